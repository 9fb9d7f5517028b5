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

from symstitch.graph import GraphNet, point_activation, point_features
from symstitch.models.base import StagedNet
from symstitch.models.resnet import BasicBlock
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
# Where the action is defined: one function per model family


@dataclass(frozen=True)
class Segment:
    """A stretch of the network whose channels all move together, ``size`` of them.

    Every ``producers`` pair ``(layer, norm)`` computes a pre-activation ``norm(layer(h))`` of this stretch
    (``norm`` an optional BatchNorm): its output channels get g. Every module of ``consumers`` (a
    convolution, or a Linear after global pooling) reads the stretch's activations on its input channels (dim
    1): it absorbs φ_σ(g)^{-1}.
    """

    size: int
    producers: tuple[tuple[nn.Module, Optional[nn.BatchNorm2d]], ...]
    consumers: tuple[nn.Module, ...]


@dataclass(frozen=True)
class Site:
    """Everything the action at one feature point edits.

    ``segments[0]`` holds the point itself (``channels`` = its size). A plain layer is one segment:
    ``h ↦ σ(norm(layer(h)))`` → ``between`` → ``next_layer``. A residual stream is several: the blocks
    of a stage add their outputs to one stream, so g acts on all of them at once, and parameter-free
    zero-padding shortcuts tie the stream to the previous stage's (which sees the top-left block of g) and
    to the next stage's (which sees g ⊕ I). ``between`` are the modules after σ that must commute with
    φ_σ(g) (pooling, flatten). g must be block diagonal with blocks ``blocks`` (their sum is
    ``channels``), so that each segment's restriction of g is itself in the group.
    """

    segments: tuple[Segment, ...]
    between: tuple[nn.Module, ...] = ()
    blocks: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        return self.segments[0].size


def _plain_site(layer: nn.Module, norm: Optional[nn.BatchNorm2d], between: tuple[nn.Module, ...],
                next_layer: nn.Module) -> Site:
    size = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
    return Site((Segment(size, ((layer, norm),), (next_layer,)),), between, (size,))


#: model class name → function ``net → {feature point: Site}``
FAMILIES: Registry[Callable[[StagedNet], dict[str, Site]]] = Registry("symmetry family")


@FAMILIES.register("MCNN")
def _mcnn_sites(net: StagedNet) -> dict[str, Site]:
    """``layer{k}.act`` → next is ``layer{k+1}``: max-pool, conv; after the last: the classifier's
    max-pool, global average pool, flatten, Linear ``fc``."""
    layers = [net.get_submodule(point.rsplit(".", 1)[0]) for point in net.stitch_points]
    head = net.classifier
    following = [((nxt.pool,), nxt.conv) for nxt in layers[1:]]
    following.append(((head.pool, head.gap, head.flatten), head.fc))
    return {
        point: _plain_site(layer.conv, getattr(layer, "bn", None), between, next_layer)
        for point, layer, (between, next_layer) in zip(net.stitch_points, layers, following)
    }


def _stream_segments(net: StagedNet) -> list[tuple[list[str], Segment, int]]:
    """The residual stream of a ResNet cut into segments: ``([stitch points], Segment, run)`` in forward
    order; segments of one ``run`` are joined by zero-padding shortcuts (each is the previous one plus
    channels).

    The stream is the stem's output, then every block's output ``act2(bn2(conv2(·)) + shortcut(x))``. A block
    whose shortcut is the identity, or an option-A zero-padding shortcut, continues the segment of its input
    (the padding grows it: its first channels are the previous ones); a block with an option-B projection
    shortcut (1×1 conv + BatchNorm) starts a new segment, its shortcut being one more producer, and consumes
    the previous segment through that 1×1 conv as well as through its conv1.
    """
    stages = net.stages()  # stem, then every block
    runs: list[list[int]] = []
    for k, (_, module) in enumerate(stages):
        projects = k == 0 or isinstance(module.shortcut, nn.Sequential)
        if projects:
            runs.append([k])
        else:
            runs[-1].append(k)
    segments = []
    for run in runs:
        for k in run:
            point, module = stages[k]
            if k == 0:
                producers = [(module.conv, module.bn)]
            else:
                producers = [(module.conv2, module.bn2)]
                if isinstance(module.shortcut, nn.Sequential):
                    producers.append((module.shortcut.conv, module.shortcut.bn))
            if k + 1 < len(stages):
                nxt = stages[k + 1][1]
                consumers = [nxt.conv1] + ([nxt.shortcut.conv] if isinstance(nxt.shortcut, nn.Sequential) else [])
            else:
                consumers = [net.classifier.fc]  # after global average pooling and flatten: both linear
            size = producers[0][0].out_channels
            segments.append(([point], Segment(size, tuple(producers), tuple(consumers)), run[0]))
    # merge the stages of one run that have the same size into one segment per size
    merged: list[tuple[list[str], Segment, int]] = []
    for points, segment, start in segments:
        if merged and merged[-1][2] == start and merged[-1][1].size == segment.size:
            last_points, last, _ = merged.pop()
            segment = Segment(segment.size, last.producers + segment.producers, last.consumers + segment.consumers)
            points = last_points + points
        merged.append((points, segment, start))
    return merged


