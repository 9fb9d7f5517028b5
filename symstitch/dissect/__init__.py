"""Network dissection (docs/method.md §6): which concepts the units at a point detect, after NetDissect-Lite's
semantics, on any network through the one network interface.

=============  ====================================================================================
``concepts``   :class:`ConceptSource` and :class:`ConceptBatch`: images with pixel and image-level concepts
``broden``     :class:`BrodenSource`: a local copy of Broden (``index.csv``, ``label.csv``, masks R + 256·G)
``twin``       :class:`DigitsTwin`: Broden-style concepts drawn on the bundled digits, no download
``quantile``   :class:`TopQuantile`: each unit's (1 − q) quantile, exact or a stated estimate
``tally``      :class:`IoUTally`: IoU of every (unit, concept), vectorised over images, units and concepts
``rotation``   Q^α, the rotation experiment's path from the activation basis to a random one
``api``        :func:`dissect` and :class:`Dissection` (``tally.csv``, the headline, the record)
=============  ====================================================================================

The submodules load on first use. The package itself is callable: ``symstitch.dissect(network, point,
concepts)`` is :func:`symstitch.dissect.api.dissect` (so is ``from symstitch.dissect import dissect``).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from symstitch.lazy import lazy_exports

_LAZY = {
    "Concept": "concepts",
    "ConceptBatch": "concepts",
    "ConceptSource": "concepts",
    "BrodenSource": "broden",
    "DigitsTwin": "twin",
    "TopQuantile": "quantile",
    "IoUTally": "tally",
    "Dissection": "api",
    "dissect": "api",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = list(_LAZY)


class _CallablePackage(types.ModuleType):
    """This package, callable as :func:`~symstitch.dissect.api.dissect` (a module may change its class to a
    subclass of ``ModuleType``, Python's documented way to customise a module)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return __getattr__("dissect")(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
