"""Model stitching (docs/method.md §2): S(x) = B_{>p}(T(A_{≤p}(x))), where only the stitching layer T trains, and
the stitching penalty (acc(A) + acc(B)) / 2 − acc(S) in points of accuracy, under two evaluation protocols.

=================  ====================================================================================
``module``         :class:`StitchingModule`, the LightningModule: frozen A and B, the trainable T, its hooks
``prefix``         :class:`PrefixCache`: A_{≤p}(x) of the training images, computed once per sweep and point
``record``         :class:`StitchRecord` and :func:`record_key`: the one home of a stitch record's keys
``grammar``        :class:`LayerSpec`, :class:`LayerChoice`: ``lowrank:rank=4``, ``birkhoff:alpha=0.1|1``
``api``            :func:`stitch` and :class:`StitchResult`: one stitch from Python
``experiment``     :class:`StitchExperiment`: the cells of ``symstitch stitch`` and stitch sweeps
=================  ====================================================================================

The light parts (records, grammar, prefix cache) import without torch's training stack; the module, the Python
API and the experiment load when first asked for (``from symstitch.stitching import stitch``), so that reports
read records quickly. :mod:`symstitch.sweep` imports the experiment, which registers the ``stitch`` kind.
"""

from __future__ import annotations

from symstitch.lazy import lazy_exports
from symstitch.stitching.prefix import PrefixCache
from symstitch.stitching.record import PROTOCOLS, StitchRecord, penalty_of, record_key

#: name → the submodule that defines it, imported on first use
_LAZY = {
    "StitchingModule": "module",
    "stitch": "api",
    "StitchResult": "api",
    "stitch_options": "api",
    "StitchExperiment": "experiment",
    "point_list": "experiment",
    "POINT_SETS": "experiment",
    "LayerSpec": "grammar",
    "LayerChoice": "grammar",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = ["PROTOCOLS", "PrefixCache", "StitchRecord", "penalty_of", "record_key", *_LAZY]
