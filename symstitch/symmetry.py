"""Intertwiner groups of activations and their action on the weights of a network (docs/method.md §1, paper §3).

For an activation σ acting entrywise on R^n, the intertwiner group is

    G_σ = { A ∈ GL_n : there is B with σ(A x) = B σ(x) for all x },   φ_σ(A) = B.

Every group in the table is a group of *monomial* matrices g = P·D (P a permutation, D diagonal); the
activation decides which diagonals D are allowed and what φ_σ is:

    σ                          G_σ                                  φ_σ(A)
    ReLU, LeakyReLU            P·D, D > 0                            A
    GELU, sigmoid, SiLU        P                                     A
    tanh                       P·D, D = ±1                           A
    Gaussian RBF exp(−x²)      P·D, D = ±1                           abs(A)  (entrywise)
    x^d (d ≥ 2)                P·D, D invertible                     A^{⊙d}  (entrywise d-th power)

Permutation convention (used by :func:`compose` and :func:`decompose`): ``g = P_π · diag(d)`` where
``(P_π)[i, π[i]] = 1``. Hence ``g[i, π[i]] = d[π[i]]`` and ``(g x)_i = d_{π(i)} x_{π(i)}``: scale first,
then output channel ``i`` reads input channel ``π[i]``, i.e. ``g @ x == (d * x)[π]``.

Weight-space action (:func:`act`): if layer l is ``z = W_l h + b_l`` (optionally followed by BatchNorm) and
then σ, the edit

    W_l ← g W_l,  b_l ← g b_l                      (no BatchNorm)
    W_l ← P W_l;  γ ← g γ, β ← g β, μ ← P μ, v ← P v   (BatchNorm with affine γ, β and running μ, v)
    W_{l+1} ← W_{l+1} φ_σ(g)^{-1}                  (along the input channels of the next layer)

leaves the network function unchanged, and the representation at the feature point becomes φ_σ(g)·h
(= g·h for every activation of the zoo, where φ_σ is the identity).

On the residual stream of a ResNet (``stem.act``, every block output ``layerS.b.act2``) the blocks of a stage
add into one stream, so the same g embeds every producer of the stage (the stem's or each block's
conv/BatchNorm before the sum, and an option-B shortcut's 1×1 conv/BatchNorm) and every reader absorbs
φ_σ(g)^{-1} (each next block's conv1 and option-B shortcut, or the classifier). An option-A shortcut carries the
stream into the next stage zero-padded, so the next stage sees g ⊕ I, and a point in a later stage sees the
earlier stage's stream in its first channels: g must there be block diagonal (:func:`action_blocks`) and its
top-left block acts on the earlier stage. An option-B shortcut absorbs g like any reader.
"""

from __future__ import annotations

import abc

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from symstitch.graph import GraphNet, as_network
from symstitch.network import PointNetwork, Site, is_network
from symstitch.registry import Registry

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------------------------
# Monomial matrices g = P_π · diag(d)


def compose(perm: Tensor, scales: Tensor) -> Tensor:
    """``g = P_π · diag(d)``: ``g[i, π[i]] = d[π[i]]``, zero elsewhere (so ``g @ x == (d * x)[π]``)."""
    perm = torch.as_tensor(perm, dtype=torch.long)
    n = perm.numel()
    if scales.shape != (n,) or not torch.equal(perm.sort().values.cpu(), torch.arange(n)):
        raise ValueError(f"need a permutation of 0..{n - 1} and {n} scales, got {perm.tolist()} and "
                         f"shape {tuple(scales.shape)}")
    perm = perm.to(scales.device)
    g = torch.zeros(n, n, dtype=scales.dtype, device=scales.device)
    g[torch.arange(n, device=scales.device), perm] = scales[perm]
    return g


