"""Files that are all there or not at all, and folders with one writer at a time.

- :func:`write_atomic` / :func:`write_json`: a temporary file in the same folder, then ``os.replace``; a
  reader never sees half a file and a killed writer leaves the old file. JSON is strict: NaN and ±Inf are
  written as ``null`` (Python's ``json`` would write the invalid token ``NaN``).
- :class:`Lock`: an advisory ``flock`` on a lock file. ``wait=True`` queues behind the other writer (for short
  critical sections: a manifest update); ``wait=False`` refuses at once with :class:`Busy` (for long work such
  as training one seed or one cell, which another process may already be doing).
- :func:`writable_folder`: create a folder or say in one line why it cannot be written.
- :func:`parse_range`: ``"0-3,7"`` → ``[0, 1, 2, 3, 7]`` for seeds and cell indices.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, Path]


class Busy(RuntimeError):
    """Another process holds the lock (it is doing this work now)."""


class NotWritable(ValueError):
    """A folder the results should go to cannot be created or written."""


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None (valid JSON; a NaN never reads back as a number)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {str(k): finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    if hasattr(data, "item") and callable(data.item) and getattr(data, "ndim", 1) == 0:  # numpy / torch scalars
        return finite_json(data.item())
    return data


def dumps(data: Any) -> str:
    """Strict JSON text (indent 2, non-finite floats as null)."""
    return json.dumps(finite_json(data), indent=2, allow_nan=False, default=str) + "\n"


def write_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename; returns ``path``."""
    path = Path(path)
    writable_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: PathLike, data: Any) -> Path:
    """:func:`write_atomic` of :func:`dumps`."""
    return write_atomic(path, dumps(data))


def read_json(path: PathLike) -> Any:
    return json.loads(Path(path).read_text())


def writable_folder(folder: PathLike) -> Path:
    """``folder``, created if needed; :class:`NotWritable` (one line, no traceback at the CLI) otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NotWritable(f"cannot create the folder {folder}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NotWritable(f"the folder {folder} is not writable; choose another output folder")
    return folder


class Lock:
    """``with Lock(path, what="seed 3"):`` — an exclusive ``flock`` on ``path`` (created if missing).

    ``wait=False`` raises :class:`Busy` when another process holds it. The lock goes with the process: a
    killed holder never leaves a stale lock behind.
    """

    def __init__(self, path: PathLike, what: str = "", wait: bool = True):
        self.path, self.what, self.wait = Path(path), what or str(path), wait
        self._file: Optional[Any] = None

    def __enter__(self) -> "Lock":
        writable_folder(self.path.parent)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError as err:
            self._file.close()
            self._file = None
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Busy(f"{self.what} is being written by another process") from None
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def parse_range(text: Union[str, int, list], what: str = "seed") -> list[int]:
    """``"0-3,7"`` (or an int, or a list of ints) → ``[0, 1, 2, 3, 7]``; ``what`` names the list in errors."""
    if isinstance(text, bool):
        raise ValueError(f"bad {what} list {text!r}: use e.g. 0-9 or 0,3,5-7")
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):
        return [v for part in text for v in parse_range(part, what)]
    values: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            rng = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"bad {what} list {text!r}: use e.g. 0-9 or 0,3,5-7") from None
        if sep and int(hi) < int(lo):
            raise ValueError(f"bad {what} list {text!r}: {part} is an empty range")
        values.extend(v for v in rng if v not in values)
    if not values:
        raise ValueError(f"bad {what} list {text!r}: it names none")
    return values
