"""The prefix cache: A_{≤p}(x) of the training images, computed once for the stitches that share it.

The stitches of a sweep at one (source, point) — one per stitching layer and repeat, run one after another —
train on the same frozen prefix activations. A :class:`PrefixCache` holds the last such set (one entry: host
memory holds one point's activations; the old entry is dropped before a new one is computed). A sweep scopes one
cache to its run (:meth:`PrefixCache.scope`, entered by the :class:`~symstitch.runner.Runner` through
:meth:`~symstitch.runner.Experiment.scope`); a stitch outside any scope (``stitch()``, ``symstitch fit``) gets a
cache of its own that goes with its module, so nothing outlives the fit.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional

_SCOPED: ContextVar[Optional["PrefixCache"]] = ContextVar("symstitch_prefix_cache", default=None)


class PrefixCache:
    """One cached entry, ``(layout, rows)``, under the key of what it depends on (the source's weights, the
    point, the dtype, the device and the training images: :meth:`StitchingModule._prefix_key`)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.entry: Optional[tuple[Any, Any]] = None

    def get(self, key: tuple, compute: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        """The entry for ``key``, computed (after the old entry is dropped) when it is not the one held."""
        if key != self.key:
            self.release()
            self.entry, self.key = compute(), key
        return self.entry

    def release(self) -> None:
        self.key = self.entry = None

    @contextlib.contextmanager
    def scope(self) -> Iterator["PrefixCache"]:
        """Within the ``with`` block, every stitch in this context uses this cache; on exit it is released."""
        token = _SCOPED.set(self)
        try:
            yield self
        finally:
            _SCOPED.reset(token)
            self.release()

    @staticmethod
    def scoped() -> Optional["PrefixCache"]:
        """The cache of the enclosing :meth:`scope`, None outside any."""
        return _SCOPED.get()


__all__ = ["PrefixCache"]
