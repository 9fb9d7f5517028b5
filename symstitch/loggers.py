"""Experiment logging: CSV always, Weights & Biases offline unless the user has configured it.

W&B with no network and no API key either hangs on a login prompt or fails after a few seconds; a
researcher on a cluster node without network access must still get a complete run. So unless W&B was
configured (``WANDB_MODE`` set, ``WANDB_API_KEY`` set, or a stored login in ``~/.netrc``), symstitch sets
``WANDB_MODE=offline``: runs land in ``<run dir>/wandb/offline-run-*`` and ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

#: Folder for runs when nothing else is said (``trainer.default_root_dir`` moves it).
DEFAULT_RUN_DIR = "runs"


def wandb_configured() -> bool:
    """True when the user has chosen a W&B mode or stored credentials."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    rc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return rc.is_file() and netrc.netrc(rc).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def default_wandb_offline() -> None:
    """Set ``WANDB_MODE=offline`` unless the user configured W&B (see the module docstring)."""
    if not wandb_configured():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")


def default_loggers(name: str, project: str = "symstitch") -> list[dict]:
    """Trainer ``logger`` default: a CSV logger and a W&B logger, both under the run folder."""
    return [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": DEFAULT_RUN_DIR, "name": name},
        },
        {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"save_dir": DEFAULT_RUN_DIR, "project": project},
        },
    ]


def finish_wandb() -> None:
    """Close a live W&B run, so the next run in this process starts a fresh one."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
