"""``symstitch report RESULTS_DIR``: tidy tables, figures and a markdown report from sweep results.

A sweep (``symstitch sweep``) leaves one JSON file per finished cell under ``<out>/cells/``::

    {"experiment": "stitch" | "align" | "projection" | "zoo", "key": …, "cell": {…}, "result": {…},
     "seconds": …, "finished": "YYYY-mm-ddTHH:MM:SS"}

:func:`collect` gathers every such file below a folder (one sweep folder, or a folder holding several);
:func:`write_report` turns them into

- tidy CSVs: ``stitch.csv`` (one row per cell), ``align.csv`` (one row per pair, metric and pair of points),
  ``zoo.csv`` (one row per model); projection cells go through :func:`projection_files` into ``projection/``
  (``projection.csv``, ``projection.png``, ``projection.md``);
- figures, drawn by :mod:`symstitch.plots`: ``stitch_penalty.png`` (penalty against stitch point, one line per
  stitching layer, mean ± standard deviation over pairs and repeats), ``align_<metric>.png`` (mean similarity
  over pairs for every pair of points) and ``align_diagonal.png`` (similarity of the same point in both
  networks);
- ``report.md``: what was found, the figures, and the numbers measured from them, including a comparison with
  the paper's qualitative findings that is computed from the data, never assumed.

Similarities that were not computed (``null`` in a cell file) stay NaN throughout: empty in ``align.csv``,
grey in the heatmaps, left out of every mean.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy.stats import spearmanr

from symstitch import plots, selection
from symstitch.loggers import wandb_group, wandb_run
from symstitch.stitching.record import PROTOCOLS, as_number, penalty_of, record_key

EXPERIMENTS = ("zoo", "stitch", "align", "projection")

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

STITCH_COLUMNS = ["arch", "source", "target", "layer", "protocol", "point", "point_index", "repeat", "penalty_pts",
                  "stitched_acc",
                  "source_acc", "target_acc", "selected"]
#: one row per candidate of a choice on the validation split (:mod:`symstitch.selection`), per protocol
SELECTION_COLUMNS = ["arch", "source", "target", "layer", "series", "protocol", "point", "point_index", "repeat",
                     "option", "value", "val_stitched_acc", "penalty_pts", "stitched_acc", "chosen"]
ALIGN_COLUMNS = ["arch", "source", "target", "metric", "cka_mode", "point_a", "point_b", "value"]
ZOO_COLUMNS = ["arch", "seed", "dataset", "test_acc"]
PROJECTION_COLUMNS = ["network", "family", "arch", "activation", "point", "layer", "matrix", "retrain", "repeat",
                      "clean_acc", "inserted_acc", "recovered_acc", "epochs", "lr", "train_fraction"]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Reading the cell files


def _cell_files(root: Path) -> list[Path]:
    files = {p.resolve(): p for p in root.rglob("cells/**/*.json") if p.is_file()}
    if root.name == "cells":  # the cells folder itself was given
        files.update({p.resolve(): p for p in root.rglob("*.json") if p.is_file()})
    return [files[k] for k in sorted(files)]


def collect(root: Path, skipped: Optional[list[tuple[Path, str]]] = None) -> dict[str, list[dict]]:
    """Every cell result below ``root``, grouped by experiment: ``{experiment: [record, …]}``.

    A record is the cell file's content plus ``"file"`` (its path). Files that do not parse, or are not cell
    results (no ``experiment``, no ``cell``/``result`` objects), are skipped with a warning, and listed with the
    reason in ``skipped`` when given.
    """
    root = Path(root)
    found: dict[str, list[dict]] = {}

    def skip(path: Path, why: str) -> None:
        _warn(f"skipping {path}: {why}")
        if skipped is not None:
            skipped.append((path, why))

    for path in _cell_files(root):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skip(path, f"not readable JSON ({e})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("experiment"), str):
            skip(path, "not a cell result (no \"experiment\")")
            continue
        if not isinstance(record.get("cell", {}), dict) or not isinstance(record.get("result"), dict):
            skip(path, "not a cell result (no \"result\" object)")
            continue
        record.setdefault("cell", {})
        record["file"] = str(path)
        found.setdefault(record["experiment"], []).append(record)
    return found


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    return path


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (NaN when n < 2) and n of the finite values."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


#: confidence of every interval of a mean in the reports (two-sided Student t)
CONFIDENCE = 0.95
GAP_CONFIDENCE = CONFIDENCE


def interval_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided Student-t interval of a mean over n values: t_{n−1} · std / √n (NaN when
    n < 2). It measures the spread of what was sampled — in a stitch sweep, independently trained networks."""
    from scipy.stats import t as student_t

    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(student_t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)


