"""The metric code path as it was before the fused kernels (symstitch 0.2.0, ``symstitch/metrics`` at commit
2024a85), kept verbatim — only its imports point here — as the baseline of ``experiments/benchmarks/metrics.py``
and of the equality tests in ``tests/test_metrics_fast.py``. Not part of the package; import it with
``experiments/benchmarks`` on ``sys.path``.
"""

from metrics_baseline.functional import cka, procrustes, similarity
from metrics_baseline.pairwise import similarity_matrix

__all__ = ["cka", "procrustes", "similarity", "similarity_matrix"]
