"""Merging along a line of weights and the loss barrier (docs/method.md §7)::

    θ(λ) = (1 − λ) θ_A + λ θ_{g·B}
    barrier = max_λ [ L(θ(λ)) − ((1 − λ) L(θ(0)) + λ L(θ(1))) ]

every floating-point parameter and buffer interpolated, BatchNorm's running statistics included
(``interpolated``), or those statistics re-estimated at each λ on one pass of the training images
(``reestimated``: every BatchNorm reset and run with a cumulative average, as the stitching's recalibrated
protocol does): an interpolated network's activations shrink, so the interpolated statistics no longer describe
them. Integer buffers (BatchNorm's batch counter) are A's. The barrier of a mode is measured against the line
between that mode's own endpoints.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from symstitch.batchnorm import batch_norms, reestimating
from symstitch.inputs import batch_images, labelled_batch, loader_normalization

Tensor = torch.Tensor

#: how BatchNorm's running statistics are set along the line
BN_MODES = ("interpolated", "reestimated")


def lambdas(count: int = 11) -> list[float]:
    """``count`` evenly spaced λ from 0 to 1 (both ends included; at least 3)."""
    if count < 3:
        raise ValueError(f"the line needs at least 3 values of λ (its ends and one between); got {count}")
    return [round(k / (count - 1), 12) for k in range(count)]


@torch.no_grad()
def interpolate(a: nn.Module, b: nn.Module, lam: float) -> nn.Module:
    """A copy of ``a`` with θ(λ) = (1 − λ) θ_A + λ θ_B in every floating-point parameter and buffer (integer
    buffers: A's). A and B must have the same state-dict keys and shapes."""
    state_a, state_b = a.state_dict(), b.state_dict()
    if state_a.keys() != state_b.keys() or any(state_a[k].shape != state_b[k].shape for k in state_a):
        raise ValueError("the two networks differ in their parameters (names or shapes): interpolation needs one "
                         "architecture and width")
    out = copy.deepcopy(a)
    out.load_state_dict({k: torch.lerp(v, state_b[k].to(v), lam) if v.is_floating_point() else v
                         for k, v in state_a.items()})
    return out


@torch.no_grad()
def reestimate_batchnorm(net: nn.Module, data: Iterable[Any], normalize: Optional[Any] = None,
                         device: Optional[str] = None) -> nn.Module:
    """``net`` (in place, returned in eval mode) with every BatchNorm's running statistics re-estimated on one pass
    of ``data`` (:func:`symstitch.batchnorm.reestimating`: reset, cumulative average)."""
    with reestimating(net) as norms:
        if norms:
            normalizer = loader_normalization(data, normalize)
            dev = torch.device(device) if device else next(net.parameters()).device
            seen = 0
            for batch in data:
                net(batch_images(batch, normalizer).to(dev))
                seen += 1
            if not seen:
                raise ValueError("re-estimating BatchNorm statistics needs data: the loader yielded no batches")
    return net


@torch.no_grad()
def evaluate(net: nn.Module, data: Iterable[Any], normalize: Optional[Any] = None,
             device: Optional[str] = None) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``net`` (eval mode) over (image, label) batches."""
    normalizer = loader_normalization(data, normalize)
    dev = torch.device(device) if device else next(net.parameters()).device
    net.eval()
    loss, correct, n = 0.0, 0, 0
    for batch in data:
        x, y = labelled_batch(batch, normalizer)
        logits = net(x.to(dev)).double()
        y = y.to(dev)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    if not n:
        raise ValueError("evaluation needs data: the loader yielded no batches")
    return loss / n, correct / n


def barrier(lams: Sequence[float], values: Sequence[float], higher_is_worse: bool = True) -> float:
    """The largest excess of ``values`` over the straight line between its ends (a loss: above the line; an
    accuracy, ``higher_is_worse=False``: below it)."""
    lo, hi = values[0], values[-1]
    sign = 1.0 if higher_is_worse else -1.0
    return max(sign * (v - ((1 - t) * lo + t * hi)) for t, v in zip(lams, values))


@dataclass
class MergePath:
    """Loss and accuracy along λ for each BatchNorm mode, and the barriers (loss: above the line; accuracy, in
    points: below it)."""

    lambdas: list[float]
    loss: dict[str, list[float]] = field(default_factory=dict)
    acc: dict[str, list[float]] = field(default_factory=dict)
    barrier_loss: dict[str, float] = field(default_factory=dict)
    barrier_acc_pts: dict[str, float] = field(default_factory=dict)

    def midpoint(self, mode: str, what: str = "acc") -> float:
        """The value at the λ nearest 0.5."""
        k = min(range(len(self.lambdas)), key=lambda i: abs(self.lambdas[i] - 0.5))
        return getattr(self, what)[mode][k]

    def to_dict(self) -> dict:
        return asdict(self)


def merge_path(a: nn.Module, b: nn.Module, test: Iterable[Any], train: Optional[Iterable[Any]] = None, *,
               count: int = 11, modes: Sequence[str] = BN_MODES, normalize: Optional[Any] = None,
               device: Optional[str] = None, progress: Optional[Any] = None) -> MergePath:
    """Evaluate θ(λ) between A and (aligned) B at ``count`` values of λ on ``test``, for each BatchNorm mode
    (``reestimated`` needs ``train``; a network without BatchNorm has only ``interpolated``). ``progress``: a
    callable advanced once per network evaluated."""
    unknown = [m for m in modes if m not in BN_MODES]
    if unknown:
        raise ValueError(f"BatchNorm modes are {', '.join(BN_MODES)}; got {', '.join(unknown)}")
    if not batch_norms(a):
        modes = [m for m in modes if m == "interpolated"] or ["interpolated"]
    if "reestimated" in modes and train is None:
        raise ValueError("re-estimating BatchNorm statistics needs the training images (train=…)")
    path = MergePath(lambdas(count))
    for mode in modes:
        losses, accs = [], []
        for lam in path.lambdas:
            net = interpolate(a, b, lam)
            if mode == "reestimated":
                reestimate_batchnorm(net, train, normalize, device)
            loss, acc = evaluate(net, test, normalize, device)
            losses.append(loss)
            accs.append(acc)
            if progress is not None:
                progress()
        path.loss[mode], path.acc[mode] = losses, accs
        path.barrier_loss[mode] = barrier(path.lambdas, losses)
        path.barrier_acc_pts[mode] = 100 * barrier(path.lambdas, accs, higher_is_worse=False)
    return path


__all__ = ["BN_MODES", "MergePath", "barrier", "evaluate", "interpolate", "lambdas", "merge_path",
           "reestimate_batchnorm"]
