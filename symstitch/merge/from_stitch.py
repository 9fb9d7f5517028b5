"""Alignment from stitching (docs/method.md §7): at each alignment site a ``birkhoff`` stitch from B into A is
trained (:func:`symstitch.stitching.stitch`, the paper's G_σ stitch: T = P·D with D of the activation's group),
and its hardened T, which maps h_B to h_A, is the site's g. The stitch's bias has no place in a group element
and is dropped. On a residual stream g must be block diagonal: each diagonal block of T is hardened on its own
(the Hungarian method on |T|, then T's entries on the matched pairs as scales, projected onto the site's kind),
which is T itself when T is block diagonal already.

Each site costs one stitch (``epochs`` of training B's suffix forward), so this method is the slowest of the
three; it is the one that asks the networks which units are interchangeable *as they compute*, not as they look.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from symstitch.merge.methods import METHODS
from symstitch.merge.sites import AlignmentSite, project_scales
from symstitch.network import PointNetwork
from symstitch.stitch_layers import hungarian
from symstitch.symmetry import compose

Tensor = torch.Tensor


def harden_blocks(T: Tensor, site: AlignmentSite) -> Tensor:
    """The element of the site's group nearest to T block by block (module docstring)."""
    blocks = []
    for lo, hi in site.block_ranges():
        sub = T[lo:hi, lo:hi].to(torch.float64)
        perm = hungarian(sub if site.scales in ("positive", "none") else sub.abs())
        d = torch.empty(hi - lo, dtype=torch.float64)
        d[perm] = sub[torch.arange(hi - lo), perm]
        blocks.append(compose(perm, project_scales(d, site.scales)))
    return torch.block_diag(*blocks)


def stitch_point(a: PointNetwork, site: AlignmentSite) -> str:
    """Where the site's stitch is trained: its point, else another of its points where the networks split."""
    for point in (site.point, *site.points):
        if point in a.split_points and a.point_channels(point) == site.size:
            return point
    raise ValueError(f"no point of the alignment site {site.point} ({', '.join(site.points)}) is a split point with "
                     f"all {site.size} of its channels, so no stitch can be trained there; use method='activation' "
                     "or 'weight'")


@METHODS.register("stitch")
def stitch_matching(a: PointNetwork, b: PointNetwork, sites: list[AlignmentSite], *, epochs: int = 2,
                    relaxed_epochs: Optional[int] = None, lr: Optional[float] = None, seed: int = 0,
                    data: Any = None, fit_args: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], dict]:
    """g at every site from a ``birkhoff`` stitch B → A trained there (``data``: as :func:`~symstitch.stitching.stitch`
    takes it; the other options are the stitch's)."""
    from symstitch.stitching import stitch  # Lightning: only when this method runs

    points = {site.point: stitch_point(a, site) for site in sites}
    options: dict[str, Any] = {"epochs": epochs, "seed": seed, "data": data, "fit_args": tuple(fit_args)}
    if relaxed_epochs is not None:
        options["relaxed_epochs"] = relaxed_epochs
    if lr is not None:
        options["lr"] = lr
    elements, penalties = {}, {}
    for site in sites:
        result = stitch(b, a, points[site.point], "birkhoff", **options)
        layer = result.layer
        layer.harden()
        T = compose(layer.permutation.cpu(), layer.scales.to("cpu", torch.float64))
        elements[site.point] = harden_blocks(T, site)
        penalties[site.point] = result.penalty_pts
    return elements, {"stitch_penalty_pts": penalties}


__all__ = ["harden_blocks", "stitch_matching", "stitch_point"]
