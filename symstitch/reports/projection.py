"""The projection experiment's report (docs/method.md §4): accuracy before and after retraining with a fixed
M inserted at layer l, per family, layer and matrix kind (mean ± std over networks × repeats), and the
orthogonal − G_σ gap per layer with its Student-t interval, paired by network, layer and repeat. Where the
cells were dissected (the experiment's ``dissect`` setting), the three-networks comparison of docs/method.md §6:
interpretable units and unique concepts of the clean, G_σ and orthogonal networks at l and after it.

:func:`projection_files` writes the experiment's own page (``projection.csv``, ``projection.png``,
``projection.md``); :func:`report` puts that page into a sweep's report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from symstitch import plots
from symstitch.reports import Section
from symstitch.reports.common import (CONFIDENCE, interval_half_width, interval_stats, interval_verdict, machines_note, mean_std,
                                      points_text, write_csv)
from symstitch.stitching.record import as_number

COLUMNS = ["network", "family", "arch", "activation", "point", "layer", "matrix", "retrain", "repeat",
                      "clean_acc", "inserted_acc", "recovered_acc", "epochs", "lr", "train_fraction"]



#: the two matrix kinds the projection verdict compares, and the control (names of projection.MATRICES)
GROUP_KIND, ORTHOGONAL_KIND, CONTROL_KIND = "group", "orthogonal", "identity"
#: confidence level of the interval on the orthogonal − G_σ gap
GAP_CONFIDENCE = CONFIDENCE


def _family(record: dict) -> str:
    """What the projection report pools over seeds and repeats: the record's ``family`` (the architecture of a
    zoo's seeds), or its network for records that do not name one."""
    return str(record.get("family") or record["network"])