@FAMILIES.register("CifarResNet")
def _resnet_sites(net: StagedNet) -> dict[str, Site]:
    """Block-internal ``layerS.b.act1`` (conv1 → bn1 → act1 → conv2), and the residual stream ``stem.act``,
    ``layerS.b.act2``: g acts on the whole segment of the point (every block output of the stage, the
    next blocks' inputs), on the earlier segments joined to it by zero-padding shortcuts through its top-left
    blocks, and on the later ones as g ⊕ I; option-B shortcuts end a segment and absorb it."""
    sites = {
        f"{name}.act1": _plain_site(block.conv1, block.bn1, (), block.conv2)
        for name, block in net.named_modules()
        if isinstance(block, BasicBlock)
    }
    segments = _stream_segments(net)
    for points, segment, start in segments:
        joined = [s for _, s, st in segments if st == start]  # the segments of this run, in order
        earlier = [s.size for s in joined if s.size < segment.size]
        blocks = tuple(b - a for a, b in zip([0] + earlier, earlier + [segment.size]))
        others = tuple(s for s in joined if s is not segment)
        for point in points:
            sites[point] = Site((segment,) + others, (), blocks)
    order = {point: i for i, point in enumerate(net.feature_points)}
    return dict(sorted(sites.items(), key=lambda item: order[item[0]]))


@FAMILIES.register("GraphNet")
def _graph_sites(net: GraphNet) -> dict[str, Site]:
    """Any traced network: every activation point ``σ(norm(layer(h)))`` → parameter-free channel-wise modules →
    ``next_layer`` (Conv or Linear, each tensor on the way read once; :meth:`GraphNet.linear_neighbours`). A
    residual stream, or an activation read by several layers, has no action here."""
    sites = {}
    for point in net.feature_points:
        try:
            sites[point] = _plain_site(*net.linear_neighbours(point))
        except ValueError:
            continue
    return sites


def _no_action(model: nn.Module, point: str, sites: dict[str, Site]) -> ValueError:
    """The error for a point without a weight-space action, with the reason where the graph gives one."""
    where = ", ".join(sites) or "(none)"
    reason = ""
    if isinstance(model, GraphNet):
        try:
            model.linear_neighbours(point)
        except ValueError as err:
            reason = f" ({err})"
    name = type(model.model).__name__ if isinstance(model, GraphNet) else type(model).__name__
    return ValueError(f"the weight-space action is not defined at {point!r} of {name}{reason}; it is defined at: "
                      f"{where}")


def _sites(model: StagedNet) -> dict[str, Site]:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES.get(cls.__name__)(model)
    return {}


def next_layer(model: StagedNet, point: str) -> nn.Module:
    """The layer holding W_{l+1}, the one that can absorb φ_σ(g)^{-1} for a g acting at ``point`` (points
    whose activation feeds one layer only; a residual stream feeds several)."""
    sites = _sites(model)
    if point not in sites:
        raise _no_action(model, point, sites)
    segments = sites[point].segments
    if len(segments) > 1 or len(segments[0].consumers) > 1:
        raise ValueError(f"{point!r} of {type(model).__name__} is on a residual stream: several layers read it")
    return segments[0].consumers[0]


