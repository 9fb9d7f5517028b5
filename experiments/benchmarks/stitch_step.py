"""Throughput of a stitching step: Lightning module vs a plain torch loop vs a cached frozen prefix.

ResNet-20 (width 1) source and target (two random inits), stitched with ``birkhoff`` mid-network (the middle
stage: ``layer2.0.act2`` and ``layer2.2.act2`` by default), batch 128, fp32, channels_last inputs, on
CIFAR-10-sized random uint8 data held in memory. In one run, interleaved, medians of repeats, images/s of:

(a) the Lightning stitching step (``StitchingModule`` + ``Trainer`` + ``DataModule``: augmentation and
    normalisation in ``on_after_batch_transfer``);
(b) a hand-written torch loop doing the same work (same loader, augment, normalise, prefix without grad, stitch,
    suffix, backward, Adam step, projection);
(c) ``StitchingModule(prefix_cache="float32")``: the step on cached prefix activations A_{≤p}(x) of the
    un-augmented, normalised training images (computed once at fit start, eval mode), trained through Lightning.

For (c)/(a) the script also prints the ceiling a FLOP count allows at that point: the cache removes the prefix
forward, while the suffix forward and its backward (input gradients only: the suffix is frozen) remain.

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

from symstitch.data import DataModule, ImageData, augment_batch, normalize_batch
from symstitch.stitching import StitchingModule
from symstitch.training import ClassifierModule

LAYER, BATCH, WARMUP = "birkhoff", 128, 5


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


def stitching_module(ckpts, point: str) -> StitchingModule:
    return StitchingModule(str(ckpts[0]), str(ckpts[1]), point, layer=LAYER)


# ------------------------------------------------------------------ (a) Lightning


def lightning_rate(ckpts, dm: FakeCifar, steps: int, point: str) -> float:
    return fit_rate(stitching_module(ckpts, point), steps, datamodule=dm)


# ------------------------------------------------------------------ (b) plain torch


def plain_rate(ckpts, dm: FakeCifar, steps: int, point: str) -> float:
    module = stitching_module(ckpts, point).train()  # the stitch layer trains, source and target stay in eval mode
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
            h = src.forward_to(x, point)
        loss = F.cross_entropy(tgt.forward_from(layer(h), point), y) + layer.regularization()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        layer.on_after_optimizer_step()
        if start is not None:
            images += len(y)
    return images / (time.perf_counter() - start)


# ------------------------------------------------------------------ (c) cached prefix


def cached_rate(ckpts, dm: FakeCifar, steps: int, point: str, info: dict) -> float:
    """The package's ``StitchingModule(prefix_cache="float32")``: A_{≤p}(x) of every un-augmented training
    image computed once at fit start (timed separately), then steps run only stitch + suffix."""
    module = StitchingModule(str(ckpts[0]), str(ckpts[1]), point, layer=LAYER, prefix_cache="float32")
    build = module._cache_prefix

    def timed_build(dtype):
        t = time.perf_counter()
        build(dtype)
        info["build_s"] = time.perf_counter() - t
        h = dm.train_set.x
        info["mb"] = h.numel() * h.element_size() / 2**20

    module._cache_prefix = timed_build
    return fit_rate(module, steps, datamodule=dm)


def flop_ceiling(ckpts, point: str) -> float:
    """(c)/(a) if time were proportional to FLOPs: (prefix fwd + suffix fwd + suffix bwd) / (suffix fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = stitching_module(ckpts, point)
    x = torch.zeros(BATCH, 3, 32, 32)
    with FlopCounterMode(display=False) as prefix:
        with torch.no_grad():
            h = module.source_net.forward_to(x, point)
    h = h.requires_grad_()
    with FlopCounterMode(display=False) as suffix:
        module.target_net.forward_from(module.stitch(h), point).sum().backward()
    p, s = prefix.get_total_flops(), suffix.get_total_flops()
    return (p + s) / s


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
    parser.add_argument("--points", default="layer2.0.act2,layer2.2.act2",
                        help="comma-separated stitch points (mid-network: the middle stage of ResNet-20)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # the frozen nets are in eval mode on purpose, the loader has 0 workers
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; ResNet-20 → {LAYER} → ResNet-20, "
          f"batch {BATCH}, fp32, channels_last, {args.images} fake images; "
          f"{args.steps} timed steps × {args.repeats} runs (medians)")

    dm = FakeCifar(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = save_checkpoints(Path(tmp))
        for point in args.points.split(","):
            runs, info = {"a": [], "b": [], "c": []}, {}
            for _ in range(args.repeats):
                runs["a"].append(lightning_rate(ckpts, dm, args.steps, point))
                runs["b"].append(plain_rate(ckpts, dm, args.steps, point))
                runs["c"].append(cached_rate(ckpts, dm, args.steps, point, info))
            a, b, c = (statistics.median(runs[k]) for k in "abc")

            def spread(k):
                return "  ".join(f"{r:.0f}" for r in runs[k])

            print(f"\nstitch point {point}")
            print(f"{'':52s} {'images/s':>9s}   runs")
            print(f"{'(a) Lightning StitchingModule step':52s} {a:9.0f}   {spread('a')}")
            print(f"{'(b) plain torch loop, same work':52s} {b:9.0f}   {spread('b')}")
            cache = f"(c) Lightning, prefix_cache=float32 ({info['mb']:.0f} MB)"
            print(f"{cache:52s} {c:9.0f}   {spread('c')}")
            print(f"    cache built once in {info['build_s']:.1f} s ({args.images} images), not in (c)'s rate")
            print(f"(a)/(b) = {a / b:.2f}  (target ≥ 0.9: {'met' if a / b >= 0.9 else 'NOT met'})")
            print(f"(c)/(a) = {c / a:.2f}  (target ≥ 2:   {'met' if c / a >= 2 else 'NOT met'}; "
                  f"FLOP ceiling at this point {flop_ceiling(ckpts, point):.2f})")


if __name__ == "__main__":
    main()
