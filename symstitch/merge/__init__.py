"""Aligning and merging two networks up to the intertwiner groups of their activations (docs/method.md §7).

=================  ====================================================================================
``sites``          :class:`AlignmentSite`: where one group element is chosen (a residual stream is one site)
``alignment``        :func:`align` and :class:`Alignment`: g_s at every site, and g·B by the weight action
``activation``     activation matching: one pass of the data, G_σ-Procrustes per site
``weight``         weight matching: coordinate descent on ‖θ_A − g·θ_B‖², scales included
``from_stitch``    the hardened P·D of a ``birkhoff`` stitch at each site
``path``           θ(λ), BatchNorm interpolated or re-estimated, loss and accuracy along λ, the barrier
``experiment``     :class:`MergeExperiment`: the cells of ``symstitch merge`` and merge sweeps
=================  ====================================================================================

::

    from symstitch.merge import align, merge_path
    al = align(a, b, method="weight")                  # or "activation" (data=…), "stitch"
    path = merge_path(a, al.apply(b), test_loader, train_loader)
    path.barrier_loss["reestimated"]
"""

from __future__ import annotations

from symstitch.lazy import lazy_exports

#: name → the submodule that defines it, imported on first use
_LAZY = {
    "AlignmentSite": "sites",
    "alignment_sites": "sites",
    "GROUP_CHOICES": "sites",
    "Alignment": "alignment",
    "align": "alignment",
    "identity_alignment": "alignment",
    "METHODS": "methods",
    "BN_MODES": "path",
    "MergePath": "path",
    "barrier": "path",
    "interpolate": "path",
    "merge_path": "path",
    "reestimate_batchnorm": "path",
    "MergeExperiment": "experiment",
    "save_merged": "experiment",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [*_LAZY]