def _stats(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n"}`` of the finite values (std: sample standard deviation, NaN when n < 2)."""
    mean, std, n = mean_std(values)
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
        mean, std, n = mean_std(d)
        half = interval_half_width(std, n, GAP_CONFIDENCE)
        gaps.append({"family": family, "retrain": retrain, "layer": layer, "mean": mean, "std": std, "n": n,
                     "ci": (mean - half, mean + half)})
    return gaps


def gap_verdict(gap: dict, activation: str) -> str:
    """One sentence from a :func:`projection_gaps` entry: "orthogonal costs X ± Y points more than G_σ at layer
    l", with n, the interval and what it resolves: a cost (interval above 0), the opposite (below 0), or no
    difference (interval contains 0, or a single pair: no interval)."""
    head = (f"orthogonal costs {gap['mean']:+.2f} ± {points_text(gap['std'])} points more than G_{activation} at layer "
            f"{gap['layer']} (retrain {gap['retrain']}; mean ± std over {gap['n']} paired run(s)")
    return interval_verdict(head, gap["ci"], "orthogonal insertions cost more: resolved",
                            "G_σ insertions cost more: resolved, against the theory's expectation",
                            "a single pair, no error bar, nothing resolved")


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


def projection_files(records: list[dict], out: Path, note: str = "") -> dict[str, Path]:
    """The projection experiment's own report in ``out``: ``projection.csv`` (one row per cell),
    ``projection.png`` (accuracy per layer with error bars, and the orthogonal − G_σ gap with its interval)
    and ``projection.md`` (per family and layer the recovered accuracy of each kind, mean ± std over networks
    × repeats, and the verdicts of :func:`gap_verdict`); ``records`` are the cells' results, ``note`` the
    machines that computed them (a figure's footnote).
    Returns ``{"csv", "png", "md"}``, with ``projection_dissection_csv`` and ``dissection_png`` when the cells were
    dissected."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "projection.csv"
    write_csv(csv_path, COLUMNS,
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
            gap_text = "–" if gap is None else f"{gap['mean']:+.2f} ± {points_text(gap['std'])} (n={gap['n']})"
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
    dissection, csvs, figures = dissection_lines(records, out, note)
    lines += dissection
    md = out / "projection.md"
    md.write_text("\n".join(lines))
    return {"csv": csv_path, "png": png, "md": md, **{f"{k}_csv": v for k, v in csvs.items()},
            **{"dissection_png": f for f in figures}}


#: ``projection_dissection.csv``: one row per dissection (the clean network's once per network, layer and point)
DISSECTION_COLUMNS = ["network", "family", "point", "layer", "matrix", "repeat", "where", "dissected_at", "units",
                      "interpretable", "unique_concepts", "source", "q", "iou_threshold", "tally_csv"]
#: the series of the three-networks comparison, in the order they are shown: the clean network, then the kinds
CLEAN = "clean"


def dissection_rows(records: list[dict]) -> list[dict]:
    """The dissections the cells carry (``dissection`` of :meth:`ProjectionExperiment.dissect_cell`), one row
    each; the clean network's, which every cell of a network and layer repeats, once, with matrix ``clean``."""
    rows, seen = [], set()
    for r in records:
        for d in r.get("dissection") or []:
            clean = d["state"] == CLEAN
            row = {"network": r["network"], "family": _family(r), "point": r["point"], "layer": r["layer"],
                   "matrix": CLEAN if clean else r["matrix"], "repeat": "" if clean else r["repeat"],
                   "where": d["where"], "dissected_at": d["point"], **{k: d[k] for k in DISSECTION_COLUMNS[8:]}}
            key = (row["network"], row["layer"], row["matrix"], row["repeat"], row["where"], r["retrain"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def dissection_summary(rows: list[dict]) -> list[dict]:
    """Per (family, layer, where) and series (clean, then each kind): the share of interpretable units in %
    and the unique concepts, each ``{"mean", "std", "n", "half"}`` over the rows (networks × repeats; the clean
    network once per network), ``half`` the :data:`CONFIDENCE` t-interval's half-width."""
    first = (CLEAN, CONTROL_KIND, GROUP_KIND, ORTHOGONAL_KIND)
    order = lambda k: (first.index(k) if k in first else len(first), k)  # noqa: E731
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["family"], row["layer"], row["where"] != "at", row["matrix"]), []).append(row)
    summary = []
    for (family, layer, after, kind), members in sorted(groups.items(), key=lambda kv: (*kv[0][:3], order(kv[0][3]))):
        summary.append({"family": family, "layer": layer, "where": "after" if after else "at",
                        "dissected_at": members[0]["dissected_at"], "matrix": kind,
                        "interpretable_pct": interval_stats([100.0 * m["interpretable"] / m["units"] for m in members]),
                        "unique_concepts": interval_stats([float(m["unique_concepts"]) for m in members])})
    return summary


def dissection_gaps(rows: list[dict]) -> list[dict]:
    """Orthogonal − G_σ in interpretable units (points of %), paired by network, layer, repeat and place, per
    (family, layer, where): ``{"family", "layer", "where", "mean", "std", "n", "ci"}``."""
    cells = {(r["family"], r["layer"], r["where"], r["network"], r["repeat"], r["matrix"]):
             100.0 * r["interpretable"] / r["units"] for r in rows}
    diffs: dict[tuple, list[float]] = {}
    for (family, layer, where, network, repeat, kind), value in sorted(cells.items(), key=lambda kv: str(kv[0])):
        other = cells.get((family, layer, where, network, repeat, GROUP_KIND))
        if kind == ORTHOGONAL_KIND and other is not None:
            diffs.setdefault((family, layer, where), []).append(value - other)
    gaps = []
    for (family, layer, where), d in sorted(diffs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "at")):
        mean, std, n = mean_std(d)
        half = interval_half_width(std, n)
        gaps.append({"family": family, "layer": layer, "where": where, "mean": mean, "std": std, "n": n,
                     "ci": (mean - half, mean + half)})
    return gaps


def _share(stat: dict) -> str:
    if not stat["n"]:
        return "–"
    half = f" ± {stat['half']:.1f}" if math.isfinite(stat["half"]) else ""
    return f"{stat['mean']:.1f}{half}"


