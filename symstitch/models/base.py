"""The common shape of every model in the zoo: a chain of named stages.

A classifier is written as f = head ∘ s_K ∘ … ∘ s_1. The output of each stage s_k is a *stitch point*
(SPEC: a cut through which all information flows), so a network can be run split at any of them:

    h = net.forward_to(x, point)       # A_{≤p}(x)
    y = net.forward_from(h, point)     # B_{>p}(h)

*Feature points* are the outputs of every activation module (``nn.ReLU``, ``nn.GELU``, …), in forward
order; for the CNNs every stitch point is also a feature point of the same name (the stage ends with its
activation module), while block-internal activations of a ResNet are feature points but not stitch points.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from symstitch.registry import Registry

#: Modules whose outputs are feature points.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Tanh,
)


class StagedNet(nn.Module):
    """Base class of the zoo. Subclasses build their modules, then call :meth:`set_stages`.

    Attributes set by subclasses:
        activation: name of the network's nonlinearity at its feature points ("relu", "sigmoid", "gelu", …);
            it decides the intertwiner group used by symmetry-aware tools.
    """

    activation: str = "relu"

    def set_stages(self, stages: Sequence[tuple[str, str]], head: str) -> None:
        """Declare the forward chain.

        Args:
            stages: ``(point, module_path)`` pairs in forward order; ``point`` names the stage's output
                (the stitch point), ``module_path`` is the submodule that computes it.
            head: module path of the final stage (features → logits); its output is not a stitch point.
        """
        names = [p for p, _ in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stitch point names: {names}")
        self._stage_paths: tuple[tuple[str, str], ...] = tuple(stages)
        self._head_path = head
        self.get_submodule(head)  # fail early on a typo
        for _, path in stages:
            self.get_submodule(path)

    # ------------------------------------------------------------------ points
    @property
    def stitch_points(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self._stage_paths)

    @property
    def feature_points(self) -> tuple[str, ...]:
        return tuple(name for name, m in self.named_modules() if isinstance(m, ACTIVATIONS))

    def check_stitch_point(self, point: str) -> int:
        """Index of ``point`` among the stitch points; a clear error listing the valid ones otherwise."""
        try:
            return self.stitch_points.index(point)
        except ValueError:
            raise ValueError(
                f"{type(self).__name__} has no stitch point {point!r}; valid stitch points: "
                + ", ".join(self.stitch_points)
            ) from None

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
        """A_{≤p}(x): run the stages up to and including the one whose output is ``point``."""
        k = self.check_stitch_point(point)
        for _, stage in self.stages()[: k + 1]:
            x = stage(x)
        return x

    def forward_from(self, h: torch.Tensor, point: str) -> torch.Tensor:
        """B_{>p}(h): run the stages after ``point`` and the head."""
        k = self.check_stitch_point(point)
        for _, stage in self.stages()[k + 1 :]:
            h = stage(h)
        return self.head(h)

    @torch.no_grad()
    def feature_shapes(self, input_shape: Sequence[int] = (1, 3, 32, 32)) -> dict[str, tuple[int, ...]]:
        """Shape (without the batch dimension) of every feature and stitch point, from one dummy forward."""
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
            x = torch.zeros(*input_shape, device=p.device, dtype=p.dtype)
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
