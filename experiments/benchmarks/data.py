"""Speed of symstitch's data pipeline against the usual per-sample torchvision pipeline.

On CIFAR-10-sized random data held in memory (50,000 uint8 images 32×32×3), measures in one run:

(a) images/s of symstitch's pipeline: batches fetched by one indexing operation (``TensorImageDataset`` +
    ``batch_loader``), then ``augment_batch`` (translate by up to 4 px + flip, per sample) and
    ``normalize_batch`` (float32, channels_last);
(b) images/s of the common research-code pipeline: PIL images through
    ``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(...)])`` per sample in a
    Dataset + DataLoader (num_workers 0);
(c) the time of one ResNet20 training step (forward, backward, SGD step; fp32, channels_last), and the
    pipeline's time per batch as a share of it.

Each measurement is warmed up, repeated (the pipelines interleaved), and reported as the median. Usage::

    python experiments/benchmarks/data.py [--threads 2] [--batches 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from symstitch.data import TensorImageDataset, augment_batch, batch_loader, normalize_batch

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
TARGET_RATIO = 10.0
TARGET_SHARE = 10.0  # percent of a ResNet20 step


class PILDataset(Dataset):
    """The usual per-sample pipeline: a PIL image per index, transformed by torchvision."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def time_batches(loader: DataLoader, batches: int, process=lambda b: b) -> float:
    """Seconds to fetch and ``process`` the first ``batches`` batches of a fresh pass over ``loader``."""
    it = iter(loader)
    start = time.perf_counter()
    for _ in range(batches):
        process(next(it))
    return time.perf_counter() - start


def ours(batch):
    """symstitch's per-batch work after fetching: training augmentation and normalisation."""
    x, y = batch
    x = augment_batch(x, padding=4, flip=True, channels_last=True)
    return normalize_batch(x, MEAN, STD, channels_last=True), y


def resnet20_step_seconds(batch, steps: int) -> float | None:
    """Median seconds of one ResNet20 training step, or None when the model zoo has no resnet20."""
    try:
        from symstitch import models
    except ImportError as err:
        print(f"(c) skipped: symstitch.models cannot be imported ({err})")
        return None
    if "resnet20" not in models.available():
        print("(c) skipped: symstitch.models has no resnet20")
        return None
    model = models.build("resnet20").to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = ours(batch)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--batches", type=int, default=40, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per pipeline")
    parser.add_argument("--steps", type=int, default=10, help="timed ResNet20 steps")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, batch {args.batch_size}, "
          f"{args.batches} batches × {args.repeats} runs (medians)")

    n, bs = 50_000, args.batch_size
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))

    fast = batch_loader(TensorImageDataset(x, y), bs, shuffle=True)
    pil_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    slow = DataLoader(PILDataset(x.permute(0, 2, 3, 1).contiguous().numpy(), y.numpy(), pil_transform),
                      batch_size=bs, shuffle=True, num_workers=0)

    # interleaved runs, so that load from other processes hits both pipelines alike; the first is warm-up
    fast_runs, fetch_runs, slow_runs = [], [], []
    for r in range(args.repeats + 1):
        times = (time_batches(fast, args.batches, ours), time_batches(fast, args.batches),
                 time_batches(slow, args.batches))
        if r > 0:
            for runs, t in zip((fast_runs, fetch_runs, slow_runs), times):
                runs.append(t)

    images = args.batches * bs
    rate_fast = images / statistics.median(fast_runs)
    rate_fetch = images / statistics.median(fetch_runs)
    rate_slow = images / statistics.median(slow_runs)
    ratio = rate_fast / rate_slow
    per_batch_fast = bs / rate_fast
    per_batch_slow = bs / rate_slow

    print(f"{'pipeline':58s} {'images/s':>10s} {'ms/batch':>9s}")
    print(f"{'(a) symstitch: one-index fetch + augment_batch + normalize':58s} {rate_fast:10,.0f} "
          f"{1e3 * per_batch_fast:9.2f}")
    print(f"{'    of which fetch only':58s} {rate_fetch:10,.0f} {1e3 * bs / rate_fetch:9.2f}")
    print(f"{'(b) torchvision per-sample PIL Compose + DataLoader':58s} {rate_slow:10,.0f} "
          f"{1e3 * per_batch_slow:9.2f}")
    print(f"ratio (a)/(b): {ratio:.1f}×  (target ≥ {TARGET_RATIO:.0f}×: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")

    step = resnet20_step_seconds(next(iter(fast)), args.steps)
    if step is not None:
        share = 100 * per_batch_fast / step
        share_slow = 100 * per_batch_slow / step
        print(f"(c) ResNet20 train step (fp32, channels_last, batch {bs}): {1e3 * step:.1f} ms "
              f"({bs / step:,.0f} images/s)")
        print(f"    pipeline per batch = {share:.2f} % of a step (target < {TARGET_SHARE:.0f} %: "
              f"{'met' if share < TARGET_SHARE else 'NOT met'}); per-sample PIL pipeline = {share_slow:.1f} %")


if __name__ == "__main__":
    main()
