"""The streaming (torchmetrics) metrics: :class:`~symstitch.metrics.procrustes.Procrustes` and
:class:`~symstitch.metrics.cka.CKA` with DDP-reducible states, and :data:`METRICS`, the four metrics of the paper
by name (procrustes_relu, procrustes_orthogonal, cka_linear, cka_relu).
"""

from __future__ import annotations

from typing import Any

from torchmetrics import Metric

from symstitch.metrics.cka import CKA
from symstitch.metrics.procrustes import Procrustes
from symstitch.registry import Registry

METRICS: Registry[Metric] = Registry("metric")


@METRICS.register("procrustes_relu")
def _procrustes_relu(**kwargs: Any) -> Procrustes:
    return Procrustes(group="relu", **kwargs)


@METRICS.register("procrustes_orthogonal")
def _procrustes_orthogonal(**kwargs: Any) -> Procrustes:
    return Procrustes(group="orthogonal", **kwargs)


@METRICS.register("cka_linear")
def _cka_linear(mode: str = "exact", **kwargs: Any) -> CKA:
    return CKA(kernel="linear", mode=mode, **kwargs)


@METRICS.register("cka_relu")
def _cka_relu(mode: str = "exact", estimator: str = "max", **kwargs: Any) -> CKA:
    return CKA(kernel="relu", estimator=estimator, mode=mode, **kwargs)


__all__ = [
    "CKA",
    "METRICS",
    "Procrustes",
]
