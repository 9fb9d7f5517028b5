"""Figures. Every function writes a PNG and returns its path; matplotlib runs headless (Agg).

The numbers come ready from the caller (the sections of :mod:`symstitch.reports` compute the summaries and
name the files); the functions here only draw them.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics_csv(path: Path | str) -> dict[str, list[tuple[int, float]]]:
    """A Lightning ``metrics.csv`` as ``{metric: [(epoch, value), …]}`` (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                series.setdefault(key, []).append((int(float(epoch)), float(value)))
    return series


def training_curves(runs: Mapping[str, Path | str], out: Path | str, metrics: Sequence[str] = ("train/acc", "val/acc"),
                    title: str = "") -> Path:
    """Accuracy per epoch of several runs (``{label: metrics.csv}``), one panel per metric."""
    out = Path(out)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for label, csv_path in runs.items():
        series = read_metrics_csv(csv_path)
        for ax, metric in zip(axes[0], metrics):
            points = series.get(metric, [])
            if points:
                epochs, values = zip(*points)
                ax.plot([e + 1 for e in epochs], values, marker="o", markersize=3, label=label)
    for ax, metric in zip(axes[0], metrics):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------------
# symstitch report


def _footnote(fig: Any, note: str) -> None:
    """A line at the bottom of a figure (which machine made it), after ``tight_layout``."""
    if note:
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.35 / fig.get_figheight())
        fig.text(0.01, 0.005, note, fontsize=7, color="0.35", ha="left", va="bottom")


