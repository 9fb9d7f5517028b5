"""Cost of network dissection (``symstitch.dissect``): the IoU tally against a per-image, per-unit loop, its
memory, and the throughput of a whole ``dissect()`` call, in one run.

The data is the embedded digits twin (``DigitsTwin("all")``: 32×32 images, 33 concepts, pixel labels in 3 layers,
scene and texture image-level), in batches of 64 (``dissect``'s default). The unit masks come from real
activations: a randomly initialised ResNet-20 (seed 0, eval mode; the cost does not depend on training) at
``layer1.2.act2`` (16 units, 32×32), inputs normalised as the digits, thresholds T_u from ``TopQuantile`` at
q = 0.02 over the images used, masks ``unit_masks`` (bilinear upsampling to the label size, then > T_u).

1. The tally, ``IoUTally.update`` over the batches then ``compute``, against the straightforward reference of
   research code: for each image, the concept masks L_c(x) of all C + 1 concepts as one boolean (C + 1, h, w)
   stack (a pixel concept where any label layer holds it, an image-level concept on every pixel); then for each
   unit u, |M_u ∧ L_c| and |M_u ∨ L_c| for all concepts at once (``&``, ``|`` and a sum over pixels), added to
   float64 running sums where c's category is labelled; IoU = the two sums' ratio. A Python loop over images ×
   units, vectorised over concepts and pixels. Both see the same masks and ``ConceptBatch``es, built before
   the clock starts; calls interleaved, medians of ``--repeats``; time per image and the ratio. Where the
   reference would take longer than ``--ref-budget`` seconds it runs on a prefix of whole batches (the output
   says so) and the IoU check compares both on that prefix (max |difference|: must be 0 up to rounding).
2. Memory: the tally's state (bytes of its tensors) after 64, 256 and 1024 images; and the peak resident set
   growth of ``dissect()`` at ``layer1.2.act2`` for 256 and 1797 images, each call in a fresh subprocess
   (``VmHWM`` reset through ``/proc/self/clear_refs`` after the set-up, minus ``VmRSS`` then), with the default
   activation cache (pass 1's activations kept for pass 2 up to 2^26 numbers) and with ``cache_budget=0``.
3. Images/s of a whole ``dissect()`` call (both passes: thresholds and top images, then masks and tally; the
   twin drawing its batches included) over all 1797 images at each stage output ``layer1.2.act2``,
   ``layer2.2.act2``, ``layer3.2.act2``, default batch size; beside it, images/s of the network's forward pass
   alone to that point on the same images, normalised and held in memory. Interleaved, medians.

The tally runs on the CPU whatever the device (it moves masks there); ``--device cuda`` moves the network.
The one-minute load average is printed at the start and the end.

    python experiments/benchmarks/dissect.py [--images 256] [--repeats 3] [--threads 2] [--ref-budget 60]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout this script belongs to, before any installed copy

from symstitch.dissect.api import activations_at, default_normalization, dissect  # noqa: E402
from symstitch.dissect.concepts import ConceptBatch  # noqa: E402
from symstitch.dissect.quantile import TopQuantile  # noqa: E402
from symstitch.dissect.tally import IoUTally, unit_masks  # noqa: E402
from symstitch.dissect.twin import DigitsTwin  # noqa: E402
from symstitch.models import MODELS  # noqa: E402

Tensor = torch.Tensor
POINT, STAGES, Q, BATCH = "layer1.2.act2", ("layer1.2.act2", "layer2.2.act2", "layer3.2.act2"), 0.02, 64
STATE_AFTER, RSS_IMAGES = (64, 256, 1024), (256, 1797)


def network(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS.build("resnet20", num_classes=10).eval().to(device)


def inputs(net: torch.nn.Module, batches: list[ConceptBatch], device: str) -> list[Tensor]:
    norm = default_normalization(net)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (norm.mean, norm.std))
    return [(b.images.to(device) - mean) / std for b in batches]


def masks_at(net: torch.nn.Module, twin: DigitsTwin, point: str, n: int, device: str
             ) -> tuple[list[Tensor], list[ConceptBatch]]:
    """The unit masks of the first ``n`` images at ``point`` (thresholds over those images) and their batches."""
    batches = list(twin.batches(BATCH, n))
    forward = activations_at(net, point)
    with torch.inference_mode():
        acts = [forward(x).float().cpu() for x in inputs(net, batches, device)]
    quantile = TopQuantile(acts[0].shape[1], Q, n * acts[0].shape[2] * acts[0].shape[3])
    for a in acts:
        quantile.update(a)
    thresholds, _ = quantile.compute()
    return [unit_masks(a, thresholds, twin.mask_size) for a in acts], batches


def new_tally(units: int, twin: DigitsTwin) -> IoUTally:
    return IoUTally(units, twin.primary(), twin.image_level(), len(twin.categories))


def ours(masks: list[Tensor], batches: list[ConceptBatch], twin: DigitsTwin) -> Tensor:
    tally = new_tally(masks[0].shape[1], twin)
    for m, b in zip(masks, batches):
        tally.update(m, b)
    return tally.compute()


def reference(masks: list[Tensor], batches: list[ConceptBatch], twin: DigitsTwin) -> Tensor:
    """The per-image, per-unit loop of the module's part 1."""
    primary = twin.primary()
    units, size = masks[0].shape[1], primary.numel()
    numbers = torch.arange(size).view(1, -1, 1, 1)
    inter = torch.zeros(units, size, dtype=torch.float64)
    union = torch.zeros(units, size, dtype=torch.float64)
    for m, b in zip(masks, batches):
        for i in range(m.shape[0]):
            concept = (b.pixel[i].unsqueeze(1) == numbers).any(dim=0)  # (C + 1, h, w): L_c(x)
            concept |= b.image[i].view(-1, 1, 1)  # image-level concepts cover the image
            concept[0] = False  # 0: no concept
            counts = (b.labelled[i][primary.clamp(min=0)] & (primary >= 0)).double()  # c's category labelled
            for u in range(units):
                mask = m[i, u]
                inter[u] += (mask & concept).sum(dim=(1, 2)) * counts
                union[u] += (mask | concept).sum(dim=(1, 2)) * counts
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    iou[:, 0] = 0.0
    return iou


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def state_bytes(tally: IoUTally) -> int:
    return sum(t.numel() * t.element_size() for t in vars(tally).values() if isinstance(t, Tensor))


