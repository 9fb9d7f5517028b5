"""The alignment report section: the similarity of every point of network A with every point of network B,
averaged over pairs (one heatmap per metric, ``align_<metric>.png``), the same point in both networks
(``align_diagonal.png``), and which similarities were never computed (NaN: grey, left out of every mean).

File: ``align.csv`` (one row per pair of networks, metric and pair of points).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np

from symstitch import plots
from symstitch.reports import Section
from symstitch.reports.common import mean_std, safe_name, sim_text, warn, write_csv
from symstitch.stitching.record import as_number

COLUMNS = ["arch", "source", "target", "metric", "cka_mode", "point_a", "point_b", "value"]


def report(records: list[dict], out: Path) -> Section:
    """``align.csv``, the heatmaps and the table (``stats``: ``align/<arch>/<metric>/diag_mean`` and
    ``off_mean``)."""
    rows, mats = align_rows(records)
    section = Section(csvs={"align": write_csv(out / "align.csv", COLUMNS, rows)})
    if mats:
        section.lines, section.figures, info = _lines(mats, out)
        for (metric, arch), s in info["summary"].items():
            section.stats[f"align/{arch}/{metric}/diag_mean"] = s["diag_mean"]
            section.stats[f"align/{arch}/{metric}/off_mean"] = s["off_mean"]
    return section


def _per_metric(record: dict) -> list[dict]:
    """An align record (one pair, ``result: {"metrics": {metric: matrix}}``) as one record per metric."""
    metrics = record["result"].get("metrics")
    if not isinstance(metrics, dict):
        return [record]  # one metric per record (the layout of earlier versions)
    return [{**record, "cell": {**record["cell"], "metric": metric}, "result": matrix}
            for metric, matrix in metrics.items()]


def align_rows(records: list[dict]) -> tuple[list[dict], list[dict]]:
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
            warn(f"skipping align cell {rec.get('file')}: malformed ({type(e).__name__}: {e})")
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
                m, sd, n = mean_std(list(s["stack"][:, i, j]))
                bars[p].append((g, m, sd if n > 1 else math.nan))
        diagonal[arch] = {"metrics": [m for m, _ in metrics], "points": points, "bars": bars,
                          "pairs": max(len(s["pairs"]) for _, s in metrics)}
    return diagonal


def _lines(mats: list[dict], out: Path) -> tuple[list[str], list[Path], dict]:
    summary = align_summary(mats)
    pngs = []
    for metric in sorted({m for m, _ in summary}):
        pngs.append(plots.align_heatmap(metric, [(a, s) for (m, a), s in summary.items() if m == metric],
                                        out / f"align_{safe_name(metric)}.png"))
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
        lines.append(f"| {metric} | {arch} | {len(s['pairs'])} | {sim_text(s['diag_mean'])} | {sim_text(s['off_mean'])} | "
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
