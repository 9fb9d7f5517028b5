"""Similarity metrics between representations (docs/method.md §3, paper §5), one family per module, each with a
functional metric, a torchmetrics class on top, and an internal ``_update``/``_compute`` pair that both of them and
the all-pairs engine call:

* :mod:`symstitch.metrics.procrustes`: G_ReLU and orthogonal Procrustes — :func:`procrustes`,
  :class:`Procrustes` (``_procrustes_update``: the moments of a batch; ``_procrustes_compute``: the similarity).
* :mod:`symstitch.metrics.cka`: linear and G_ReLU CKA, exact or by minibatches — :func:`cka`, :func:`hsic1`,
  :class:`CKA` (``_cka_update``: the HSIC1 terms of a minibatch's kernels; ``_cka_compute``: CKA from their sums).
* :mod:`symstitch.metrics.base`: what the families share — layouts, :func:`match_features`, the inputs every
  metric refuses (:data:`MIN_INPUTS`), the float64 summed states.
* :mod:`symstitch.metrics.functional`: :data:`FUNCTIONS`, the functional twins of the four metrics of the paper
  by name (:func:`similarity`); :mod:`symstitch.metrics.streaming`: :data:`METRICS`, the classes by name.
* :mod:`symstitch.metrics.pairwise`: :func:`similarity_matrix`, every metric for every pair of feature points
  of two networks in one pass over the data.

Everything public is re-exported here: ``from symstitch.metrics import cka, METRICS, similarity_matrix`` (the name
``symstitch.metrics.cka`` is the function; the module is ``importlib.import_module("symstitch.metrics.cka")``, or
``from symstitch.metrics.cka import CKA``).
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
