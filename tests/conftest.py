"""Shared fixtures: every test runs in its own folder with a clean distributed / W&B environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WANDB_MODE", "WANDB_SILENT", "WANDB_API_KEY", "LOCAL_RANK",
             "NODE_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run in a fresh folder; restore the environment Lightning and W&B write into."""
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc W&B login leaks in
    (tmp_path / "home").mkdir()
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one intra-op thread is faster and steadier than two on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a ``python -m symstitch`` subprocess: no W&B login, no leftover DDP variables."""
    env = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
    env["HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def fit_briefly(net, dm, optimizer, epochs: int):
    """A plain training loop on the DataModule's normalised, un-augmented training batches (64 a batch): the
    networks users bring, trained the way they would train them; returns ``net`` in eval mode."""
    import torch.nn.functional as F

    for _ in range(epochs):
        net.train()
        for x, y in dm.loader("train", batch_size=64):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    return net.eval()


#: how :func:`mcnn_lib` trains: one epoch of eighth-width mCNNs on digits, CSV logs only
LIB_FIT = ["--data.dataset", "digits", "--model.init_args.arch_kwargs", "{width: 0.125}", "--trainer.max_epochs", "1",
           "--config", str(CONFIGS / "logger/csv.yaml"), "--trainer.enable_progress_bar", "false"]
LIB_POINT = "layer1.act"


@pytest.fixture(scope="session")
def mcnn_lib(tmp_path_factory) -> Path:
    """A model library of two 1-epoch eighth-width mCNNs on digits (seeds 0 and 1), trained once per session."""
    from symstitch import zoo

    root = tmp_path_factory.mktemp("mcnn_lib") / "lib"
    zoo.train_zoo("mcnn", [0, 1], root, LIB_FIT)
    return root


def library_refs(lib: Path) -> tuple[str, str]:
    """The library entries of :func:`mcnn_lib`'s two networks."""
    return f"{lib}:mcnn/seed0", f"{lib}:mcnn/seed1"
