"""Where an alignment chooses its group elements (docs/method.md §7): one :class:`AlignmentSite` per set of
channels that move together.

The weight-space action (:func:`symstitch.symmetry.act`) is defined at the feature points a network lists in
:meth:`~symstitch.network.PointNetwork.symmetry_sites`. Several points can share one element: every block output
of a residual stage is the same stream, so ``layer1.0.act2``, ``layer1.1.act2`` and ``layer1.2.act2`` of a
ResNet-20 edit the same weights, and zero-padding shortcuts join the stages' streams into one run (the first 16
channels of ``layer2`` are those of ``layer1``). An alignment site gathers such points: it is acted on at the
point with the most channels (whose g reaches every segment of the run through its top-left blocks), and its g is
block diagonal with that point's blocks; block k is chosen from the points that hold its channels.

Which elements are allowed at a site (:attr:`AlignmentSite.scales`): the scales of the activation's group
G_σ (``positive`` for ReLU, ``sign`` for tanh, ``none`` for GELU's permutations), except that max-pooling after
the point does not commute with negative scales, so tanh's signs are dropped there; ``permutations``
alignments drop every scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from symstitch.graph import as_network
from symstitch.network import Site
from symstitch.symmetry import intertwiner_group

Tensor = torch.Tensor

#: what the diagonal D of g = P·D may be: any positive number, ±1, 1, any nonzero number
ScaleKind = Literal["positive", "sign", "none", "nonzero"]

#: the intertwiner group kind (symstitch.symmetry.GROUPS) → its scales
SCALES: dict[str, ScaleKind] = {
    "positive_scaled_permutations": "positive",
    "signed_permutations": "sign",
    "permutations": "none",
    "invertible_scaled_permutations": "nonzero",
}

#: which part of G_σ an alignment uses: nothing (B as it is), permutations only (what the public tools align
#: with), or the whole group (positive-scaled permutations for ReLU, signed permutations for tanh)
GROUP_CHOICES = ("none", "permutations", "full")


@dataclass(frozen=True)
class AlignmentSite:
    """One group element g: acted on at ``point``, it moves the channels of every point in ``points`` (in forward
    order; ``channels[i]`` of them at ``points[i]``), block diagonal with ``blocks``, its scales of kind
    ``scales``; ``group`` names G_σ there."""

    point: str
    points: tuple[str, ...]
    channels: tuple[int, ...]
    blocks: tuple[int, ...]
    scales: ScaleKind
    group: str

    @property
    def size(self) -> int:
        return sum(self.blocks)

    def block_ranges(self) -> list[tuple[int, int]]:
        """``[(lo, hi), …]``: the channels of each block."""
        edges = torch.tensor([0, *self.blocks]).cumsum(0).tolist()
        return list(zip(edges[:-1], edges[1:]))

    def holders(self, hi: int) -> list[str]:
        """The points that hold channels ``0 … hi − 1`` (a run's earlier stages hold only its first blocks)."""
        return [p for p, c in zip(self.points, self.channels) if c >= hi]

    def restricted(self, choice: str) -> "AlignmentSite":
        """This site for an alignment ``choice`` of :data:`GROUP_CHOICES` (``permutations``: no scales)."""
        if choice not in GROUP_CHOICES:
            raise ValueError(f"the group of an alignment is one of {', '.join(GROUP_CHOICES)}; got {choice!r}")
        if choice == "permutations":
            return AlignmentSite(self.point, self.points, self.channels, self.blocks, "none", self.group)
        return self


def _segment_key(site: Site) -> frozenset[int]:
    """The segments a site edits, by identity of their first producer: the same for every point of one run."""
    return frozenset(id(segment.producers[0][0]) for segment in site.segments)


def alignment_sites(net: nn.Module) -> tuple[list[AlignmentSite], dict[str, str]]:
    """The alignment sites of ``net`` (any module: read through the network interface,
    :func:`~symstitch.graph.as_network`) in forward order, and the feature points none of them reaches, each with
    the reason the action is not defined there."""
    net = as_network(net)
    sites = net.symmetry_sites()
    runs: dict[frozenset[int], list[str]] = {}
    for point, site in sites.items():
        runs.setdefault(_segment_key(site), []).append(point)
    out = []
    for points in runs.values():
        point = max(points, key=lambda p: (sites[p].channels, -points.index(p)))  # the widest, the first of those
        site = sites[point]
        group = intertwiner_group(net.point_activation(point))
        scales = SCALES[group.nonlinearity.group]  # the kind's registry name
        if scales in ("sign", "nonzero") and any(isinstance(m, torch.nn.MaxPool2d) for m in site.between):
            scales = "none" if scales == "sign" else "positive"  # max-pooling commutes with positive scales only
        out.append(AlignmentSite(point, tuple(points), tuple(sites[p].channels for p in points), tuple(site.blocks),
                                 scales, group.name))
    order = {p: i for i, p in enumerate(net.feature_points)}
    out.sort(key=lambda s: order.get(s.points[0], len(order)))
    unreached = {p: net.no_action_reason(p) or "no weight-space action is defined there"
                 for p in net.feature_points if p not in sites}
    return out, unreached


def project_scales(d: Tensor, kind: ScaleKind) -> Tensor:
    """The nearest allowed scales of ``kind`` to least-squares scales ``d``; 1 where ``d`` says nothing (0, not
    finite: a dead unit) or has the wrong sign for positive scales."""
    d = torch.as_tensor(d, dtype=torch.float64).clone()
    bad = ~torch.isfinite(d) | (d == 0)
    if kind == "none":
        return torch.ones_like(d)
    if kind == "sign":
        d = torch.sign(d)
    elif kind == "positive":
        bad |= d < 0
    d[bad] = 1.0
    return d


__all__ = ["GROUP_CHOICES", "SCALES", "AlignmentSite", "ScaleKind", "alignment_sites", "project_scales"]
