"""What a finished stitch leaves: :class:`StitchRecord`, the one home of a stitch cell's record keys.

A stitch is evaluated under two protocols (docs/method.md §2): ``frozen`` (B's own BatchNorm statistics) and
``recalibrated`` (the statistics after the stitch re-estimated on the training images first). Each protocol
has a penalty in points, penalty(p) = (acc(A) + acc(B)) / 2 − acc(S), and the stitched network's accuracy S.
In a record (a cell's ``result``) they are

    ========================  ==================  ==================================
    protocol                  penalty (points)    stitched accuracy
    ========================  ==================  ==================================
    frozen                    ``penalty_pts``     ``stitched_acc``
    recalibrated              ``penalty_recalibrated_pts``  ``stitched_recalibrated_acc``
    ========================  ==================  ==================================

and the same with ``val_`` in front for the held-out validation split (cells that choose an option on it). The
networks' own accuracies are ``source_acc`` and ``target_acc``. Logged metrics are ``test/stitch/penalty_pts``,
``test/stitch_recalibrated/acc``, … (:data:`PROTOCOLS` names them).

Imports nothing heavy: reports and selections read records without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

#: evaluation protocol → the name its accuracy and penalty are logged under (``test/<name>/penalty_pts``)
PROTOCOLS = {"frozen": "stitch", "recalibrated": "stitch_recalibrated"}

Quantity = Literal["penalty", "stitched"]
Split = Literal["test", "val"]


def record_key(quantity: Quantity, protocol: str, split: Split = "test") -> str:
    """The key of a protocol's penalty (``quantity="penalty"``, in points) or stitched accuracy (``"stitched"``)
    in a record: ``penalty_pts``, ``stitched_recalibrated_acc``, ``val_stitched_acc``, …"""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    middle = "" if protocol == "frozen" else f"_{protocol}"
    unit = "_pts" if quantity == "penalty" else "_acc"
    return f"{'val_' if split == 'val' else ''}{quantity}{middle}{unit}"


def _logged(metrics: Mapping[str, float], split: Split, name: str, what: str) -> Optional[float]:
    value = metrics.get(f"{'test' if split == 'test' else 'val'}/{name}/{what}")
    return None if value is None else float(value)


@dataclass
class StitchRecord:
    """One stitching layer's outcome. ``protocols``: protocol → (penalty in points, stitched accuracy), for the
    protocols that ran; ``validation``: the same numbers on the validation split (``source_acc``, ``target_acc``
    and protocol → pair), when the cell evaluated it; ``model``: the learned layer's summary."""

    source_acc: float
    target_acc: float
    protocols: dict[str, tuple[Optional[float], Optional[float]]] = field(default_factory=dict)
    permutation: Optional[list[int]] = None
    model: dict = field(default_factory=dict)
    validation: Optional[dict[str, Any]] = None
    run_dir: Optional[str] = None

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float], log_names: Mapping[str, str], summary: dict,
                     validation: Optional[Mapping[str, float]] = None, run_dir: Optional[str] = None) -> "StitchRecord":
        """From a finished fit's logged metrics (``test/<name>/…``; ``validation``: its ``val/…`` metrics, when it
        evaluated the validation split): ``log_names`` is protocol → logged name of the layer (its
        :class:`~symstitch.stitching.StitchingModule`'s ``log_names[k]``), ``summary`` its ``summary(k)``."""
        protocols = {p: (_logged(metrics, "test", name, "penalty_pts"), _logged(metrics, "test", name, "acc"))
                     for p, name in log_names.items()}
        val = None
        if validation is not None:
            val = {"source_acc": float(validation["val/source/acc"]), "target_acc": float(validation["val/target/acc"])}
            val.update({p: (_logged(validation, "val", name, "penalty_pts"), _logged(validation, "val", name, "acc"))
                        for p, name in log_names.items() if f"val/{name}/acc" in validation})
        return cls(float(metrics["test/source/acc"]), float(metrics["test/target/acc"]), protocols,
                   summary.get("permutation"), summary, val, run_dir)

    def penalty_pts(self, protocol: str = "frozen") -> Optional[float]:
        return self.protocols.get(protocol, (None, None))[0]

    def stitched_acc(self, protocol: str = "frozen") -> Optional[float]:
        return self.protocols.get(protocol, (None, None))[1]

    def to_result(self) -> dict[str, Any]:
        """The record as a cell's ``result`` (flat keys, see the module docstring): the frozen protocol's keys are
        always there (None when it did not run), another protocol's only when it ran."""
        result: dict[str, Any] = {record_key("penalty", "frozen"): None, record_key("stitched", "frozen"): None}
        for protocol, (penalty, acc) in self.protocols.items():
            result[record_key("penalty", protocol)], result[record_key("stitched", protocol)] = penalty, acc
        result.update(source_acc=self.source_acc, target_acc=self.target_acc, permutation=self.permutation,
                      model=self.model)
        if self.validation is not None:
            result.update(val_source_acc=self.validation["source_acc"], val_target_acc=self.validation["target_acc"])
            for protocol in PROTOCOLS:
                if protocol in self.validation:
                    penalty, acc = self.validation[protocol]
                    result[record_key("penalty", protocol, "val")] = penalty
                    result[record_key("stitched", protocol, "val")] = acc
        if self.run_dir is not None:
            result["run_dir"] = self.run_dir
        return result


def penalty_of(result: Mapping[str, Any], protocol: str = "frozen") -> float:
    """A protocol's penalty in points from a record's ``result`` (NaN when absent or null). Records written before
    the unit was fixed held the frozen penalty as a fraction, ``penalty``."""
    key = record_key("penalty", protocol)
    if key not in result and protocol == "frozen" and "penalty" in result:
        return 100 * as_number(result["penalty"])
    return as_number(result.get(key))


def as_number(value: Any) -> float:
    """A number from a record: None, booleans, strings and other non-numbers become NaN."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


__all__ = ["PROTOCOLS", "StitchRecord", "as_number", "penalty_of", "record_key"]