def _save(fig: Any, path: Path, note: str = "") -> Path:
    """Lay out, add the footnote (which machines computed the data), write at 110 dpi, close; ``path``."""
    fig.tight_layout()
    _footnote(fig, note)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stitch_penalty_plot(summary: dict[str, dict], path: Path, note: str = "") -> Path:
    """Penalty (points) against stitch point, one line per layer; error bars = std over pairs and repeats.

    ``summary``: :func:`symstitch.reports.stitch.stitch_summary`; ``note``: a line at the bottom (the machine)."""
    archs = list(summary)
    width = max(5.5, 0.55 * max(len(summary[a]["points"]) for a in archs) + 2.5)
    fig, axes = plt.subplots(len(archs), 1, figsize=(width, 3.8 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs):
        points = summary[arch]["points"]
        for layer, s in summary[arch]["layers"].items():
            xs = [points.index(p) for p in s["points"]]
            yerr = [sd if n > 1 else np.nan for sd, n in zip(s["std"], s["n"])]
            n_lo, n_hi = min(s["n"]), max(s["n"])
            n_text = f"n={n_lo}" if n_lo == n_hi else f"n={n_lo}–{n_hi}"
            ax.errorbar(xs, s["mean"], yerr=yerr, marker="o", markersize=4, capsize=3, label=f"{layer} ({n_text})")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(points)), points, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("stitch point (depth order)")
        ax.set_ylabel("stitching penalty (points)")
        n_pairs = len(summary[arch]["pairs"])
        ax.set_title(f"{arch}: stitching penalty, mean ± std over {n_pairs} pair(s) × repeats", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _footnote(fig, note)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def stitch_penalty_bars(summary: dict[str, dict], path: Path, note: str = "") -> Path:
    """The paper's stitching figure: for each stitch point a group of bars, one per stitching layer (mean over
    pairs × repeats, error bars: sample standard deviation where n > 1); one panel per architecture and
    evaluation protocol (``frozen``, ``recalibrated``).

    ``summary``: :func:`symstitch.reports.stitch.stitch_summary`, whose series are ``layer`` or ``layer/protocol``;
    ``note``: a line at the bottom (the machine)."""
    panels = []
    for arch, s in summary.items():
        protocols = list(dict.fromkeys((name.split("/", 1) + ["frozen"])[1] for name in s["layers"]))
        panels += [(arch, protocol) for protocol in protocols]
    width = max(9.0, 0.9 * max(len(summary[a]["points"]) for a, _ in panels) + 3.0)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.9 * len(panels)), squeeze=False, sharey=False)
    for ax, (arch, protocol) in zip(axes[:, 0], panels):
        s = summary[arch]
        points = s["points"]
        series = {name.split("/", 1)[0]: ls for name, ls in s["layers"].items()
                  if (name.split("/", 1) + ["frozen"])[1] == protocol}
        bar = 0.8 / max(len(series), 1)
        colours = matplotlib.colormaps["tab10"](np.arange(len(series)) % 10)
        for k, (layer, ls) in enumerate(series.items()):
            xs = [points.index(p) - 0.4 + bar * (k + 0.5) for p in ls["points"]]
            yerr = [sd if n > 1 else np.nan for sd, n in zip(ls["std"], ls["n"])]
            n_lo, n_hi = min(ls["n"]), max(ls["n"])
            n_text = f"n={n_lo}" if n_lo == n_hi else f"n={n_lo}–{n_hi}"
            ax.bar(xs, ls["mean"], width=bar, yerr=yerr, capsize=2, color=colours[k], label=f"{layer} ({n_text})")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(points)), points, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("stitching penalty (points)")
        ax.set_title(f"{arch}, {protocol} BatchNorm statistics: mean ± std over {len(s['pairs'])} pair(s) × "
                     "repeats", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.18)  # room for the legend above the bars
        ax.legend(fontsize=7, ncol=min(len(series), 5), loc="upper center")
    fig.tight_layout()
    _footnote(fig, note)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def align_heatmap(metric: str, entries: list[tuple[str, dict]], path: Path) -> Path:
    """One heatmap of ``metric`` per architecture (``entries``: ``[(arch, summary)]`` from
    :func:`symstitch.reports.align.align_summary`); NaN (never computed) in grey."""
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    fig, axes = plt.subplots(1, len(entries), squeeze=False,
                             figsize=(max(4.8, 0.4 * max(len(s["points_b"]) for _, s in entries) + 2.8) * len(entries),
                                      max(4.0, 0.4 * max(len(s["points_a"]) for _, s in entries) + 2.2)))
    for ax, (arch, s) in zip(axes[0], entries):
        data = np.ma.masked_invalid(s["mean"])
        finite = s["mean"][np.isfinite(s["mean"])]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmin == vmax:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(s["points_b"])), s["points_b"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(s["points_a"])), s["points_a"], fontsize=8)
        ax.set_xlabel("model B point")
        ax.set_ylabel("model A point")
        nan_note = f", {s['nan_mean']} NaN (grey)" if s["nan_mean"] else ""
        ax.set_title(f"{metric} ({arch}): mean over {len(s['pairs'])} pair(s){nan_note}", fontsize=10)
        fig.colorbar(im, ax=ax, label="similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def align_diagonal_plot(diagonal: dict[str, dict], path: Path) -> Path:
    """Similarity of point p of A with point p of B, one panel per architecture, a group of bars per metric.

    ``diagonal``: :func:`symstitch.reports.align.align_diagonal` (not empty)."""
    fig, axes = plt.subplots(len(diagonal), 1, squeeze=False, figsize=(9, 3.9 * len(diagonal)))
    for ax, (arch, d) in zip(axes[:, 0], diagonal.items()):
        points = d["points"]
        width = 0.8 / len(points)
        colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(points)))
        for k, p in enumerate(points):
            xs, ys, errs = [], [], []
            for g, mean, std in d["bars"][p]:
                xs.append(g - 0.4 + width * (k + 0.5)), ys.append(mean), errs.append(std)
            ax.bar(xs, ys, width=width, yerr=errs, capsize=2, color=colors[k], label=p)
        ax.set_xticks(range(len(d["metrics"])), d["metrics"])
        ax.set_xlabel("metric")
        ax.set_ylabel("similarity at (p, p)")
        ax.set_title(f"{arch}: same point in both networks, mean over pairs (≤ {d['pairs']}), error bars: std")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=max(1, math.ceil(len(points) / 8)), title="point p", title_fontsize=7,
                  bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def projection_accuracy(summary: Sequence[dict], gaps: Sequence[dict], path: Path) -> Path:
    """The projection experiment, one column per family. Top: test accuracy per layer after retraining (solid,
    error bars: sample standard deviation over networks × repeats where n > 1), before retraining (dashed,
    faint) and the clean networks (dotted, mean). Bottom: orthogonal − G_σ in points per layer, the mean of the
    paired differences with its confidence interval, and 0 (no difference) for reference.

    ``summary``: :func:`symstitch.reports.projection.projection_summary`; ``gaps``: :func:`symstitch.reports.projection.projection_gaps`."""
    families = list(dict.fromkeys(s["family"] for s in summary))
    fig, axes = plt.subplots(2, len(families), figsize=(4.8 * len(families), 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]}, sharex="col")
    for k, family in enumerate(families):
        ax, gap_ax = axes[0][k], axes[1][k]
        series = [s for s in summary if s["family"] == family]
        clean = series[0]["clean"]
        ax.axhline(clean["mean"], color="black", linestyle=":", label=f"clean (mean of {clean['n']})")
        for j, s in enumerate(series):
            label = f"{s['matrix']}, retrain {s['retrain']}"
            offset = 0.06 * (j - (len(series) - 1) / 2)  # keep error bars of different series apart
            xs = [layer + offset for layer in s["layers"]]
            n = max(a["n"] for a in s["recovered"])
            line = ax.errorbar(xs, [a["mean"] for a in s["recovered"]],
                               yerr=[a["std"] if a["n"] > 1 else np.nan for a in s["recovered"]],
                               marker="o", markersize=4, capsize=3, label=f"{label} (n={n})")
            ax.plot(xs, [a["mean"] for a in s["inserted"]], marker="x", linestyle="--",
                    color=line.lines[0].get_color(), alpha=0.4)
        ax.set_title(f"{family} ({series[0]['activation']}): after retraining (dashed: before)", fontsize=9)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        family_gaps = [g for g in gaps if g["family"] == family]
        for j, retrain in enumerate(dict.fromkeys(g["retrain"] for g in family_gaps)):
            rows = [g for g in family_gaps if g["retrain"] == retrain]
            xs = [g["layer"] + 0.06 * j for g in rows]
            means = [g["mean"] for g in rows]
            err = np.array([[m - g["ci"][0], g["ci"][1] - m] for m, g in zip(means, rows)]).T
            gap_ax.errorbar(xs, means, yerr=err, marker="s", markersize=4, capsize=3, linestyle="none",
                            label=f"retrain {retrain} (n={max(g['n'] for g in rows)})")
        gap_ax.axhline(0, color="black", linewidth=0.8)
        gap_ax.set_ylabel("orthogonal − G_σ cost\n(points, 95 % CI)", fontsize=8)
        gap_ax.set_xlabel("layer l (M inserted before its activation)")
        gap_ax.set_xticks(sorted({layer for s in series for layer in s["layers"]}))
        gap_ax.grid(alpha=0.3)
        if family_gaps:
            gap_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# network dissection