def _machine_counts(records: Iterable[dict]) -> Counter:
    return Counter(", ".join(f"{k} {v}" for k, v in sorted((r.get("machine") or {}).items())) or "not recorded"
                   for r in records)


def _machines(records: list[dict]) -> list[str]:
    """Which machines computed the cells: numbers from short training runs move with the CPU's instruction path
    (and the accelerator), so a report says where its numbers came from."""
    seen = _machine_counts(records)
    if not seen:
        return []
    return ["Computed on: " + "; ".join(f"{m} ({n} cell{'s' if n > 1 else ''})" for m, n in seen.most_common()), ""]


def machines_note(records: Iterable[dict]) -> str:
    """The machines of a figure's cells in one line (for its footnote)."""
    seen = _machine_counts(records)
    return "computed on " + "; ".join(m for m, _ in seen.most_common()) if seen else ""


def _spearman(values: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation of ``values`` against their position; None when undefined."""
    v = [x for x in values if math.isfinite(x)]
    if len(v) < 3 or len(v) != len(values) or max(v) == min(v):
        return None
    rho = float(spearmanr(np.arange(len(v)), v).statistic)
    return rho if math.isfinite(rho) else None


def _pts(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.2f}"


def _rho(rho: Optional[float]) -> str:
    return "undefined" if rho is None else f"{rho:+.3f}"


def _sim(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


# ----------------------------------------------------------------------------------------------------------
# Stitching


#: evaluation protocol → (penalty key, stitched-accuracy key) in a stitch record (docs/method.md §2: both are reported)
PROTOCOL_KEYS = {protocol: (record_key("penalty", protocol), record_key("stitched", protocol)) for protocol in PROTOCOLS}


def series_name(layer: str, protocol: str) -> str:
    """How a layer under a protocol is named in summaries and figures: ``birkhoff``, ``birkhoff/recalibrated``."""
    return layer if protocol == "frozen" else f"{layer}/{protocol}"


def _stitch_rows(records: list[dict], selections: Optional[list[selection.Selection]] = None) -> list[dict]:
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
            _warn(f"skipping stitch cell {rec.get('file')}: missing {e}")
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
                m, s, n = _mean_std(vals)
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
                + (f" (below at {', '.join(f'{p}: {_pts(g[p])} vs {_pts(full[p])}' for p in below)})" if below else ""))
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
        f"last point {last_point}: {_pts(last)} pts ({'≤' if last <= SMALL_LAST_POINTS else '>'} "
        f"{SMALL_LAST_POINTS:g}; mean over the other points {_pts(rest)})")


def standard_verdict(means: list[float]) -> tuple[str, str]:
    """Paper: unconstrained stitching has a penalty near zero (ours: every mean ≤ NEAR_ZERO_POINTS)."""
    finite = [m for m in means if math.isfinite(m)]
    if not finite:
        return "cannot be tested", "no penalties"
    worst = max(finite)
    ok = worst <= NEAR_ZERO_POINTS
    return ("agrees" if ok else "does not agree"), (
        f"max mean penalty {_pts(worst)} pts {'≤' if ok else '>'} {NEAR_ZERO_POINTS:g} pts")


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
            cells.append(f"{_pts(m)} ± {_pts(sd)} [{_pts(m - half)}, {_pts(m + half)}] ({n})" if math.isfinite(half)
                         else f"{_pts(m)} ({n})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines + [""]


def _stitch_section(rows: list[dict], out: Path, selections: Sequence[selection.Selection] = (), note: str = ""
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
            lines.append(f"| {layer} | {n_text} | {_pts(m[0])} ({p[0]}) | {_pts(m[mid])} ({p[mid]}) | "
                         f"{_pts(m[-1])} ({p[-1]}) | {_pts(m[imax])} ({p[imax]}) | {_rho(_spearman(m))} |")
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
                m, sd, n = _mean_std([s.chosen.penalty_pts for s in made])
                penalty = f"{_pts(m)} ± {_pts(sd)} (n={n})" if n > 1 else f"{_pts(m)} (n={n})"
                per_value = []
                for v in values:
                    cands = [c for s in here for c in s.candidates if c.value == v]
                    acc = _mean_std([c.val_acc for c in cands])[0]
                    pen = _mean_std([c.penalty_pts for c in cands])[0]
                    per_value.append(f"{selection.value_text(v)}: "
                                     f"{'n/a' if not math.isfinite(acc) else f'{100 * acc:.1f} %'} / {_pts(pen)}")
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


# ----------------------------------------------------------------------------------------------------------
# Alignment


def _per_metric(record: dict) -> list[dict]:
    """An align record (one pair, ``result: {"metrics": {metric: matrix}}``) as one record per metric."""
    metrics = record["result"].get("metrics")
    if not isinstance(metrics, dict):
        return [record]  # one metric per record (the layout of earlier versions)
    return [{**record, "cell": {**record["cell"], "metric": metric}, "result": matrix}
            for metric, matrix in metrics.items()]


def _align_rows(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Tidy rows and the per-record matrices (``{arch, source, target, metric, points_a, points_b, values}``)."""
    records = [one for rec in records for one in _per_metric(rec)]
    modes: dict[str, set] = {}
    for rec in records:
        modes.setdefault(str(rec["cell"].get("metric")), set()).add(rec["cell"].get("cka_mode"))
    rows, mats = [], []
    for rec in records:
        c, r = rec["cell"], rec["result"]
        try:
            pa, pb = [str(p) for p in r["points_a"]], [str(p) for p in r["points_b"]]
            values = np.array([[as_number(v) for v in row] for row in r["values"]], dtype=float).reshape(len(pa), len(pb))
            metric = str(c["metric"])
            arch, source, target = str(c.get("arch", "")), str(c["source"]), str(c["target"])
        except (KeyError, TypeError, ValueError) as e:
            _warn(f"skipping align cell {rec.get('file')}: malformed ({type(e).__name__}: {e})")
            continue
        label = metric if len(modes.get(metric, ())) <= 1 else f"{metric}_{c.get('cka_mode')}"
        mats.append({"arch": arch, "source": source, "target": target, "metric": label, "points_a": pa,
                     "points_b": pb, "values": values, "errors": r.get("errors") or {}})
        for i, a in enumerate(pa):
            for j, b in enumerate(pb):
                rows.append({"arch": arch, "source": source, "target": target, "metric": label,
                             "cka_mode": c.get("cka_mode"), "point_a": a, "point_b": b, "value": values[i, j]})
    rows.sort(key=lambda r: (r["arch"], r["metric"], r["source"], r["target"]))
    return rows, mats


def _union(lists: Iterable[list[str]]) -> list[str]:
    return list(dict.fromkeys(p for lst in lists for p in lst))


def align_summary(mats: list[dict]) -> dict[tuple[str, str], dict]:
    """``{(metric, arch): {...}}``: the mean over pairs of every (point A, point B), NaN where never computed."""
    summary = {}
    for metric, arch in sorted({(m["metric"], m["arch"]) for m in mats}):
        group = [m for m in mats if (m["metric"], m["arch"]) == (metric, arch)]
        pa, pb = _union(m["points_a"] for m in group), _union(m["points_b"] for m in group)
        stack = np.full((len(group), len(pa), len(pb)), np.nan)
        for k, m in enumerate(group):
            ia = [pa.index(p) for p in m["points_a"]]
            ib = [pb.index(p) for p in m["points_b"]]
            stack[k][np.ix_(ia, ib)] = m["values"]
        counts = np.isfinite(stack).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(counts > 0, np.nansum(stack, 0) / np.maximum(counts, 1), np.nan)
        raw_nan = int(sum(np.isnan(m["values"]).sum() for m in group))
        raw_total = int(sum(m["values"].size for m in group))
        diag = [(pa.index(p), pb.index(p)) for p in pa if p in pb]
        diag_set = set(diag)
        diag_vals = [mean[i, j] for i, j in diag if np.isfinite(mean[i, j])]
        off_vals = [mean[i, j] for i in range(len(pa)) for j in range(len(pb))
                    if (i, j) not in diag_set and np.isfinite(mean[i, j])]
        on_diag, rows_counted = 0, 0
        for i, j in diag:
            row = mean[i]
            if not np.isfinite(row).any() or not np.isfinite(mean[i, j]):
                continue
            rows_counted += 1
            on_diag += bool(mean[i, j] >= np.nanmax(row))
        summary[(metric, arch)] = {
            "points_a": pa, "points_b": pb, "mean": mean, "stack": stack,
            "pairs": [(m["source"], m["target"]) for m in group],
            "same_points": all(m["points_a"] == m["points_b"] for m in group),
            "diag_mean": float(np.mean(diag_vals)) if diag_vals else math.nan,
            "off_mean": float(np.mean(off_vals)) if off_vals else math.nan,
            "rows_on_diag": on_diag, "rows_counted": rows_counted,
            "nan_raw": raw_nan, "total_raw": raw_total, "nan_mean": int(np.isnan(mean).sum()),
            "errors": sum(len(m["errors"]) for m in group),
        }
    return summary


def align_diagonal(summary: dict[tuple[str, str], dict]) -> dict[str, dict]:
    """Similarity of point p of A with the same point p of B, for the architectures whose pairs have the same
    points in both networks: ``{arch: {"metrics": [...], "points": [...], "bars": {point: [(metric index, mean,
    std), …]}, "pairs": max pairs over the metrics}}``; mean and sample std over pairs (std NaN where n < 2)."""
    diagonal = {}
    for arch in sorted({arch for (_, arch), s in summary.items() if s["same_points"]}):
        metrics = [(metric, s) for (metric, a), s in summary.items() if a == arch and s["same_points"]]
        points = _union(s["points_a"] for _, s in metrics)
        bars: dict[str, list[tuple[int, float, float]]] = {}
        for p in points:
            bars[p] = []
            for g, (_, s) in enumerate(metrics):
                if p not in s["points_a"]:
                    continue
                i, j = s["points_a"].index(p), s["points_b"].index(p)
                m, sd, n = _mean_std(list(s["stack"][:, i, j]))
                bars[p].append((g, m, sd if n > 1 else math.nan))
        diagonal[arch] = {"metrics": [m for m, _ in metrics], "points": points, "bars": bars,
                          "pairs": max(len(s["pairs"]) for _, s in metrics)}
    return diagonal


def _align_section(mats: list[dict], out: Path) -> tuple[list[str], list[Path], dict]:
    summary = align_summary(mats)
    pngs = []
    for metric in sorted({m for m, _ in summary}):
        pngs.append(plots.align_heatmap(metric, [(a, s) for (m, a), s in summary.items() if m == metric],
                                        out / f"align_{_safe_name(metric)}.png"))
    diagonal = align_diagonal(summary)
    diag_png = plots.align_diagonal_plot(diagonal, out / "align_diagonal.png") if diagonal else None
    lines = ["## Alignment", "",
             "Similarity of every point of model A with every point of model B, averaged over pairs of models "
             "(entries that were not computed are NaN and left out of the means). The diagonal is point p of A "
             "with the same point p of B.", ""]
    for png in pngs:
        lines += [f"![{png.stem}]({png.name})", ""]
    if diag_png:
        lines += [f"![similarity on the diagonal]({diag_png.name})", ""]
    lines += ["Data: [align.csv](align.csv)", "",
              "| metric | architecture | pairs | mean diagonal | mean off-diagonal | rows with their max on the "
              "diagonal | NaN entries |",
              "|---|---|---|---|---|---|---|"]
    for (metric, arch), s in summary.items():
        frac = s["rows_on_diag"] / s["rows_counted"] if s["rows_counted"] else math.nan
        frac_text = f"{s['rows_on_diag']}/{s['rows_counted']} ({frac:.0%})" if s["rows_counted"] else "n/a"
        lines.append(f"| {metric} | {arch} | {len(s['pairs'])} | {_sim(s['diag_mean'])} | {_sim(s['off_mean'])} | "
                     f"{frac_text} | {s['nan_raw']} of {s['total_raw']} |")
    lines.append("")
    nan_notes = [f"{metric} ({arch}): {s['nan_raw']} of {s['total_raw']} similarities were not computed (NaN)"
                 + (f", {s['nan_mean']} entr{'y' if s['nan_mean'] == 1 else 'ies'} of the mean heatmap "
                    "never computed in any pair (grey)" if s["nan_mean"] else "")
                 + (f"; {s['errors']} error message(s) recorded in the cell files" if s["errors"] else "")
                 for (metric, arch), s in summary.items() if s["nan_raw"] or s["errors"]]
    if nan_notes:
        lines += ["NaN entries:", ""] + [f"- {n}." for n in nan_notes] + [""]
    return lines, pngs + ([diag_png] if diag_png else []), {"summary": summary}


# ----------------------------------------------------------------------------------------------------------
# Model library and projection


def _zoo_rows(records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        c, r = rec["cell"], rec["result"]
        rows.append({"arch": r.get("arch", c.get("arch")), "seed": r.get("seed", c.get("seed")),
                     "dataset": r.get("dataset"), "test_acc": as_number(r.get("test_acc"))})
    return sorted(rows, key=lambda r: (str(r["arch"]), str(r["dataset"]), as_number(r["seed"]), str(r["seed"])))


def _zoo_section(rows: list[dict]) -> list[str]:
    lines = ["## Model library", "", "Data: [zoo.csv](zoo.csv)", "",
             "| architecture | seed | dataset | test accuracy |", "|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['test_acc']:.2f} %" if math.isfinite(r["test_acc"]) else "n/a"
        lines.append(f"| {r['arch']} | {r['seed']} | {r['dataset']} | {acc} |")
    lines += ["", "| architecture | dataset | models | mean test accuracy | std |", "|---|---|---|---|---|"]
    for arch, dataset in sorted({(str(r["arch"]), str(r["dataset"])) for r in rows}):
        m, s, n = _mean_std([r["test_acc"] for r in rows if (str(r["arch"]), str(r["dataset"])) == (arch, dataset)])
        std = f"{100 * s:.2f}" if math.isfinite(s) else "–"
        lines.append(f"| {arch} | {dataset} | {n} | {100 * m:.2f} % | {std} |" if n else
                     f"| {arch} | {dataset} | 0 | n/a | – |")
    lines.append("")
    return lines


#: the two matrix kinds the projection verdict compares, and the control (names of projection.MATRICES)
GROUP_KIND, ORTHOGONAL_KIND, CONTROL_KIND = "group", "orthogonal", "identity"
#: confidence level of the interval on the orthogonal − G_σ gap


def _family(record: dict) -> str:
    """What the projection report pools over seeds and repeats: the record's ``family`` (the architecture of a
    zoo's seeds), or its network for records that do not name one."""
    return str(record.get("family") or record["network"])


def _stats(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n"}`` of the finite values (std: sample standard deviation, NaN when n < 2)."""
    mean, std, n = _mean_std(values)
    return {"mean": mean, "std": std, "n": n}


def projection_summary(records: list[dict]) -> list[dict]:
    """One series per family (:func:`_family`) and (matrix kind, retrain), in sorted order: ``{"family",
    "activation", "matrix", "retrain", "networks", "clean", "layers", "inserted", "recovered"}``.

    ``inserted`` and ``recovered`` hold, per layer, ``{"mean", "std", "n"}`` of the test accuracy over every
    cell of the series at that layer (the family's networks × repeats); ``clean`` is the same over the family's
    networks (each network once); ``activation`` comes from the family's first record."""
    series_keys = sorted({(r["matrix"], r["retrain"]) for r in records})
    summary = []
    for family in sorted({_family(r) for r in records}):
        rows = [r for r in records if _family(r) == family]
        clean = {r["network"]: r["clean_acc"] for r in rows}
        for kind, retrain in series_keys:
            by_layer: dict[int, list[dict]] = {}
            for r in rows:
                if (r["matrix"], r["retrain"]) == (kind, retrain):
                    by_layer.setdefault(r["layer"], []).append(r)
            if not by_layer:
                continue
            layers = sorted(by_layer)
            summary.append({"family": family, "activation": rows[0]["activation"], "matrix": kind,
                            "retrain": retrain, "networks": sorted(clean), "clean": _stats(list(clean.values())),
                            "layers": layers,
                            "inserted": [_stats([as_number(r["inserted_acc"]) for r in by_layer[l]]) for l in layers],
                            "recovered": [_stats([as_number(r["recovered_acc"]) for r in by_layer[l]]) for l in layers]})
    return summary


def projection_gaps(records: list[dict]) -> list[dict]:
    """How many points more an orthogonal insertion costs than a G_σ one, per family, retrain and layer.

    Cells are paired when they share network, layer, retrain and repeat (the same subset, matrix seed and
    training order, see :class:`symstitch.projection.ProjectionExperiment`); each pair gives
    d = 100 · (acc_G − acc_orth), the recovered accuracy of the G_σ cell minus that of the orthogonal one, in
    points. Per (family, retrain, layer) with at least one pair: ``{"family", "retrain", "layer", "mean",
    "std", "n", "ci"}``, mean and sample standard deviation of d over the n pairs and the two-sided
    :data:`GAP_CONFIDENCE` Student-t interval of the mean, mean ± t_{n−1} · std / √n (``ci`` is (NaN, NaN)
    when n < 2). Sorted by family, retrain, layer."""
    cells = {(_family(r), r["retrain"], r["layer"], r["network"], r["repeat"], r["matrix"]): as_number(r["recovered_acc"])
             for r in records}
    diffs: dict[tuple, list[float]] = {}
    for (family, retrain, layer, network, repeat, kind), acc in sorted(cells.items(), key=lambda kv: str(kv[0])):
        other = cells.get((family, retrain, layer, network, repeat, ORTHOGONAL_KIND))
        if kind == GROUP_KIND and other is not None and math.isfinite(acc) and math.isfinite(other):
            diffs.setdefault((family, retrain, layer), []).append(100.0 * (acc - other))
    gaps = []
    for (family, retrain, layer), d in sorted(diffs.items()):
        mean, std, n = _mean_std(d)
        half = interval_half_width(std, n, GAP_CONFIDENCE)
        gaps.append({"family": family, "retrain": retrain, "layer": layer, "mean": mean, "std": std, "n": n,
                     "ci": (mean - half, mean + half)})
    return gaps


def gap_verdict(gap: dict, activation: str) -> str:
    """One sentence from a :func:`projection_gaps` entry: "orthogonal costs X ± Y points more than G_σ at layer
    l", with n, the interval and what it resolves: a cost (interval above 0), the opposite (below 0), or no
    difference (interval contains 0, or a single pair: no interval)."""
    head = (f"orthogonal costs {gap['mean']:+.2f} ± {_pts(gap['std'])} points more than G_{activation} at layer "
            f"{gap['layer']} (retrain {gap['retrain']}; mean ± std over {gap['n']} paired run(s)")
    lo, hi = gap["ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return head + "): a single pair, no error bar, nothing resolved"
    ci = f"{100 * GAP_CONFIDENCE:.0f} % CI [{lo:+.2f}, {hi:+.2f}]"
    outcome = ("orthogonal insertions cost more: resolved" if lo > 0 else
               "G_σ insertions cost more: resolved, against the theory's expectation" if hi < 0 else
               "no difference resolved (the interval contains 0)")
    return f"{head}, {ci}): {outcome}"


def _acc(stat: dict) -> str:
    """An accuracy summary in percent: mean ± std (n)."""
    if not stat["n"]:
        return "n/a"
    std = f" ± {100 * stat['std']:.1f}" if math.isfinite(stat["std"]) else ""
    return f"{100 * stat['mean']:.1f}{std} (n={stat['n']})"


def _setting(records: list[dict]) -> str:
    """The retraining budget(s) of the records: epochs, learning rate, training fraction."""
    budgets = sorted({(r.get("epochs"), r.get("lr"), r.get("train_fraction", 1.0)) for r in records}, key=str)
    return "; ".join(f"{e} epoch(s) at lr {lr} on {100 * float(f):g} % of the training split" for e, lr, f in budgets)


def projection_files(records: list[dict], out: Path) -> dict[str, Path]:
    """The projection experiment's own report in ``out``: ``projection.csv`` (one row per cell),
    ``projection.png`` (accuracy per layer with error bars, and the orthogonal − G_σ gap with its interval)
    and ``projection.md`` (per family and layer the recovered accuracy of each kind, mean ± std over networks
    × repeats, and the verdicts of :func:`gap_verdict`); ``records`` are the cells' results.
    Returns ``{"csv", "png", "md"}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "projection.csv"
    _write_csv(csv_path, PROJECTION_COLUMNS,
               sorted(records, key=lambda r: (r["network"], r["retrain"], r["layer"], r["matrix"], r["repeat"])))

    summary = projection_summary(records)
    gaps = projection_gaps(records)
    png = plots.projection_accuracy(summary, gaps, out / "projection.png")

    first = (CONTROL_KIND, GROUP_KIND, ORTHOGONAL_KIND)  # the control, then the two kinds the verdict compares
    kinds = sorted({s["matrix"] for s in summary}, key=lambda k: (first.index(k) if k in first else len(first), k))
    lines = ["# Projection experiment (docs/method.md §4)", "",
             "A fixed matrix M is inserted before the activation of layer l and the network is retrained with",
             "layers ≤ l frozen: every later layer (retrain `rest`) or only layer l+1 (retrain `next`), starting",
             f"from their trained weights; budget: {_setting(records)}. Test accuracy in %, mean ± std over the",
             "family's networks × repeats (n cells); `identity` (M = I) is the control: what retraining alone does.",
             "", "## After retraining", "",
             "| family | σ | retrain | layer | clean | " + " | ".join(kinds) + " | orthogonal − G_σ (points) |",
             "|---|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    for family, retrain in dict.fromkeys((s["family"], s["retrain"]) for s in summary):
        series = {s["matrix"]: s for s in summary if (s["family"], s["retrain"]) == (family, retrain)}
        first = next(iter(series.values()))
        for layer in sorted({l for s in series.values() for l in s["layers"]}):
            accs = [_acc(series[k]["recovered"][series[k]["layers"].index(layer)])
                    if k in series and layer in series[k]["layers"] else "–" for k in kinds]
            gap = next((g for g in gaps if (g["family"], g["retrain"], g["layer"]) == (family, retrain, layer)), None)
            gap_text = "–" if gap is None else f"{gap['mean']:+.2f} ± {_pts(gap['std'])} (n={gap['n']})"
            lines.append(f"| {family} | {first['activation']} | {retrain} | {layer} | {_acc(first['clean'])} | "
                         + " | ".join(accs) + f" | {gap_text} |")
    lines += ["", "## Verdicts", ""]
    activation = {s["family"]: s["activation"] for s in summary}
    lines += [f"- {g['family']}: {gap_verdict(g, activation[g['family']])}." for g in gaps] or [
        f"- No verdict: the cells hold no ({GROUP_KIND}, {ORTHOGONAL_KIND}) pairs of the same network, layer and repeat."]
    lines += ["", "## Before retraining", "", "| family | σ | M | accuracy per layer |", "|---|---|---|---|"]
    before = {(s["family"], s["matrix"]): s for s in reversed(summary)}  # M's effect does not depend on retrain
    for (family, kind), s in sorted(before.items()):
        lines.append(f"| {family} | {s['activation']} | {kind} | "
                     + ", ".join(f"l{l}: {_acc(a)}" for l, a in zip(s["layers"], s["inserted"])) + " |")
    lines += ["", f"![accuracy per layer]({png.name})", "", f"Data: [{csv_path.name}]({csv_path.name})", ""]
    md = out / "projection.md"
    md.write_text("\n".join(lines))
    return {"csv": csv_path, "png": png, "md": md}


def _projection_section(records: list[dict], out: Path) -> tuple[list[str], list[Path], dict[str, Path]]:
    results = [rec["result"] for rec in records]
    paths = projection_files(results, out / "projection")
    text = paths["md"].read_text().splitlines()
    body = [ln for ln in text if not ln.startswith("# ")]
    while body and not body[0].strip():
        body.pop(0)
    body = [ln.replace("](projection.", "](projection/projection.") for ln in body]
    lines = ["## Projection", "", *body, "", "Full summary: [projection/projection.md](projection/projection.md)", ""]
    return lines, [paths["png"]], paths


# ----------------------------------------------------------------------------------------------------------
# The report


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


def _table_rows(data: list[list[str]]) -> list[list[Any]]:
    """CSV rows as a W&B table holds them: a column whose every field is a number as numbers (so W&B can plot
    it), the other columns as text; empty fields as None."""
    def number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    numeric = [all(number(v) for v in column if v != "") for column in zip(*data)]
    return [[None if v == "" else float(v) if numeric[i] else v for i, v in enumerate(row)] for row in data]


def _log_wandb(root: Path, out: Path, csvs: dict[str, Path], figures: list[Path], stats: dict) -> None:
    """One W&B run (offline unless configured) holding the tables and figures, in the group of the sweep whose
    folder ``root`` is (the group of its cells' runs: ``symstitch sweep --wandb``); failures only warn."""
    try:
        with wandb_run(out, job_type="report", name=f"report-{root.resolve().name}", group=wandb_group(root),
                       config={"results_dir": str(root)}) as run:
            import wandb  # loaded by wandb_run

            for name, path in csvs.items():
                columns, data = _read_csv(path)
                if columns:
                    run.log({f"{name}_table": wandb.Table(columns=columns, data=_table_rows(data))})
            for png in figures:
                run.log({f"figures/{png.stem}": wandb.Image(str(png))})
            run.summary.update(stats)
    except Exception as e:  # noqa: BLE001 - W&B must never cost the files already written
        _warn(f"W&B logging failed ({type(e).__name__}: {e}); the report files are complete")


def write_report(root: Path, out: Optional[Path] = None, wandb: bool = False) -> Path:
    """Read every cell below ``root``, write the CSVs, figures and ``report.md`` into ``out`` (default
    ``root/report``); returns the path of ``report.md``. ``wandb``: also log tables and figures to W&B."""
    return _write(root, out, wandb)[0]


def _write(root: Path, out: Optional[Path], wandb: bool) -> tuple[Path, dict[str, Any]]:
    """:func:`write_report`, also returning the headline numbers (cell counts, verdicts, alignment means)."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[tuple[Path, str]] = []
    found = collect(root, skipped)
    counts = {e: len(found.get(e, [])) for e in EXPERIMENTS}
    others = {e: len(v) for e, v in found.items() if e not in EXPERIMENTS}
    lines = [f"# symstitch report: {root.resolve().name}", "",
             f"Results folder: `{root}` · {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
             "## What was found", "", "| experiment | cells |", "|---|---|"]
    lines += [f"| {e} | {n} |" for e, n in counts.items()]
    lines += [f"| {e} (not reported) | {n} |" for e, n in others.items()]
    lines.append("")
    lines += _machines([r for records in found.values() for r in records])
    if skipped:
        lines += [f"Skipped {len(skipped)} file(s) among the cell records, which are not in any number below "
                  "(a sweep moves a damaged record aside and runs its cell again):", ""]
        lines += [f"- `{path}`: {why}" for path, why in skipped] + [""]
    if not any(counts.values()):
        lines += [f"No cell results (`cells/**/*.json`) under `{root}`.", ""]

    csvs: dict[str, Path] = {}
    figures: list[Path] = []
    stats: dict[str, Any] = {f"cells/{e}": n for e, n in counts.items()}

    if found.get("zoo"):
        rows = _zoo_rows(found["zoo"])
        csvs["zoo"] = _write_csv(out / "zoo.csv", ZOO_COLUMNS, rows)
        lines += _zoo_section(rows)
    if found.get("stitch"):
        selections = selection.select(found["stitch"])
        rows = _stitch_rows(found["stitch"], selections)
        csvs["stitch"] = _write_csv(out / "stitch.csv", STITCH_COLUMNS, rows)
        if selections:
            csvs["stitch_selection"] = _write_csv(out / "stitch_selection.csv", SELECTION_COLUMNS,
                                                  _selection_rows(selections))
        if rows:
            section, pngs, info = _stitch_section(rows, out, selections, machines_note(found["stitch"]))
            lines += section
            figures += pngs
            for kind, verdicts in info["verdicts"].items():
                for arch, layer, verdict in verdicts:
                    stats[f"stitch/{arch}/{layer}/{kind}_verdict"] = verdict
        elif selections:  # choices were made nowhere yet: say why
            lines += ["## Stitching", "", *_selection_section(selections)]
    if found.get("align"):
        rows, mats = _align_rows(found["align"])
        csvs["align"] = _write_csv(out / "align.csv", ALIGN_COLUMNS, rows)
        if mats:
            section, pngs, info = _align_section(mats, out)
            lines += section
            figures += pngs
            for (metric, arch), s in info["summary"].items():
                stats[f"align/{arch}/{metric}/diag_mean"] = s["diag_mean"]
                stats[f"align/{arch}/{metric}/off_mean"] = s["off_mean"]
    if found.get("projection"):
        try:
            section, pngs, paths = _projection_section(found["projection"], out)
            lines += section
            figures += pngs
            csvs["projection"] = paths["csv"]
        except (KeyError, TypeError, ValueError) as e:
            _warn(f"projection cells could not be reported ({type(e).__name__}: {e})")
            lines += ["## Projection", "", f"The projection cells could not be reported: {type(e).__name__}: {e}.", ""]

    md = out / "report.md"
    md.write_text("\n".join(lines).rstrip("\n") + "\n")
    if wandb:
        _log_wandb(root, out, csvs, figures, stats)
    return md, stats


def main_report(root: Path, out: Optional[Path] = None, wandb: bool = False) -> int:
    """``symstitch report``: write the report and print where it is and the verdicts; 1 when no cell was found."""
    md, stats = _write(root, out, wandb=wandb)
    cells = {k.split("/", 1)[1]: n for k, n in stats.items() if k.startswith("cells/") and n}
    print(f"report: {md}")
    print("cells: " + (", ".join(f"{e} {n}" for e, n in cells.items()) or f"none found under {root}"))
    for key, value in stats.items():
        if key.endswith("_verdict"):
            _, arch, *series, kind = key.split("/")
            print(f"stitch {arch} {'/'.join(series)} {kind.removesuffix('_verdict')}: {value}")
    return 0 if cells else 1
