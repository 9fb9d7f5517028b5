"""Training the zoo: a LightningModule around any registered architecture.

The optimizer and learning-rate schedule are injected as callables (LightningCLI's dependency-injection
style), so configs choose them by class path and Python users pass any ``torch.optim`` class.
Defaults follow the usual CIFAR recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4, learning rate 0.1,
a short linear warm-up then cosine decay to zero, updated every optimizer step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from symstitch import models


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` with the CIFAR recipe's defaults (lr 0.1, Nesterov momentum 0.9, wd 5e-4)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
    ):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up over ``warmup`` of the run, then cosine decay to ``final_fraction`` of the base rate.

        lr(t) = lr₀ · t / t_w                                        for t < t_w = warmup · T
        lr(t) = lr₀ · (f + (1 − f) · ½ (1 + cos(π (t − t_w) / (T − t_w))))   otherwise

    ``total_steps`` T defaults to the trainer's ``estimated_stepping_batches`` (filled in by the modules of
    this package); it steps once per optimizer step.
    """

    interval = "step"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: Optional[int] = None,
        warmup: float = 0.05,
        final_fraction: float = 0.0,
        last_epoch: int = -1,
    ):
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the run in [0, 1), got {warmup}")
        self.total_steps = total_steps
        self.warmup = warmup
        self.final_fraction = final_fraction
        super().__init__(optimizer, last_epoch)

    def factor(self, t: int) -> float:
        total = max(int(self.total_steps or 1), 1)
        t_w = int(self.warmup * total)
        if t < t_w:
            return (t + 1) / t_w
        progress = min((t - t_w) / max(total - t_w, 1), 1.0)
        f = self.final_fraction
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


def configure_schedule(
    module: pl.LightningModule, optimizer: torch.optim.Optimizer, scheduler: Optional[LRSchedulerCallable]
) -> Any:
    """The ``configure_optimizers`` return value for an optimizer and an optional scheduler callable."""
    if scheduler is None:
        return optimizer
    sched = scheduler(optimizer)
    if getattr(sched, "total_steps", 0) is None:
        steps = module.trainer.estimated_stepping_batches
        if not math.isfinite(steps):  # max_epochs -1 and no max_steps: Lightning trains without a limit
            raise ValueError(f"{type(sched).__name__} spreads its schedule over the whole run, which has no end here "
                             "(--trainer.max_epochs -1 and no --trainer.max_steps): give one of them, or train "
                             "without a schedule (--model.init_args.scheduler null)")
        sched.total_steps = int(steps)
    interval = getattr(sched, "interval", "epoch")
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": interval}}


class ClassifierModule(pl.LightningModule):
    """Trains one network of the zoo with cross-entropy.

    Args:
        arch: registry name of the architecture (``symstitch.models.available()``).
        arch_kwargs: extra keyword arguments of the architecture, e.g. ``{"width": 0.5}``.
        num_classes: number of classes; ``None`` takes it from the data when run from the CLI.
        optimizer: callable ``params → Optimizer``.
        scheduler: callable ``optimizer → LRScheduler`` or ``None`` for a constant rate.
        label_smoothing: cross-entropy label smoothing.
        channels_last: keep the network in channels-last memory format (faster convolutions).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``; the epoch
    accuracies and losses are torchmetrics objects, exact under DDP.
    """

    def __init__(
        self,
        arch: str = "resnet20",
        arch_kwargs: Optional[dict[str, Any]] = None,
        num_classes: Optional[int] = 10,
        optimizer: OptimizerCallable = SGD,
        scheduler: Optional[LRSchedulerCallable] = WarmupCosine,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
    ):
        super().__init__()
        if num_classes is None:
            raise ValueError("num_classes is None: give it, or run from the CLI where the data provides it")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = models.build(arch, num_classes=num_classes, **(arch_kwargs or {}))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_{kind}": (
                    MulticlassAccuracy(num_classes, average="micro") if kind == "acc" else MeanMetric()
                )
                for split in ("train", "val", "test")
                for kind in ("acc", "loss")
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc, mean_loss = self.metrics[f"{split}_acc"], self.metrics[f"{split}_loss"]
        acc.update(logits.detach(), y)
        mean_loss.update(loss.detach(), weight=y.numel())
        on_step = split == "train"
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=split != "train")
        if on_step:
            self.log("train/step_loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return configure_schedule(self, self.optimizer(self.net.parameters()), self.scheduler)
