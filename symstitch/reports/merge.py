"""The merge report section (docs/method.md §7): the loss and accuracy of θ(λ) between A and aligned B, per
network family, alignment (none, permutations, the full group; by method) and BatchNorm mode (interpolated,
re-estimated), with the loss barrier and the midpoint's accuracy as means over pairs with their Student-t
intervals, and the verdicts that pair the alignments network pair by network pair.

Files: ``merge.csv`` (one row per cell and BatchNorm mode), ``merge_curves.csv`` (one row per cell, mode and λ),
``merge_curves.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

from symstitch import plots
from symstitch.reports import Section
from symstitch.reports.common import CONFIDENCE, interval_stats, interval_verdict, machines_note, warn, write_csv

COLUMNS = ["family", "pair", "alignment", "method", "group", "bn", "barrier_loss", "barrier_acc_pts", "midpoint_acc",
           "acc_a", "acc_b", "align_seconds", "midpoint"]
CURVE_COLUMNS = ["family", "pair", "alignment", "bn", "lambda", "loss", "acc"]
#: the order alignments are shown in
GROUP_ORDER = {"none": 0, "permutations": 1, "full": 2}


def alignment_label(method: str, group: str) -> str:
    return "none" if group == "none" else f"{group} ({method})"


def merge_rows(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Tidy rows (per cell and mode) and curve rows (per cell, mode and λ)."""
    rows, curves = [], []
    for rec in records:
        c, r = rec["cell"], rec["result"]
        try:
            family = str(c.get("family") or c["arch"])
            pair = f"{c['source_seed']}-{c['target_seed']}"
            label = alignment_label(str(c["method"]), str(c["group"]))
            for mode, losses in r["loss"].items():
                acc = r["acc"][mode]
                rows.append({"family": family, "pair": pair, "alignment": label, "method": c["method"],
                             "group": c["group"], "bn": mode, "barrier_loss": float(r["barrier_loss"][mode]),
                             "barrier_acc_pts": float(r["barrier_acc_pts"][mode]),
                             "midpoint_acc": float(r["midpoint_acc"][mode]), "acc_a": float(acc[0]),
                             "acc_b": float(acc[-1]), "align_seconds": r.get("align_seconds"),
                             "midpoint": r.get("midpoint")})
                for lam, loss, a in zip(r["lambdas"], losses, acc):
                    curves.append({"family": family, "pair": pair, "alignment": label, "bn": mode,
                                   "lambda": float(lam), "loss": float(loss), "acc": float(a)})
        except (KeyError, TypeError, ValueError) as e:
            warn(f"skipping merge cell {rec.get('file')}: malformed ({type(e).__name__}: {e})")
    key = lambda row: (row["family"], GROUP_ORDER.get(row["group"], 9), row["alignment"], row["bn"], row["pair"])  # noqa: E731
    rows.sort(key=key)
    return rows, curves


def _spread(values: list[float]) -> dict[str, float]:
    """:func:`~symstitch.reports.common.interval_stats` and the range (``min``, ``max``) of the values."""
    return {**interval_stats(values), "min": min(values), "max": max(values)}


def merge_summary(rows: list[dict], curves: list[dict]) -> list[dict]:
    """One entry per (family, alignment, BatchNorm mode): interval statistics over pairs of the barrier (loss),
    the midpoint's accuracy (%), and of loss and accuracy at every λ with their range over pairs (the figure)."""
    summary = []
    keys = list(dict.fromkeys((r["family"], r["alignment"], r["group"], r["bn"]) for r in rows))
    for family, label, group, mode in keys:
        mine = [r for r in rows if (r["family"], r["alignment"], r["bn"]) == (family, label, mode)]
        points = [c for c in curves if (c["family"], c["alignment"], c["bn"]) == (family, label, mode)]
        lams = sorted({c["lambda"] for c in points})
        summary.append({"family": family, "alignment": label, "group": group, "bn": mode,
                        "barrier": interval_stats([r["barrier_loss"] for r in mine]),
                        "barrier_acc": interval_stats([r["barrier_acc_pts"] for r in mine]),
                        "midpoint_acc": interval_stats([100 * r["midpoint_acc"] for r in mine]),
                        "lambdas": lams,
                        "loss": [_spread([c["loss"] for c in points if c["lambda"] == t]) for t in lams],
                        "acc": [_spread([100 * c["acc"] for c in points if c["lambda"] == t]) for t in lams]})
    return summary


