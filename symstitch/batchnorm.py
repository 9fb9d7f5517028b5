"""BatchNorm statistics re-estimated on a pass of data: the *recalibrated* protocol of stitching (docs/method.md
§2: the statistics after a stitch) and the *re-estimated* line of merging (§7: the statistics of an interpolated
network), one home for both.

Inside :func:`reestimating`, every BatchNorm of the given modules is reset, in train mode, with a cumulative
average (``momentum=None``), and everything else in eval mode; the forward passes run inside set each running
mean and variance to the exact mean and unbiased variance of its input over those passes, whatever the batches.
On exit: eval mode, the momenta as they were.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(*modules: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm (1d, 2d, 3d, sync) in ``modules``."""
    return [m for module in modules for m in module.modules() if isinstance(m, _BatchNorm)]


@contextlib.contextmanager
def reestimating(*modules: nn.Module) -> Iterator[list[_BatchNorm]]:
    """The BatchNorms of ``modules`` (module docstring), for the passes run inside; empty when there are none
    (then a pass changes nothing and can be skipped)."""
    norms = batch_norms(*modules)
    momenta = [m.momentum for m in norms]
    for module in modules:
        module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        yield norms
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()


__all__ = ["batch_norms", "reestimating"]
