"""The functional metrics (docs/method.md §3): :func:`procrustes`, :func:`cka`, :func:`hsic1`,
:func:`match_features`, and :data:`FUNCTIONS`, the functional twins of the four metrics of the paper by name
(:func:`similarity`). The formulas and the numerics are with each family: :mod:`symstitch.metrics.procrustes`,
:mod:`symstitch.metrics.cka`; the shape matching and the edges every metric shares in
:mod:`symstitch.metrics.base`.
"""

from __future__ import annotations

from typing import Any

import torch

from symstitch.metrics.base import MIN_INPUTS, match_features
from symstitch.metrics.cka import CONSTANT_TOL, ESTIMATORS, KERNELS, MODES, cka, hsic1
from symstitch.metrics.procrustes import GROUPS, procrustes
from symstitch.registry import Registry

Tensor = torch.Tensor

FUNCTIONS: Registry[Tensor] = Registry("similarity function")

FUNCTIONS.register("procrustes_relu")(lambda x, y: procrustes(x, y, group="relu"))
FUNCTIONS.register("procrustes_orthogonal")(lambda x, y: procrustes(x, y, group="orthogonal"))
FUNCTIONS.register("cka_linear")(lambda x, y, **kw: cka(x, y, kernel="linear", **kw))
FUNCTIONS.register("cka_relu")(lambda x, y, estimator="max", **kw: cka(x, y, "relu", estimator, **kw))


def similarity(name: str, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
    """The functional metric ``name`` (one of :data:`FUNCTIONS`) of X and Y, e.g. ``similarity("cka_relu", x, y)``."""
    return FUNCTIONS.get(name)(x, y, **kwargs)


__all__ = [
    "CONSTANT_TOL",
    "MIN_INPUTS",
    "ESTIMATORS",
    "FUNCTIONS",
    "GROUPS",
    "KERNELS",
    "MODES",
    "cka",
    "hsic1",
    "match_features",
    "procrustes",
    "similarity",
]
