"""The layer grammar: how a sweep, a command or ``stitch()`` names a stitching layer with its options.

``lowrank:rank=4`` is the registry name ``lowrank`` with ``rank=4`` (several options: ``lasso:lam=0.01;threshold=1e-3``;
numbers, else YAML scalars): a :class:`LayerSpec`. An option listing candidate values,
``birkhoff:alpha=0.001|0.01|0.1|1|10``, leaves it to be chosen on a held-out validation split: a
:class:`LayerChoice` (:mod:`symstitch.selection`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from symstitch.stitch_layers import STITCH_LAYERS


def _scalar(text: str) -> Any:
    """An option value: an int, a float (``1e-3`` too, which YAML reads as a string), else a YAML scalar."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return float(text)
    return yaml.safe_load(text)


@dataclass(frozen=True)
class LayerSpec:
    """A stitching layer as a sweep or a command names it: a registry name, optionally with options,
    ``lowrank:rank=4`` (several options: ``lasso:lam=0.01;threshold=1e-3``; numbers, else YAML scalars).

    The paper's yardstick is written ``standard, lowrank:rank=4, lowrank:rank=2, lowrank:rank=1, birkhoff``.
    The options replace the ``layer_kwargs`` of the layer's config."""

    label: str
    name: str
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "LayerSpec":
        label = str(text).strip()
        name, _, rest = label.partition(":")
        STITCH_LAYERS.get(name)  # an unknown layer: the list of known ones
        options: dict[str, Any] = {}
        for key, value in _option_items(label, rest):
            if CHOICES in value:
                raise ValueError(f"layer {label!r}: {key}={value} lists candidate values, which only a stitch sweep "
                                 "chooses among (on its validation split); name one value here")
            options[key] = _scalar(value)
        return cls(label, name, options)

    @property
    def slug(self) -> str:
        """The label as a file-name part: ``lowrank_rank_4``."""
        return re.sub(r"[^A-Za-z0-9.-]+", "_", self.label).strip("_")


#: separates the candidate values of a layer option that a stitch sweep chooses on its validation split
CHOICES = "|"


def _option_items(label: str, rest: str) -> list[tuple[str, str]]:
    """The ``key=value`` items after the ``:`` of a layer label, as written (stripped)."""
    items = []
    for item in filter(None, (part.strip() for part in rest.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"layer {label!r}: options are key=value, e.g. lowrank:rank=4")
        items.append((key.strip(), value.strip()))
    return items


@dataclass(frozen=True)
class LayerChoice:
    """A stitching layer with one option left to choose on a held-out validation split: that option lists its
    candidate values separated by ``|``, e.g. ``birkhoff:alpha=0.001|0.01|0.1|1|10`` (the paper's
    cross-validated G_ReLU stitch); the other options stay fixed (``birkhoff:projection=euclidean;alpha=0.1|1``).

    Rules: exactly one option lists candidates, at least two distinct ones. A stitch sweep runs one ordinary cell
    per candidate (:attr:`candidates`, each a :class:`LayerSpec`: ``birkhoff:alpha=0.001``, …) and
    :func:`symstitch.selection.select` chooses among them per stitch point, pair and repeat; the chosen result is
    reported as the layer :attr:`series` (``birkhoff (cv alpha)``)."""

    label: str
    name: str
    option: str
    values: tuple
    candidates: tuple[LayerSpec, ...]

    @classmethod
    def parse(cls, text: str) -> Optional["LayerChoice"]:
        """The choice named by ``text``; None for an ordinary layer (no option lists candidates)."""
        label = str(text).strip()
        name, _, rest = label.partition(":")
        items = _option_items(label, rest)
        listed = [key for key, value in items if CHOICES in value]
        if not listed:
            return None
        STITCH_LAYERS.get(name)  # an unknown layer: the list of known ones
        if len(listed) > 1:
            raise ValueError(f"layer {label!r}: one option may list candidate values, not {len(listed)} "
                             f"({', '.join(listed)})")
        option = listed[0]
        texts = [v.strip() for v in dict(items)[option].split(CHOICES)]
        values = tuple(_scalar(t) for t in texts)
        if "" in texts or len(set(map(repr, values))) != len(values) or len(values) < 2:
            raise ValueError(f"layer {label!r}: {option} needs at least two distinct candidate values, separated by "
                             f"{CHOICES}, e.g. {name}:{option}=0.01{CHOICES}0.1")
        candidates = tuple(LayerSpec.parse(f"{name}:" + ";".join(f"{k}={t if k == option else v}" for k, v in items))
                           for t in texts)
        return cls(label, name, option, values, candidates)

    @property
    def series(self) -> str:
        """How reports name the chosen result: the layer with its fixed options and ``(cv <option>)``."""
        fixed = ";".join(f"{k}={v}" for k, v in _option_items(self.label, self.label.partition(":")[2])
                         if k != self.option)
        return f"{self.name}{':' + fixed if fixed else ''} (cv {self.option})"


__all__ = ["CHOICES", "LayerChoice", "LayerSpec"]
