"""Streaming (torchmetrics) similarity metrics: :class:`Procrustes` and :class:`CKA` with DDP-reducible states,
and :data:`METRICS`, the four metrics of the paper by name (procrustes_relu, procrustes_orthogonal, cka_linear,
cka_relu). The formulas and the numerics are described in :mod:`symstitch.metrics.functional`.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from symstitch.metrics.functional import (
    BLOCK_ROWS,
    MODES,
    _check_group,
    _check_kernel,
    _check_n,
    _check_same_n,
    _cka_value,
    _gram,
    _Gram,
    _hsic1,
    _match_spatial,
    _moments,
    _Moments,
    _procrustes_value,
    _to_4d,
    cka,
)
from symstitch.registry import Registry

Tensor = torch.Tensor


def _f64_zero() -> Tensor:
    return torch.tensor(0.0, dtype=torch.float64)


class Procrustes(Metric):
    """Streaming Procrustes similarity: ``update(x, y)`` with batches of features of the same inputs,
    ``compute()`` = :func:`procrustes` on all of them.

    State (float64, summed across processes under DDP): the channel cross-products Σ X_a Y_b (C1×C2) on the
    matched spatial grid and the per-channel squared norms of X and Y; memory does not grow with n. To refuse
    what is undefined as :func:`procrustes` does (fewer than 4 inputs, features the same for every input), it
    also counts the inputs and keeps the first input's features of each side with the largest deviation from them
    (reduced by max and min across processes, so inputs that differ between processes count as varying). The
    states take their shapes at the first ``update``, so every process must see at least one batch.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, group: str = "relu", **kwargs: Any):
        super().__init__(**kwargs)
        self.group = _check_group(group)
        self.add_state("cross", default=_f64_zero(), dist_reduce_fx="sum")
        self.add_state("sq_x", default=_f64_zero(), dist_reduce_fx="sum")
        self.add_state("sq_y", default=_f64_zero(), dist_reduce_fx="sum")
        self.add_state("count", default=_f64_zero(), dist_reduce_fx="sum")
        for side in ("x", "y"):
            self.add_state(f"first_{side}_max", default=_f64_zero(), dist_reduce_fx="max")
            self.add_state(f"first_{side}_min", default=_f64_zero(), dist_reduce_fx="min")
            self.add_state(f"spread_{side}", default=_f64_zero(), dist_reduce_fx="max")

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        x4, y4 = _to_4d(x, "x"), _to_4d(y, "y")
        m = _moments(x4, y4)  # float64 products: no rescaling needed at any float32 scale
        if self.cross.dim() == 2 and self.cross.shape != m.cross.shape:
            raise ValueError(f"channel counts changed between batches: {tuple(self.cross.shape)} before, "
                             f"{tuple(m.cross.shape)} now")
        self.cross = self.cross + m.cross.to(self.cross.device)
        self.sq_x = self.sq_x + m.sq_x.to(self.sq_x.device)
        self.sq_y = self.sq_y + m.sq_y.to(self.sq_y.device)
        self.count = self.count + x4.shape[0]
        for side, t in (("x", x4), ("y", y4)):
            first = getattr(self, f"first_{side}_max")
            if first.dim() == 0:  # the first batch: its first input is the reference
                first = t[0].to(first.device, torch.float64)
                setattr(self, f"first_{side}_max", first)
                setattr(self, f"first_{side}_min", first.clone())
            deviation = (t.to(torch.float64) - first.to(t.device)).abs().amax().to(first.device)
            setattr(self, f"spread_{side}", torch.maximum(getattr(self, f"spread_{side}"), deviation))

    def compute(self) -> Tensor:
        if self.cross.dim() != 2:
            raise ValueError("Procrustes.compute() before any update")
        _check_n(int(self.count), "Procrustes")
        for side in ("x", "y"):
            same = bool(getattr(self, f"spread_{side}") == 0) and torch.equal(
                getattr(self, f"first_{side}_max"), getattr(self, f"first_{side}_min"))
            if same:
                kind = "all zero" if not bool(getattr(self, f"first_{side}_max").any()) else "the same for every input"
                raise ValueError(f"Procrustes is undefined: the features of {side} are {kind} (a representation "
                                 "that does not change with the input says nothing about it)")
        return _procrustes_value(_Moments(self.cross, self.sq_x, self.sq_y), self.group)


