"""The stitching report section (docs/method.md §2): penalties per stitch point and stitching layer, mean ±
std over pairs and repeats with Student-t intervals, under both protocols; the choices made on the validation
split (:mod:`symstitch.selection`); and the paper's qualitative findings tested on the numbers: verdicts
computed from the data, never assumed.

Files: ``stitch.csv`` (one row per cell and protocol), ``stitch_selection.csv`` (one row per candidate of a
choice), ``stitch_bars.png`` and ``stitch_penalty.png``; where lasso stitches ran at several λ,
``stitch_lasso.csv`` and ``stitch_lasso.png`` (penalty and non-zero entries of W against λ).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from symstitch import plots, selection
from symstitch.reports import Section
from symstitch.reports.common import (CONFIDENCE, interval_half_width, interval_stats, machines_note, mean_std, points_text,
                                      rho_text, spearman, warn, write_csv)
from symstitch.stitching.record import PROTOCOLS, as_number, penalty_of, record_key

#: stitching layers that realise G_ReLU (a permutation times positive scales)
G_RELU_LAYERS = ("birkhoff", "softsort")
#: unconstrained stitching
STANDARD_LAYER = "standard"
#: our reading of "near zero" for unconstrained stitching, in points of accuracy (not a number from the paper)
NEAR_ZERO_POINTS = 2.0
#: how far below the unconstrained stitch a G_ReLU stitch may land before it counts as better (optimisation noise)
NOISE_POINTS = 1.0
#: our line for "small" at the last stitch point, in points (the paper's ResNet-20 shows about 5 there)
SMALL_LAST_POINTS = 10.0
#: a low-rank stitch as the paper's yardstick names it in a sweep: lowrank:rank=<r>
LOW_RANK = re.compile(r"^lowrank:rank=(\d+)$")

COLUMNS = ["arch", "source", "target", "layer", "protocol", "point", "point_index", "repeat", "penalty_pts",
                  "stitched_acc",
                  "source_acc", "target_acc", "selected"]
#: one row per candidate of a choice on the validation split (:mod:`symstitch.selection`), per protocol
SELECTION_COLUMNS = ["arch", "source", "target", "layer", "series", "protocol", "point", "point_index", "repeat",
                     "option", "value", "val_stitched_acc", "penalty_pts", "stitched_acc", "chosen"]


def report(records: list[dict], out: Path) -> Section:
    """``stitch.csv``, ``stitch_selection.csv`` (when choices were made), the figures, the per-point tables and
    the verdicts (``stats``: ``stitch/<arch>/<series>/<claim>_verdict``)."""
    selections = selection.select(records)
    rows = stitch_rows(records, selections)
    section = Section(csvs={"stitch": write_csv(out / "stitch.csv", COLUMNS, rows)})
    if selections:
        section.csvs["stitch_selection"] = write_csv(out / "stitch_selection.csv", SELECTION_COLUMNS,
                                                     _selection_rows(selections))
    if rows:
        section.lines, section.figures, info = _lines(rows, out, selections, machines_note(records))
        for claim, verdicts in info["verdicts"].items():
            for arch, layer, verdict in verdicts:
                section.stats[f"stitch/{arch}/{layer}/{claim}_verdict"] = verdict
    elif selections:  # choices were made nowhere yet: say why
        section.lines = ["## Stitching", "", *_selection_section(selections)]
    lasso = lasso_rows(records)
    if len({r["lam"] for r in lasso}) > 1:
        section.csvs["stitch_lasso"] = write_csv(out / "stitch_lasso.csv", LASSO_COLUMNS, lasso)
        lines, figure = _lasso_lines(lasso, out, machines_note(records))
        section.lines += lines
        section.figures.append(figure)
    return section


#: the lasso stitch (T = W, λ‖W‖_1 in the loss) and the columns of ``stitch_lasso.csv``
LASSO_LAYER = "lasso"
LASSO_COLUMNS = ["arch", "source", "target", "point", "repeat", "lam", "protocol", "penalty_pts", "nonzero"]


def lasso_rows(records: list[dict]) -> list[dict]:
    """One row per lasso cell and protocol: its λ and the fraction of non-zero entries of its hardened W (both
    from the learned layer's summary), and its penalty in points."""
    rows = []
    for rec in records:
        c, r = rec.get("cell") or {}, rec.get("result") or {}
        model = r.get("model") or {}
        if str(c.get("layer", "")).split(":", 1)[0] != LASSO_LAYER or "sparsity" not in model:
            continue
        for protocol, (penalty, _) in PROTOCOL_KEYS.items():
            if penalty in r:
                rows.append({"arch": c["arch"], "source": c["source"], "target": c["target"], "point": c["point"],
                             "repeat": c.get("repeat", 0), "lam": float(model["lam"]), "protocol": protocol,
                             "penalty_pts": as_number(r[penalty]), "nonzero": 1.0 - float(model["sparsity"])})
    return sorted(rows, key=lambda r: (r["arch"], r["point"], r["lam"], r["protocol"], r["source"], r["target"]))


def lasso_summary(rows: list[dict]) -> list[dict]:
    """Per (arch, point, protocol) in depth order of first appearance: λ ascending, and per λ the penalty and the
    non-zero fraction, each ``{"mean", "std", "n", "half"}`` over pairs and repeats."""
    summary = []
    for arch, point, protocol in dict.fromkeys((r["arch"], r["point"], r["protocol"]) for r in rows):
        mine = [r for r in rows if (r["arch"], r["point"], r["protocol"]) == (arch, point, protocol)]
        lams = sorted({r["lam"] for r in mine})
        summary.append({"arch": arch, "point": point, "protocol": protocol, "lams": lams,
                        "penalty": [interval_stats([r["penalty_pts"] for r in mine if r["lam"] == l]) for l in lams],
                        "nonzero": [interval_stats([r["nonzero"] for r in mine if r["lam"] == l]) for l in lams]})
    return summary


def _lasso_lines(rows: list[dict], out: Path, note: str) -> tuple[list[str], Path]:
    summary = lasso_summary(rows)
    figure = plots.stitch_lasso(summary, out / "stitch_lasso.png", note)
    lines = ["### The lasso stitch against λ", "",
             "T = W with λ‖W‖_1 in the loss; after training, entries below the threshold are pruned. Penalty in points "
             f"and the fraction of non-zero entries of W, mean ± {100 * CONFIDENCE:.0f} % t-interval over pairs and "
             "repeats (n):", "", f"![lasso penalty and sparsity against λ]({figure.name})", "",
             "Data: [stitch_lasso.csv](stitch_lasso.csv)", "",
             "| arch | point | protocol | λ | penalty (points) | non-zero entries |", "|---|---|---|---|---|---|"]
    for s in summary:
        for lam, pen, nz in zip(s["lams"], s["penalty"], s["nonzero"]):
            half = f" ± {pen['half']:.2f}" if math.isfinite(pen["half"]) else ""
            nz_half = f" ± {100 * nz['half']:.1f}" if math.isfinite(nz["half"]) else ""
            lines.append(f"| {s['arch']} | {s['point']} | {s['protocol']} | {lam:g} | {pen['mean']:.2f}{half} "
                         f"({pen['n']}) | {100 * nz['mean']:.1f}{nz_half} % |")
    return lines + [""], figure


#: evaluation protocol → (penalty key, stitched-accuracy key) in a stitch record (docs/method.md §2: both are reported)
PROTOCOL_KEYS = {protocol: (record_key("penalty", protocol), record_key("stitched", protocol)) for protocol in PROTOCOLS}


def series_name(layer: str, protocol: str) -> str:
    """How a layer under a protocol is named in summaries and figures: ``birkhoff``, ``birkhoff/recalibrated``."""
    return layer if protocol == "frozen" else f"{layer}/{protocol}"


def stitch_rows(records: list[dict], selections: Optional[list[selection.Selection]] = None) -> list[dict]:
    """One row per cell and protocol it reports (a protocol the cell did not run has no row). The candidates of a
    choice on the validation split have no rows of their own: each choice made (``selections``, by default
    :func:`symstitch.selection.select` of ``records``) is one row of the layer ``series`` (``birkhoff (cv
    alpha)``) holding the chosen candidate's test numbers, and ``selected`` says which (``alpha=0.1``)."""
    rows = []
    for chosen in (selection.select(records) if selections is None else selections):
        if chosen.chosen is not None:
            c = chosen.chosen
            rows.append({"arch": chosen.arch, "source": chosen.source, "target": chosen.target,
                         "layer": chosen.series, "point": chosen.point, "point_index": chosen.point_index,
                         "repeat": chosen.repeat, "source_acc": c.source_acc, "target_acc": c.target_acc,
                         "protocol": chosen.protocol, "penalty_pts": c.penalty_pts, "stitched_acc": c.stitched_acc,
                         "selected": chosen.chosen_text})
    for rec in records:
        if selection.is_candidate(rec):
            continue
        c, r = rec["cell"], rec["result"]
        try:
            base = {"arch": str(c["arch"]), "source": str(c["source"]), "target": str(c["target"]),
                    "layer": str(c["layer"]), "point": str(c["point"]), "point_index": c.get("point_index"),
                    "repeat": c.get("repeat", 0), "source_acc": as_number(r.get("source_acc")),
                    "target_acc": as_number(r.get("target_acc"))}
            penalties = {protocol: penalty_of(r, protocol) for protocol in PROTOCOLS}
        except KeyError as e:
            warn(f"skipping stitch cell {rec.get('file')}: missing {e}")
            continue
        for protocol, (_, acc_key) in PROTOCOL_KEYS.items():
            if math.isfinite(penalties[protocol]):
                rows.append({**base, "protocol": protocol, "penalty_pts": penalties[protocol],
                             "stitched_acc": as_number(r.get(acc_key))})
    key = lambda r: (r["arch"], r["layer"], r["protocol"],  # noqa: E731
                     r["point_index"] if r["point_index"] is not None else 1 << 30, r["point"], r["source"],
                     r["target"], str(r["repeat"]))
    return sorted(rows, key=key)


def _point_order(rows: list[dict]) -> list[str]:
    """Stitch points in depth order (``point_index``; order of appearance where it is missing)."""
    index: dict[str, float] = {}
    for i, r in enumerate(rows):
        pi = r["point_index"]
        rank = float(pi) if isinstance(pi, (int, float)) and not isinstance(pi, bool) else 1e9 + i
        index[r["point"]] = min(index.get(r["point"], rank), rank)
    return sorted(index, key=lambda p: (index[p], p))


def _layer_order(series: str) -> tuple:
    """The paper's order of stitching layers: full, low-rank by falling rank, then the others (G_ReLU …)."""
    layer = series.split("/", 1)[0]
    rank = LOW_RANK.match(layer)
    group = 0 if layer == STANDARD_LAYER else 1 if rank else 2
    return group, -int(rank.group(1)) if rank else 0, series


def stitch_summary(rows: list[dict]) -> dict[str, dict]:
    """``{arch: {"points": [...], "layers": {series: {"points", "mean", "std", "n"}}}}``, penalties in points; a
    series is a layer under one protocol (:func:`series_name`)."""
    summary: dict[str, dict] = {}
    for arch in sorted({r["arch"] for r in rows}):
        arch_rows = [{**r, "series": series_name(r["layer"], r.get("protocol", "frozen"))}
                     for r in rows if r["arch"] == arch]
        points = _point_order(arch_rows)
        layers = {}
        for layer in sorted({r["series"] for r in arch_rows}, key=_layer_order):
            pts, means, stds, ns = [], [], [], []
            for p in points:
                vals = [r["penalty_pts"] for r in arch_rows if r["series"] == layer and r["point"] == p]
                m, s, n = mean_std(vals)
                if n:
                    pts.append(p), means.append(m), stds.append(s), ns.append(n)
            layers[layer] = {"points": pts, "mean": means, "std": stds, "n": ns}
        pairs = sorted({(r["source"], r["target"]) for r in arch_rows})
        summary[arch] = {"points": points, "layers": layers, "pairs": pairs,
                         "repeats": sorted({str(r["repeat"]) for r in arch_rows})}
    return summary


def _is_g_relu(layer: str) -> bool:
    """A G_ReLU layer by its series name: ``birkhoff``, ``birkhoff:alpha=0.1``, ``birkhoff (cv alpha)``, …"""
    name = layer.lower()
    return any(name == g or re.match(rf"{g}[_\-./: ]", name) for g in G_RELU_LAYERS)


def _by_point(series: dict) -> dict[str, float]:
    return dict(zip(series["points"], series["mean"]))


def _shared(g: dict[str, float], other: dict[str, float]) -> list[str]:
    return [p for p in g if p in other and math.isfinite(g[p]) and math.isfinite(other[p])]


def g_relu_vs_full(g: dict[str, float], full: dict[str, float]) -> tuple[str, str]:
    """Paper: the G_ReLU stitch is never better than the unconstrained one (it is a special case of it). Agrees
    when at every point the G_ReLU mean is at least the full mean minus NOISE_POINTS (optimisation noise)."""
    points = _shared(g, full)
    if not points:
        return "cannot be tested", "no stitch point with both layers"
    below = [p for p in points if g[p] < full[p] - NOISE_POINTS]
    evidence = (f"G_ReLU ≥ full − {NOISE_POINTS:g} pts at {len(points) - len(below)} of {len(points)} points"
                + (f" (below at {', '.join(f'{p}: {points_text(g[p])} vs {points_text(full[p])}' for p in below)})" if below else ""))
    return ("agrees" if not below else "does not agree"), evidence


def g_relu_vs_ranks(g: dict[str, float], ranks: dict[int, dict[str, float]]) -> tuple[str, str]:
    """Paper: at most points the G_ReLU penalty lies between the rank-1 and rank-4 stitches. The verdict is on
    "G_ReLU ≤ rank 1 at more than half of the points"; the evidence also says where it falls against rank 2
    and rank 4 (and any other rank run)."""
    if 1 not in ranks:
        return "cannot be tested", "no rank-1 stitch (lowrank:rank=1) in these results"
    parts, verdict = [], "cannot be tested"
    for r in sorted(ranks):
        points = _shared(g, ranks[r])
        if not points:
            continue
        k = sum(g[p] <= ranks[r][p] for p in points)
        parts.append(f"G_ReLU ≤ rank {r} at {k} of {len(points)} points")
        if r == 1:
            verdict = "agrees" if 2 * k > len(points) else "does not agree"
    return verdict, "; ".join(parts) or "no stitch point with both layers"


def g_relu_last(g_means: list[float], points: list[str]) -> tuple[str, str]:
    """Paper: the G_ReLU penalty is small at the last stitch point. Agrees when the last point's mean is at most
    SMALL_LAST_POINTS (our line) and below the mean over the other points."""
    finite = [(p, m) for p, m in zip(points, g_means) if math.isfinite(m)]
    if len(finite) < 2:
        return "cannot be tested", "fewer than 2 stitch points"
    (last_point, last), others = finite[-1], [m for _, m in finite[:-1]]
    rest = float(np.mean(others))
    ok = last <= SMALL_LAST_POINTS and last < rest
    return ("agrees" if ok else "does not agree"), (
        f"last point {last_point}: {points_text(last)} pts ({'≤' if last <= SMALL_LAST_POINTS else '>'} "
        f"{SMALL_LAST_POINTS:g}; mean over the other points {points_text(rest)})")


def standard_verdict(means: list[float]) -> tuple[str, str]:
    """Paper: unconstrained stitching has a penalty near zero (ours: every mean ≤ NEAR_ZERO_POINTS)."""
    finite = [m for m in means if math.isfinite(m)]
    if not finite:
        return "cannot be tested", "no penalties"
    worst = max(finite)
    ok = worst <= NEAR_ZERO_POINTS
    return ("agrees" if ok else "does not agree"), (
        f"max mean penalty {points_text(worst)} pts {'≤' if ok else '>'} {NEAR_ZERO_POINTS:g} pts")


def _per_point_table(s: dict) -> list[str]:
    """Per layer and point: mean ± sample std and the 95 % t-interval of the mean, over pairs and repeats."""
    points = s["points"]
    lines = [f"Penalty per point, mean ± std [{100 * CONFIDENCE:.0f} % t-interval of the mean] (n). The spread is "
             "between independently trained networks; pairs that share a network are not independent, so with few "
             "networks the interval is, if anything, too narrow.", "",
             "| layer | " + " | ".join(f"`{p}`" for p in points) + " |", "|---|" + "---|" * len(points)]
    for layer, ls in s["layers"].items():
        cells = []
        for p in points:
            if p not in ls["points"]:
                cells.append("–")
                continue
            i = ls["points"].index(p)
            m, sd, n = ls["mean"][i], ls["std"][i], ls["n"][i]
            half = interval_half_width(sd, n)
            cells.append(f"{points_text(m)} ± {points_text(sd)} [{points_text(m - half)}, {points_text(m + half)}] ({n})" if math.isfinite(half)
                         else f"{points_text(m)} ({n})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines + [""]


def _lines(rows: list[dict], out: Path, selections: Sequence[selection.Selection] = (), note: str = ""
           ) -> tuple[list[str], list[Path], dict]:
    summary = stitch_summary(rows)
    bars = plots.stitch_penalty_bars(summary, out / "stitch_bars.png", note)
    png = plots.stitch_penalty_plot(summary, out / "stitch_penalty.png", note)
    lines = ["## Stitching", "",
             "Penalty = (acc(source) + acc(target))/2 − acc(stitched), in points of test accuracy (×100); "
             "mean over pairs and repeats, error bars: sample standard deviation (none where n = 1), the tables below "
             "give the 95 % t-interval of each mean too. Frozen: the "
             "stitched network uses B's own BatchNorm statistics; recalibrated (the paper's protocol): the "
             "statistics of every BatchNorm after the stitch are re-estimated on the training images first.", "",
             f"![stitching penalty per stitch point and layer]({bars.name})", "",
             f"![stitching penalty per stitch point]({png.name})", "", "Data: [stitch.csv](stitch.csv)", ""]
    for arch, s in summary.items():
        lines += [f"### {arch}", "",
                  f"{len(s['pairs'])} pair(s) ({', '.join(f'{a}→{b}' for a, b in s['pairs'])}), "
                  f"{len(s['repeats'])} repeat(s), {len(s['points'])} stitch point(s), "
                  f"{len(s['layers'])} stitching layer(s).", ""]
        lines += _per_point_table(s)
        lines += ["| layer | n per point | first point | middle point | last point | max | "
                  "Spearman ρ (mean penalty vs depth) |", "|---|---|---|---|---|---|---|"]
        for layer, ls in s["layers"].items():
            m, p = ls["mean"], ls["points"]
            mid = (len(m) - 1) // 2
            imax = int(np.nanargmax(m)) if any(math.isfinite(x) for x in m) else 0
            n_text = str(ls["n"][0]) if len(set(ls["n"])) == 1 else f"{min(ls['n'])}–{max(ls['n'])}"
            lines.append(f"| {layer} | {n_text} | {points_text(m[0])} ({p[0]}) | {points_text(m[mid])} ({p[mid]}) | "
                         f"{points_text(m[-1])} ({p[-1]}) | {points_text(m[imax])} ({p[imax]}) | {rho_text(spearman(m))} |")
        lines.append("")
    if selections:
        lines += _selection_section(list(selections))
    lines += ["### Against the paper's findings", "",
              "Verdicts are computed from the numbers above, nothing else, for each evaluation protocol (frozen: "
              "B's own BatchNorm statistics; recalibrated: re-estimated after the stitch, the paper's). The paper's "
              "claims (docs/method.md §2), G_ReLU meaning the layers " + ", ".join(f"`{g}`" for g in G_RELU_LAYERS) + ":", "",
              f"(a) G_ReLU ≥ full: the constrained stitch never beats the unconstrained `{STANDARD_LAYER}` one (up to "
              f"{NOISE_POINTS:g} point of noise, ours). (b) At most points G_ReLU lies between the rank-1 and rank-4 "
              "stitches: tested as G_ReLU ≤ rank 1 at more than half of the points, with where it falls against "
              f"rank 2 and rank 4. (c) G_ReLU is small at the last point (≤ {SMALL_LAST_POINTS:g} points, ours, and "
              f"below its mean elsewhere). (d) Unconstrained stitching is near zero (≤ {NEAR_ZERO_POINTS:g} points at "
              "every point, ours).", ""]
    verdicts: dict[str, list] = {"g_relu_vs_full": [], "g_relu_vs_ranks": [], "g_relu_last": [], "standard": []}
    for arch, s in summary.items():
        for protocol in PROTOCOL_KEYS:
            series = {name: ls for name, ls in s["layers"].items()
                      if (name.split("/", 1) + ["frozen"])[1] == protocol}
            if not series:
                continue
            base = {name.split("/", 1)[0]: ls for name, ls in series.items()}
            full = base.get(STANDARD_LAYER)
            ranks = {int(m.group(1)): _by_point(ls) for name, ls in base.items() if (m := LOW_RANK.match(name))}
            lines.append(f"**{arch}, {protocol}:**")
            lines.append("")
            for layer, ls in base.items():
                if not _is_g_relu(layer):
                    continue
                g = _by_point(ls)
                found = [("g_relu_vs_full", "(a)", g_relu_vs_full(g, _by_point(full)) if full else
                          ("cannot be tested", f"no `{STANDARD_LAYER}` stitch in these results")),
                         ("g_relu_vs_ranks", "(b)", g_relu_vs_ranks(g, ranks)),
                         ("g_relu_last", "(c)", g_relu_last(ls["mean"], ls["points"]))]
                for kind, tag, (verdict, evidence) in found:
                    verdicts[kind].append((arch, series_name(layer, protocol), verdict))
                    lines.append(f"- {tag} `{layer}`: {evidence} → **{verdict}**.")
            if full:
                verdict, evidence = standard_verdict(full["mean"])
                verdicts["standard"].append((arch, series_name(STANDARD_LAYER, protocol), verdict))
                lines.append(f"- (d) `{STANDARD_LAYER}`: {evidence} → **{verdict}**.")
            lines.append("")
    return lines, [bars, png], {"summary": summary, "verdicts": verdicts}


def _selection_rows(selections: list[selection.Selection]) -> list[dict]:
    """One row per candidate of every choice (``stitch_selection.csv``); ``chosen`` 1 for the chosen one."""
    rows = []
    for sel in selections:
        for c in sel.candidates:
            rows.append({"arch": sel.arch, "source": sel.source, "target": sel.target, "layer": sel.layer,
                         "series": sel.series, "protocol": sel.protocol, "point": sel.point,
                         "point_index": sel.point_index, "repeat": sel.repeat, "option": sel.option,
                         "value": selection.value_text(c.value), "val_stitched_acc": c.val_acc,
                         "penalty_pts": c.penalty_pts, "stitched_acc": c.stitched_acc,
                         "chosen": int(sel.chosen is c)})
    return rows


def _selection_section(selections: list[selection.Selection]) -> list[str]:
    """Per choice and architecture: the rule, then per stitch point and protocol the chosen values (their
    distribution over pairs × repeats), the test penalty at the chosen value (mean ± std), and for comparison
    each candidate's mean validation accuracy and test penalty; the points, pairs and repeats with no choice."""
    lines = ["### Options chosen on the validation split", "",
             "A layer named `… (cv <option>)` is the paper's cross-validated variant: for every stitch point, pair "
             "and repeat, the option is chosen among its candidates by the stitched network's accuracy on the "
             "held-out validation split (carved from the training set, never seen by the stitch's training), "
             "under each protocol by that protocol's validation accuracy; ties go to the smallest value (the "
             "first listed, for values that are not numbers); nothing is chosen where a candidate's validation "
             "accuracy is missing. Its penalty is the chosen candidate's test penalty: the test split plays no "
             "part in the choice. The per-candidate test penalties are shown for comparison only. Every "
             "candidate: [stitch_selection.csv](stitch_selection.csv).", ""]
    for arch, series in dict.fromkeys((s.arch, s.series) for s in selections):
        group = [s for s in selections if (s.arch, s.series) == (arch, series)]
        option = group[0].option
        values = list(dict.fromkeys(c.value for s in group for c in s.candidates))
        points = _point_order([{"point": s.point, "point_index": s.point_index} for s in group])
        pairs = sorted({(s.source, s.target) for s in group})
        lines += [f"**{arch}, `{series}`**: {option} ∈ {{{', '.join(map(selection.value_text, values))}}}, "
                  f"{len(pairs)} pair(s), {len({str(s.repeat) for s in group})} repeat(s).", "",
                  f"| point | protocol | chosen {option} (times) | test penalty at the chosen {option} | "
                  f"per {option}: mean validation accuracy / mean test penalty |", "|---|---|---|---|---|"]
        for point in points:
            for protocol in PROTOCOLS:
                here = [s for s in group if s.point == point and s.protocol == protocol]
                if not here:
                    continue
                made = [s for s in here if s.chosen is not None]
                counts = {v: sum(s.chosen.value == v for s in made) for v in values}
                chosen = ", ".join(f"{selection.value_text(v)} ×{n}" for v, n in counts.items() if n) or "none"
                m, sd, n = mean_std([s.chosen.penalty_pts for s in made])
                penalty = f"{points_text(m)} ± {points_text(sd)} (n={n})" if n > 1 else f"{points_text(m)} (n={n})"
                per_value = []
                for v in values:
                    cands = [c for s in here for c in s.candidates if c.value == v]
                    acc = mean_std([c.val_acc for c in cands])[0]
                    pen = mean_std([c.penalty_pts for c in cands])[0]
                    per_value.append(f"{selection.value_text(v)}: "
                                     f"{'n/a' if not math.isfinite(acc) else f'{100 * acc:.1f} %'} / {points_text(pen)}")
                lines.append(f"| {point} | {protocol} | {chosen} | {penalty} | {' · '.join(per_value)} |")
        lines.append("")
        incomplete = [s for s in group if s.chosen is None]
        if incomplete:
            lines += [f"No choice ({len(incomplete)}): a candidate's cell is missing, or lacks the validation "
                      "accuracy or the test penalty of that protocol:", ""]
            lines += [f"- {s.source}→{s.target} at {s.point}, repeat {s.repeat}, {s.protocol}: missing "
                      f"{', '.join(f'{option}={selection.value_text(v)}' for v in s.missing)}" for s in incomplete]
            lines.append("")
    return lines