def actionable_points(model: StagedNet) -> tuple[str, ...]:
    """The feature points of ``model`` where :func:`act` is defined, in forward order."""
    return tuple(_sites(model))


def action_blocks(model: StagedNet, point: str) -> tuple[int, ...]:
    """The block sizes g must respect at ``point``: g = g_1 ⊕ g_2 ⊕ … with g_i ∈ G_σ of size ``blocks[i]``.

    One block (every channel) except on the residual stream of a ResNet with zero-padding shortcuts, where
    the first channels of a stage are the previous stage's stream (ResNet-20 at ``layer3.*``: 16, 16, 32).
    """
    sites = _sites(model)
    if point not in sites:
        raise _no_action(model, point, sites)
    return sites[point].blocks


def sample_action(model: StagedNet, point: str, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random element of the group acting at ``point`` (float64): ⊕ of G_σ samples over
    :func:`action_blocks`."""
    group = intertwiner_group(point_activation(model, point))
    return torch.block_diag(*[group.sample(n, generator=generator) for n in action_blocks(model, point)])


def feature(model: nn.Module, point: str, x: Tensor) -> Tensor:
    """The representation at feature ``point`` (an activation module's output) for input ``x``.

    Runs ``model(x)`` under ``torch.no_grad()`` in the model's current mode (call ``.eval()`` first for
    BatchNorm running statistics) and returns the module's output from a forward hook.
    """
    if isinstance(model, GraphNet):
        with torch.no_grad():
            return point_features(model, x, [point])[point]
    if point not in getattr(model, "feature_points", ()):
        raise ValueError(f"{type(model).__name__} has no feature point {point!r}; feature points: "
                         + ", ".join(getattr(model, "feature_points", ())))
    captured: list[Tensor] = []
    handle = model.get_submodule(point).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return captured[0]


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


def act(model: StagedNet, point: str, g: Tensor) -> StagedNet:
    """``g·model``: a deep copy whose representation at ``point`` is φ_σ(g)·h and whose function is unchanged.

    Args:
        model: a network of the zoo or a :class:`~symstitch.graph.GraphNet` (left untouched, including its
            training mode); any other ``nn.Module`` is wrapped in a GraphNet and the edited copy of the module
            itself is returned. In a traced graph the action is defined at activation points between two
            Conv/Linear layers (:meth:`~symstitch.graph.GraphNet.linear_neighbours`); elsewhere the error says
            why not.
        point: a feature point listed by :func:`actionable_points`.
        g: an n×n element of ``intertwiner_group(model.activation)``, n the channels at ``point``
            (any float dtype; the edit runs in float64 and is cast back to the weights' dtype); on a residual
            stream block diagonal with the blocks of :func:`action_blocks` (:func:`sample_action` draws one).
    """
    if not isinstance(model, (StagedNet, GraphNet)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"act needs an nn.Module, got {type(model).__name__}")
        return act(GraphNet(model), point, g).model
    sites = _sites(model)
    if point not in sites:
        raise _no_action(model, point, sites)
    group = intertwiner_group(point_activation(model, point))
    n = sites[point].channels
    g = torch.as_tensor(g).detach().to("cpu", torch.float64)
    if g.shape != (n, n):
        raise ValueError(f"{point!r} has {n} channels, so g must be {n}×{n}; got {tuple(g.shape)}")
    if not group.contains(g):
        raise ValueError(f"g is not in {group.name}")
    _check(sites[point], g, group.phi(g), point, group)
    new = copy.deepcopy(model)
    site = _sites(new)[point]
    _apply(site, g.to(site.segments[0].producers[0][0].weight.device), group)
    return new


__all__ = [
    "FAMILIES",
    "GROUPS",
    "NONLINEARITIES",
    "IntertwinerGroup",
    "InvertibleScaledPermutations",
    "Nonlinearity",
    "Permutations",
    "PositiveScaledPermutations",
    "SignedPermutations",
    "Segment",
    "Site",
    "act",
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