def status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


def child(images: int, cache: bool, device: str) -> dict:
    """One ``dissect()`` call after the set-up, in this fresh process: its peak RSS above the RSS before it."""
    net, twin = network(device), DigitsTwin("all")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the set-up does not count
    base = status_kib("VmRSS")
    seconds, _ = timed(lambda: dissect(net, POINT, twin, limit=images, device=device,
                                       **({} if cache else {"cache_budget": 0})))
    return {"growth_mib": (status_kib("VmHWM") - base) / 1024, "seconds": seconds}


def run_child(args: argparse.Namespace, images: int, cache: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--device", args.device,
           "--child", json.dumps({"images": images, "cache": cache})]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images of the tally comparison (part 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed calls of each (medians)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--ref-budget", type=float, default=60.0,
                        help="seconds per reference call beyond which it runs on a prefix of the images")
    parser.add_argument("--device", default="cpu", help="where the network runs (cpu, or cuda)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked, but torch sees no GPU")
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(**json.loads(args.child), device=args.device)))
        return
    print(f"torch {torch.__version__}, {args.device} ({os.cpu_count()} cores), threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'default')}; load average "
          f"{os.getloadavg()[0]:.2f} at the start")
    net, twin = network(args.device), DigitsTwin("all")
    n = min(max(args.images, STATE_AFTER[-1]), len(twin))
    masks, batches = masks_at(net, twin, POINT, n, args.device)
    used = -(-args.images // BATCH)
    fired = torch.cat(masks[:used]).float().mean().item()
    print(f"\n1. IoU tally, ResNet-20 (random init) at {POINT}: {masks[0].shape[1]} units, masks "
          f"{tuple(masks[0].shape[2:])}, {fired:.2%} of mask pixels on (q = {Q}); {args.images} images")
    first, _ = timed(lambda: reference(masks[:1], batches[:1], twin))
    prefix = max(1, min(used, int(args.ref_budget / first)))
    ref_images = sum(len(b.index) for b in batches[:prefix])
    runs: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(args.repeats):
        t, iou = timed(lambda: ours(masks[:used], batches[:used], twin))
        runs["ours"].append(t / args.images)
        t, ref = timed(lambda: reference(masks[:prefix], batches[:prefix], twin))
        runs["reference"].append(t / ref_images)
    diff = (ours(masks[:prefix], batches[:prefix], twin) - ref).abs().max().item()
    a, b = statistics.median(runs["ours"]), statistics.median(runs["reference"])
    note = "" if prefix == used else f"  (on the first {ref_images} images: over --ref-budget; extrapolated per image)"
    print(f"{'':44s} {'ms/image':>9s}   runs")
    for name, label in (("ours", "IoUTally (vectorised)"), ("reference", "per-image, per-unit loop")):
        spread = "  ".join(f"{1e3 * r:.3f}" for r in runs[name])
        print(f"{label:44s} {1e3 * statistics.median(runs[name]):9.3f}   {spread}")
    print(f"reference / ours = {b / a:.1f}×; max |IoU difference| = {diff:.2g} over {ref_images} images{note}")

    print(f"\n2. memory: IoUTally state at {POINT} ({masks[0].shape[1]} units × {twin.primary().numel()} concepts)")
    tally, seen, sizes = new_tally(masks[0].shape[1], twin), 0, []
    for m, b in zip(masks, batches):
        tally.update(m, b)
        seen += m.shape[0]
        if seen in STATE_AFTER:
            sizes.append(f"{seen} images: {state_bytes(tally)} B")
    print("   " + "; ".join(sizes))
    print(f"   peak RSS growth of dissect() at {POINT}, fresh process each (MiB; wall time of the call)")
    for cache in (True, False):
        cells = []
        for images in RSS_IMAGES:
            r = run_child(args, images, cache)
            cells.append(f"{images} images {r['growth_mib']:6.1f} MiB ({r['seconds']:.1f} s)")
        label = "default activation cache" if cache else "cache_budget=0 (network runs twice)"
        print(f"   {label:38s} " + "   ".join(cells))

    print(f"\n3. dissect() on all {len(twin)} twin images, batch {BATCH} (medians of {args.repeats}, images/s)")
    print(f"{'point':16s} {'units':>5s} {'map':>6s} {'dissect()':>10s} {'forward only':>13s} {'forward share':>14s}")
    all_batches = list(twin.batches(BATCH))
    xs = inputs(net, all_batches, args.device)
    for point in STAGES:
        forward = activations_at(net, point)

        def forward_all() -> Tensor:
            with torch.inference_mode():
                out = [forward(x) for x in xs]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out[-1]

        shape = forward_all().shape  # warm-up
        full, fwd = [], []
        for _ in range(args.repeats):
            full.append(len(twin) / timed(lambda: dissect(net, point, twin, device=args.device))[0])
            fwd.append(len(twin) / timed(forward_all)[0])
        d, f = statistics.median(full), statistics.median(fwd)
        print(f"{point:16s} {shape[1]:5d} {f'{shape[2]}×{shape[3]}':>6s} {d:10.0f} {f:13.0f} {d / f:13.0%}")
    print("   (forward share: one forward pass's time over dissect()'s; the activations of all three points fit "
          "its cache, so dissect() runs the network once)")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
