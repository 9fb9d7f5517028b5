"""Each experiment kind's part of a sweep's report: its tidy CSVs, figures, tables and verdicts.

==============  ========================================================================================
``zoo``         the model library: test accuracy per network, mean and spread per architecture
``stitch``      stitching penalties per point and layer, choices on the validation split, the paper's §2 verdicts
``align``       similarity of every pair of points, the diagonal, the NaN entries
``projection``  accuracy after inserting M and retraining, the orthogonal − G_σ gap with its interval
``dissect``     interpretable units and unique concepts against the rotation α, the activation basis's verdict
``merge``       loss and accuracy along the line between A and aligned B, the barriers per alignment with intervals
``common``      what they share: means and Student-t intervals, machines, number formats, CSV files
==============  ========================================================================================

A section module defines ``report(records, out) -> Section`` over its kind's cell records (the dicts of
:func:`symstitch.report.collect`); :meth:`symstitch.runner.Experiment.report` calls it for its kind, and
:mod:`symstitch.report` puts the sections of every kind found into one ``report.md``. The sections import no
torch, so that ``symstitch report`` reads records quickly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

#: experiment kind → the module of its report section, in the order the report shows them
SECTIONS = {
    "zoo": "symstitch.reports.zoo",
    "stitch": "symstitch.reports.stitch",
    "align": "symstitch.reports.align",
    "projection": "symstitch.reports.projection",
    "dissect": "symstitch.reports.dissect",
    "merge": "symstitch.reports.merge",
}


@dataclass
class Section:
    """One kind's part of a report: markdown ``lines`` (from its ``## Heading`` on), the tidy CSVs it wrote
    (table name → path), its figures, and its headline numbers (``stats``: W&B summary key → value)."""

    lines: list[str] = field(default_factory=list)
    csvs: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def section(kind: str, records: Sequence[dict], out: Path) -> Section:
    """The report section of experiment ``kind`` over its cell records, its files written into ``out`` (made
    when missing)."""
    if kind not in SECTIONS:
        raise KeyError(f"no report section for experiment {kind!r}; known: {', '.join(SECTIONS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return importlib.import_module(SECTIONS[kind]).report(list(records), out)