def paired_gaps(rows: list[dict], what: str = "barrier_loss") -> list[dict]:
    """Per family, mode and method: the permutation-only alignment's ``what`` minus the full group's, and no
    alignment's minus permutations', paired by network pair, with the t-interval of the mean."""
    out = []
    by = {(r["family"], r["pair"], r["method"], r["group"], r["bn"]): r[what] for r in rows}
    nones = {(r["family"], r["pair"], r["bn"]): r[what] for r in rows if r["group"] == "none"}
    for family, method, mode in dict.fromkeys((r["family"], r["method"], r["bn"]) for r in rows if r["group"] != "none"):
        pairs = sorted({r["pair"] for r in rows if r["family"] == family})
        for worse, better in (("none", "permutations"), ("permutations", "full")):
            diffs = []
            for pair in pairs:
                lo = nones.get((family, pair, mode)) if worse == "none" else by.get((family, pair, method, worse, mode))
                hi = by.get((family, pair, method, better, mode))
                if lo is not None and hi is not None:
                    diffs.append(lo - hi)
            if diffs:
                stats = interval_stats(diffs)
                out.append({"family": family, "method": method, "bn": mode, "worse": worse, "better": better,
                            **stats, "ci": (stats["mean"] - stats["half"], stats["mean"] + stats["half"])})
    return out


def _text(s: dict, digits: int = 3) -> str:
    if not s["n"]:
        return "n/a"
    half = f" ± {s['half']:.{digits}f}" if s["n"] > 1 and math.isfinite(s["half"]) else ""
    return f"{s['mean']:.{digits}f}{half}"


def report(records: list[dict], out: Path) -> Section:
    """``merge.csv``, ``merge_curves.csv``, the figure, the barrier table and the verdicts (``stats``:
    ``merge/<family>/<alignment>/<bn>/barrier`` and ``…/midpoint_acc``)."""
    rows, curves = merge_rows(records)
    section = Section(csvs={"merge": write_csv(out / "merge.csv", COLUMNS, rows),
                            "merge_curves": write_csv(out / "merge_curves.csv", CURVE_COLUMNS, curves)})
    if not rows:
        return section
    summary = merge_summary(rows, curves)
    figure = plots.merge_curves(summary, out / "merge_curves.png", machines_note(records))
    section.figures = [figure]
    lines = ["## Merging up to the intertwiner groups", "",
             "θ(λ) = (1 − λ) θ_A + λ θ_{g·B} with g from each alignment; BatchNorm statistics interpolated with the "
             "weights, or re-estimated at every λ on the training images. Barrier: the largest excess of the test "
             "loss over the straight line between the ends; midpoint: test accuracy at λ = ½. Means over network "
             f"pairs ± the {100 * CONFIDENCE:.0f} % t-interval's half-width.", "",
             f"![loss and accuracy along λ]({figure.name})", "",
             "Data: [merge.csv](merge.csv), [merge_curves.csv](merge_curves.csv)", "",
             "| family | alignment | BatchNorm | pairs | loss barrier | accuracy barrier (points) | midpoint accuracy (%) |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['family']} | {s['alignment']} | {s['bn']} | {s['barrier']['n']} | {_text(s['barrier'])} | "
                     f"{_text(s['barrier_acc'], 1)} | {_text(s['midpoint_acc'], 1)} |")
        key = f"merge/{s['family']}/{s['alignment']}/{s['bn']}"
        section.stats[f"{key}/barrier"] = s["barrier"]["mean"]
        section.stats[f"{key}/midpoint_acc"] = s["midpoint_acc"]["mean"]
    lines += ["", "### Which alignment lowers the barrier", ""]
    for g in paired_gaps(rows):
        head = (f"{g['family']}, {g['bn']} BatchNorm, {g['method']}: {g['better']} instead of {g['worse']} lowers the "
                f"loss barrier by {g['mean']:+.3f} (n = {g['n']} pairs")
        lines.append("- " + interval_verdict(head, g["ci"], f"{g['better']} resolves a lower barrier",
                                             f"{g['worse']} resolves a lower barrier", "a single pair, no interval",
                                             digits=3) + ".")
    section.lines = lines + [""]
    return section


__all__ = ["COLUMNS", "merge_rows", "merge_summary", "paired_gaps", "report"]
