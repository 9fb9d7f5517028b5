"""The YAML configs shipped with symstitch (package data), split by concern as LightningCLI composes them:
``data/``, ``model/``, ``zoo/`` (model + trainer), ``stitch/``, ``logger/``, ``trainer/``, ``align/``,
``projection/``.

A config is named as in the repository, ``configs/stitch/birkhoff.yaml``, or without the prefix,
``stitch/birkhoff.yaml``; :func:`resolve` turns such a name into the installed file whenever no file of that
name exists where the user is, so every command works from a wheel install as from a clone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

class OptionError(ValueError):
    """Options of a Lightning command (``symstitch fit``, a sweep's cells) that do not parse, in one line naming the
    option (or the config file, line and column); the whole usage stays with ``--help``."""


#: the folder of the shipped configs (a plain folder inside the installed package)
ROOT = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The shipped config ``name`` (``stitch/birkhoff.yaml``); a clear error listing the folder's configs."""
    found = ROOT / name
    if not found.is_file():
        folder = found.parent if found.parent.is_dir() else ROOT
        known = sorted(str(p.relative_to(ROOT)) for p in folder.rglob("*.yaml"))
        raise ValueError(f"no shipped config {name!r}; shipped: {', '.join(known)}")
    return found


def resolve(ref: Union[str, Path], base: Optional[Path] = None) -> str:
    """``ref`` as a file: itself (relative to ``base`` when given) if it exists, else the shipped config of that
    name (``configs/x/y.yaml`` or ``x/y.yaml``); unchanged when neither exists (the caller reports it)."""
    p = Path(ref)
    local = p if p.is_absolute() or base is None else Path(base) / p
    if local.exists():
        return str(local.resolve()) if base is not None else str(ref)
    parts = p.parts
    if "configs" in parts:
        parts = parts[len(parts) - parts[::-1].index("configs"):]
    shipped = ROOT.joinpath(*parts) if parts else None
    if shipped is not None and shipped.is_file():
        return str(shipped)
    return str(local) if base is not None else str(ref)