def dissection_lines(records: list[dict], out: Path, note: str = "") -> tuple[list[str], dict[str, Path], list[Path]]:
    """The three-networks comparison (docs/method.md §6): the table, the verdicts, the CSV and the figure;
    nothing when no cell was dissected."""
    rows = dissection_rows(records)
    if not rows:
        return [], {}, []
    csv_path = out / "projection_dissection.csv"
    write_csv(csv_path, DISSECTION_COLUMNS, sorted(rows, key=lambda r: (r["network"], r["layer"], r["where"] != "at",
                                                                        r["matrix"], str(r["repeat"]))))
    summary = dissection_summary(rows)
    png = plots.projection_dissection(summary, out / "projection_dissection.png", note)
    sources = sorted({(r["source"], r["q"], r["iou_threshold"]) for r in rows}, key=str)
    kinds = list(dict.fromkeys(s["matrix"] for s in summary))
    lines = ["## Dissection of the three networks", "",
             "Each network dissected at layer l (where M was inserted) and at the next layer, after retraining; "
             "the clean network beside them. Concepts: " + "; ".join(f"{src} at q = {q:g}, IoU ≥ {t:g}"
                                                                   for src, q, t in sources) + ".",
             f"Interpretable units in % (mean ± {100 * CONFIDENCE:.0f} % t-interval over networks × repeats), then "
             "unique concepts among their labels.", "",
             "| family | layer | dissected at | " + " | ".join(f"{k}: % units" for k in kinds) + " | "
             + " | ".join(f"{k}: concepts" for k in kinds) + " |",
             "|---|---|---|" + "---|" * (2 * len(kinds))]
    for family, layer, where in dict.fromkeys((s["family"], s["layer"], s["where"]) for s in summary):
        series = {s["matrix"]: s for s in summary if (s["family"], s["layer"], s["where"]) == (family, layer, where)}
        at = next(iter(series.values()))["dissected_at"]
        lines.append(f"| {family} | {layer} | {where} l: {at} | "
                     + " | ".join(_share(series[k]["interpretable_pct"]) if k in series else "–" for k in kinds) + " | "
                     + " | ".join(_share(series[k]["unique_concepts"]) if k in series else "–" for k in kinds) + " |")
    lines += ["", "Orthogonal − G_σ, interpretable units in points of %, paired by network and repeat:", ""]
    for g in dissection_gaps(rows):
        head = (f"- {g['family']}, layer {g['layer']}, {g['where']} l: {g['mean']:+.1f} ± "
                f"{points_text(g['std'])} (n={g['n']}")
        lines.append(interval_verdict(head, g["ci"], "the orthogonal insertion leaves more interpretable units: "
                                      "resolved", "the orthogonal insertion leaves fewer interpretable units: resolved",
                                      "no interval from a single pair", digits=1))
    lines += ["", f"![dissection of the three networks]({png.name})", "", f"Data: [{csv_path.name}]({csv_path.name})",
              ""]
    return lines, {"projection_dissection": csv_path}, [png]


def report(records: list[dict], out: Path) -> Section:
    """:func:`projection_files` of the cells' results in ``out/projection``, its page as this section."""
    results = [rec["result"] for rec in records]
    paths = projection_files(results, out / "projection", machines_note(records))
    text = paths["md"].read_text().splitlines()
    body = [ln for ln in text if not ln.startswith("# ")]
    while body and not body[0].strip():
        body.pop(0)
    body = [ln.replace("](projection", "](projection/projection") for ln in body]
    lines = ["## Projection", "", *body, "", "Full summary: [projection/projection.md](projection/projection.md)", ""]
    csvs = {"projection": paths["csv"]}
    if "projection_dissection_csv" in paths:
        csvs["projection_dissection"] = paths["projection_dissection_csv"]
    return Section(lines, csvs, [paths["png"], *([paths["dissection_png"]] if "dissection_png" in paths else [])])
