"""Choosing a stitching layer's option on the validation split: the paper's cross-validated G_ReLU stitch.

The original code chose the ``birkhoff`` (G_ReLU) stitch's α of the −α‖W‖_F term per stitch point by validation
accuracy over α ∈ {0.001, 0.01, 0.1, 1, 10}, then reported the test accuracy at the chosen α. A stitch sweep
names such a choice as a layer whose option lists candidate values,
``birkhoff:alpha=0.001|0.01|0.1|1|10`` (:class:`~symstitch.stitching.grammar.LayerChoice`), and runs one ordinary,
resumable cell per candidate; each such cell also evaluates its final stitched network on the DataModule's
held-out validation split (``val_split`` > 0, carved from the training set; a sweep without one is refused) and
records the validation accuracies (``val_stitched_acc``, ``val_stitched_recalibrated_acc``, …) next to the
usual test numbers. A candidate cell's ``cell`` holds ``select``: ``{"layer": <the choice as written>, "series":
<its report name>, "option", "value", "values"}``.

:func:`select` then chooses, from the cell records alone, for every stitch point, pair and repeat and for every
evaluation protocol:

- the candidate with the highest validation accuracy of the stitched network under that protocol (the frozen
  choice by the frozen validation accuracy, the recalibrated one by the recalibrated); test numbers are never
  read before the choice is made;
- ties (equal validation accuracy) go to the smallest value when every candidate is a number, else to the
  candidate listed first;
- a choice is made only among all candidates: when a candidate's cell is missing or lacks the validation
  accuracy (or the test penalty) of that protocol, nothing is chosen for that point, pair and repeat and the
  :class:`Selection` names the missing values;
- the selected result is the chosen candidate's test penalty and test accuracy (its own cell's numbers).

This module reads records only (plain dicts, as :func:`symstitch.report.collect` gives them); it imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from symstitch.stitching.record import PROTOCOLS, as_number, record_key

#: evaluation protocol → (test penalty, test stitched accuracy, validation stitched accuracy): keys of a stitch
#: cell's ``result`` (a protocol a cell did not run has none of them)
RECORD_KEYS = {protocol: (record_key("penalty", protocol), record_key("stitched", protocol),
                          record_key("stitched", protocol, "val")) for protocol in PROTOCOLS}


def is_candidate(record: dict) -> bool:
    """Whether a stitch record is a candidate of a choice (its cell has ``select``)."""
    return isinstance(record.get("cell", {}).get("select"), dict)


def value_text(value: Any) -> str:
    """A candidate value as reports show it: ``0.001``, ``10``, ``euclidean``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def preference(values: Sequence[Any]) -> list[Any]:
    """``values`` in tie-breaking order: ascending when all are numbers, else as listed."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return sorted(values) if numeric else list(values)


@dataclass
class Candidate:
    """One candidate value's cell under one protocol: its validation accuracy (what the choice reads) and its test
    numbers (what the chosen one reports); NaN where the record lacks them."""

    value: Any
    val_acc: float
    penalty_pts: float
    stitched_acc: float
    source_acc: float = math.nan
    target_acc: float = math.nan
    file: Optional[str] = None


@dataclass
class Selection:
    """The choice at one stitch point of one pair and repeat, under one protocol; ``chosen`` is None when a
    candidate is missing (``missing``: their values)."""

    arch: str
    source: str
    target: str
    point: str
    point_index: Any
    repeat: Any
    layer: str
    series: str
    option: str
    protocol: str
    candidates: list[Candidate] = field(default_factory=list)
    missing: list[Any] = field(default_factory=list)
    chosen: Optional[Candidate] = None

    @property
    def chosen_text(self) -> str:
        """``alpha=0.1``, or empty when nothing was chosen."""
        return f"{self.option}={value_text(self.chosen.value)}" if self.chosen else ""


def _folder(record: dict) -> str:
    """The sweep folder a record belongs to (the part of its path before ``cells/``): results of two sweeps
    collected together are never chosen among as one grid."""
    path = Path(str(record.get("file") or ""))
    parts = path.parts
    return str(Path(*parts[:len(parts) - parts[::-1].index("cells") - 1])) if "cells" in parts else ""


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the highest validation accuracy; ties to the first in :func:`preference` order."""
    order = {repr(v): i for i, v in enumerate(preference([c.value for c in candidates]))}
    return max(candidates, key=lambda c: (c.val_acc, -order[repr(c.value)]))


def select(records: Sequence[dict]) -> list[Selection]:
    """Every choice the candidate records below allow (see the module docstring for the rule), one
    :class:`Selection` per sweep folder, architecture, pair, stitch point, repeat, choice and protocol that any
    of its candidates reports; records that are not candidates are ignored."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        if not is_candidate(rec):
            continue
        c = rec["cell"]
        key = (_folder(rec), str(c.get("arch", "")), str(c.get("source")), str(c.get("target")), str(c.get("point")),
               str(c.get("repeat", 0)), str(c["select"].get("layer")))
        groups.setdefault(key, []).append(rec)
    selections = []
    for (_, arch, source, target, point, _, layer), recs in groups.items():
        first = recs[0]["cell"]
        spec = first["select"]
        values = list(spec.get("values") or dict.fromkeys(r["cell"]["select"].get("value") for r in recs))
        by_value: dict[str, list[dict]] = {}
        for rec in recs:
            by_value.setdefault(repr(rec["cell"]["select"].get("value")), []).append(rec)
        for protocol, (penalty_key, acc_key, val_key) in RECORD_KEYS.items():
            if not any(penalty_key in r["result"] or val_key in r["result"] for r in recs):
                continue  # no candidate ran this protocol
            candidates = []
            for value in values:
                cells = by_value.get(repr(value), [])
                r = cells[0]["result"] if len(cells) == 1 else {}  # two cells of one value: ambiguous, missing
                candidates.append(Candidate(value, as_number(r.get(val_key)), as_number(r.get(penalty_key)),
                                            as_number(r.get(acc_key)), as_number(r.get("source_acc")),
                                            as_number(r.get("target_acc")), cells[0].get("file") if cells else None))
            missing = [c.value for c in candidates if not (math.isfinite(c.val_acc) and math.isfinite(c.penalty_pts))]
            selections.append(Selection(
                arch=arch, source=source, target=target, point=point, point_index=first.get("point_index"),
                repeat=first.get("repeat", 0), layer=layer, series=str(spec.get("series") or layer),
                option=str(spec.get("option", "")), protocol=protocol, candidates=candidates, missing=missing,
                chosen=None if missing else choose(candidates)))
    return selections
