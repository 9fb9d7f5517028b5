"""Figures. Every function writes a PNG and returns its path; matplotlib runs headless (Agg)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

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
