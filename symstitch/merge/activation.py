"""Activation matching (docs/method.md §7): one pass of the data through A and B, then per alignment site the
G_σ-Procrustes solution.

For each block of a site, with X = B's and Y = A's activations over every input and position of the points
that hold the block (a residual stream: every block output of the stages that hold it)::

    M_ij = ⟨Ŷ_i, X̂_j⟩   (channels scaled to unit norm)       π = argmax_π Σ_i M_{i, π(i)}   (|M| for signed groups)
    d_{π(i)} = sign⟨Y_i, X_{π(i)}⟩ ‖Y_i‖ / ‖X_{π(i)}‖          (then the group's kind: positive for ReLU, ±1 for
                                                             tanh, 1 for permutations)

and g = P_π·diag(d) (:func:`symstitch.symmetry.compose`), so that (g·h_B)_i = d_{π(i)} h_B,π(i) ≈ h_A,i: each
matched unit of B brought to the norm of A's, the scale that G_ReLU-Procrustes's normalisation X̂ = X / ‖X‖
implies. For B = g₀⁻¹·A the solution is g₀ exactly on every unit that is neither dead nor a copy of another. Not
the least-squares scale ⟨Y_i, X_π(i)⟩ / ‖X_π(i)‖² = ρ‖Y_i‖ / ‖X_π(i)‖, exact under g₀ too but shrinking with the
pair's correlation ρ: towards 0 on weakly matched units, whose outgoing weights then grow by 1/d and are averaged
into the merged network (docs/method.md §7 has the measurement). The moments are
those of G_ReLU-Procrustes (:mod:`symstitch.metrics.procrustes`, float64), recorded with the similarity
metrics' :class:`~symstitch.metrics.pairwise.FeatureRecorder`; the matching is the G stitch's
(:class:`~symstitch.stitch_layers.ChannelMatch`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from symstitch.inputs import batch_images, loader_normalization
from symstitch.merge.methods import METHODS
from symstitch.merge.sites import AlignmentSite, project_scales
from symstitch.metrics.pairwise import FeatureRecorder
from symstitch.metrics.procrustes import _procrustes_update
from symstitch.network import PointNetwork
from symstitch.stitch_layers import ChannelMatch
from symstitch.symmetry import compose

Tensor = torch.Tensor


@torch.no_grad()
def record_moments(a: PointNetwork, b: PointNetwork, points: list[str], data: Iterable[Any],
                   normalize: Optional[Any] = None, device: Optional[str] = None) -> dict[str, tuple[Tensor, ...]]:
    """``{point: (cross, sq_a, sq_b)}`` over one pass of ``data`` (eval mode; modes and devices restored):
    cross[i, j] = Σ A_i B_j and the channels' squared norms, float64, summed over inputs and positions."""
    normalizer = loader_normalization(data, normalize)
    dev = torch.device(device) if device else next(a.parameters()).device
    saved = [(m.training, next(m.parameters()).device) for m in (a, b)]
    sums: dict[str, list[Tensor]] = {}
    try:
        a.eval().to(dev)
        b.eval().to(dev)
        with FeatureRecorder(a, b, points, points) as recorder:
            for batch in data:
                feats = recorder.run(batch_images(batch, normalizer).to(dev))
                for p in points:
                    m = _procrustes_update(feats["a"][p], feats["b"][p])
                    new = [m.cross, m.sq_x, m.sq_y]
                    sums[p] = new if p not in sums else [s + t for s, t in zip(sums[p], new)]
                del feats
    finally:
        for m, (training, where) in zip((a, b), saved):
            m.train(training).to(where)
    if not sums:
        raise ValueError("activation matching needs data: the loader yielded no batches")
    return {p: tuple(t.cpu() for t in v) for p, v in sums.items()}


def norm_ratio_scales(match: ChannelMatch, perm: Tensor) -> Tensor:
    """d_{π(i)} = ‖Y_i‖ / ‖X_{π(i)}‖ with the sign of ⟨Y_i, X_{π(i)}⟩ (0 where either unit is zero: the site's kind
    then makes it 1), indexed by B's units as :func:`~symstitch.symmetry.compose` takes them."""
    rows = torch.arange(len(perm))
    d = torch.zeros(len(perm), dtype=torch.float64)
    alive = (match.y_sq > 0) & (match.x_sq[perm] > 0)
    ratio = (match.y_sq / match.x_sq[perm].clamp_min(1e-300)).sqrt() * torch.sign(match.cross[rows, perm])
    d[perm] = torch.where(alive, ratio, torch.zeros_like(ratio))
    return d


def site_element(site: AlignmentSite, moments: dict[str, tuple[Tensor, ...]]) -> Tensor:
    """g of one site from the moments of its points (module docstring), block by block."""
    blocks = []
    for lo, hi in site.block_ranges():
        holders = site.holders(hi)
        cross = sum(moments[p][0][lo:hi, lo:hi] for p in holders)
        sq_a = sum(moments[p][1][lo:hi] for p in holders)
        sq_b = sum(moments[p][2][lo:hi] for p in holders)
        match = ChannelMatch(cross, sq_b, sq_a)  # Y = A, X = B: A ≈ g·B
        perm = match.permutation(signed=site.scales in ("sign", "nonzero"))
        blocks.append(compose(perm, project_scales(norm_ratio_scales(match, perm), site.scales)))
    return torch.block_diag(*blocks)


@METHODS.register("activation")
def activation_matching(a: PointNetwork, b: PointNetwork, sites: list[AlignmentSite], *,
                        data: Optional[Iterable[Any]] = None, normalize: Optional[Any] = None,
                        device: Optional[str] = None) -> tuple[dict[str, Tensor], dict]:
    """g at every site from one pass of ``data`` (batches of images, or (image, label); uint8 images are
    normalised as :func:`~symstitch.metrics.similarity_matrix` normalises them)."""
    if data is None:
        raise ValueError("activation matching needs data: align(a, b, 'activation', data=<loader of images>), e.g. "
                         "the networks' training images")
    points = list(dict.fromkeys(p for site in sites for p in site.points))
    moments = record_moments(a, b, points, data, normalize, device)
    return {site.point: site_element(site, moments) for site in sites}, {"points": len(points)}


__all__ = ["activation_matching", "norm_ratio_scales", "record_moments", "site_element"]
