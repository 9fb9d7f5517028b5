"""Throughput of a stitching step: Lightning module vs a plain torch loop vs a cached frozen prefix.

ResNet-20 (width 1) source and target, stitched with ``birkhoff`` at ``layer2.0.act2``, batch 128, fp32,
channels_last, on CIFAR-10-sized random data held in memory. In one run, interleaved, medians of repeats:

(a) the Lightning stitching step (``StitchingModule`` + ``Trainer``, augmentation and normalisation on the device);
(b) a hand-written torch loop doing the same work (augment, normalise, prefix without grad, stitch, suffix,
    backward, Adam step, projection);
(c) the stitching step with the frozen prefix's activations cached (un-augmented images, computed once,
    fp32), trained through Lightning.

Targets: (a)/(b) ≥ 0.9 and (c)/(a) ≥ 2.   Usage: python experiments/benchmarks/stitch_step.py [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from symstitch.data import DataModule, ImageData, augment_batch, normalize_batch
from symstitch.stitching import StitchingModule
from symstitch.training import ClassifierModule

POINT, BATCH = "layer2.0.act2", 128


class FakeCifar(DataModule):
    """The DataModule over random CIFAR-10-sized images (N uint8 images, 10 classes)."""

    def __init__(self, n: int):
        super().__init__(dataset="cifar10", batch_size=BATCH)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (n,), generator=g)
        self.data = ImageData(x, y, x[:BATCH], y[:BATCH], 10, (0.5,) * 3, (0.25,) * 3, True, [str(i) for i in range(10)])


class StepClock(pl.Callback):
    """Wall time from the start of training step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def _trainer(steps: int, clock: StepClock) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
                      accelerator="cpu")


def lightning_step(ckpts, dm, warmup, steps) -> float:
    module = StitchingModule(str(ckpts[0]), str(ckpts[1]), POINT, layer="birkhoff")
    clock = StepClock(warmup)
    _trainer(warmup + steps, clock).fit(module, datamodule=dm)
    return steps * BATCH / (clock.end - clock.start)


def plain_step(ckpts, dm, warmup, steps) -> float:
    module = StitchingModule(str(ckpts[0]), str(ckpts[1]), POINT, layer="birkhoff").train()
    src, tgt, layer = module.source_net, module.target_net, module.stitch
    opt = torch.optim.Adam(layer.parameters())
    x_all, y_all = dm.data.train_x, dm.data.train_y
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        idx = torch.randint(0, len(y_all), (BATCH,))
        x = normalize_batch(augment_batch(x_all[idx], padding=4, flip=True), dm.mean, dm.std)
        with torch.no_grad():
            h = src.forward_to(x, POINT)
        loss = F.cross_entropy(tgt.forward_from(layer(h), POINT), y_all[idx]) + layer.regularization()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        layer.on_after_optimizer_step()
    return steps * BATCH / (time.perf_counter() - start)


class CachedStitch(pl.LightningModule):
    """Stitch layer + frozen target suffix trained on cached prefix activations (h, y)."""

    def __init__(self, module: StitchingModule):
        super().__init__()
        self.inner = module

    def training_step(self, batch, batch_idx):
        h, y = batch
        m = self.inner
        return F.cross_entropy(m.target_net.forward_from(m.stitch(h), POINT), y) + m.stitch.regularization()

    def configure_optimizers(self):
        return torch.optim.Adam(self.inner.stitch.parameters())

    def on_fit_start(self):
        for opt in self.trainer.optimizers:
            opt.register_step_post_hook(lambda *_: self.inner.stitch.on_after_optimizer_step())

    def train(self, mode=True):
        super().train(mode)
        self.inner.source_net.eval()
        self.inner.target_net.eval()
        return self


def cached_step(ckpts, dm, warmup, steps) -> float:
    module = StitchingModule(str(ckpts[0]), str(ckpts[1]), POINT, layer="birkhoff")
    x, y = dm.data.train_x, dm.data.train_y
    with torch.no_grad():
        h = torch.cat([module.source_net.forward_to(normalize_batch(x[i:i + 500], dm.mean, dm.std), POINT)
                       for i in range(0, len(y), 500)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(h, y), batch_size=BATCH, shuffle=True)
    clock = StepClock(warmup)
    _trainer(warmup + steps, clock).fit(CachedStitch(module), train_dataloaders=loader)
    return steps * BATCH / (clock.end - clock.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = FakeCifar(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            m = ClassifierModule("resnet20", num_classes=10)
            path = Path(tmp) / f"resnet20-{seed}.ckpt"
            torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
            ckpts.append(path)
        runs = {"a": [], "b": [], "c": []}
        for _ in range(args.repeats):
            runs["a"].append(lightning_step(ckpts, dm, 3, args.steps))
            runs["b"].append(plain_step(ckpts, dm, 3, args.steps))
            runs["c"].append(cached_step(ckpts, dm, 3, args.steps))
    a, b, c = (statistics.median(runs[k]) for k in "abc")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, ResNet-20 stitched at {POINT} (birkhoff), batch {BATCH}, "
          f"{args.steps} timed steps × {args.repeats} (medians)")
    print(f"(a) Lightning StitchingModule step       {a:8.0f} images/s")
    print(f"(b) plain torch loop, same work          {b:8.0f} images/s")
    print(f"(c) Lightning, cached prefix (fp32)      {c:8.0f} images/s")
    print(f"(a)/(b) = {a / b:.2f}  (target ≥ 0.9: {'met' if a / b >= 0.9 else 'NOT met'})")
    print(f"(c)/(a) = {c / a:.2f}  (target ≥ 2: {'met' if c / a >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
