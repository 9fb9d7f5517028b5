"""The repository's files at a git revision, for the benchmarks that run that code beside the working tree's:
``git archive REV`` unpacked into a temporary folder (the repository and its worktrees are not touched), removed
afterwards. Put the folder first on ``PYTHONPATH`` (or ``sys.path``) to import that revision's ``symstitch``."""

from __future__ import annotations

import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def source_tree(rev: str) -> Iterator[Path]:
    """A temporary folder holding the files of revision ``rev`` (a commit, tag or branch); SystemExit when the
    repository has no such revision."""
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"{rev!r} is not a revision of the repository at {REPO}")
    with tempfile.TemporaryDirectory(prefix="symstitch-rev-") as tmp:
        archive = subprocess.Popen(["git", "-C", str(REPO), "archive", found.stdout.strip()], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tmp], stdin=archive.stdout, check=True)
        archive.stdout.close()
        if archive.wait():
            raise RuntimeError(f"git archive {rev} failed")
        yield Path(tmp)