def haar_orthogonal(n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A Haar-random n×n orthogonal matrix (float64): Q of the QR decomposition of a standard Gaussian
    matrix, with column j multiplied by sign(R_jj) so that the law is uniform on O(n)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def is_monomial(A: Tensor, atol: float = 1e-6) -> bool:
    """Square, and exactly one entry with ``|a| > atol`` in every row and every column."""
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        return False
    nonzero = A.abs() > atol
    return bool((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all())


def decompose(A: Tensor, atol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`compose`: ``(π, d)`` with ``A = P_π · diag(d)``, ``π[i] = argmax_j |A[i, j]|``."""
    if not is_monomial(A, atol):
        raise ValueError("not a scaled permutation: need exactly one nonzero per row and per column")
    perm = A.abs().argmax(dim=1)
    scales = torch.empty(A.shape[0], dtype=A.dtype, device=A.device)
    scales[perm] = A[torch.arange(A.shape[0], device=A.device), perm]
    return perm, scales


def monomial_inverse(A: Tensor) -> Tensor:
    """Exact inverse of a monomial matrix: ``(P D)^{-1} = D^{-1} Pᵀ``, i.e. invert the nonzeros, transpose."""
    inverse = torch.zeros_like(A)
    nonzero = A != 0
    inverse[nonzero] = 1.0 / A[nonzero]
    return inverse.T


def act_on_features(g: Tensor, h: Tensor, dim: int = 1) -> Tensor:
    """``g·h`` along the channel dimension ``dim``: ``(g·h)_c = Σ_{c'} g_{c c'} h_{c'}`` (1 for (N, C, H, W))."""
    return torch.movedim(torch.movedim(h, dim, -1) @ g.to(h).T, -1, dim)


# ----------------------------------------------------------------------------------------------------------
# Activations σ and their φ_σ


@dataclass(frozen=True)
class Nonlinearity:
    """An entrywise activation σ, the kind of its intertwiner group (a :data:`GROUPS` name) and φ_σ."""

    label: str
    fn: Callable[[Tensor], Tensor]
    group: str
    phi: Callable[[Tensor], Tensor]


def _identity(A: Tensor) -> Tensor:
    return A


NONLINEARITIES: Registry[Nonlinearity] = Registry("activation")


@NONLINEARITIES.register()
def relu() -> Nonlinearity:
    return Nonlinearity("ReLU", torch.relu, "positive_scaled_permutations", _identity)


@NONLINEARITIES.register()
def leaky_relu(negative_slope: float = 0.01) -> Nonlinearity:
    return Nonlinearity(
        "LeakyReLU", lambda x: F.leaky_relu(x, negative_slope), "positive_scaled_permutations", _identity
    )


@NONLINEARITIES.register()
def gelu(approximate: str = "none") -> Nonlinearity:
    return Nonlinearity("GELU", lambda x: F.gelu(x, approximate=approximate), "permutations", _identity)


@NONLINEARITIES.register()
def sigmoid() -> Nonlinearity:
    return Nonlinearity("sigmoid", torch.sigmoid, "permutations", _identity)


@NONLINEARITIES.register()
def silu() -> Nonlinearity:
    return Nonlinearity("SiLU", F.silu, "permutations", _identity)


@NONLINEARITIES.register()
def tanh() -> Nonlinearity:
    return Nonlinearity("tanh", torch.tanh, "signed_permutations", _identity)


@NONLINEARITIES.register()
def rbf() -> Nonlinearity:
    """Gaussian RBF σ(x) = exp(−x²): even, so σ(P D x) = P σ(x) for D = ±1, and φ(A) = abs(A)."""
    return Nonlinearity("RBF", lambda x: torch.exp(-x * x), "signed_permutations", torch.abs)


@NONLINEARITIES.register()
def poly(degree: int = 2) -> Nonlinearity:
    """σ(x) = x^d: (P D x)^{⊙d} = P D^d x^{⊙d}, so φ(A) = A^{⊙d}."""
    if int(degree) != degree or degree < 2:
        raise ValueError(f"poly needs an integer degree d ≥ 2, got {degree}")
    d = int(degree)
    return Nonlinearity(f"x^{d}", lambda x: x**d, "invertible_scaled_permutations", lambda A: A**d)


#: torch activation modules → (registry name, keyword arguments read off an instance)
_MODULES: dict[type[nn.Module], tuple[str, Callable[[nn.Module], dict[str, Any]]]] = {
    nn.ReLU: ("relu", lambda m: {}),
    nn.LeakyReLU: ("leaky_relu", lambda m: {"negative_slope": m.negative_slope}),
    nn.GELU: ("gelu", lambda m: {"approximate": m.approximate}),
    nn.Sigmoid: ("sigmoid", lambda m: {}),
    nn.SiLU: ("silu", lambda m: {}),
    nn.Tanh: ("tanh", lambda m: {}),
}

ActivationLike = Union[str, nn.Module, type]


def nonlinearity(activation: ActivationLike, **kw: Any) -> Nonlinearity:
    """Resolve a name (``"relu"``, ``"poly"`` with ``degree=3``, ``"poly3"``), a module or a module class."""
    if isinstance(activation, str):
        match = re.fullmatch(r"poly(\d+)", activation.lower())
        if match:
            return NONLINEARITIES.build("poly", degree=int(match.group(1)), **kw)
        return NONLINEARITIES.build(activation.lower(), **kw)
    cls = activation if isinstance(activation, type) else type(activation)
    for module_cls, (name, read_kwargs) in _MODULES.items():
        if issubclass(cls, module_cls):
            found = {} if isinstance(activation, type) else read_kwargs(activation)
            return NONLINEARITIES.build(name, **{**found, **kw})
    raise ValueError(f"no intertwiner group known for {activation!r}; known modules: "
                     + ", ".join(c.__name__ for c in _MODULES))


def activation_fn(activation: ActivationLike, **kw: Any) -> Callable[[Tensor], Tensor]:
    """The entrywise function σ (also for ``rbf`` and ``poly``, which have no torch module)."""
    return nonlinearity(activation, **kw).fn


# ----------------------------------------------------------------------------------------------------------
# Intertwiner groups: one class per kind of allowed diagonal D


class IntertwinerGroup(abc.ABC):
    """G_σ = { P·D } for one activation σ; subclasses say which diagonals D are allowed.

    Args:
        nonlinearity: the activation σ (gives φ_σ and the readable name).
        scale_spread: s of the log-normal positive scales exp(s·z)/exp(s²/2), z ~ N(0, 1) (docs/method.md §4).
    """

    description: ClassVar[str]

    def __init__(self, nonlinearity: Nonlinearity, scale_spread: float = 0.5):
        self.nonlinearity = nonlinearity
        self.scale_spread = scale_spread

    @property
    def name(self) -> str:
        return f"G_{self.nonlinearity.label}: {self.description}"

    def __repr__(self) -> str:
        return f"<{self.name}>"

    # -- the allowed diagonals, per kind
    @abc.abstractmethod
    def sample_scales(self, n: int, generator: Optional[torch.Generator]) -> Tensor:
        ...

    @abc.abstractmethod
    def allowed_scales(self, d: Tensor, atol: float) -> bool:
        ...

    def _log_normal(self, n: int, generator: Optional[torch.Generator]) -> Tensor:
        s = self.scale_spread
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.exp(s * z) / math.exp(s * s / 2)

    @staticmethod
    def _signs(n: int, generator: Optional[torch.Generator]) -> Tensor:
        return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1

    # -- shared by every kind
    def phi(self, A: Tensor) -> Tensor:
        """φ_σ(A), with σ(A x) = φ_σ(A) σ(x)."""
        return self.nonlinearity.phi(A)

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float64) -> Tensor:
        """A random n×n element: a uniformly random permutation times random allowed scales."""
        perm = torch.randperm(n, generator=generator)
        return compose(perm, self.sample_scales(n, generator)).to(dtype)

    def contains(self, A: Tensor, atol: float = 1e-6) -> bool:
        """Exactly one nonzero per row and column, and the nonzeros are allowed scales of this kind."""
        if not isinstance(A, Tensor) or not is_monomial(A, atol):
            return False
        return self.allowed_scales(decompose(A, atol)[1], atol)

    def decompose(self, A: Tensor, atol: float = 1e-6) -> tuple[Tensor, Tensor]:
        """``(π, d)`` with ``A = P_π · diag(d)``, ``A[i, π[i]] = d[π[i]]``; ValueError if A is not in the group."""
        if not self.contains(A, atol):
            raise ValueError(f"matrix is not in {self.name}")
        return decompose(A, atol)

    def compose(self, perm: Tensor, scales: Tensor, atol: float = 1e-6) -> Tensor:
        """``P_π · diag(d)``, the inverse of :meth:`decompose`; ValueError if the scales are not allowed."""
        if not self.allowed_scales(scales, atol):
            raise ValueError(f"scales {scales.tolist()} are not allowed in {self.name}")
        return compose(perm, scales)


GROUPS: Registry[type[IntertwinerGroup]] = Registry("intertwiner group")


@GROUPS.register("permutations")
class Permutations(IntertwinerGroup):
    """D = I."""

    description = "permutations P"

    def sample_scales(self, n, generator):
        return torch.ones(n, dtype=torch.float64)

    def allowed_scales(self, d, atol):
        return bool(((d - 1).abs() <= atol).all())


@GROUPS.register("positive_scaled_permutations")
class PositiveScaledPermutations(IntertwinerGroup):
    """D > 0; sampled log-normal exp(s·z)/exp(s²/2)."""

    description = "positive-scaled permutations P·D (D > 0)"

    def sample_scales(self, n, generator):
        return self._log_normal(n, generator)

    def allowed_scales(self, d, atol):
        return bool((d > atol).all())


@GROUPS.register("signed_permutations")
class SignedPermutations(IntertwinerGroup):
    """D = ±1; signs uniform."""

    description = "signed permutations P·D (D = ±1)"

    def sample_scales(self, n, generator):
        return self._signs(n, generator)

    def allowed_scales(self, d, atol):
        return bool(((d.abs() - 1).abs() <= atol).all())


@GROUPS.register("invertible_scaled_permutations")
class InvertibleScaledPermutations(IntertwinerGroup):
    """D ≠ 0; sampled as uniform sign × log-normal magnitude."""

    description = "invertible-scaled permutations P·D (D ≠ 0)"

    def sample_scales(self, n, generator):
        return self._signs(n, generator) * self._log_normal(n, generator)

    def allowed_scales(self, d, atol):
        return bool((d.abs() > atol).all())


def intertwiner_group(activation: ActivationLike, scale_spread: float = 0.5, **kw: Any) -> IntertwinerGroup:
    """G_σ for an activation name, module or module class (``kw``: e.g. ``degree=3`` for ``"poly"``)."""
    sigma = nonlinearity(activation, **kw)
    return GROUPS.get(sigma.group)(sigma, scale_spread=scale_spread)


# ----------------------------------------------------------------------------------------------------------
# Where the action is defined: each network declares its sites (symstitch.network.Site)


def _no_action(model: PointNetwork, point: str, sites: dict[str, Site]) -> ValueError:
    """The error for a point without a weight-space action, with the reason where the network gives one."""
    where = ", ".join(sites) or "(none)"
    reason = model.no_action_reason(point)
    reason = f" ({reason})" if reason else ""
    return ValueError(f"the weight-space action is not defined at {point!r} of {model.label}{reason}; it is defined "
                      f"at: {where}")


def next_layer(model: PointNetwork, point: str) -> nn.Module:
    """The layer holding W_{l+1}, the one that can absorb φ_σ(g)^{-1} for a g acting at ``point`` (points
    whose activation feeds one layer only; a residual stream feeds several)."""
    sites = model.symmetry_sites()
    if point not in sites:
        raise _no_action(model, point, sites)
    segments = sites[point].segments
    if len(segments) > 1 or len(segments[0].consumers) > 1:
        raise ValueError(f"{point!r} of {model.label} is on a residual stream: several layers read it")
    return segments[0].consumers[0]


def actionable_points(model: PointNetwork) -> tuple[str, ...]:
    """The feature points of ``model`` where :func:`act` is defined, in forward order."""
    return tuple(model.symmetry_sites())


def action_blocks(model: PointNetwork, point: str) -> tuple[int, ...]:
    """The block sizes g must respect at ``point``: g = g_1 ⊕ g_2 ⊕ … with g_i ∈ G_σ of size ``blocks[i]``.

    One block (every channel) except on the residual stream of a ResNet with zero-padding shortcuts, where
    the first channels of a stage are the previous stage's stream (ResNet-20 at ``layer3.*``: 16, 16, 32).
    """
    sites = model.symmetry_sites()
    if point not in sites:
        raise _no_action(model, point, sites)
    return sites[point].blocks


def sample_action(model: PointNetwork, point: str, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random element of the group acting at ``point`` (float64): ⊕ of G_σ samples over
    :func:`action_blocks`."""
    group = intertwiner_group(model.point_activation(point))
    return torch.block_diag(*[group.sample(n, generator=generator) for n in action_blocks(model, point)])


def feature(model: nn.Module, point: str, x: Tensor) -> Tensor:
    """The representation at feature ``point`` for input ``x`` (a copy; any module is read as a network,
    :func:`~symstitch.graph.as_network`).

    Runs ``model(x)`` under ``torch.no_grad()`` in the model's current mode (call ``.eval()`` first for
    BatchNorm running statistics).
    """
    net = as_network(model)
    net.check_feature_point(point)
    with torch.no_grad():
        return net.features(x, [point])[point]


# ----------------------------------------------------------------------------------------------------------
# The weight-space action


def _left(M: Tensor, t: Tensor) -> Tensor:
    """``M t`` along dim 0 of ``t`` (output channels of a weight, or a per-channel vector)."""
    return torch.einsum("ij,j...->i...", M, t)


def _right(t: Tensor, M: Tensor) -> Tensor:
    """``t M`` along dim 1 of ``t`` (input channels of a conv or Linear weight)."""
    return torch.einsum("oi...,ij->oj...", t, M)


@torch.no_grad()
def _edit(tensor: Tensor, edit: Callable[[Tensor], Tensor]) -> None:
    """In place, computed in float64 and cast back (keeps dtype, device and memory format)."""
    tensor.copy_(edit(tensor.detach().to(torch.float64)).to(tensor.dtype))


def _embed(layer: nn.Module, norm: Optional[nn.BatchNorm2d], g: Tensor) -> None:
    """``norm(layer(h)) ↦ g · norm(layer(h))``: the edit of the module docstring on one producer."""
    if norm is None:
        _edit(layer.weight, lambda W: _left(g, W))  # W_l ← g W_l
        if layer.bias is not None:
            _edit(layer.bias, lambda b: _left(g, b))  # b_l ← g b_l
        return
    P = compose(decompose(g)[0], torch.ones_like(g[0]))
    _edit(layer.weight, lambda W: _left(P, W))  # W_l ← P W_l
    if layer.bias is not None:
        _edit(layer.bias, lambda b: _left(P, b))
    _edit(norm.weight, lambda gamma: _left(g, gamma))  # γ ← P D γ
    _edit(norm.bias, lambda beta: _left(g, beta))  # β ← P D β
    _edit(norm.running_mean, lambda mu: _left(P, mu))  # μ ← P μ
    _edit(norm.running_var, lambda v: _left(P, v))  # v ← P v


def _resize(g: Tensor, size: int) -> Tensor:
    """g seen by a segment of ``size`` channels: its top-left block, or g ⊕ I (zero-padded channels stay 0)."""
    n = g.shape[0]
    if size <= n:
        return g[:size, :size]
    return torch.block_diag(g, torch.eye(size - n, dtype=g.dtype, device=g.device))


def _apply(site: Site, g: Tensor, group: IntertwinerGroup) -> None:
    """The edit of the module docstring on every segment of ``site`` (g in float64)."""
    for segment in site.segments:
        g_s = _resize(g, segment.size)
        for layer, norm in segment.producers:
            _embed(layer, norm, g_s)
        phi_inv = monomial_inverse(group.phi(g_s))
        for consumer in segment.consumers:
            _edit(consumer.weight, lambda W: _right(W, phi_inv))  # W_{l+1} ← W_{l+1} φ(g)^{-1}


def _check(site: Site, g: Tensor, phi_g: Tensor, point: str, group: IntertwinerGroup) -> None:
    """What the group alone does not ensure at ``point``: g's block structure on a residual stream, φ(g) = g
    where activations are added to pre-activations (shortcuts), max-pooling with positive scales only."""
    if len(site.blocks) > 1:
        edges = torch.tensor([0, *site.blocks]).cumsum(0)
        mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool) for n in site.blocks])
        if g[~mask].abs().max() > 0:
            raise ValueError(
                f"at {point!r} g must be block diagonal with blocks {'+'.join(map(str, site.blocks))} (channels "
                f"{', '.join(f'{int(a)}–{int(b) - 1}' for a, b in zip(edges[:-1], edges[1:]))}): the first "
                "channels of the stream come from the previous stage through a zero-padding shortcut")
    stream = len(site.segments) > 1 or len(site.segments[0].producers) > 1
    if stream and not torch.equal(phi_g, g):
        raise ValueError(f"{point!r} is on a residual stream, where the action needs φ_σ(g) = g; "
                         f"{group.name} has φ_σ(g) ≠ g for this g")
    if any(isinstance(m, nn.MaxPool2d) for m in site.between) and (phi_g < 0).any():
        raise ValueError(f"max-pooling after {point!r} does not commute with negative scales of φ(g); "
                         "use an element with positive scales")


def act(model: PointNetwork, point: str, g: Tensor) -> PointNetwork:
    """``g·model``: a deep copy whose representation at ``point`` is φ_σ(g)·h and whose function is unchanged.

    Args:
        model: a network (:class:`~symstitch.network.PointNetwork`: the zoo's, a GraphNet; left untouched,
            including its training mode) acted on at its :meth:`~symstitch.network.PointNetwork.symmetry_sites`;
            any other ``nn.Module`` is wrapped in a GraphNet and the edited copy of the module itself is returned.
            In a traced graph the action is defined at activation points between two Conv/Linear layers
            (:meth:`~symstitch.graph.TracedNet.linear_neighbours`); elsewhere the error says why not.
        point: a feature point listed by :func:`actionable_points`.
        g: an n×n element of ``intertwiner_group(model.activation)``, n the channels at ``point``
            (any float dtype; the edit runs in float64 and is cast back to the weights' dtype); on a residual
            stream block diagonal with the blocks of :func:`action_blocks` (:func:`sample_action` draws one).
    """
    if not is_network(model):
        if not isinstance(model, nn.Module):
            raise TypeError(f"act needs an nn.Module, got {type(model).__name__}")
        return act(GraphNet(model), point, g).model
    _checked(model, point, g)  # before the copy: a wrong g costs nothing
    return act_(copy.deepcopy(model), point, g)


def _checked(model: PointNetwork, point: str, g: Tensor) -> tuple[Site, Tensor, IntertwinerGroup]:
    """The site at ``point``, g as float64 on the CPU and the group, once g is known to act there."""
    sites = model.symmetry_sites()
    if point not in sites:
        raise _no_action(model, point, sites)
    group = intertwiner_group(model.point_activation(point))
    n = sites[point].channels
    g = torch.as_tensor(g).detach().to("cpu", torch.float64)
    if g.shape != (n, n):
        raise ValueError(f"{point!r} has {n} channels, so g must be {n}×{n}; got {tuple(g.shape)}")
    if not group.contains(g):
        raise ValueError(f"g is not in {group.name}")
    _check(sites[point], g, group.phi(g), point, group)
    return sites[point], g, group


def act_(model: PointNetwork, point: str, g: Tensor) -> PointNetwork:
    """:func:`act` in place: ``model``'s own weights become those of g·model (returned, for chaining); any other
    ``nn.Module`` is edited through a GraphNet. For the many small steps of an alignment
    (:mod:`symstitch.merge`), where a copy per step would cost more than the step."""
    if not is_network(model):
        if not isinstance(model, nn.Module):
            raise TypeError(f"act_ needs an nn.Module, got {type(model).__name__}")
        act_(GraphNet(model), point, g)
        return model
    site, g, group = _checked(model, point, g)
    _apply(site, g.to(site.segments[0].producers[0][0].weight.device), group)
    return model


__all__ = [
    "GROUPS",
    "NONLINEARITIES",
    "IntertwinerGroup",
    "InvertibleScaledPermutations",
    "Nonlinearity",
    "Permutations",
    "PositiveScaledPermutations",
    "SignedPermutations",
    "act",
    "act_",
    "action_blocks",
    "act_on_features",
    "actionable_points",
    "activation_fn",
    "compose",
    "decompose",
    "feature",
    "intertwiner_group",
    "is_monomial",
    "monomial_inverse",
    "nonlinearity",
    "sample_action",
]
