"""Cost of the similarity metrics: G_ReLU-CKA against a straightforward implementation, and all pairs of
feature points of two ResNet-20s at the paper's scale.

In one run, on the CPU, with ``--threads`` torch threads:

1. this machine's float32 GEMM rate: ``torch.matmul`` of two 4096×4096 float32 matrices (median of repeats
   after a warm-up), in GFLOP/s = 2·4096³ / t;
2. G_ReLU-CKA (``symstitch.metrics.cka(x, y, kernel="relu")``, exact, max over channels) of two random feature
   tensors X, Y of shape (n, 64, 16, 16), n = 2000 (ReLU of seeded Gaussians, float32), against a
   straightforward research-code version written here: all features materialised, channels centred and
   normalised, the kernel built one sample at a time in a Python loop (row i: an einsum over channels of
   sample i against all samples, then the max over channels), diagonal zeroed, HSIC1 by the SPEC formula in
   float64 numpy. Both are timed and their peak memory measured; the two values are compared at a smaller n
   where the straightforward one runs in full. If the straightforward one would take longer than
   ``--naive-budget`` seconds, it is timed on a prefix of the rows of K and extrapolated linearly to 2n rows
   (n rows of K, n of L); the output says so and from how many rows. The achieved FLOP rate of ours counts
   2·n²·C·H·W FLOPs per kernel, two kernels (K and L), over the time of the whole ``cka`` call (centring and
   HSIC1 included). Ours builds only the upper triangle of each symmetric kernel, so it does about half of
   those FLOPs: the rate is the nominal rate of a full kernel, comparable to what a full-kernel GEMM would
   need to reach;
3. ``similarity_matrix`` of two randomly initialised ResNet-20s (seeds 0 and 1, eval mode; similarity values
   of untrained networks mean nothing, the cost is the same) over all 19×19 pairs of feature points, the four
   metrics of the paper, ``cka_mode="minibatch"``, on ``--images`` random normalised (N, 3, 32, 32) images in
   batches of 500 (a TensorDataset): wall time and peak resident memory, by default at the paper's scale
   n = 10,000. With a smaller ``--images`` the time is also extrapolated linearly in n to 10,000 (minibatch
   mode does the same work for every batch), while memory is reported as measured at the n actually run; in
   minibatch mode only the in-memory image tensor grows with n, and the output adds that difference
   separately, labelled as an estimate.

Timings on a shared machine: with torch using every core, a concurrent CPU-heavy process slows this script far
more than 2× (one 500-image batch of part 3 took 52 s under load against 7 s without), so the one-minute load
average is printed at the start and at the end of the run.

Memory method. ``tracemalloc`` does not see torch allocations, so every measured implementation runs in a fresh
subprocess of this script (same interpreter, same thread count). The child imports everything and creates its
inputs (in place, no transient copies), then resets the kernel's high-water mark of its resident set
(``/proc/self/clear_refs`` ← 5) and reads its current RSS (``VmRSS``) as the baseline, runs the implementation,
and reads the high-water mark ``VmHWM`` from ``/proc/self/status``. "peak growth" = VmHWM − baseline is the
extra memory of the implementation; "peak RSS" is the whole process (interpreter, torch with its ~0.5 GB of
libraries, inputs included). ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not used for the figures: on
Linux a child started by ``subprocess`` (vfork + exec) inherits the parent's ru_maxrss, so after the parent
has held the 4096² GEMM operands or the features it reports the parent's peak, not its own. The child still
reports ru_maxrss beside VmHWM (``rusage_*`` in its JSON) for a cross-check. A high-water mark of resident
pages counts memory freed and reused inside the allocator once.

Targets: speed-up of ours over the straightforward version ≥ 50×; our G_ReLU kernel rate within 2× of the
GEMM rate (ratio ≥ 0.5); all 19×19 pairs at n = 10,000 with peak memory < 4 GB (the whole process).

    python experiments/benchmarks/metrics.py [--threads 2] [--n 2000] [--images 10000] [--skip-naive] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

GEMM_N, CHANNELS, SIDE, CHECK_N, BATCH, PAPER_IMAGES = 4096, 64, 16, 300, 500, 10_000
MEMORY_TARGET_GB = 4.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak resident memory of the code run between ``start()`` and ``stop()`` (MiB): see "Memory method"."""

    def start(self) -> None:
        try:  # reset VmHWM to the current RSS, so transients of the imports and set-up do not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.base_mb = _status_kib("VmRSS") / 1024
        self.rusage_base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def stop(self) -> dict:
        return {"base_mb": self.base_mb, "peak_mb": _status_kib("VmHWM") / 1024, "hwm_reset": self.reset,
                "rusage_base_mb": self.rusage_base_mb,
                "rusage_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------ 1. GEMM rate


def gemm_gflops(n: int, repeats: int = 5) -> tuple[float, list[float]]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    torch.matmul(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)
    rates = [2 * n ** 3 / t / 1e9 for t in times]
    return statistics.median(rates), rates


# ------------------------------------------------------------------ 2. G_ReLU-CKA


def features(n: int, seed: int) -> torch.Tensor:
    """ReLU of a seeded Gaussian, (n, 64, 16, 16) float32, made in place (no transient copy)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, CHANNELS, SIDE, SIDE, generator=g).relu_()


def naive_prepare(x: torch.Tensor) -> torch.Tensor:
    """Research-code preprocessing: every channel centred and normalised (over n, h, w), as (n, C, H·W)."""
    f = x - x.mean(dim=(0, 2, 3), keepdim=True)
    f = f / f.square().sum(dim=(0, 2, 3), keepdim=True).sqrt()
    return f.reshape(*x.shape[:2], -1)


def naive_rows(f: torch.Tensor, K: torch.Tensor, start: int, stop: int) -> None:
    """Rows start..stop of the G_ReLU kernel, one sample at a time: K[i] = max_c ⟨f[i, c], f[j, c]⟩ for all j."""
    for i in range(start, stop):
        K[i] = torch.einsum("cp,jcp->jc", f[i], f).max(dim=1).values


def naive_kernel(x: torch.Tensor) -> torch.Tensor:
    """The G_ReLU kernel as research code writes it (all rows), diagonal zeroed."""
    f = naive_prepare(x)
    K = torch.zeros(x.shape[0], x.shape[0])
    naive_rows(f, K, 0, x.shape[0])
    K.fill_diagonal_(0)
    return K


def naive_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    """HSIC1(K, L) of Song et al. (2012), SPEC §3, in float64 numpy (zero diagonals)."""
    n = K.shape[0]
    K, L = K.astype(np.float64), L.astype(np.float64)
    one_k, one_l = K.sum(1), L.sum(1)
    value = (K * L).sum() + one_k.sum() * one_l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_k @ one_l
    return float(value / (n * (n - 3)))


def naive_cka_relu(x: torch.Tensor, y: torch.Tensor) -> float:
    K, L = naive_kernel(x).numpy(), naive_kernel(y).numpy()
    return naive_hsic1(K, L) / math.sqrt(naive_hsic1(K, K) * naive_hsic1(L, L))


def child_ours(n: int, repeats: int) -> dict:
    from symstitch.metrics import cka

    x, y = features(n, 0), features(n, 1)
    memory = PeakMemory()
    memory.start()
    times, value = [], None
    for _ in range(1 + repeats):  # the first (cold) call is reported separately
        t = time.perf_counter()
        value = float(cka(x, y, kernel="relu"))
        times.append(time.perf_counter() - t)
    return {"cold": times[0], "times": times[1:], "value": value, **memory.stop()}


def child_naive(n: int, budget: float) -> dict:
    """The straightforward version in full, timed from scratch; or, if a probe of 20 rows (after one warm-up
    row, preprocessing excluded) predicts more than ``budget`` seconds, K's preprocessing and first rows only,
    extrapolated to 2 × (preprocessing + n rows) for K and L (the HSIC1 sums are left out of the estimate)."""
    x, y = features(n, 0), features(n, 1)
    memory = PeakMemory()
    memory.start()
    f, K = naive_prepare(x), torch.zeros(n, n)
    probe = min(n - 1, 20)
    naive_rows(f, K, 0, 1)
    t = time.perf_counter()
    naive_rows(f, K, 1, 1 + probe)
    per_row = (time.perf_counter() - t) / probe
    del f, K
    if per_row * 2 * n <= budget:
        t = time.perf_counter()
        value = naive_cka_relu(x, y)
        return {"time": time.perf_counter() - t, "value": value, "rows": None, "probe_s": per_row * 2 * n,
                **memory.stop()}
    rows = min(n, 200, max(probe, int(0.5 * budget / per_row)))
    t = time.perf_counter()
    f, K = naive_prepare(x), torch.zeros(n, n)
    prep = time.perf_counter() - t
    t = time.perf_counter()
    naive_rows(f, K, 0, rows)
    elapsed = time.perf_counter() - t
    return {"time": 2 * (prep + elapsed * n / rows), "value": None, "rows": rows, "measured": prep + elapsed,
            **memory.stop()}


# ------------------------------------------------------------------ 3. all pairs of two ResNet-20s


def child_pairs(images: int) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    from symstitch.metrics import METRICS, similarity_matrix
    from symstitch.models import build

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(build("resnet20", num_classes=10).eval())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(images, 3, 32, 32, generator=g)  # already "normalised": zero mean, unit variance
    loader = DataLoader(TensorDataset(x), batch_size=BATCH, shuffle=False)
    metrics = ["cka_linear", "cka_relu", "procrustes_relu", "procrustes_orthogonal"]
    assert set(metrics) == set(METRICS.available()), METRICS.available()
    memory = PeakMemory()
    memory.start()
    t = time.perf_counter()
    rows = similarity_matrix(nets[0], nets[1], loader, metrics=metrics, cka_mode="minibatch", progress=False)
    elapsed = time.perf_counter() - t
    points = len(nets[0].feature_points)
    summary = {}
    for m in metrics:
        vals = [r["value"] for r in rows if r["metric"] == m]
        finite = [v for v in vals if math.isfinite(v)]
        summary[m] = {"pairs": len(vals), "nan": len(vals) - len(finite),
                      "min": min(finite, default=math.nan), "max": max(finite, default=math.nan)}
    return {"time": elapsed, "points": points, "metrics": metrics, "summary": summary,
            "input_mb": x.numel() * x.element_size() / 2**20, **memory.stop()}


# ------------------------------------------------------------------ subprocess plumbing


def run_child(task: str, args: argparse.Namespace, **params) -> dict:
    """Run ``task`` in a fresh interpreter (this script with ``--child``) and return its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", task, "--threads", str(args.threads),
           "--params", json.dumps(params)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(task: str, threads: int, params: dict) -> None:
    torch.set_num_threads(threads)
    result = {"ours": child_ours, "naive": child_naive, "pairs": child_pairs}[task](**params)
    print(json.dumps(result))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def mb(result: dict) -> str:
    return (f"peak growth {result['peak_mb'] - result['base_mb']:7.0f} MiB, "
            f"peak RSS {result['peak_mb']:7.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--n", type=int, default=2000, help="inputs for the G_ReLU-CKA comparison (part 2)")
    parser.add_argument("--images", type=int, default=PAPER_IMAGES,
                        help=f"images for all pairs of two ResNet-20s (part 3), a multiple of {BATCH}")
    parser.add_argument("--skip-naive", action="store_true", help="do not run the straightforward version")
    parser.add_argument("--naive-budget", type=float, default=180.0,
                        help="seconds beyond which the straightforward version is timed on a prefix of rows")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of ours (median)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.threads, json.loads(args.params))
        return
    if args.quick:
        args.n, args.images, args.repeats, gemm_n, check_n = 200, BATCH, 1, 1024, 60
    else:
        gemm_n, check_n = GEMM_N, CHECK_N
    if args.images % BATCH:
        parser.error(f"--images must be a multiple of {BATCH}")

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU ({os.cpu_count()} cores, load "
          f"average {os.getloadavg()[0]:.2f}), float32 features" + (" [--quick: tiny sizes]" if args.quick else ""))

    # 1
    gemm, rates = gemm_gflops(gemm_n)
    print(f"\n1. float32 GEMM {gemm_n}×{gemm_n}: {gemm:.0f} GFLOP/s (median; runs "
          + " ".join(f"{r:.0f}" for r in rates) + ")")

    # 2
    n = args.n
    shape = f"({n}, {CHANNELS}, {SIDE}, {SIDE})"
    print(f"\n2. G_ReLU-CKA, exact, X and Y of shape {shape}, ReLU of seeded Gaussians, float32")
    from symstitch.metrics import cka

    if not args.skip_naive:
        xs, ys = features(check_n, 0), features(check_n, 1)
        ours_v, naive_v = float(cka(xs, ys, kernel="relu")), naive_cka_relu(xs, ys)
        print(f"   agreement at n = {check_n}: ours {ours_v:.8f}, straightforward {naive_v:.8f}, "
              f"|difference| {abs(ours_v - naive_v):.1e}")
    ours = run_child("ours", args, n=n, repeats=args.repeats)
    t_ours = statistics.median(ours["times"])
    flops = 2 * 2 * n ** 2 * CHANNELS * SIDE * SIDE  # two kernels, 2·n²·C·H·W each
    rate = flops / t_ours / 1e9
    print(f"   ours            {t_ours:8.2f} s  (median of " + " ".join(f"{t:.2f}" for t in ours["times"])
          + f" after a cold first call of {ours['cold']:.2f})  {mb(ours)}  value {ours['value']:.6f}")
    if not args.skip_naive:
        naive = run_child("naive", args, n=n, budget=args.naive_budget)
        how = ("measured in full" if naive["rows"] is None else
               f"EXTRAPOLATED linearly from {naive['rows']} of {n} rows of K "
               f"({naive['measured']:.1f} s measured) to all {2 * n} rows of K and L, HSIC1 not included")
        value = "" if naive["value"] is None else f"  value {naive['value']:.6f}"
        print(f"   straightforward {naive['time']:8.2f} s  ({how})  {mb(naive)}{value}")
        speedup = naive["time"] / t_ours
        print(f"   speed-up {speedup:.0f}×  (target ≥ 50×: {verdict(speedup >= 50)})")
    print(f"   G_ReLU kernel rate {rate:.0f} GFLOP/s (2·n²·C·H·W per kernel, K and L, over the whole cka call; "
          f"ours computes only the upper triangle)")
    print(f"   vs GEMM {gemm:.0f} GFLOP/s: ratio {rate / gemm:.2f}  (target ≥ 0.5: {verdict(rate / gemm >= 0.5)})")

    # 3
    images = args.images
    print(f"\n3. similarity_matrix of two ResNet-20s (random init, seeds 0 and 1, eval mode), all 19×19 pairs, "
          f"cka_mode=minibatch, {images} random normalised images in batches of {BATCH}")
    pairs = run_child("pairs", args, images=images)
    print(f"   {pairs['points']}×{pairs['points']} pairs × {len(pairs['metrics'])} metrics "
          f"({', '.join(pairs['metrics'])})")
    for m, s in pairs["summary"].items():
        print(f"     {m:22s} {s['pairs']} values, {s['nan']} NaN, range [{s['min']:.3f}, {s['max']:.3f}]")
    print(f"   wall time {pairs['time']:.1f} s at n = {images} ({pairs['time'] * BATCH / images:.1f} s per batch)",
          end="")
    if images != PAPER_IMAGES:
        print(f"; extrapolated linearly to n = {PAPER_IMAGES}: {pairs['time'] * PAPER_IMAGES / images:.0f} s")
    else:
        print()
    peak_gb = pairs["peak_mb"] * 2**20 / 1e9
    print(f"   memory at n = {images} (measured): {mb(pairs)}")
    print(f"   peak RSS {peak_gb:.2f} GB (target < {MEMORY_TARGET_GB:.0f} GB"
          + ("" if images == PAPER_IMAGES else f", measured at n = {images}, not {PAPER_IMAGES}")
          + f": {verdict(peak_gb < MEMORY_TARGET_GB)})")
    if images != PAPER_IMAGES:
        extra = pairs["input_mb"] * (PAPER_IMAGES / images - 1)
        est = (pairs["peak_mb"] + extra) * 2**20 / 1e9
        print(f"   not measured: at n = {PAPER_IMAGES} the image tensor alone adds {extra:.0f} MiB "
              f"({pairs['input_mb']:.0f} MiB now) → about {est:.2f} GB, if nothing else grows with n "
              f"({verdict(est < MEMORY_TARGET_GB)} by that estimate)")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
