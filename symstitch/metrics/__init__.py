"""Similarity metrics between representations (docs/method.md §3, paper §5), functional and streaming.

* :mod:`symstitch.metrics.functional`: the formulas (module docstring) and the functions :func:`procrustes`,
  :func:`cka`, :func:`hsic1`, :func:`match_features`, :func:`similarity` (by name, from :data:`FUNCTIONS`),
  with the shape matching, moments, kernels and HSIC1 behind them.
* :mod:`symstitch.metrics.streaming`: the torchmetrics classes :class:`Procrustes` and :class:`CKA`
  (DDP-reducible states) and :data:`METRICS`, the four metrics of the paper by name.
* :mod:`symstitch.metrics.pairwise`: :func:`similarity_matrix`, every metric for every pair of feature points
  of two networks in one pass over the data.

Everything public is re-exported here: ``from symstitch.metrics import cka, METRICS, similarity_matrix``.
"""

from symstitch.metrics.functional import (
    CONSTANT_TOL,
    ESTIMATORS,
    FUNCTIONS,
    GROUPS,
    KERNELS,
    MODES,
    cka,
    hsic1,
    match_features,
    procrustes,
    similarity,
)
from symstitch.metrics.pairwise import similarity_matrix
from symstitch.metrics.streaming import CKA, METRICS, Procrustes

__all__ = [
    "CKA",
    "CONSTANT_TOL",
    "ESTIMATORS",
    "FUNCTIONS",
    "GROUPS",
    "KERNELS",
    "METRICS",
    "MODES",
    "Procrustes",
    "cka",
    "hsic1",
    "match_features",
    "procrustes",
    "similarity",
    "similarity_matrix",
]