class CKA(Metric):
    """Streaming CKA: ``update(x, y)`` with batches of features of the same inputs, then ``compute()``.

    * ``mode="exact"``: keeps the batches (list states, concatenated across processes under DDP; float64
      batches stay float64, lower precisions are stored as float32) and computes :func:`cka` on all of them.
      Memory grows with n (features, then n×n kernels).
    * ``mode="minibatch"`` (Nguyen, Raghu & Kornblith 2021): every update is one minibatch; its kernels are
      centred and built within it, and float64 sums of HSIC1(K, L), HSIC1(K, K), HSIC1(L, L) and the number of
      minibatches are kept (summed under DDP). ``compute`` = mean HSIC1(K, L) / sqrt(mean HSIC1(K, K) ·
      mean HSIC1(L, L)); memory does not grow with n. Every minibatch needs n ≥ 4.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, kernel: str = "linear", estimator: str = "max", mode: str = "exact",
                 block_size: int = BLOCK_ROWS, **kwargs: Any):
        super().__init__(**kwargs)
        _check_kernel(kernel, estimator)
        if mode not in MODES:
            raise ValueError(f"unknown CKA mode {mode!r}; choose from {', '.join(MODES)}")
        self.kernel, self.estimator, self.mode, self.block_size = kernel, estimator, mode, block_size
        if mode == "exact":
            self.add_state("xs", default=[], dist_reduce_fx="cat")
            self.add_state("ys", default=[], dist_reduce_fx="cat")
        else:
            for name in ("hsic_xy", "hsic_xx", "hsic_yy", "batches"):
                self.add_state(name, default=_f64_zero(), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, x: Union[Tensor, _Gram], y: Union[Tensor, _Gram]) -> None:
        if self.mode == "exact":
            x4, y4 = _to_4d(x, "x"), _to_4d(y, "y")
            _check_same_n(x4, y4)
            keep = (lambda t: t.detach() if t.dtype == torch.float64 else t.detach().to(torch.float32))
            self.xs.append(keep(x))
            self.ys.append(keep(y))
            return
        if isinstance(x, _Gram):
            gx, gy = x, y
        else:
            xm, ym = _match_spatial(x, y)
            _check_n(xm.shape[0], "a CKA minibatch")
            c = max(xm.shape[1], ym.shape[1])
            gx = _gram(xm, self.kernel, self.estimator, c, self.block_size)
            gy = _gram(ym, self.kernel, self.estimator, c, self.block_size)
        _check_n(gx.n, "a CKA minibatch")
        device = self.hsic_xy.device
        self.hsic_xy = self.hsic_xy + _hsic1(gx, gy).to(device)
        self.hsic_xx = self.hsic_xx + gx.self_hsic().to(device)
        self.hsic_yy = self.hsic_yy + gy.self_hsic().to(device)
        self.batches = self.batches + 1

    def compute(self) -> Tensor:
        if self.mode == "exact":
            if isinstance(self.xs, list) and not self.xs:
                raise ValueError("CKA.compute() before any update")
            return cka(dim_zero_cat(self.xs), dim_zero_cat(self.ys), self.kernel, self.estimator,
                       block_size=self.block_size)
        if float(self.batches) == 0:
            raise ValueError("CKA.compute() before any update")
        k = self.batches
        return _cka_value(self.hsic_xy / k, self.hsic_xx / k, self.hsic_yy / k)


# ----------------------------------------------------------------------------------------------------------
# Registry: the four metrics of the paper, by name

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
