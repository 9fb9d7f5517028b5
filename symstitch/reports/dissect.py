"""The dissection report section (docs/method.md §6): per network, point and rotation Q^α of the units, how many
units are interpretable (best IoU ≥ the threshold) and how many distinct concepts they cover, pooled over seeds
and rotations into means with Student-t intervals; the activation basis (α = 0) against a random one (α = 1),
paired by network; unique concepts per category; each network's best units with their masks.

Files: ``dissect.csv`` (one row per cell), ``dissect_rotation.png``, ``dissect_categories.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
import numpy as np

from symstitch import plots
from symstitch.reports import Section
from symstitch.reports.common import (CONFIDENCE, interval_stats, interval_verdict, machines_note, points_text,
                                      write_csv)
from symstitch.stitching.record import as_number

COLUMNS = ["network", "family", "seed", "point", "alpha", "rotation", "units", "interpretable",
           "interpretable_fraction", "unique_concepts", "iou_threshold", "q", "quantile", "images", "concepts",
           "headline"]


def dissect_rows(records: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per cell (with ``unique_<category>`` columns), sorted; and the categories seen."""
    rows, categories = [], []
    for rec in records:
        r = rec["result"]
        per_cat = r.get("unique_per_category") or {}
        categories += [c for c in per_cat if c not in categories]
        units = as_number(r.get("units"))
        row = {"network": r.get("network"), "family": r.get("family", r.get("network")), "seed": r.get("seed"),
               "point": r["point"], "alpha": as_number(r.get("alpha", 0.0)), "rotation": r.get("rotation"),
               "units": units, "interpretable": as_number(r.get("interpretable")),
               "interpretable_fraction": as_number(r.get("interpretable")) / units if units else math.nan,
               "unique_concepts": as_number(r.get("unique_concepts")), "iou_threshold": r.get("iou_threshold"),
               "q": r.get("q"), "quantile": "exact" if (r.get("quantile") or {}).get("exact") else "estimate",
               "images": r.get("images"), "concepts": r.get("concepts", r.get("source")),
               "headline": r.get("headline"), "units_png": r.get("units_png"), "file": rec.get("file")}
        row.update({f"unique_{c}": as_number(v) for c, v in per_cat.items()})
        rows.append(row)
    order = {}
    for row in rows:  # points in the order the cells list them
        order.setdefault((row["family"], row["point"]), len(order))
    rows.sort(key=lambda r: (str(r["family"]), order[(r["family"], r["point"])], r["alpha"], str(r["network"]),
                             str(r["rotation"])))
    return rows, categories


def dissect_summary(rows: list[dict], categories: list[str]) -> list[dict]:
    """Per (family, point, α): ``interpretable`` (fraction of units) and ``unique`` (concepts), each ``{"mean",
    "std", "n", "half"}`` over the cells (networks × rotations), and ``unique_<category>`` likewise."""
    keys = list(dict.fromkeys((r["family"], r["point"], r["alpha"]) for r in rows))
    summary = []
    for family, point, alpha in keys:
        cells = [r for r in rows if (r["family"], r["point"], r["alpha"]) == (family, point, alpha)]
        entry = {"family": family, "point": point, "alpha": alpha, "units": cells[0]["units"],
                 "interpretable": interval_stats([r["interpretable_fraction"] for r in cells]),
                 "unique": interval_stats([r["unique_concepts"] for r in cells])}
        entry.update({f"unique_{c}": interval_stats([r.get(f"unique_{c}", math.nan) for r in cells]) for c in categories})
        summary.append(entry)
    return summary


def basis_gaps(rows: list[dict]) -> list[dict]:
    """The activation basis against a random one, per (family, point): for each network, its interpretable
    fraction at α = 0 minus its mean over the rotations at α = 1; mean, std, n and the 95 % interval of that
    difference over networks (``ci``: NaN where n < 2)."""
    gaps = []
    for family, point in dict.fromkeys((r["family"], r["point"]) for r in rows):
        cells = [r for r in rows if (r["family"], r["point"]) == (family, point)]
        diffs = []
        for network in dict.fromkeys(r["network"] for r in cells):
            zero = [r["interpretable_fraction"] for r in cells if r["network"] == network and r["alpha"] == 0]
            one = [r["interpretable_fraction"] for r in cells if r["network"] == network and r["alpha"] == 1]
            if zero and one:
                diffs.append(zero[0] - float(np.mean(one)))
        if diffs:
            s = interval_stats(diffs)
            gaps.append({"family": family, "point": point, **s, "ci": (s["mean"] - s["half"], s["mean"] + s["half"])})
    return gaps


