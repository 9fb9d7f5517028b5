"""What every metric family shares (docs/method.md §3, §8): the layouts of features, the matching of two
feature points' shapes, the inputs every metric refuses, and the float64 summed states of the torchmetrics
classes. The families are :mod:`symstitch.metrics.procrustes` and :mod:`symstitch.metrics.cka`.

Features X ∈ R^{n×C1×h×w} and Y ∈ R^{n×C2×h'×w'} are taken at two feature points for the *same* n inputs.
Accepted layouts: ``(n, C)`` (read as ``(n, C, 1, 1)``), token tensors ``(n, L, C)`` (channels last, read as
``(n, C, L, 1)``) and ``(n, C, H, W)``.

Shape matching (:func:`match_features`). If the spatial sizes differ, the smaller is upsampled by nearest
neighbour to the larger (``F.interpolate(mode="nearest")``); if the channel counts differ, the smaller is
zero-padded to C = max(C1, C2) channels. Channel norms and means are over (n, h, w). Where nearest upsampling
only repeats every position f times (:func:`_uniform_upsampling`), the metrics work on the coarser grid and
account for the factor instead of upsampling.

Defined behaviour at the edges, the same for every metric and every path (functional, streaming, all pairs):
a similarity compares how two representations vary over the inputs, so where that is not measured the result is
a ValueError naming the reason (a NaN with the reason in a :func:`~symstitch.metrics.similarity_matrix` row),
never a number:

* fewer than :data:`MIN_INPUTS` = 4 inputs (CKA's unbiased HSIC1 divides by n(n−3); with one input any two
  representations are orthogonally equivalent, and Procrustes of a handful scores high by chance);
* features that are the same for every input (bitwise: a representation that does not change with the input
  says nothing about it), all-zero features included;
* NaN or Inf values.

Numerics (docs/method.md §8): every sum over inputs is accumulated in float64 (the states of the streaming
classes are float64 sums, :class:`_Sums`); the argument of every square root is clamped at 0; the caller's
tensors are never modified. The metrics are measurements: they are computed without gradients
(``requires_grad`` inputs are read, not differentiated). float16 and bfloat16 features are computed in float32.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torchmetrics import Metric

Tensor = torch.Tensor

#: the fewest inputs any metric is defined for
MIN_INPUTS = 4


# ----------------------------------------------------------------------------------------------------------
# Layouts and the inputs every metric refuses


def _to_4d(t: Tensor, name: str = "features") -> Tensor:
    """(n, C) → (n, C, 1, 1); tokens (n, L, C) → (n, C, L, 1); (n, C, H, W) unchanged (views, no copy)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2:
        t = t[:, :, None, None]
    elif t.dim() == 3:
        t = t.transpose(1, 2)[..., None]
    elif t.dim() != 4:
        raise ValueError(f"{name}: expected (n, C), (n, L, C) or (n, C, H, W) features; got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t


def _not_finite(t: Tensor, name: str, probe: Tensor) -> None:
    """Raise ValueError if ``t`` holds NaN or Inf. ``probe`` is a reduction of ``t`` computed anyway (a sum, a
    squared norm): NaN and Inf propagate into it, so a finite probe clears ``t`` without another pass. Only a
    non-finite probe (NaN/Inf in ``t``, or a sum that overflowed) pays for the exact elementwise check."""
    if not bool(torch.isfinite(probe).all()) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _is_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t``: a sum first (one cheap pass), the elementwise check only when the sum is not
    finite (NaN/Inf present, or an overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(t: Tensor, name: str) -> None:
    if not _is_finite(t):
        raise ValueError(f"{name} contains NaN or Inf values")


def _identical_inputs(t: Tensor) -> bool:
    """Whether every input (first dim) gives bitwise the same features: almost always decided by comparing two
    inputs; the whole tensor is compared only when those agree."""
    if t.shape[0] < 2:
        return True
    if not torch.equal(t[1], t[0]) or not torch.equal(t[-1], t[0]):
        return False
    return torch.equal(t, t[:1].expand_as(t))


def _check_varies(t: Tensor, name: str, what: str) -> None:
    """ValueError when the features ``t`` (n first) are the same for every input (all zero included)."""
    if _identical_inputs(t):
        kind = "all zero" if not bool(t[:1].any()) else "the same for every input"
        raise ValueError(f"{what} is undefined: the features of {name} are {kind} (a representation that does "
                         "not change with the input says nothing about it)")


def _check_n(n: int, what: str = "CKA") -> None:
    if n < MIN_INPUTS:
        why = ("the unbiased HSIC1 divides by n(n−3)" if "CKA" in what or "HSIC" in what else
               "as every metric here: fewer inputs cannot tell two representations apart")
        raise ValueError(f"{what} needs at least {MIN_INPUTS} inputs ({why}); got n = {n}")


# ----------------------------------------------------------------------------------------------------------
# Shape matching


def _check_same_n(x: Tensor, y: Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold features of the same inputs: got n = {x.shape[0]} and n = {y.shape[0]}")


def _target_hw(x: Tensor, y: Tensor) -> tuple[int, int]:
    return max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3])


def _upsample(t: Tensor, hw: tuple[int, int]) -> Tensor:
    """Nearest-neighbour upsampling of (n, C, H, W) to ``hw`` (a new tensor; ``t`` itself if already there)."""
    if tuple(t.shape[2:]) == tuple(hw):
        return t
    return F.interpolate(t, size=hw, mode="nearest")


def _match_spatial(x: Tensor, y: Tensor, check: bool = True) -> tuple[Tensor, Tensor]:
    """Both as (n, C, H, W) on the larger spatial grid; checks n and (``check``) finiteness."""
    x, y = _to_4d(x, "x"), _to_4d(y, "y")
    _check_same_n(x, y)
    if check:
        _check_finite(x, "x")
        _check_finite(y, "y")
    dtype = torch.promote_types(x.dtype, y.dtype)
    hw = _target_hw(x, y)
    return _upsample(x.to(dtype), hw), _upsample(y.to(dtype), hw)


def match_features(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The pair on common ground: both ``(n, C, H, W)`` with H, W the larger spatial size (nearest-neighbour
    upsampling of the smaller) and C = max(C1, C2) (zero channels appended to the narrower).

    Different n raise ValueError. The inputs are never modified (new tensors, or views of unchanged ones).
    """
    x, y = _match_spatial(x, y)
    c = max(x.shape[1], y.shape[1])
    return _pad_channels(x, c), _pad_channels(y, c)


def _pad_channels(t: Tensor, c: int) -> Tensor:
    if t.shape[1] == c:
        return t
    zeros = t.new_zeros(t.shape[0], c - t.shape[1], *t.shape[2:])
    return torch.cat([t, zeros], dim=1)


@functools.lru_cache(maxsize=None)
def _nearest_factor(src: int, dst: int) -> Optional[int]:
    """f when nearest upsampling src → dst (as torch computes it) repeats every source index in a block of
    exactly f outputs, else None. Such an upsampling only reweights every position by f."""
    if dst < src or dst % src:
        return None
    f = dst // src
    idx = F.interpolate(torch.arange(src, dtype=torch.float32).view(1, 1, src), size=dst, mode="nearest")
    return f if torch.equal(idx.view(-1).long(), torch.arange(dst) // f) else None


def _uniform_upsampling(hw: Sequence[int], target: Sequence[int]) -> bool:
    return all(_nearest_factor(int(s), int(t)) is not None for s, t in zip(hw, target))


# ----------------------------------------------------------------------------------------------------------
# Streaming states


class _Sums(Metric):
    """A torchmetrics metric whose states are float64 sums over the batches, summed across processes under DDP
    (merging two of them is adding their states): the streaming classes of the families and the all-pairs engines
    of :func:`~symstitch.metrics.similarity_matrix`."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def _add_sums(self, *names: str, shape: tuple[int, ...] = ()) -> None:
        for name in names:
            self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, **terms: Union[Tensor, float]) -> None:
        """Each state ``name`` += ``terms[name]`` (on the state's device; a 0-dim state takes the shape of its
        first term)."""
        for name, term in terms.items():
            state = getattr(self, name)
            setattr(self, name, state + torch.as_tensor(term, dtype=torch.float64).to(state.device))
