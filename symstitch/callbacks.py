"""Callbacks shared by every symstitch trainer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist


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
            (Path(log_dir) / "ranks.json").write_text(json.dumps(report, indent=2))
        if not consistent:
            raise RuntimeError(f"DDP replicas diverged: {ranks}")