def basis_verdict(gap: dict) -> str:
    """One sentence from a :func:`basis_gaps` entry, in points of the units' percentage."""
    head = (f"the activation basis has {100 * gap['mean']:+.1f} ± {points_text(100 * gap['std'])} points more "
            f"interpretable units than a random rotation (mean ± std over {gap['n']} network(s)")
    return interval_verdict(head, gap["ci"], "the activation basis is more interpretable: resolved",
                            "the rotated basis is more interpretable: resolved",
                            "one network, no interval, nothing resolved", scale=100.0, digits=1)


def _cell_text(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    if not s["n"]:
        return "–"
    half = f" ± {scale * s['half']:.{digits}f}" if math.isfinite(s["half"]) else ""
    return f"{scale * s['mean']:.{digits}f}{half} (n={s['n']})"


def report(records: list[dict], out: Path) -> Section:
    """``dissect.csv``, the figures, the tables and the verdicts (``stats``: ``dissect/<family>/<point>/…``)."""
    rows, categories = dissect_rows(records)
    columns = COLUMNS + [f"unique_{c}" for c in categories]
    section = Section(csvs={"dissect": write_csv(out / "dissect.csv", columns, rows)})
    summary = dissect_summary(rows, categories)
    gaps = basis_gaps(rows)
    note = machines_note(records)
    rotation = plots.dissection_rotation(summary, out / "dissect_rotation.png", note)
    bars = plots.dissection_categories(summary, categories, out / "dissect_categories.png", note)
    section.figures = [rotation, bars]
    thresholds = sorted({str(r["iou_threshold"]) for r in rows})
    sources = sorted({str(r["concepts"]) for r in rows})
    lines = ["## Network dissection", "",
             f"Concepts: {', '.join(sources)}. A unit is interpretable when its best concept's IoU reaches "
             f"{', '.join(thresholds)}; units are dissected in the activation basis (α = 0) and after a rotation "
             "Q^α of the units (Q Haar-random in SO(n), α = 1 a random basis). Means over networks × rotations "
             f"with the {100 * CONFIDENCE:.0f} % t-interval of the mean.", "",
             f"![interpretable units against α]({rotation.name})", "",
             f"![unique concepts per category]({bars.name})", "", "Data: [dissect.csv](dissect.csv)", "",
             "| network family | point | α | units | interpretable units (%) | unique concepts |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['family']} | {s['point']} | {s['alpha']:g} | {s['units']:g} | "
                     f"{_cell_text(s['interpretable'], 100)} | {_cell_text(s['unique'])} |")
    lines += ["", "### Unique concepts per category (activation basis)", "",
              "| network family | point | " + " | ".join(categories) + " |",
              "|---|---|" + "---|" * len(categories)]
    for s in summary:
        if s["alpha"] == 0:
            lines.append(f"| {s['family']} | {s['point']} | "
                         + " | ".join(_cell_text(s[f"unique_{c}"]) for c in categories) + " |")
    lines += ["", "### The activation basis against a random one", ""]
    lines += [f"- {g['family']} at {g['point']}: {basis_verdict(g)}." for g in gaps] or [
        "- No verdict: the cells hold no network dissected both at α = 0 and at α = 1."]
    for g in gaps:
        section.stats[f"dissect/{g['family']}/{g['point']}/basis_gap"] = g["mean"]
    for s in summary:
        if s["alpha"] == 0:
            section.stats[f"dissect/{s['family']}/{s['point']}/interpretable"] = s["interpretable"]["mean"]
    lines += ["", "### Best units", "", "Each network's best units in the activation basis, their top images with the "
              "unit's mask (the rest dimmed):", ""]
    shown = set()
    for r in rows:
        if r["alpha"] == 0 and r.get("units_png") and (r["family"], r["point"]) not in shown:
            shown.add((r["family"], r["point"]))
            cell = _sweep_folder(Path(r["file"])) if r.get("file") else Path(".")
            units, tally = cell / r["units_png"], cell / r["units_png"].replace("units.png", "tally.csv")
            lines.append(f"- {r['network']} at {r['point']}: {r['headline']} ([units]({_relative(units, out)}), "
                         f"[tally]({_relative(tally, out)}))")
            if units.exists():
                section.figures.append(units)
            if tally.exists():  # each point's tally as a table of its own on W&B
                section.csvs[f"tally/{r['network']}/{r['point']}"] = tally
    section.lines = lines + [""]
    return section


def _sweep_folder(record: Path) -> Path:
    """The sweep folder of a cell record ``<sweep>/cells/<key>.json`` (keys hold slashes)."""
    parts = record.parts
    return Path(*parts[: len(parts) - 1 - parts[::-1].index("cells")]) if "cells" in parts else record.parent


def _relative(path: Path, out: Path) -> str:
    """``path`` as a link from the report folder ``out``."""
    import os

    return os.path.relpath(Path(path).resolve(), Path(out).resolve())

