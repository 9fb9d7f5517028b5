"""The common shape of every model in the zoo: a chain of named stages.

A classifier is written as f = head ∘ s_K ∘ … ∘ s_1. The output of each stage s_k is a *stitch point*
(docs/method.md: a cut through which all information flows), so a network can be run split at any of them:

    h = net.forward_to(x, point)       # A_{≤p}(x)
    y = net.forward_from(h, point)     # B_{>p}(h)

A stage may also offer *inner points* (``inner_points``): a point inside it where a second path bypasses the
point, like the ReLU after a residual block's first convolution, whose shortcut carries the block input. The
network splits there too, but the rest of the stage needs that bypassing tensor, the *carry*:

    h, carry = net.split(x, point)               # the activation at the point and the block input
    y = net.forward_from(h, point, carry)        # the block continues from h, its shortcut from carry

(stitching at such a point feeds B's block T(h_A) and A's block input: the paper's protocol). A stage module
with inner points implements ``enter(x) → (h, carry)`` and ``leave(h, carry)`` with ``leave(*enter(x)) ==
forward(x)``. ``split_points`` lists every point where the network splits, cuts and inner points, in
forward order.

*Feature points* are the outputs of every activation module (``nn.ReLU``, ``nn.GELU``, …), in forward
order; for the CNNs every stitch point is also a feature point of the same name (the stage ends with its
activation module), while block-internal activations of a ResNet are feature points but not stitch points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from symstitch.network import Site
from symstitch.registry import Registry

if TYPE_CHECKING:
    from symstitch.graph import GraphNet

#: Modules whose outputs are feature points.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Tanh,
)


#: the batch shape of the zoo's input (CIFAR-10 and the upscaled digits: 3×32×32)
INPUT_SHAPE = (1, 3, 32, 32)


class StagedNet(nn.Module):
    """Base class of the zoo, a :class:`~symstitch.network.PointNetwork`. Subclasses build their modules, then
    call :meth:`set_stages`; a family with a weight-space action declares where it acts (:meth:`symmetry_sites`).

    Attributes set by subclasses:
        activation: name of the network's nonlinearity at its feature points ("relu", "sigmoid", "gelu", …);
            it decides the intertwiner group used by symmetry-aware tools.
    """

    activation: str = "relu"

    def set_stages(self, stages: Sequence[tuple[str, str]], head: str,
                   inner: Sequence[tuple[str, str]] = ()) -> None:
        """Declare the forward chain.

        Args:
            stages: ``(point, module_path)`` pairs in forward order; ``point`` names the stage's output
                (the stitch point), ``module_path`` is the submodule that computes it.
            head: module path of the final stage (features → logits); its output is not a stitch point.
            inner: ``(point, stage point)`` pairs: an inner point and the stitch point of the stage it lies
                in (that stage's module implements ``enter`` and ``leave``).
        """
        names = [p for p, _ in stages] + [p for p, _ in inner]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stitch point names: {names}")
        self._stage_paths: tuple[tuple[str, str], ...] = tuple(stages)
        self._head_path = head
        self.get_submodule(head)  # fail early on a typo
        for _, path in stages:
            self.get_submodule(path)
        cuts = [p for p, _ in stages]
        for point, stage_point in inner:
            if stage_point not in cuts:
                raise ValueError(f"inner point {point!r}: no stage {stage_point!r}")
        self._inner: dict[str, int] = {point: cuts.index(stage_point) for point, stage_point in inner}

    @property
    def label(self) -> str:
        """What messages call the network: its class name."""
        return type(self).__name__

    # ------------------------------------------------------------------ points
    @property
    def stitch_points(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self._stage_paths)

    @property
    def feature_points(self) -> tuple[str, ...]:
        return tuple(name for name, m in self.named_modules() if isinstance(m, ACTIVATIONS))

    @property
    def inner_points(self) -> tuple[str, ...]:
        """Points inside a stage, bypassed by a carry (see the module docstring)."""
        return tuple(getattr(self, "_inner", {}))

    @property
    def split_points(self) -> tuple[str, ...]:
        """Every point where the network splits: stitch points and inner points, in forward order (an inner
        point comes right before the output of its stage)."""
        inner = getattr(self, "_inner", {})
        order = []
        for k, point in enumerate(self.stitch_points):
            order += [p for p, stage in inner.items() if stage == k]
            order.append(point)
        return tuple(order)

    def check_split_point(self, point: str) -> None:
        """A clear error listing the valid points unless ``point`` is in :attr:`split_points`."""
        if point not in self.split_points:
            inner = f"; inner points: {', '.join(self.inner_points)}" if self.inner_points else ""
            raise ValueError(f"{type(self).__name__} has no stitch point {point!r}; valid stitch points: "
                             + ", ".join(self.stitch_points) + inner)

    def check_stitch_point(self, point: str) -> int:
        """Index of ``point`` among the stitch points; a clear error listing the valid ones otherwise."""
        try:
            return self.stitch_points.index(point)
        except ValueError:
            raise ValueError(
                f"{type(self).__name__} has no stitch point {point!r}; valid stitch points: "
                + ", ".join(self.stitch_points)
            ) from None

    def check_feature_point(self, point: str) -> None:
        """A clear error listing the feature points unless ``point`` is one."""
        if point not in self.feature_points:
            raise ValueError(f"{type(self).__name__} has no feature point {point!r}; valid feature points: "
                             + ", ".join(self.feature_points))

    # ----------------------------------------------------------------- forward
    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(p, self.get_submodule(path)) for p, path in self._stage_paths]

    @property
    def num_classes(self) -> int:
        """Output size: that of the last ``nn.Linear`` of the head."""
        return [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1].out_features

    @property
    def head(self) -> nn.Module:
        return self.get_submodule(self._head_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return self.head(x)

    def forward_to(self, x: torch.Tensor, point: str) -> torch.Tensor:
        """A_{≤p}(x): run the stages up to and including the one whose output is ``point`` (at an inner point:
        the activation there, see :meth:`split` for the carry)."""
        return self.split(x, point)[0]

    def split(self, x: torch.Tensor, point: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(A_{≤p}(x), carry)``: the carry is the bypassing tensor at an inner point, ``None`` at a cut."""
        inner = getattr(self, "_inner", {})
        self.check_split_point(point)
        if point in inner:
            stages = self.stages()
            for _, stage in stages[: inner[point]]:
                x = stage(x)
            return stages[inner[point]][1].enter(x)
        k = self.check_stitch_point(point)
        for _, stage in self.stages()[: k + 1]:
            x = stage(x)
        return x, None

    def forward_from(self, h: torch.Tensor, point: str, carry: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B_{>p}(h): run the rest of the network from ``h`` at ``point``: the rest of the stage (with ``carry``,
        required at an inner point), the stages after it, and the head."""
        inner = getattr(self, "_inner", {})
        self.check_split_point(point)
        if point in inner:
            if carry is None:
                raise ValueError(f"{point!r} is inside a stage: forward_from needs its carry (the tensor that "
                                 "bypasses the point, from split())")
            stages = self.stages()
            h = stages[inner[point]][1].leave(h, carry)
            k = inner[point]
        else:
            if carry is not None:
                raise ValueError(f"{point!r} is a cut: nothing bypasses it, so there is no carry")
            k = self.check_stitch_point(point)
        for _, stage in self.stages()[k + 1 :]:
            h = stage(h)
        return self.head(h)

    # ------------------------------------------------------------------ features, shapes and groups at points
    def point_module(self, point: str) -> nn.Module:
        """The activation module whose output is feature ``point`` (every feature point is one)."""
        return self.get_submodule(point)

    def features(self, x: torch.Tensor, points: Sequence[str]) -> dict[str, torch.Tensor]:
        """The outputs at feature ``points`` (cloned) from one forward pass, by forward hooks on their modules."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for p in dict.fromkeys(points):
            def hook(_module, _inputs, out, p=p):
                captured.setdefault(p, out.detach().clone())  # later in-place ops must not change it
            handles.append(self.point_module(p).register_forward_hook(hook))
        try:
            self(x)
        finally:
            for h in handles:
                h.remove()
        missing = [p for p in points if p not in captured]
        if missing:
            raise RuntimeError(f"feature points not reached in the forward pass: {', '.join(missing)}")
        return captured

    def point_shape(self, point: str) -> tuple[int, ...]:
        """The shape at ``point`` without the batch dimension (for a 3×32×32 input)."""
        return self.feature_shapes()[point]

    def point_channels(self, point: str) -> int:
        """C at ``point``: (N, C, …) or the last dim of tokens (N, L, C)."""
        shape = self.point_shape(point)
        return shape[-1] if len(shape) == 2 else shape[0]

    def point_activation(self, point: str) -> str:
        """The network's activation: one kind at every point of the zoo."""
        return self.activation

    def symmetry_sites(self) -> dict[str, Site]:
        """Where the weight-space action is defined (docs/method.md §1): none, unless the family declares its
        sites."""
        return {}

    def no_action_reason(self, point: str) -> str:
        return ""

    def as_graph(self, input_shape: Optional[Sequence[int]] = None) -> GraphNet:
        """The network traced as a graph of every node (:class:`~symstitch.graph.GraphNet`; default input
        3×32×32)."""
        from symstitch.graph import GraphNet  # the wrapper of any module; it knows nothing of the zoo

        return GraphNet(self, input_shape=input_shape or INPUT_SHAPE)

    @torch.no_grad()
    def feature_shapes(self, input_shape: Optional[Sequence[int]] = None) -> dict[str, tuple[int, ...]]:
        """Shape (without the batch dimension) of every feature and stitch point, from one dummy forward (default
        input: :data:`INPUT_SHAPE`)."""
        shapes: dict[str, tuple[int, ...]] = {}
        handles = []

        def record(name: str):
            def hook(_module, _inputs, out) -> None:  # returns None: the output stays untouched
                shapes.setdefault(name, tuple(out.shape[1:]))

            return hook

        for name in self.feature_points:
            handles.append(self.get_submodule(name).register_forward_hook(record(name)))
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            x = torch.zeros(*(input_shape or INPUT_SHAPE), device=p.device, dtype=p.dtype)
            for point, stage in self.stages():
                x = stage(x)
                shapes.setdefault(point, tuple(x.shape[1:]))
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        return shapes


#: architecture name → factory (each family file registers its networks; ``symstitch.models.build`` builds one)
MODELS: Registry[StagedNet] = Registry("architecture")
register = MODELS.register
