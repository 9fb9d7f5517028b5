"""Callbacks shared by every symstitch trainer."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from symstitch.io import write_json


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """SHA-256 of the exact bytes of a list of tensors (bitwise identity, not closeness)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DDPConsistency(pl.Callback):
    """Keeps DDP replicas identical and proves it.

    DDP averages gradients, so parameters stay equal on every rank, but BatchNorm running statistics are
    updated from each rank's own shard: before every evaluation the buffers of rank 0 (the ones that get
    checkpointed) are broadcast, so every rank evaluates the same network. At the end of fit the digests of
    all ranks' parameters and buffers are gathered; rank 0 writes them to ``<log dir>/ranks.json`` and a
    mismatch is an error. Does nothing in a single process.
    """

    @staticmethod
    def _distributed(trainer: pl.Trainer) -> bool:
        return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._distributed(trainer):
            for buf in pl_module.buffers():
                dist.broadcast(buf, src=0)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._distributed(trainer):
            return
        for buf in pl_module.buffers():
            dist.broadcast(buf, src=0)
        mine = {
            "rank": trainer.global_rank,
            "parameters": tensor_digest(list(pl_module.parameters())),
            "buffers": tensor_digest(list(pl_module.buffers())),
        }
        ranks: list = [None] * trainer.world_size
        dist.all_gather_object(ranks, mine)
        consistent = all(r["parameters"] == ranks[0]["parameters"] for r in ranks) and all(
            r["buffers"] == ranks[0]["buffers"] for r in ranks
        )
        log_dir = trainer.log_dir  # a collective (broadcast from rank 0): every rank must ask
        if trainer.is_global_zero and log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            report = {"world_size": trainer.world_size, "consistent": consistent, "ranks": ranks}
            write_json(Path(log_dir) / "ranks.json", report)
        if not consistent:
            raise RuntimeError(f"DDP replicas diverged: {ranks}")


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite: the run stopped and nothing was recorded."""


class FiniteLoss(pl.Callback):
    """Stops training with :class:`TrainingDiverged` the first time the training loss is not finite.

    A diverged run is never a result: without this, a fit with loss NaN exits normally, its network enters a
    model library and later tools blame the network (or the symmetry) for the damage. The check reads the
    loss the step returned (a scalar already computed; no extra work), every micro-batch.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"training diverged: the loss is {value} at epoch {trainer.current_epoch}, step "
                    f"{trainer.global_step} ({type(pl_module).__name__}); nothing was recorded. Lower the learning "
                    "rate (e.g. --model.init_args.optimizer.init_args.lr) or check the inputs")
