"""The model zoo: every architecture of the paper, chosen by name.

    >>> from symstitch import models
    >>> net = models.build("resnet20", num_classes=10)
    >>> net.stitch_points[:2]
    ('stem.act', 'layer1.0.act2')
"""

from __future__ import annotations

from typing import Any

# one file per family; importing them registers their networks in MODELS
from symstitch.models import cct, mcnn, resnet  # noqa: F401
from symstitch.models.base import ACTIVATIONS, MODELS, StagedNet, register


def build(name: str, **kwargs: Any) -> StagedNet:
    """Build architecture ``name`` (see :func:`available`) with its keyword arguments."""
    return MODELS.build(name, **kwargs)


def available() -> list[str]:
    return MODELS.available()


__all__ = ["ACTIVATIONS", "MODELS", "StagedNet", "available", "build", "register"]