def dissection_units(pictures: Sequence[tuple[str, Any, Any]], path: Path, note: str = "") -> Path:
    """One row per unit: its top images with the unit's mask M_u drawn over them (outside dimmed, the edge in
    cyan). ``pictures``: (title, images (k, 3, H, W) on 0…1, masks (k, H, W) bool), as
    :meth:`symstitch.dissect.api.Dissection.unit_pictures` gives them."""
    rows = max(len(pictures), 1)
    cols = max((len(p[1]) for p in pictures), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.4, 1.5 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (title, images, masks) in enumerate(pictures):
        images, masks = np.asarray(images, dtype=float), np.asarray(masks, dtype=bool)
        for c in range(len(images)):
            ax = axes[r][c]
            image = images[c].transpose(1, 2, 0)
            ax.imshow(np.where(masks[c][..., None], image, 0.35 * image), interpolation="nearest")
            if masks[c].any() and not masks[c].all():
                ax.contour(masks[c].astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        axes[r][0].set_title(title, loc="left", fontsize=7)
    return _save(fig, path, note)


def dissection_rotation(summary: Sequence[dict], path: Path, note: str = "") -> Path:
    """Interpretable units (%, top) and unique concepts (bottom) against α, one column per network family and one
    line per point; error bars: the 95 % t-interval of the mean over networks × rotations (none where n = 1).
    ``summary``: :func:`symstitch.reports.dissect.dissect_summary`."""
    families = list(dict.fromkeys(s["family"] for s in summary)) or ["(none)"]
    fig, axes = plt.subplots(2, len(families), figsize=(4.4 * len(families), 5.6), squeeze=False, sharex=True)
    for k, family in enumerate(families):
        rows = [s for s in summary if s["family"] == family]
        for point in dict.fromkeys(s["point"] for s in rows):
            series = [s for s in rows if s["point"] == point]
            alphas = [s["alpha"] for s in series]
            for ax, key, scale in ((axes[0][k], "interpretable", 100.0), (axes[1][k], "unique", 1.0)):
                stats = [s[key] for s in series]
                ax.errorbar(alphas, [scale * st["mean"] for st in stats],
                            yerr=[scale * st["half"] if st["n"] > 1 else np.nan for st in stats],
                            marker="o", markersize=4, capsize=3,
                            label=f"{point} (n = {'/'.join(str(st['n']) for st in stats)} at α = "
                                  f"{'/'.join(f'{a:g}' for a in alphas)})")
        axes[0][k].set_title(family, fontsize=10)
        axes[0][k].set_ylabel("interpretable units (%)")
        axes[1][k].set_ylabel("unique concepts")
        axes[1][k].set_xlabel("α (units rotated by Q^α; 0: activation basis)")
        for ax in (axes[0][k], axes[1][k]):
            ax.grid(alpha=0.3)
        axes[0][k].legend(fontsize=7)
    return _save(fig, path, note)


def dissection_categories(summary: Sequence[dict], categories: Sequence[str], path: Path, note: str = "") -> Path:
    """Unique concepts per category in the activation basis (α = 0), one group of bars per (family, point);
    error bars: the 95 % t-interval over networks."""
    rows = [s for s in summary if s["alpha"] == 0]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(rows) * max(len(categories), 1) * 0.45 + 2), 3.6))
    width = 0.8 / max(len(categories), 1)
    x = np.arange(len(rows))
    for j, category in enumerate(categories):
        stats = [s[f"unique_{category}"] for s in rows]
        ax.bar(x + (j - (len(categories) - 1) / 2) * width, [st["mean"] for st in stats], width,
               yerr=[st["half"] if st["n"] > 1 else 0 for st in stats], capsize=2, label=category)
    ax.set_xticks(x, [f"{s['family']}\n{s['point']}" for s in rows], fontsize=7)
    ax.set_ylabel("unique concepts (interpretable units)")
    ax.grid(alpha=0.3, axis="y")
    if categories:
        ax.legend(fontsize=7, ncol=min(len(categories), 5))
    return _save(fig, path, note)


