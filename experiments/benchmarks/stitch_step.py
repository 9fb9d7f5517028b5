"""Throughput of a stitching step: Lightning module vs a plain torch loop vs a cached frozen prefix.

ResNet-20 (width 1) source and target (two random inits), stitched with ``birkhoff`` at ``layer2.0.act2``,
batch 128, fp32, channels_last inputs, on CIFAR-10-sized random uint8 data held in memory. In one run,
interleaved, medians of repeats, images/s of:

(a) the Lightning stitching step (``StitchingModule`` + ``Trainer`` + ``DataModule``: augmentation and
    normalisation in ``on_after_batch_transfer``);
(b) a hand-written torch loop doing the same work (same loader, augment, normalise, prefix without grad, stitch,
    suffix, backward, Adam step, projection);
(c) the stitching step on cached prefix activations A_{≤p}(x) of the un-augmented, normalised training images
    (computed once in eval mode; fp32, or bf16 when the fp32 cache would exceed 1 GiB), trained through Lightning.

Only training steps after a warm-up are timed. Targets: (a)/(b) ≥ 0.9 and (c)/(a) ≥ 2.

    python experiments/benchmarks/stitch_step.py [--threads 2] [--steps 30] [--repeats 3]
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

from symstitch.data import DataModule, ImageData, TensorImageDataset, augment_batch, batch_loader, normalize_batch
from symstitch.stitching import StitchingModule
from symstitch.training import ClassifierModule

POINT, LAYER, BATCH, WARMUP = "layer2.0.act2", "birkhoff", 128, 5


class FakeCifar(DataModule):
    """The package's DataModule over ``n`` random CIFAR-10-sized uint8 images with 10 classes."""

    def __init__(self, n: int):
        super().__init__(dataset="cifar10", batch_size=BATCH)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (n,), generator=g)
        mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
        self.data = ImageData(x, y, x[:BATCH], y[:BATCH], 10, mean, std, True, [str(i) for i in range(10)])


