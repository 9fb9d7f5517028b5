"""The private Lightning names of symstitch.lightning_adapters: these tests fail as soon as Lightning renames or
changes them (then find the new name, or a public route, and update the adapter)."""

from __future__ import annotations

import os

import pytest
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy

from symstitch.lightning_adapters import QuietWandbLogger, find_unused_parameters


def test_ddp_kwargs_are_what_the_strategy_passes_to_ddp():
    """`_ddp_kwargs` holds the options DDPStrategy gives DistributedDataParallel; the adapter sets the one option
    the public constructor sets, and keeps a user's own choice."""
    public = DDPStrategy(find_unused_parameters=True)
    assert public._ddp_kwargs == {"find_unused_parameters": True}
    adapted = DDPStrategy()
    find_unused_parameters(adapted)
    assert adapted._ddp_kwargs == public._ddp_kwargs
    mine = DDPStrategy(find_unused_parameters=False)
    find_unused_parameters(mine)
    assert mine._ddp_kwargs == {"find_unused_parameters": False}


def test_wandb_init_arguments_without_anonymous(tmp_path, monkeypatch):
    """`_wandb_init` holds the arguments Lightning gives wandb.init, `anonymous` among them; the quiet logger
    passes the rest unchanged, and `anonymous` when it was asked for."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    kwargs = dict(save_dir=str(tmp_path), project="p", group="g", job_type="j")
    lightnings = WandbLogger(**kwargs)._wandb_init
    assert "anonymous" in lightnings and lightnings["anonymous"] is None
    quiet = QuietWandbLogger(**kwargs)._wandb_init
    assert quiet == {k: v for k, v in lightnings.items() if k != "anonymous"}
    assert QuietWandbLogger(anonymous=True, **kwargs)._wandb_init["anonymous"] == "allow"


# slow (two W&B runs, 15 s): the name it depends on is pinned by test_wandb_init_arguments_without_anonymous
@pytest.mark.slow
@pytest.mark.parametrize("logger", [WandbLogger, QuietWandbLogger])
def test_the_anonymous_warning_is_what_the_quiet_logger_avoids(tmp_path, logger, capfd):
    """Lightning's logger makes W&B warn about `anonymous` (the reason for the adapter); the quiet one does not."""
    import subprocess
    import sys

    from .conftest import cli_env

    code = (f"from {logger.__module__} import {logger.__name__} as L; "
            f"lg = L(save_dir={str(tmp_path)!r}, project='p'); lg.experiment; lg.experiment.finish()")
    env = {**cli_env(tmp_path), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    (tmp_path / "home").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("anonymous" in proc.stderr) == (logger is WandbLogger)
    assert os.path.isdir(tmp_path / "wandb")


def test_the_w_and_b_logger_joins_a_sweep_s_group_unless_given_its_own(tmp_path):
    from symstitch.lightning_adapters import QuietWandbLogger
    from symstitch.loggers import wandb_grouping

    assert QuietWandbLogger(save_dir=str(tmp_path), offline=True)._wandb_init.get("group") is None
    with wandb_grouping("grid", "stitch"):
        joined = QuietWandbLogger(save_dir=str(tmp_path), offline=True, group=None)  # as LightningCLI passes it
        own = QuietWandbLogger(save_dir=str(tmp_path), offline=True, group="mine", job_type="mine")
    assert (joined._wandb_init["group"], joined._wandb_init["job_type"]) == ("grid", "stitch")
    assert (own._wandb_init["group"], own._wandb_init["job_type"]) == ("mine", "mine")