def projection_dissection(summary: Sequence[dict], path: Path, note: str = "") -> Path:
    """The three-networks comparison: interpretable units (%) of each series (clean, then each matrix kind),
    one group of bars per (family, layer, at l / after l); error bars: the 95 % t-interval over networks ×
    repeats."""
    groups = list(dict.fromkeys((s["family"], s["layer"], s["where"], s["dissected_at"]) for s in summary))
    kinds = list(dict.fromkeys(s["matrix"] for s in summary))
    by_key = {(s["family"], s["layer"], s["where"], s["matrix"]): s for s in summary}
    fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * len(groups) * len(kinds) + 2), 3.6))
    width = 0.8 / max(len(kinds), 1)
    x = np.arange(len(groups))
    for j, kind in enumerate(kinds):
        stats = [by_key.get((f, l, w, kind), {}).get("interpretable_pct") for f, l, w, _ in groups]
        means = [st["mean"] if st and st["n"] else np.nan for st in stats]
        errs = [st["half"] if st and st["n"] > 1 else 0 for st in stats]
        ax.bar(x + (j - (len(kinds) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=kind)
    ax.set_xticks(x, [f"{f} l={l}\n{w} l ({p})" for f, l, w, p in groups], fontsize=7)
    ax.set_ylabel("interpretable units (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=len(kinds))
    return _save(fig, path, note)


def stitch_lasso(summary: Sequence[dict], path: Path, note: str = "") -> Path:
    """The lasso stitch against λ (log scale): penalty (left; frozen solid, recalibrated dashed) and the fraction
    of non-zero entries of W (right), one colour per (arch, point); error bars: the 95 % t-interval over pairs
    and repeats. ``summary``: :func:`symstitch.reports.stitch.lasso_summary`."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {}
    for s in summary:
        key = (s["arch"], s["point"])
        colour = colours.setdefault(key, f"C{len(colours) % 10}")
        frozen = s["protocol"] == "frozen"
        left.errorbar(s["lams"], [p["mean"] for p in s["penalty"]],
                      yerr=[p["half"] if p["n"] > 1 else np.nan for p in s["penalty"]], color=colour, marker="o",
                      markersize=3, capsize=2, linestyle="-" if frozen else "--",
                      label=f"{s['arch']} {s['point']}" + ("" if frozen else " (recalibrated)"))
        if frozen or not any(t["protocol"] == "frozen" and (t["arch"], t["point"]) == key for t in summary):
            right.errorbar(s["lams"], [100 * z["mean"] for z in s["nonzero"]],
                           yerr=[100 * z["half"] if z["n"] > 1 else np.nan for z in s["nonzero"]], color=colour,
                           marker="o", markersize=3, capsize=2, label=f"{s['arch']} {s['point']}")
    for ax, label in ((left, "stitching penalty (points)"), (right, "non-zero entries of W (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("λ (lasso weight)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend(fontsize=6)
    return _save(fig, path, note)


def merge_curves(summary: Sequence[dict], path: Path, note: str = "") -> Path:
    """Test loss (left, log scale) and accuracy (right) along λ, one row per network family: one colour per
    alignment, BatchNorm re-estimated solid, interpolated dashed; the line is the mean over pairs, the band the
    range over pairs (lowest to highest). ``summary``: :func:`symstitch.reports.merge.merge_summary`."""
    families = list(dict.fromkeys(s["family"] for s in summary))
    fig, axes = plt.subplots(len(families), 2, figsize=(12.5, 3.2 * len(families)), squeeze=False)
    colours: dict[str, str] = {}
    for row, family in zip(axes, families):
        for s in (s for s in summary if s["family"] == family):
            colour = colours.setdefault(s["alignment"], f"C{len(colours) % 10}")
            style = "-" if s["bn"] == "reestimated" else "--"
            for ax, what in zip(row, ("loss", "acc")):
                ax.plot(s["lambdas"], [v["mean"] for v in s[what]], style, color=colour, marker="o", markersize=2.5,
                        label=f"{s['alignment']}, BN {s['bn']}")
                ax.fill_between(s["lambdas"], [v["min"] for v in s[what]], [v["max"] for v in s[what]],
                                color=colour, alpha=0.1, linewidth=0)
        row[0].set_ylabel(f"{family}\ntest loss")
        row[0].set_yscale("log")
        row[1].set_ylabel("test accuracy (%)")
        for ax in row:
            ax.set_xlabel("λ (0: A, 1: aligned B)")
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for row in axes:  # every family's lines, each label once
        for h, label in zip(*row[1].get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    axes[0][1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path, note)
