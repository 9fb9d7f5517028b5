"""What every report section shares: statistics over repeats (mean, sample standard deviation, Student-t
intervals), the machines a figure's cells ran on, number formats, tidy CSV files and warnings.

Light on purpose: numpy and scipy, no torch, so ``symstitch report`` reads records quickly.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy.stats import spearmanr


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: csv_value(row.get(c)) for c in columns})
    return path


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (NaN when n < 2) and n of the finite values."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


#: confidence of every interval of a mean in the reports (two-sided Student t)
CONFIDENCE = 0.95


def interval_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided Student-t interval of a mean over n values: t_{n−1} · std / √n (NaN when
    n < 2). It measures the spread of what was sampled — in a stitch sweep, independently trained networks."""
    from scipy.stats import t as student_t

    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(student_t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)


def interval_stats(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n", "half"}`` of the finite values: :func:`mean_std` and the :data:`CONFIDENCE`
    t-interval's half-width (:func:`interval_half_width`)."""
    mean, std, n = mean_std(values)
    return {"mean": mean, "std": std, "n": n, "half": interval_half_width(std, n)}


def interval_verdict(head: str, ci: tuple[float, float], above: str, below: str, single: str, scale: float = 1.0,
                     digits: int = 2) -> str:
    """A verdict sentence on a difference: ``head`` (which opens a parenthesis), then its :data:`CONFIDENCE`
    interval (× ``scale``) and what it resolves — ``above`` when the interval lies above 0, ``below`` when below,
    no difference when it contains 0 — or ``single`` when there is no interval (a single pair)."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{head}): {single}"
    outcome = above if lo > 0 else below if hi < 0 else "no difference resolved (the interval contains 0)"
    return (f"{head}, {100 * CONFIDENCE:.0f} % CI [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]): "
            f"{outcome}")


def machine_counts(records: Iterable[dict]) -> Counter:
    return Counter(", ".join(f"{k} {v}" for k, v in sorted((r.get("machine") or {}).items())) or "not recorded"
                   for r in records)


def machines_lines(records: list[dict]) -> list[str]:
    """Which machines computed the cells: numbers from short training runs move with the CPU's instruction path
    (and the accelerator), so a report says where its numbers came from."""
    seen = machine_counts(records)
    if not seen:
        return []
    return ["Computed on: " + "; ".join(f"{m} ({n} cell{'s' if n > 1 else ''})" for m, n in seen.most_common()), ""]


def machines_note(records: Iterable[dict]) -> str:
    """The machines of a figure's cells in one line (for its footnote)."""
    seen = machine_counts(records)
    return "computed on " + "; ".join(m for m, _ in seen.most_common()) if seen else ""


def spearman(values: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation of ``values`` against their position; None when undefined."""
    v = [x for x in values if math.isfinite(x)]
    if len(v) < 3 or len(v) != len(values) or max(v) == min(v):
        return None
    rho = float(spearmanr(np.arange(len(v)), v).statistic)
    return rho if math.isfinite(rho) else None


def points_text(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.2f}"


def rho_text(rho: Optional[float]) -> str:
    return "undefined" if rho is None else f"{rho:+.3f}"


def sim_text(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"