class StepClock(pl.Callback):
    """Wall time and images from the start of training step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.images = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.images += len(batch[1])
            self.end = time.perf_counter()

    def rate(self) -> float:
        return self.images / (self.end - self.start)


def fit_rate(module: pl.LightningModule, steps: int, **data) -> float:
    """Images/s of the timed training steps of a ``Trainer.fit`` of ``WARMUP + steps`` steps."""
    clock = StepClock(WARMUP)
    trainer = pl.Trainer(max_steps=WARMUP + steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, accelerator="cpu", callbacks=[clock])
    trainer.fit(module, **data)
    return clock.rate()


def stitching_module(ckpts) -> StitchingModule:
    return StitchingModule(str(ckpts[0]), str(ckpts[1]), POINT, layer=LAYER)


# ------------------------------------------------------------------ (a) Lightning


def lightning_rate(ckpts, dm: FakeCifar, steps: int) -> float:
    return fit_rate(stitching_module(ckpts), steps, datamodule=dm)


# ------------------------------------------------------------------ (b) plain torch


def plain_rate(ckpts, dm: FakeCifar, steps: int) -> float:
    module = stitching_module(ckpts).train()  # the stitch layer trains, source and target stay in eval mode
    src, tgt, layer = module.source_net, module.target_net, module.stitch
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad])
    loader = dm.train_dataloader()

    def batches():
        while True:
            yield from loader

    start, images = None, 0
    for step, (x, y) in zip(range(WARMUP + steps), batches()):
        if step == WARMUP:
            start = time.perf_counter()
        x = augment_batch(x, padding=dm.crop_padding, flip=dm.flip, cutout=dm.cutout, channels_last=True)
        x = normalize_batch(x, dm.mean, dm.std, channels_last=True)
        with torch.no_grad():
            h = src.forward_to(x, POINT)
        loss = F.cross_entropy(tgt.forward_from(layer(h), POINT), y) + layer.regularization()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        layer.on_after_optimizer_step()
        if start is not None:
            images += len(y)
    return images / (time.perf_counter() - start)


# ------------------------------------------------------------------ (c) cached prefix


class CachedStitching(StitchingModule):
    """The stitching module trained on batches (h, y) of cached prefix activations, stored (N, H, W, C)."""

    def training_step(self, batch, batch_idx):
        h, y = batch
        h = h.permute(0, 3, 1, 2).float()  # a channels_last (B, C, H, W) view, fp32
        loss = F.cross_entropy(self.target_net.forward_from(self.stitch(h), self.point), y)
        loss = loss + self.stitch.regularization()
        self.log("train/loss", loss, prog_bar=True)
        return loss


@torch.no_grad()
def prefix_cache(net, dm: FakeCifar, chunk: int = 500) -> torch.Tensor:
    """A_{≤p}(x) of every un-augmented, normalised training image (eval mode), as (N, H, W, C)."""
    x = dm.data.train_x
    parts = [net.forward_to(normalize_batch(x[i:i + chunk], dm.mean, dm.std), POINT).permute(0, 2, 3, 1)
             for i in range(0, len(x), chunk)]
    fp32_bytes = len(x) * parts[0][0].numel() * 4
    dtype = torch.bfloat16 if fp32_bytes > 2**30 else torch.float32
    return torch.cat([p.to(dtype) for p in parts])


def cached_rate(ckpts, dm: FakeCifar, steps: int, info: dict) -> float:
    module = CachedStitching(str(ckpts[0]), str(ckpts[1]), POINT, layer=LAYER)
    h = prefix_cache(module.source_net, dm)
    info.update(dtype=str(h.dtype).removeprefix("torch."), mb=h.numel() * h.element_size() / 2**20)
    loader = batch_loader(TensorImageDataset(h, dm.data.train_y), BATCH, shuffle=True)
    return fit_rate(module, steps, train_dataloaders=loader)


# ------------------------------------------------------------------ main


def save_checkpoints(folder: Path) -> list[Path]:
    """Two differently seeded, untrained ResNet-20 classifier checkpoints (throughput does not need training)."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = ClassifierModule("resnet20", num_classes=10)
        path = folder / f"resnet20-seed{seed}.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--images", type=int, default=5000, help="fake training images")
    parser.add_argument("--steps", type=int, default=30, help=f"timed steps per run (after {WARMUP} warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of (a), (b), (c)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # the frozen nets are in eval mode on purpose, the loader has 0 workers
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; ResNet-20 → {LAYER} at {POINT} → "
          f"ResNet-20, batch {BATCH}, fp32, channels_last, {args.images} fake images; "
          f"{args.steps} timed steps × {args.repeats} runs (medians)")

    dm = FakeCifar(args.images)
    runs, info = {"a": [], "b": [], "c": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = save_checkpoints(Path(tmp))
        for _ in range(args.repeats):
            runs["a"].append(lightning_rate(ckpts, dm, args.steps))
            runs["b"].append(plain_rate(ckpts, dm, args.steps))
            runs["c"].append(cached_rate(ckpts, dm, args.steps, info))
    a, b, c = (statistics.median(runs[k]) for k in "abc")

    def spread(k):
        return "  ".join(f"{r:.0f}" for r in runs[k])

    print(f"{'':44s} {'images/s':>9s}   runs")
    print(f"{'(a) Lightning StitchingModule step':44s} {a:9.0f}   {spread('a')}")
    print(f"{'(b) plain torch loop, same work':44s} {b:9.0f}   {spread('b')}")
    cache = f"(c) Lightning, cached prefix ({info['dtype']}, {info['mb']:.0f} MB)"
    print(f"{cache:44s} {c:9.0f}   {spread('c')}")
    print(f"(a)/(b) = {a / b:.2f}  (target ≥ 0.9: {'met' if a / b >= 0.9 else 'NOT met'})")
    print(f"(c)/(a) = {c / a:.2f}  (target ≥ 2:   {'met' if c / a >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
