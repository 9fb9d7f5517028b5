"""Stitching layers T (docs/method.md §2, paper §4): S(x) = B_{>p}( T( A_{≤p}(x) ) ), where only T trains.

T acts on the channels: on (N, C, H, W) like a 1×1 convolution, on (N, L, C) tokens over the last dim, and on
(N, C) vectors. For one channel vector x every layer computes

    y = norm_after( T · norm_before(x) + b ),      T = matrix() ∈ R^{C×C}

with optional bias b and an optional BatchNorm on either side (``norm="before"`` or ``"after"``; it
normalises each channel over every other dim, N·H·W or N·L, and uses its running statistics in eval mode).

Relaxed and evaluated form. Each layer has a relaxed form, trained by gradient descent, and an evaluated form:

    train mode and not hardened  →  the relaxed form
    eval mode, or hardened       →  the evaluated form: a true P·D for ``birkhoff`` and ``softsort``, the
                                    thresholded W for ``lasso``; the relaxed form itself for the others.

``harden()`` fixes the evaluated form for good: the hard permutation becomes a buffer, the relaxed parameters
stop training (``requires_grad`` False) and only the scales D and the bias go on training.

Training contract, for whoever runs the loop:
    loss = task_loss + layer.regularization()
    after every real optimizer step:  layer.on_after_optimizer_step()   (deterministic and idempotent)
    phase switch:                     layer.harden(), then optimise [p for p in parameters() if p.requires_grad]
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass

from typing import Any, Callable, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from symstitch.registry import Registry
from symstitch.symmetry import (
    IntertwinerGroup,
    InvertibleScaledPermutations,
    Permutations,
    PositiveScaledPermutations,
    SignedPermutations,
    intertwiner_group,
)

Tensor = torch.Tensor
NormPlacement = Literal["none", "before", "after"]
NORM_PLACEMENTS = ("none", "before", "after")

#: tensor rank → its channel dim: (N, C), (N, L, C), (N, C, H, W)
_CHANNEL_DIM = {2: 1, 3: 2, 4: 1}


def channels_last(h: Tensor, channels: int) -> tuple[Tensor, int]:
    """``h`` with its channel dim moved last, and that dim's index in ``h``."""
    dim = _CHANNEL_DIM.get(h.dim())
    if dim is None or h.shape[dim] != channels:
        raise ValueError(f"expected (N, {channels}), (N, L, {channels}) or (N, {channels}, H, W); "
                         f"got shape {tuple(h.shape)}")
    return h.movedim(dim, -1), dim


# ----------------------------------------------------------------------------------------------------------
# The Birkhoff polytope B_C = { W ≥ 0 : W 1 = 1, Wᵀ 1 = 1 } and projections onto it


def _guard_zero_lines(M: Tensor) -> Tensor:
    """A zero row, then a zero column, of M ≥ 0 becomes uniform 1/C: no sum below can be zero."""
    uniform = 1.0 / M.shape[0]
    M = torch.where(M.sum(1, keepdim=True) > 0, M, uniform)
    return torch.where(M.sum(0, keepdim=True) > 0, M, uniform)


def _max_deviation(M: Tensor) -> float:
    """max( max_i |Σ_j M_ij − 1|, max_j |Σ_i M_ij − 1| )."""
    return max((M.sum(1) - 1).abs().max().item(), (M.sum(0) - 1).abs().max().item())


def round_to_birkhoff(M: Tensor) -> Tensor:
    """An exactly doubly stochastic matrix near a nonnegative M (Altschuler, Weed & Rigollet 2017, Alg. 2).

    Scale down rows with sum > 1, then columns with sum > 1 (X ≥ 0, every sum ≤ 1); the missing masses
    r = 1 − X1 ≥ 0 and c = 1 − Xᵀ1 ≥ 0 have the same total, and X + r cᵀ / Σr restores every sum to 1.
    The change is at most 2·(the row and column deviations of M) in ℓ1; a zero M becomes uniform.
    """
    X = M / M.sum(1, keepdim=True).clamp_min(1)
    X = X / X.sum(0, keepdim=True).clamp_min(1)
    r = (1 - X.sum(1)).clamp_min(0)
    c = (1 - X.sum(0)).clamp_min(0)
    return X + torch.outer(r, c) / r.sum().clamp_min(torch.finfo(X.dtype).tiny)


