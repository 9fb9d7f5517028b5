"""Aligning B to A up to the intertwiner groups of its activations (docs/method.md §7)::

    al = align(a, b, method="activation", data=train_loader)     # or "weight", or "stitch"
    b_aligned = al.apply(b)                                        # g·B: B's function, A's unit order and scales

:func:`align` chooses one group element g_s at every :class:`~symstitch.merge.sites.AlignmentSite` of the
networks (a residual stream is one site) so that g·B is as close to A as the method can make it, and
:meth:`Alignment.apply` builds g·B with the weight action (:func:`symstitch.symmetry.act`), which leaves B's
function unchanged. The methods (:data:`METHODS`, one file each):

* ``activation`` (:mod:`~symstitch.merge.activation`): one pass of the data, per site the G_σ-Procrustes solution;
* ``weight`` (:mod:`~symstitch.merge.weight`): coordinate descent over the sites on ‖θ_A − g·θ_B‖², scales
  included;
* ``stitch`` (:mod:`~symstitch.merge.from_stitch`): the hardened P·D of a ``birkhoff`` stitch at each site.

``group`` picks the part of G_σ used: ``full`` (positive-scaled permutations for ReLU, signed permutations for
tanh, permutations for GELU) or ``permutations`` (what the public merging tools align with).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from symstitch.graph import as_network
from symstitch.network import PointNetwork
from symstitch.symmetry import act_, decompose
from symstitch.merge.methods import METHODS
from symstitch.merge.sites import GROUP_CHOICES, AlignmentSite, alignment_sites

Tensor = torch.Tensor


@dataclass
class Alignment:
    """What :func:`align` found: ``elements[site.point]`` = g_s (float64, g_s·h_B ≈ h_A) for each of ``sites``;
    ``unaligned`` names the feature points no site reaches and why; ``details`` what the method reports
    (iterations, seconds, …)."""

    method: str
    group: str
    sites: list[AlignmentSite]
    elements: dict[str, Tensor]
    unaligned: dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def apply(self, b: nn.Module) -> nn.Module:
        """g·B: a copy of ``b`` acted on at every site (its function unchanged; B itself untouched). A network of
        the zoo or any :class:`~symstitch.network.PointNetwork` comes back as one; any other module as itself."""
        out = copy.deepcopy(b)
        net = as_network(out)
        for site in self.sites:
            act_(net, site.point, self.elements[site.point])
        return out

    def permutations(self) -> dict[str, list[int]]:
        """π of each site (g = P_π·diag(d), ``g[i, π[i]] = d[π[i]]``)."""
        return {p: decompose(g)[0].tolist() for p, g in self.elements.items()}

    def scales(self) -> dict[str, list[float]]:
        """d of each site."""
        return {p: decompose(g)[1].tolist() for p, g in self.elements.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-ready: method, group, per site its points, how many units moved and the spread of its scales."""
        rows = []
        for site in self.sites:
            perm, d = decompose(self.elements[site.point])
            rows.append({"point": site.point, "points": list(site.points), "blocks": list(site.blocks),
                         "scales": site.scales, "moved": int((perm != torch.arange(len(perm))).sum()),
                         "units": len(perm), "log_scale_spread": float(d.abs().log().std()) if len(d) > 1 else 0.0,
                         "negative": int((d < 0).sum())})
        return {"method": self.method, "group": self.group, "sites": rows, "unaligned": self.unaligned,
                **{k: v for k, v in self.details.items() if isinstance(v, (int, float, str))}}


def identity_alignment(b: nn.Module) -> Alignment:
    """The alignment that leaves B as it is (``group="none"``)."""
    sites, unaligned = alignment_sites(as_network(b))
    return Alignment("none", "none", sites, {s.point: torch.eye(s.size, dtype=torch.float64) for s in sites},
                     unaligned)


def check_alignable(a: PointNetwork, b: PointNetwork) -> tuple[list[AlignmentSite], dict[str, str]]:
    """The sites of A and B, which must agree (same points, channels and blocks); a clear error where they do
    not, or where neither network has any site (naming the points and why)."""
    sites_a, unaligned = alignment_sites(a)
    sites_b, _ = alignment_sites(b)
    if not sites_a:
        reasons = "; ".join(f"{p}: {r}" for p, r in list(unaligned.items())[:8]) or "it has no feature points"
        raise ValueError(f"{a.label} has no point where the weight-space action is defined, so nothing can be "
                         f"aligned ({reasons})")
    shape = lambda sites: [(s.point, s.points, s.channels, s.blocks) for s in sites]  # noqa: E731
    if shape(sites_a) != shape(sites_b):
        diff = [f"{x[0]} ({x[2]} channels) vs {y[0]} ({y[2]} channels)"
                for x, y in zip(shape(sites_a), shape(sites_b)) if x != y]
        raise ValueError(f"A ({a.label}) and B ({b.label}) cannot be aligned: their sites differ"
                         + (f": {'; '.join(diff[:4])}" if diff else f" in number ({len(sites_a)} vs {len(sites_b)})")
                         + "; alignment needs two networks of one architecture and width")
    return sites_a, unaligned


def align(a: nn.Module, b: nn.Module, method: str = "activation", group: str = "full", *,
          points: Optional[list[str]] = None, **options: Any) -> Alignment:
    """Align B to A: g_s at every alignment site (or at the sites of ``points``) with g·B as close to A as
    ``method`` makes it.

    Args:
        a, b: two networks of one architecture (the zoo's, or any module: wrapped as a
            :class:`~symstitch.graph.GraphNet`, aligned where the action reaches; ``unaligned`` says where not).
        method: ``activation``, ``weight`` or ``stitch`` (:data:`METHODS`).
        group: ``full`` or ``permutations`` (``none``: :func:`identity_alignment`).
        points: feature points to align (each selects the site holding it); a point without an action is an
            error naming why.
        options: the method's own (``data`` for ``activation``; ``max_iter``, ``seed`` for ``weight``; the stitch
            settings for ``stitch``).
    """
    if group == "none":
        return identity_alignment(b)
    if group not in GROUP_CHOICES:
        raise ValueError(f"group is one of {', '.join(GROUP_CHOICES)}; got {group!r}")
    fn = METHODS.get(method)
    net_a, net_b = as_network(a), as_network(b)
    sites, unaligned = check_alignable(net_a, net_b)
    if points is not None:
        by_point = {p: s for s in sites for p in s.points}
        bad = [p for p in points if p not in by_point]
        if bad:
            raise ValueError("cannot align at " + "; ".join(
                f"{p}: {unaligned.get(p) or 'not a feature point of ' + net_a.label}" for p in bad)
                + f"; alignable points: {', '.join(by_point)}")
        chosen = {id(by_point[p]) for p in points}
        sites = [s for s in sites if id(s) in chosen]
    sites = [s.restricted(group) for s in sites]
    start = time.perf_counter()
    elements, details = fn(net_a, net_b, sites, **options)
    details = {**details, "seconds": time.perf_counter() - start}
    return Alignment(method, group, sites, elements, unaligned, details)


# the methods register themselves
from symstitch.merge import activation, from_stitch, weight  # noqa: E402,F401  (they register their methods)

__all__ = ["METHODS", "Alignment", "align", "check_alignable", "identity_alignment"]
