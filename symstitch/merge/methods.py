"""The registry of alignment methods: name → ``fn(a, b, sites, **options) -> ({site.point: g}, details)``, where
``g`` (float64, block diagonal with the site's blocks, scales of the site's kind) maps B's units at the site onto
A's (g·h_B ≈ h_A). Each method lives in its own file and registers itself here."""

from __future__ import annotations

from typing import Callable

import torch

from symstitch.registry import Registry

METHODS: Registry[Callable[..., tuple[dict[str, torch.Tensor], dict]]] = Registry("alignment method")

__all__ = ["METHODS"]