def sinkhorn(M: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Sinkhorn–Knopp on M ≥ 0: M ← M / (M 1) row-wise, then M ← M / (1ᵀ M) column-wise, repeated until
    every row and column sum is within ``tol`` of 1 or for ``max_iter`` rounds (zero lines guarded first)."""
    M = _guard_zero_lines(M)
    for _ in range(max_iter):
        M = M / M.sum(1, keepdim=True)
        M = M / M.sum(0, keepdim=True)
        if _max_deviation(M) < tol:
            break
    return M


PROJECTIONS: Registry[Tensor] = Registry("Birkhoff projection")


@PROJECTIONS.register("sinkhorn")
def sinkhorn_projection(W: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """W ← round(Sinkhorn(ReLU(W))), computed in float64, returned in W's dtype.

    Sinkhorn converges slowly (O(1/k)) when the support of ReLU(W) has no perfect matching that covers every
    entry; :func:`round_to_birkhoff` then makes the last iterate exactly doubly stochastic. Deterministic;
    on a doubly stochastic W it changes entries only by rounding (idempotent).
    """
    M = sinkhorn(W.detach().to(torch.float64).clamp_min(0), max_iter, tol)
    return round_to_birkhoff(M).to(W.dtype)


def _project_affine(X: Tensor) -> Tensor:
    """Euclidean projection onto { X : X 1 = 1, Xᵀ 1 = 1 }:
    X − (r 1ᵀ + 1 cᵀ)/C + s/C², with r = X1 − 1, c = Xᵀ1 − 1, s = 1ᵀX1 − C."""
    C = X.shape[0]
    r = X.sum(1, keepdim=True) - 1
    c = X.sum(0, keepdim=True) - 1
    return X - r / C - c / C + (X.sum() - C) / C**2


@PROJECTIONS.register("euclidean")
def euclidean_projection(W: Tensor, max_iter: int = 10_000, tol: float = 1e-10) -> Tensor:
    """argmin_{X ∈ B_C} ‖X − W‖_F by Dykstra's alternating projection (float64, returned in W's dtype).

    B_C is the intersection of the affine set A = {X1 = 1, Xᵀ1 = 1} and the orthant {X ≥ 0}. From X_0 = W,
    Q_0 = 0:  Z_k = P_A(X_k),  X_{k+1} = max(Z_k + Q_k, 0),  Q_{k+1} = Z_k + Q_k − X_{k+1}  (A is affine, so
    its correction term vanishes). Stops when X and Z stop moving (by < tol·max(1, max|W|)) or after
    ``max_iter`` rounds (cost O(C²) each; a few tens of rounds after a usual optimizer step);
    :func:`round_to_birkhoff` then removes the last ``tol``-sized deviation from the sums.
    """
    X = W.detach().to(torch.float64)
    Q = torch.zeros_like(X)
    scale = max(1.0, X.abs().max().item())
    for _ in range(max_iter):
        Z = _project_affine(X)
        X_next = (Z + Q).clamp_min(0)
        Q = Z + Q - X_next
        moved = max((X_next - X).abs().max().item(), (X_next - Z).abs().max().item())
        X = X_next
        if moved < tol * scale:
            break
    return round_to_birkhoff(X).to(W.dtype)


@dataclass(frozen=True)
class ChannelMatch:
    """How well each source channel explains each target channel, from paired activations: the statistics of
    the channel matching that starts a G stitch from the data and judges its rivals alike.

    With X, Y ∈ R^{n×C} the source and target activations at every position (one row each):
    ``cross`` = YᵀX (cross[i, j] = ⟨Y_i, X_j⟩), ``x_sq`` = ‖X_j‖², ``y_sq`` = ‖Y_i‖², all float64. The matching
    (:meth:`permutation`) is that of G_ReLU-Procrustes, π = argmax_π Σ_i M[i, π[i]] (|M| for signed groups) with
    M[i, j] = ⟨Ŷ_i, X̂_j⟩ for columns scaled to unit norm (zero channels stay zero); the scales of any π
    (:meth:`scales`) are least squares per matched pair, d[π[i]] = ⟨Y_i, X_π(i)⟩ / ‖X_π(i)‖². For Y = g·X with
    g = P_π·diag(d) both are g's exactly (on channels that are not zero).
    """

    cross: Tensor
    x_sq: Tensor
    y_sq: Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, h_a: Tensor, h_b: Tensor, channels: int) -> "ChannelMatch":
        X = channels_last(h_a, channels)[0].reshape(-1, channels).to("cpu", torch.float64)
        Y = channels_last(h_b, channels)[0].reshape(-1, channels).to("cpu", torch.float64)
        if X.shape != Y.shape:
            raise ValueError(f"h_a and h_b must hold the same positions; got {tuple(h_a.shape)}, {tuple(h_b.shape)}")
        return cls(Y.T @ X, (X * X).sum(0), (Y * Y).sum(0))

    def tensors(self) -> list[Tensor]:
        """Its statistics, e.g. to broadcast them from one process to the others."""
        return [self.cross, self.x_sq, self.y_sq]

    def permutation(self, signed: bool = False) -> Tensor:
        """π by the Hungarian method on M; on |M| when ``signed`` (a group with negative scales matches a
        channel with its negative as well)."""
        norm_y, norm_x = self.y_sq.sqrt().clamp_min(1e-12), self.x_sq.sqrt().clamp_min(1e-12)
        M = self.cross / norm_y[:, None] / norm_x[None, :]
        return hungarian(M.abs() if signed else M)

    def scales(self, perm: Tensor) -> Tensor:
        """d with d[π[i]] = ⟨Y_i, X_π(i)⟩ / ‖X_π(i)‖² (float64; 0 where X_π(i) is zero)."""
        perm = perm.cpu()
        d = torch.empty_like(self.x_sq)
        d[perm] = self.cross[torch.arange(len(perm)), perm] / self.x_sq[perm].clamp_min(1e-12)
        return d


def hungarian(W: Tensor) -> Tensor:
    """π maximising ⟨P_π, W⟩ = Σ_i W[i, π[i]] (scipy's linear_sum_assignment, maximize=True), on the CPU."""
    _, cols = linear_sum_assignment(W.detach().to("cpu", torch.float64).numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def permutation_matrix(perm: Tensor, like: Tensor) -> Tensor:
    """P_π with P_π[i, π[i]] = 1 (the convention of :func:`symstitch.symmetry.compose`), like ``like``."""
    return F.one_hot(perm.to(like.device), perm.numel()).to(like.dtype)


def softsort(theta: Tensor, tau: float) -> Tensor:
    """P_τ(θ)_ij = softmax_j( −|sort(θ)_i − θ_j| / τ ) (Prillo & Eisenschlos 2020, ascending sort).

    Row i peaks at the j whose θ_j is the i-th smallest, so the hard limit is P_π with π = argsort(θ).
    """
    sorted_theta = theta.sort().values
    return torch.softmax(-(sorted_theta[:, None] - theta[None, :]).abs() / tau, dim=1)


# ----------------------------------------------------------------------------------------------------------
# The diagonal D of T = P·D, one kind per intertwiner group


class Scales(nn.Module):
    """d ∈ R^C of T = P·diag(d), learned from d = ``init``: ``forward()`` the relaxed value, ``hard()`` the
    evaluated one."""

    init: ClassVar[float] = 1.0

    def __init__(self, channels: int):
        super().__init__()
        self.value = nn.Parameter(torch.full((channels,), self.init))

    def forward(self) -> Tensor:
        return self.value

    def hard(self) -> Tensor:
        return self()

    def project_(self) -> None:
        """In place, after every optimizer step (both phases)."""

    def harden_(self) -> None:
        """In place, once, at ``harden()``."""

    def relaxed_parameters(self) -> list[nn.Parameter]:
        """Parameters that stop training at ``harden()``."""
        return []

    @torch.no_grad()
    def assign_(self, d: Tensor) -> None:
        """Set d (its nearest value of the group's kind: :meth:`project_`), in place."""
        self.value.copy_(d.to(self.value))
        self.project_()


class UnitScales(Scales):
    """Permutations (GELU, sigmoid, SiLU): d = 1, nothing to learn."""

    def __init__(self, channels: int):
        nn.Module.__init__(self)
        self.register_buffer("value", torch.ones(channels))

    def assign_(self, d: Tensor) -> None:
        """d stays 1: the group has no scales."""


class PositiveScales(Scales):
    """ReLU, LeakyReLU: d > 0, learned, init 1. After every step d ← max(d, ε) with ε = 1e-4: the ReLU
    projection of docs/method.md §2, kept strictly positive so that T = P·D stays invertible and in G_ReLU."""

    min_scale: ClassVar[float] = 1e-4

    def project_(self) -> None:
        self.value.clamp_(min=self.min_scale)


class SignScales(Scales):
    """tanh, RBF: d ∈ {−1, 1}, relaxed to [−1, 1] (clamped after every step); evaluated and hardened as
    sign(d) with sign(0) = +1. Init d = 0, so that the first gradients pick each sign (from d = 1 every
    negative channel would first have to cross 0). After ``harden()`` d is fixed (nothing left to learn)."""

    init = 0.0

    def hard(self) -> Tensor:
        return torch.where(self.value < 0, -1.0, 1.0).to(self.value)

    def project_(self) -> None:
        self.value.clamp_(-1.0, 1.0)

    def harden_(self) -> None:
        self.value.copy_(self.hard())

    def relaxed_parameters(self) -> list[nn.Parameter]:
        return [self.value]


class FreeScales(Scales):
    """x^d: d any invertible diagonal, learned without constraint, init 1."""


class ExpScales(Scales):
    """d = exp(s) > 0 with s learned, init s = 0 (the positive scales of ``softsort``)."""

    def __init__(self, channels: int):
        nn.Module.__init__(self)
        self.s = nn.Parameter(torch.zeros(channels))

    def forward(self) -> Tensor:
        return torch.exp(self.s)

    @torch.no_grad()
    def assign_(self, d: Tensor) -> None:
        self.s.copy_(d.to(self.s).clamp_min(PositiveScales.min_scale).log())


#: intertwiner group kind → its scales
SCALES: dict[type[IntertwinerGroup], type[Scales]] = {
    Permutations: UnitScales,
    PositiveScaledPermutations: PositiveScales,
    SignedPermutations: SignScales,
    InvertibleScaledPermutations: FreeScales,
}


# ----------------------------------------------------------------------------------------------------------
# Stitching layers


class StitchLayer(nn.Module, abc.ABC):
    """y = norm_after( T · norm_before(x) + b ) over the channels; subclasses define T = :meth:`matrix`.

    Args:
        channels: C, for source and target alike (same architecture).
        activation: σ at the stitch point (names the intertwiner group of the P·D layers).
        bias: learn b ∈ R^C (init 0).
        norm: ``"none"``, ``"before"`` (BatchNorm on the input channels, then T) or ``"after"`` (T, then BatchNorm).
    """

    name: ClassVar[str]

    def __init__(self, channels: int, activation: str = "relu", bias: bool = True,
                 norm: NormPlacement = "none"):
        super().__init__()
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORM_PLACEMENTS))}; got {norm!r}")
        if int(channels) < 1:
            raise ValueError(f"channels must be ≥ 1, got {channels}")
        self.channels = int(channels)
        self.activation = str(activation)
        self.norm = norm
        self.bias = nn.Parameter(torch.zeros(self.channels)) if bias else None
        self.norm_before = nn.BatchNorm1d(self.channels) if norm == "before" else nn.Identity()
        self.norm_after = nn.BatchNorm1d(self.channels) if norm == "after" else nn.Identity()
        self._hardened = False

    # -- what subclasses define
    @abc.abstractmethod
    def matrix(self) -> Tensor:
        """The current effective C_out×C_in matrix T (relaxed or evaluated form, see the module docstring)."""
        ...

    def _harden(self) -> None:
        """Fix the evaluated form (called once, under no_grad)."""

    def _relaxed_parameters(self) -> list[nn.Parameter]:
        """Parameters that train only before ``harden()``."""
        return []

    def _details(self) -> dict[str, Any]:
        return {}

    # -- shared
    def forward(self, h: Tensor) -> Tensor:
        x, dim = channels_last(h, self.channels)
        shape = x.shape
        x = x.reshape(-1, self.channels)
        x = self.norm_after(F.linear(self.norm_before(x), self.matrix(), self.bias))
        return x.reshape(shape).movedim(-1, dim)

    @torch.no_grad()
    def on_after_optimizer_step(self) -> None:
        """Project onto the constraint set; a no-op here. Deterministic and idempotent in every subclass."""

    def regularization(self) -> Tensor:
        """The term added to the loss: zero here."""
        return next(self.parameters()).new_zeros(())

    @property
    def hardened(self) -> bool:
        return self._hardened

    @torch.no_grad()
    def harden(self) -> None:
        """Switch to the evaluated form for good (idempotent)."""
        if not self._hardened:
            self._harden()
            self._hardened = True
        self._sync_trainable()

    def _sync_trainable(self) -> None:
        for p in self._relaxed_parameters():
            p.requires_grad_(not self._hardened)

    def get_extra_state(self) -> dict[str, bool]:
        return {"hardened": self._hardened}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        """Loading a hardened state dict restores the hardened phase (its buffers are loaded alongside)."""
        self._hardened = bool(state["hardened"])
        self._sync_trainable()

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary for logs."""
        return {"layer": self.name, "channels": self.channels, "activation": self.activation,
                "bias": self.bias is not None, "norm": self.norm, "hardened": self.hardened, **self._details()}


STITCH_LAYERS: Registry[StitchLayer] = Registry("stitch layer")


def _register(cls: type[StitchLayer]) -> type[StitchLayer]:
    return STITCH_LAYERS.register(cls.name)(cls)


def build_stitch_layer(name: str, channels: int, activation: str = "relu", **kw: Any) -> StitchLayer:
    """``STITCH_LAYERS[name](channels, activation, **kw)``; an unknown name raises KeyError listing the known."""
    return STITCH_LAYERS.build(name, channels=channels, activation=activation, **kw)


def _least_squares(layer: StitchLayer, h_a: Tensor, h_b: Tensor) -> Tensor:
    """β of min_β ‖X β − B‖_F, X = [A | 1] (the ones only when ``layer`` has a bias), rows a_n, b_n ∈ R^C over every
    (N, H, W) or (N, L) position; float64 on the CPU. The fit is for T itself, so ``layer`` must have no norm."""
    if layer.norm != "none":
        raise ValueError("a least-squares start fits T alone; it needs norm='none'")
    A = channels_last(h_a, layer.channels)[0].reshape(-1, layer.channels).to("cpu", torch.float64)
    B = channels_last(h_b, layer.channels)[0].reshape(-1, layer.channels).to("cpu", torch.float64)
    if A.shape != B.shape:
        raise ValueError(f"h_a and h_b must hold the same positions; got {tuple(h_a.shape)}, {tuple(h_b.shape)}")
    X = A if layer.bias is None else torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], dim=1)
    return torch.linalg.lstsq(X, B).solution


@_register
class StandardStitch(StitchLayer):
    """T = W ∈ R^{C×C}, unconstrained. Init W = I + ε, ε_ij ~ N(0, init_std²): the identity stitch (source
    and target share the architecture) with noise to break symmetry; or :meth:`init_least_squares`."""

    name = "standard"

    def __init__(self, channels: int, activation: str = "relu", bias: bool = True,
                 norm: NormPlacement = "none", init_std: float = 1e-2):
        super().__init__(channels, activation, bias, norm)
        C = self.channels
        self.weight = nn.Parameter(torch.eye(C) + init_std * torch.randn(C, C))

    def matrix(self) -> Tensor:
        return self.weight

    @torch.no_grad()
    def init_least_squares(self, h_a: Tensor, h_b: Tensor) -> "StandardStitch":
        """Closed-form regression of target activations h_b on source activations h_a.

        Rows a_n, b_n ∈ R^C over every (N, H, W) or (N, L) position; with X = [A | 1] (the column of ones only
        with a bias) solve min_β ‖X β − B‖_F (torch.linalg.lstsq, float64, CPU), then W = β[:C]ᵀ, b = β[C].
        Only with ``norm="none"``: the fit is for T itself.
        """
        beta = _least_squares(self, h_a, h_b)
        self.weight.copy_(beta[: self.channels].T)
        if self.bias is not None:
            self.bias.copy_(beta[self.channels])
        return self

    def init_from_data(self, h_a: Tensor, h_b: Tensor) -> "StandardStitch":
        """The data-driven start of this layer: :meth:`init_least_squares`."""
        return self.init_least_squares(h_a, h_b)

    def _details(self) -> dict[str, Any]:
        return {"frobenius_norm": float(torch.linalg.matrix_norm(self.weight.detach()))}


@_register
class LassoStitch(StandardStitch):
    """T = W with λ‖W‖_1 added to the loss. Evaluated form: W ⊙ [|W| ≥ threshold]; ``harden()`` stores that
    mask as a buffer, zeroes the pruned weights and keeps them zero (T = W ⊙ mask from then on)."""

    name = "lasso"

    def __init__(self, channels: int, activation: str = "relu", bias: bool = True,
                 norm: NormPlacement = "none", lam: float = 1e-3, threshold: float = 1e-3, init_std: float = 1e-2):
        super().__init__(channels, activation, bias, norm, init_std)
        self.lam = lam
        self.threshold = threshold
        self.register_buffer("mask", torch.ones(self.channels, self.channels))

    def _keep(self) -> Tensor:
        if self.hardened:
            return self.mask
        return (self.weight.abs() >= self.threshold).to(self.weight.dtype)

    def matrix(self) -> Tensor:
        if self.training and not self.hardened:
            return self.weight
        return self.weight * self._keep()

    def regularization(self) -> Tensor:
        """λ ‖W ⊙ mask‖_1."""
        return self.lam * (self.weight * self.mask).abs().sum()

    def _harden(self) -> None:
        self.mask.copy_(self._keep())
        self.weight.mul_(self.mask)

    def _details(self) -> dict[str, Any]:
        zeros = int((self.weight.detach() * self._keep() == 0).sum())
        return {"sparsity": zeros / self.channels**2,
                "threshold": self.threshold, "lam": self.lam}


@_register
class LowRankStitch(StitchLayer):
    """T = U V, U ∈ R^{C×r}, V ∈ R^{r×C}, so rank T ≤ r (default r = max(1, C // 4)).
    Init U_ik ~ N(0, 1/r), V_kj ~ N(0, 1/C): E[T_ij²] = 1/C, so ‖T x‖ ≈ ‖x‖ on average."""

    name = "lowrank"

    def __init__(self, channels: int, activation: str = "relu", bias: bool = True,
                 norm: NormPlacement = "none", rank: Optional[int] = None):
        super().__init__(channels, activation, bias, norm)
        C = self.channels
        r = max(1, C // 4) if rank is None else int(rank)
        if not 1 <= r <= C:
            raise ValueError(f"rank must be in 1..{C}, got {rank}")
        self.rank = r
        self.U = nn.Parameter(torch.randn(C, r) / r**0.5)
        self.V = nn.Parameter(torch.randn(r, C) / C**0.5)

    def matrix(self) -> Tensor:
        return self.U @ self.V

    @torch.no_grad()
    def init_from_data(self, h_a: Tensor, h_b: Tensor) -> "LowRankStitch":
        """Reduced-rank regression: the best rank-r linear map from A's to B's activations in least squares.

        With β the full least-squares fit (:func:`_least_squares`) and Ŷ = X β = U S Vᵀ its fitted values, the
        rank-r optimum is β V_r V_rᵀ (V_r: the top r right singular vectors of Ŷ), so T = V_r (V_rᵀ W) with
        W = β[:C]ᵀ: U ← V_r, V ← V_rᵀ W, and the bias β[C] V_r V_rᵀ.
        """
        beta = _least_squares(self, h_a, h_b)
        A = channels_last(h_a, self.channels)[0].reshape(-1, self.channels).to("cpu", torch.float64)
        X = A if self.bias is None else torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], dim=1)
        V_r = torch.linalg.svd(X @ beta, full_matrices=False).Vh[: self.rank].T  # C × r
        W = beta[: self.channels].T
        self.U.copy_(V_r)
        self.V.copy_(V_r.T @ W)
        if self.bias is not None:
            self.bias.copy_(beta[self.channels] @ V_r @ V_r.T)
        return self

    def _details(self) -> dict[str, Any]:
        return {"rank": self.rank, "numerical_rank": int(torch.linalg.matrix_rank(self.matrix().detach()))}


class MonomialStitch(StitchLayer):
    """T = P·diag(d) for the intertwiner group G_σ of ``activation``: P relaxed while training (``birkhoff``,
    ``softsort``), a true permutation P_π when evaluated or hardened; d per the group (:data:`SCALES`).

    Convention of :mod:`symstitch.symmetry`: P_π[i, π[i]] = 1, so T[i, π[i]] = d[π[i]] and
    T h = (d ⊙ h)[π]; ``permutation`` and ``scales`` give (π, d) of the evaluated form, and
    ``symmetry.compose(permutation, scales)`` equals the evaluated ``matrix()``.
    """

    scale_kinds: ClassVar[dict[type[IntertwinerGroup], type[Scales]]] = SCALES

    def __init__(self, channels: int, activation: str = "relu", bias: bool = True, norm: NormPlacement = "none"):
        super().__init__(channels, activation, bias, norm)
        self.group = intertwiner_group(activation)
        self.d = self.scale_kinds[type(self.group)](self.channels)
        self.register_buffer("P", torch.zeros(self.channels, self.channels))

    # -- what subclasses define
    @abc.abstractmethod
    def relaxed_permutation(self) -> Tensor:
        """The relaxed C×C permutation."""
        ...

    @abc.abstractmethod
    def _assignment(self) -> Tensor:
        """The hard π its relaxed permutation rounds to."""
        ...

    @abc.abstractmethod
    def relaxed_permutation_parameters(self) -> list[nn.Parameter]:
        """The parameters of the relaxed permutation (frozen by ``harden()``)."""
        ...

    def _project_relaxed(self) -> None:
        """Project the relaxed permutation's parameters (before ``harden()`` only)."""

    # -- shared
    @property
    def permutation(self) -> Tensor:
        """π of the evaluated form (CPU long tensor)."""
        return self.P.argmax(1).cpu() if self.hardened else self._assignment()

    @property
    def scales(self) -> Tensor:
        """d of the evaluated form (detached)."""
        return self.d.hard().detach()

    def matrix(self) -> Tensor:
        """Relaxed: T = W·diag(d) (column j scaled by d_j). Evaluated: T = P_π·diag(d)."""
        if self.training and not self.hardened:
            return self.relaxed_permutation() * self.d()
        P = self.P if self.hardened else permutation_matrix(self._assignment(), self.P)
        return P * self.d.hard()

    @torch.no_grad()
    def on_after_optimizer_step(self) -> None:
        if not self.hardened:
            self._project_relaxed()
        self.d.project_()

    def _harden(self) -> None:
        self.P.copy_(permutation_matrix(self._assignment(), self.P))
        self.d.harden_()

    @torch.no_grad()
    def fixed(self, perm: Tensor, scales: Optional[Tensor] = None) -> "MonomialStitch":
        """A hardened copy in eval mode with T = P_π·diag(d): π = ``perm``, d = ``scales`` made the group's
        (:meth:`Scales.assign_`; this layer's own when None); bias and norms as this layer's."""
        layer = copy.deepcopy(self)
        layer.harden()
        layer.P.copy_(permutation_matrix(perm, layer.P))
        if scales is not None:
            layer.d.assign_(scales)
            layer.d.harden_()
        return layer.eval()

    def _relaxed_parameters(self) -> list[nn.Parameter]:
        return self.relaxed_permutation_parameters() + self.d.relaxed_parameters()

    def _details(self) -> dict[str, Any]:
        perm = self.permutation
        d = self.scales.float()
        relaxed = self.relaxed_permutation().detach()
        return {
            "group": self.group.name,
            "permutation": perm.tolist(),
            "scales": {"min": float(d.min()), "mean": float(d.mean()), "max": float(d.max())},
            "distance_to_permutation": float(torch.linalg.matrix_norm(relaxed - permutation_matrix(perm, relaxed))),
        }


@_register
class BirkhoffStitch(MonomialStitch):
    """The G_σ stitch of the paper: relaxed P = W on the Birkhoff polytope, hardened by the Hungarian method.

    W is initialised as Sinkhorn(U), U_ij ~ Uniform(0, 1) from torch's global RNG. After every optimizer step
    W ← projection(W), ``projection`` = ``"sinkhorn"`` (:func:`sinkhorn_projection`) or ``"euclidean"``
    (:func:`euclidean_projection`). The loss adds −α‖W‖_F, largest at the vertices (‖P‖_F = √C), which pushes
    W toward a permutation. ``harden()``: π = argmax_π ⟨P_π, W⟩, the nearest permutation to W in Frobenius
    norm (‖W − P‖² = ‖W‖² + C − 2⟨P, W⟩); then T = P_π·diag(d) exactly, W is unused and frozen.
    """

    name = "birkhoff"

    def __init__(self, channels: int, activation: str = "relu", bias: bool = True, norm: NormPlacement = "none",
                 projection: Literal["sinkhorn", "euclidean"] = "sinkhorn", alpha: float = 0.01):
        super().__init__(channels, activation, bias, norm)
        self.project: Callable[[Tensor], Tensor] = PROJECTIONS.get(projection)
        self.projection = projection
        self.alpha = alpha
        self.W = nn.Parameter(sinkhorn_projection(torch.rand(self.channels, self.channels)))

    def relaxed_permutation(self) -> Tensor:
        return self.W

    def relaxed_permutation_parameters(self) -> list[nn.Parameter]:
        return [self.W]

    def _assignment(self) -> Tensor:
        return hungarian(self.W)

    def _project_relaxed(self) -> None:
        self.W.copy_(self.project(self.W))

    def regularization(self) -> Tensor:
        """−α‖W‖_F before ``harden()``, zero after."""
        if self.hardened:
            return super().regularization()
        return -self.alpha * torch.linalg.matrix_norm(self.W)

    def _details(self) -> dict[str, Any]:
        return {**super()._details(), "projection": self.projection, "alpha": self.alpha}

    @torch.no_grad()
    def init_from_data(self, h_a: Tensor, h_b: Tensor, mix: float = 0.1) -> "BirkhoffStitch":
        """Data-driven start instead of a random one: the channel matching of :class:`ChannelMatch` (as
        G_ReLU-Procrustes matches), see :meth:`init_from_match`."""
        return self.init_from_match(ChannelMatch.of(h_a, h_b, self.channels), mix)

    @torch.no_grad()
    def init_from_match(self, match: "ChannelMatch", mix: float = 0.1) -> "BirkhoffStitch":
        """Start at W = (1 − mix)·P_π + mix·J/C, π = ``match.permutation()`` (inside the polytope, off its
        vertex, so training can still move it), with the learnable scales ``match.scales(π)`` (least squares per
        matched pair) projected onto the group's. The relaxed phase then trains from there as usual."""
        perm = match.permutation(signed=isinstance(self.group, (SignedPermutations, InvertibleScaledPermutations)))
        self.W.copy_((1 - mix) * permutation_matrix(perm, self.W) + mix / self.channels)
        self.d.assign_(match.scales(perm))
        return self


@_register
class SoftSortStitch(MonomialStitch):
    """Relaxed P = P_τ(θ) (:func:`softsort`) of a learned θ ∈ R^C; positive scales are learned as d = exp(s)
    (:class:`ExpScales`), the other groups' scales as in ``birkhoff``.

    Init θ = τ·(0, 1, …, C−1) + τ·init_noise·z, z ~ N(0, 1): spacing τ makes P_τ a soft identity
    (diagonal ≈ 0.46), with useful gradients; a spacing ≫ τ would start almost hard, with vanishing gradients.
    Evaluated form (eval mode, or fixed by ``harden()``): π = argsort(θ) (stable), which is the row-wise argmax
    of P_τ whenever that argmax is unique, and always a permutation, also under ties.
    P_τ is row- but not column-stochastic: there is nothing to project. Its gradients are local: it reliably
    undoes swaps of neighbours in its current order, but recovers an arbitrary permutation far less often
    than ``birkhoff`` (about 3 in 10 at C = 6..8 in our tests).
    """

    name = "softsort"
    scale_kinds = {**SCALES, PositiveScaledPermutations: ExpScales}

    def __init__(self, channels: int, activation: str = "relu", bias: bool = True, norm: NormPlacement = "none",
                 tau: float = 0.1, init_noise: float = 0.1):
        super().__init__(channels, activation, bias, norm)
        self.tau = tau
        self.theta = nn.Parameter(tau * (torch.arange(self.channels) + init_noise * torch.randn(self.channels)))

    def relaxed_permutation(self) -> Tensor:
        return softsort(self.theta, self.tau)

    def relaxed_permutation_parameters(self) -> list[nn.Parameter]:
        return [self.theta]

    def _assignment(self) -> Tensor:
        return torch.argsort(self.theta.detach(), stable=True).cpu()

    def _details(self) -> dict[str, Any]:
        return {**super()._details(), "tau": self.tau}


__all__ = [
    "NORM_PLACEMENTS",
    "PROJECTIONS",
    "SCALES",
    "STITCH_LAYERS",
    "BirkhoffStitch",
    "ChannelMatch",
    "LassoStitch",
    "LowRankStitch",
    "MonomialStitch",
    "Scales",
    "SoftSortStitch",
    "StandardStitch",
    "StitchLayer",
    "build_stitch_layer",
    "channels_last",
    "euclidean_projection",
    "hungarian",
    "permutation_matrix",
    "round_to_birkhoff",
    "sinkhorn",
    "sinkhorn_projection",
    "softsort",
]
