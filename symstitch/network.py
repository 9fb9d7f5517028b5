"""One network interface: :class:`PointNetwork`, what every tool asks of a network, and :class:`Site`, where a
network says the weight-space action edits it (docs/method.md, *Notation* and §1).

Two kinds of network implement it, and callers never ask which one they hold:

* the zoo's staged networks (:class:`symstitch.models.base.StagedNet`: MCNN, CifarResNet, CCT);
* any other PyTorch model behind a wrapper (:class:`symstitch.graph.GraphNet`): a :class:`~symstitch.graph.TracedNet`
  when ``torch.fx`` traces it, else a :class:`~symstitch.graph.HookedNet` run with forward hooks.

A network of your own needs no base class: any ``nn.Module`` with the members of :class:`PointNetwork` is used as
it is (:func:`is_network`), every other module is wrapped (:func:`symstitch.graph.as_network`).

**Points and their kind.** ``split_points`` are where the network splits, in forward order: the *stitch points*
(cuts: nothing bypasses them) and the *inner points* (a carry bypasses them); ``feature_points`` are the outputs
of activations, which the similarity metrics compare.

**Symmetry sites.** Each model family declares its own (:meth:`PointNetwork.symmetry_sites`): the zoo's
families in their own files (``symstitch/models/mcnn.py``, ``resnet.py``), the wrapper for any traced graph in
``symstitch/graph.py``. :mod:`symstitch.symmetry` applies the action on a :class:`Site` and knows no family.

This module is the bottom of the network layer: it imports no other symstitch module.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import nn

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# Where the weight-space action edits a network (docs/method.md §1)


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


def plain_site(layer: nn.Module, norm: Optional[nn.BatchNorm2d], between: tuple[nn.Module, ...],
               next_layer: nn.Module) -> Site:
    """The site of a plain layer: ``σ(norm(layer(h)))`` → ``between`` → ``next_layer``."""
    size = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
    return Site((Segment(size, ((layer, norm),), (next_layer,)),), between, (size,))


# ----------------------------------------------------------------------------------------------------------
# The interface


class PointNetwork(Protocol):
    """A classifier that runs split at named points and answers for each point its features, shape and group.

    A is run up to a point and B from it (docs/method.md §2)::

        h, carry = net.split(x, p)          # A_{≤p}(x), and what bypasses p (None at a cut)
        y = net.forward_from(h, p, carry)   # B_{>p}(h)
    """

    @property
    def label(self) -> str:
        """What messages call the network: its class name (a wrapper's: the wrapped model's)."""
        ...

    # ------------------------------------------------------------------ points and their kind
    @property
    def stitch_points(self) -> tuple[str, ...]:
        """The cuts where stitching maps A's representation to B's, in forward order."""
        ...

    @property
    def inner_points(self) -> tuple[str, ...]:
        """Points bypassed by a carry (a residual block's first activation)."""
        ...

    @property
    def split_points(self) -> tuple[str, ...]:
        """Every point where the network splits, in forward order."""
        ...

    @property
    def feature_points(self) -> tuple[str, ...]:
        """The outputs of activations, in forward order."""
        ...

    def check_split_point(self, point: str) -> None:
        """A clear ``ValueError`` (with the valid or nearest names) unless the network splits at ``point``."""
        ...

    def check_stitch_point(self, point: str) -> int:
        """The index of ``point`` among the points; a clear ``ValueError`` where there is none."""
        ...

    def check_feature_point(self, point: str) -> None:
        """A clear ``ValueError`` unless :meth:`features` answers at ``point``."""
        ...

    # ------------------------------------------------------------------ running it split
    def __call__(self, x: Tensor) -> Tensor:
        ...

    def split(self, x: Tensor, point: str) -> tuple[Tensor, Any]:
        """``(A_{≤p}(x), carry)``: the carry is what the rest of the network needs besides the point, None at a
        cut."""
        ...

    def forward_to(self, x: Tensor, point: str) -> Tensor:
        """A_{≤p}(x)."""
        ...

    def forward_from(self, h: Tensor, point: str, carry: Any = None) -> Tensor:
        """B_{>p}(h), with the carry of :meth:`split` where the point has one."""
        ...

    # ------------------------------------------------------------------ features at points
    def features(self, x: Tensor, points: Sequence[str]) -> dict[str, Tensor]:
        """The outputs at ``points`` for input ``x`` (copies: later in-place operations do not move them), from one
        forward pass."""
        ...

    def point_module(self, point: str) -> Optional[nn.Module]:
        """The module whose forward output is the features at ``point`` (a forward hook there records them), or
        None where only :meth:`features` gives them."""
        ...

    # ------------------------------------------------------------------ shape and activation at a point
    def feature_shapes(self, input_shape: Optional[Sequence[int]] = None) -> dict[str, tuple[int, ...]]:
        """The shape, without the batch dimension, at every point (``input_shape``: the batch shape to use)."""
        ...

    def point_shape(self, point: str) -> tuple[int, ...]:
        """The shape at ``point`` without the batch dimension."""
        ...

    def point_channels(self, point: str) -> int:
        """C at ``point``: dim 1 of (N, C, …), the last dim of tokens (N, L, C)."""
        ...

    def point_activation(self, point: str) -> str:
        """The activation whose intertwiner group acts at ``point`` (a ``symstitch.symmetry.NONLINEARITIES``
        name); ``ValueError`` with the reason where none is known."""
        ...

    @property
    def activation(self) -> str:
        """The network's one activation (``ValueError`` where it has several kinds: ask per point)."""
        ...

    @property
    def num_classes(self) -> int:
        ...

    # ------------------------------------------------------------------ the weight-space action
    def symmetry_sites(self) -> dict[str, Site]:
        """Every feature point where the weight-space action is defined, with what it edits, in forward order."""
        ...

    def no_action_reason(self, point: str) -> str:
        """Why the weight-space action is not defined at ``point`` ('' where the network does not say)."""
        ...

    # ------------------------------------------------------------------ every node
    def as_graph(self, input_shape: Optional[Sequence[int]] = None) -> "PointNetwork":
        """The network as a graph of every named node (``symstitch points``), with ``describe()`` and ``note``."""
        ...


#: the members of the interface (:func:`is_network` looks for every one)
MEMBERS: tuple[str, ...] = tuple(sorted(
    name for name in {*vars(PointNetwork), *PointNetwork.__annotations__}
    if not name.startswith("_") or name == "__call__"
))


def is_network(obj: object) -> bool:
    """Whether ``obj`` implements :class:`PointNetwork`. The members are looked up statically: no property runs
    (one may be expensive or refuse, as a wrapper's ``activation`` does for a model with several kinds)."""
    return all(inspect.getattr_static(obj, name, None) is not None for name in MEMBERS)


__all__ = ["MEMBERS", "PointNetwork", "Segment", "Site", "is_network", "plain_site"]
