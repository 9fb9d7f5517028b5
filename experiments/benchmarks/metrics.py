"""Cost of the similarity metrics, the working tree's code side by side with a baseline, the code of git revision
``--baseline REV`` (default 60a6b45: the code path before the fused kernels), in one run. The baseline's files
come from git into a temporary folder (``git_tree.source_tree``) and run in processes of their own, with that
folder first on the path: in part 2 one process answers the calls one at a time, interleaved with ours; in part
4 fresh children, as ours.

1. GEMM rate of the device: ``torch.matmul`` of two 4096×4096 float32 matrices (median after a warm-up),
   GFLOP/s = 2·4096³ / t.
2. For each metric of the paper and each of three feature shapes (n = 2000 inputs; (C, H, W) = (16, 32, 32),
   (32, 16, 16), (64, 8, 8); X and Y ReLU of seeded Gaussians, float32, on the device): the baseline's time
   and ours (calls interleaved, median of ``--repeats``), their ratio, the values' difference, our GEMM share
   and our rate. GEMM share = time inside the GEMM operators (``aten::mm``, ``bmm``, ``addmm``, ``matmul``
   kernels; torch.profiler self time, device time on a GPU) over the wall time of one profiled call. Rate =
   nominal FLOPs / our median time: CKA counts two full kernels, 2·n²·C·H·W each (ours computes only the
   upper triangle, so this is the rate a full-kernel GEMM would need); Procrustes counts its C×C
   cross-product, 2·n·H·W·C² (it runs in float64, docs/method.md §8). "of GEMM" = rate / the GEMM rate of part 1.
   After the rows of each shape, the two parts of the Procrustes moments timed alone: the float64 conversion
   pass over both inputs and the float64 GEMMs on inputs already converted, beside the time 10× the baseline
   would need.
3. The straightforward G_ReLU-CKA of research code (every channel centred and normalised, the kernel one
   sample at a time in a Python loop, HSIC1 in float64 numpy) at the middle shape, extrapolated from a prefix
   of rows when it would exceed ``--naive-budget`` seconds (the output says so).
4. ``similarity_matrix`` of two randomly initialised ResNet-20s (seeds 0 and 1, eval mode; the cost does not
   depend on training) over all 19×19 pairs of feature points, the four metrics, ``cka_mode="minibatch"``, on
   ``--images`` random normalised images in batches of 500 (default: the paper's 10,000): baseline and ours,
   each in a fresh subprocess, wall time and peak memory (resident set high-water mark ``VmHWM`` after a
   reset, read from ``/proc/self/status``; "growth" = above the RSS after set-up; on a GPU also
   ``torch.cuda.max_memory_allocated``). Then linear CKA alone, ours against pytorch-cka's model-pair API
   (``cka.compute_cka``, the ``bench`` extra: ``pip install -e .[bench]``) on the same images and points,
   with the largest difference of their values; skipped, with a note, when pytorch-cka is not installed.
   ``--pair-repeats N`` runs every child N times, the implementations alternating, and reports the median run
   (and every run's time): one run of a minute moves by 10–30 % on a shared machine.

On a shared machine timings move with the load of other processes; the one-minute load average is printed at
the start and the end, and every comparison is a ratio of calls interleaved in one process. Run it with the
default OpenMP wait policy: ``OMP_WAIT_POLICY=PASSIVE`` (which the test suite uses, to share two cores among
processes) puts idle threads to sleep, and on the 2-core machine every parallel operation then paid ~80 µs of
wake-up (an ``amax`` over 64K floats took 83 µs instead of 13).

    python experiments/benchmarks/metrics.py [--baseline 60a6b45] [--threads 2] [--n 2000] [--images 10000]
        [--repeats 3] [--pair-repeats 3] [--skip-naive] [--skip-pairs] [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout this script belongs to, before any installed copy
sys.path.insert(1, str(HERE))  # git_tree

from git_tree import source_tree  # noqa: E402

#: the code path before the fused kernels
BASELINE = "60a6b45"
GEMM_N, BATCH, PAPER_IMAGES, MEMORY_TARGET_GB = 4096, 500, 10_000, 4.0
SHAPES = ((16, 32, 32), (32, 16, 16), (64, 8, 8))
METRIC_NAMES = ("cka_relu", "cka_linear", "procrustes_relu", "procrustes_orthogonal")
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::baddbmm")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    sync(device)
    t = time.perf_counter()
    value = float(fn())
    sync(device)
    return time.perf_counter() - t, value


# ------------------------------------------------------------------ 1. GEMM rate


def gemm_gflops(n: int, device: torch.device, repeats: int = 5) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    torch.matmul(a, b)
    times = [timed(lambda: torch.matmul(a, b)[0, 0], device)[0] for _ in range(repeats)]
    return 2 * n ** 3 / statistics.median(times) / 1e9


# ------------------------------------------------------------------ 2. per metric and shape


def features(n: int, shape: tuple[int, int, int], seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g).relu_().to(device)


def nominal_flops(name: str, n: int, shape: tuple[int, int, int]) -> float:
    c, h, w = shape
    return 2 * 2 * n ** 2 * c * h * w if name.startswith("cka") else 2 * n * h * w * c * c


def gemm_share(fn, device: torch.device) -> float:
    """Time inside GEMM operators / wall time, of one profiled call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    gemm = 0.0
    for event in prof.key_averages():
        if event.key in GEMM_OPS:
            gemm += (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1e6
    return gemm / wall


def procrustes_parts(x: torch.Tensor, y: torch.Tensor, repeats: int, device: torch.device) -> tuple[float, float]:
    """What the Procrustes moments cannot avoid, timed alone (median of ``repeats``): the float64 conversion pass
    (both inputs copied into float64 chunk buffers in the grouped layout of the moments) and the float64 GEMMs
    (the batched group products on inputs already converted)."""
    from symstitch.metrics.procrustes import _GROUP_WIDTH, _MOMENT_BUDGET

    n, c = x.shape[:2]
    p = x[0, 0].numel()
    chunk = max(1, _MOMENT_BUDGET // (2 * c * p))
    g = max(1, min(chunk, _GROUP_WIDTH // p))
    chunk = max(g, chunk // g * g)
    z = torch.empty(chunk // g, 2 * c, g, p, dtype=torch.float64, device=device)
    whole = n // chunk * chunk  # whole chunks only (the remainder is a few inputs)

    def convert():
        for s in range(0, whole, chunk):
            z[:, :c].copy_(x[s:s + chunk].reshape(chunk // g, g, c, p).transpose(1, 2))
            z[:, c:].copy_(y[s:s + chunk].reshape(chunk // g, g, c, p).transpose(1, 2))
        return z[0, 0, 0, 0]

    convert()
    f = z.view(chunk // g, 2 * c, g * p)

    def gemm():
        total = torch.zeros(c, c, dtype=torch.float64, device=device)
        for _ in range(0, whole, chunk):
            total += torch.bmm(f[:, :c], f[:, c:].transpose(1, 2)).sum(0)
        return total[0, 0]

    gemm()
    return (statistics.median(timed(convert, device)[0] for _ in range(repeats)),
            statistics.median(timed(gemm, device)[0] for _ in range(repeats)))


class Baseline:
    """The baseline's functional metrics in a process of their own (``--serve``, the revision's folder first on its
    path): :meth:`call` runs one metric once on the seeded features of ``features`` and gives its time there
    and its value. One call at a time, so its calls and ours interleave."""

    def __init__(self, args: argparse.Namespace, tree: Path):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--tree", str(tree), "--threads",
               str(args.threads), "--device", args.device]
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(self, name: str, n: int, shape: tuple[int, int, int]) -> tuple[float, float]:
        self.process.stdin.write(json.dumps({"name": name, "n": n, "shape": shape}) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:  # the answer is the next JSON line
            if line.startswith("{"):
                answer = json.loads(line)
                return answer["time"], answer["value"]
        raise RuntimeError(f"the baseline process ended (exit status {self.process.wait()})")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def serve(device: torch.device) -> None:
    """The baseline's side of :class:`Baseline`: one JSON request a line on stdin, one JSON answer on stdout."""
    from symstitch import metrics

    held: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (request["n"], tuple(request["shape"]))
        if key not in held:
            held.clear()
            held[key] = features(*key, 0, device), features(*key, 1, device)
        x, y = held[key]
        t, value = timed(lambda: metrics.similarity(request["name"], x, y), device)
        print(json.dumps({"time": t, "value": value}), flush=True)


def metric_table(n: int, repeats: int, gemm: float, device: torch.device, base: Baseline) -> list[dict]:
    from symstitch import metrics as ours

    print(f"   {'metric':22s} {'shape':12s} {'baseline':>9s} {'ours':>8s} {'ratio':>6s} {'|diff|':>8s} "
          f"{'GEMM share':>10s} {'GFLOP/s':>8s} {'of GEMM':>7s}")
    out = []
    for shape in SHAPES:
        x, y = features(n, shape, 0, device), features(n, shape, 1, device)
        for name in METRIC_NAMES:
            run_ours = lambda: ours.similarity(name, x, y)  # noqa: E731
            base.call(name, n, shape), run_ours()  # warm-up
            tb, to = [], []
            for _ in range(repeats):  # interleaved: both see the same load
                t, vb = base.call(name, n, shape)
                tb.append(t)
                t, vo = timed(run_ours, device)
                to.append(t)
            share = gemm_share(run_ours, device)
            t_base, t_ours = statistics.median(tb), statistics.median(to)
            rate = nominal_flops(name, n, shape) / t_ours / 1e9
            row = {"metric": name, "shape": shape, "baseline": t_base, "ours": t_ours, "ratio": t_base / t_ours,
                   "diff": abs(vb - vo), "share": share, "rate": rate}
            out.append(row)
            print(f"   {name:22s} {str(shape):12s} {t_base:8.3f}s {t_ours:7.3f}s {t_base / t_ours:5.1f}× "
                  f"{row['diff']:8.1e} {share:9.0%} {rate:8.1f} {rate / gemm:7.2f}", flush=True)
        t_convert, t_gemm = procrustes_parts(x, y, repeats, device)
        print(f"   {'  Procrustes parts':22s} {str(shape):12s} float64 conversion pass alone {t_convert:.3f}s, float64 "
              f"GEMMs alone {t_gemm:.3f}s, together {t_convert + t_gemm:.3f}s; 10× the baseline needs ≤ "
              f"{min(r['baseline'] / 10 for r in out[-2:]):.3f}s", flush=True)
        del x, y
    return out


# ------------------------------------------------------------------ 3. straightforward G_ReLU-CKA


def naive_prepare(x: torch.Tensor) -> torch.Tensor:
    f = x - x.mean(dim=(0, 2, 3), keepdim=True)
    f = f / f.square().sum(dim=(0, 2, 3), keepdim=True).sqrt()
    return f.reshape(*x.shape[:2], -1)


def naive_rows(f: torch.Tensor, K: torch.Tensor, start: int, stop: int) -> None:
    for i in range(start, stop):
        K[i] = torch.einsum("cp,jcp->jc", f[i], f).max(dim=1).values


def naive_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    K, L = K.astype(np.float64), L.astype(np.float64)
    one_k, one_l = K.sum(1), L.sum(1)
    value = (K * L).sum() + one_k.sum() * one_l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_k @ one_l
    return float(value / (n * (n - 3)))


def naive_cka_relu(x: torch.Tensor, y: torch.Tensor) -> float:
    kernels = []
    for t in (x, y):
        f, K = naive_prepare(t), torch.zeros(t.shape[0], t.shape[0])
        naive_rows(f, K, 0, t.shape[0])
        K.fill_diagonal_(0)
        kernels.append(K.numpy())
    K, L = kernels
    return naive_hsic1(K, L) / math.sqrt(naive_hsic1(K, K) * naive_hsic1(L, L))


def naive_time(x: torch.Tensor, budget: float) -> tuple[float, str]:
    n = x.shape[0]
    t = time.perf_counter()
    f, K = naive_prepare(x), torch.zeros(n, n)
    prep = time.perf_counter() - t
    naive_rows(f, K, 0, 1)  # warm-up
    probe = min(n - 1, 20)
    t = time.perf_counter()
    naive_rows(f, K, 1, 1 + probe)
    per_row = (time.perf_counter() - t) / probe
    if 2 * (prep + per_row * n) <= budget:
        t = time.perf_counter()
        naive_cka_relu(x, x.flip(0))
        return time.perf_counter() - t, "measured in full"
    rows = min(n, max(probe, int(0.5 * budget / per_row)))
    t = time.perf_counter()
    naive_rows(f, K, 0, rows)
    elapsed = time.perf_counter() - t
    return 2 * (prep + elapsed * n / rows), (f"EXTRAPOLATED from {rows} of {n} rows of K ({prep + elapsed:.1f} s "
                                             "measured) to all rows of K and L, HSIC1 not included")


# ------------------------------------------------------------------ 4. all pairs of two ResNet-20s (children)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _nets_and_loader(images: int, device: torch.device):
    from torch.utils.data import DataLoader, TensorDataset

    from symstitch.models import build

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(build("resnet20", num_classes=10).eval().to(device))
    x = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return nets, DataLoader(TensorDataset(x), batch_size=BATCH, shuffle=False)


def child_pairs(images: int, impl: str, metrics: list[str], device: str) -> dict:
    dev = torch.device(device)
    nets, loader = _nets_and_loader(images, dev)
    if impl == "pytorch-cka":
        from cka import compute_cka
    else:  # ours, or the baseline's (its folder is first on the path)
        from symstitch.metrics import similarity_matrix
    points = list(nets[0].feature_points)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: the set-up does not count
    except OSError:
        pass
    base = _status_kib("VmRSS") / 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    if impl == "pytorch-cka":
        matrix = compute_cka(nets[0], nets[1], loader, layers=points, device=dev, progress=False)[0]
        values = {(a, b): float(matrix[i, j]) for i, a in enumerate(points) for j, b in enumerate(points)}
    else:
        rows = similarity_matrix(nets[0], nets[1], loader, metrics=metrics, cka_mode="minibatch", progress=False)
        values = {(r["point_a"], r["point_b"]): r["value"] for r in rows if r["metric"] == metrics[0]}
    sync(dev)
    elapsed = time.perf_counter() - t
    gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return {"time": elapsed, "base_mb": base, "peak_mb": _status_kib("VmHWM") / 1024, "gpu_mb": gpu,
            "points": len(points), "values": [[a, b, v] for (a, b), v in values.items()]}


def run_child(args: argparse.Namespace, **params) -> dict:
    tree = ["--tree", str(args.tree)] if params["impl"] == "baseline" else []
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *tree, "--threads", str(args.threads),
           "--params", json.dumps(params)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(result: dict) -> str:
    gpu = "" if result["gpu_mb"] is None else f", GPU peak {result['gpu_mb']:.0f} MiB"
    return (f"peak RSS {result['peak_mb'] * 2**20 / 1e9:5.2f} GB (growth {result['peak_mb'] - result['base_mb']:6.0f}"
            f" MiB){gpu}")


def _alternate(args: argparse.Namespace, runs: dict[str, dict]) -> dict[str, list[dict]]:
    """Each named child run ``--pair-repeats`` times, the names alternating (each repeat sees the same load)."""
    out: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.pair_repeats):
        for name, params in runs.items():
            out[name].append(run_child(args, task="pairs", **params))
    return out


def _median_run(results: list[dict]) -> dict:
    return sorted(results, key=lambda r: r["time"])[len(results) // 2]


def _times(results: list[dict]) -> str:
    return "" if len(results) == 1 else "  (runs: " + ", ".join(f"{r['time']:.1f}" for r in results) + " s)"


def pairs_section(args: argparse.Namespace) -> dict:
    images = args.images
    scale = "the paper's scale" if images == PAPER_IMAGES else f"SCALED DOWN from the paper's {PAPER_IMAGES}"
    reps = "" if args.pair_repeats == 1 else f", {args.pair_repeats} alternating runs each, medians"
    print(f"\n4. similarity_matrix, two ResNet-20s (random init, seeds 0 and 1), all 19×19 pairs, minibatch CKA, "
          f"{images} random images ({scale}) in batches of {BATCH}{reps}")
    four = list(METRIC_NAMES)
    common = dict(images=images, device=args.device)
    runs = _alternate(args, {impl: dict(impl=impl, metrics=four, **common) for impl in ("baseline", "ours")})
    out = {impl: _median_run(results) for impl, results in runs.items()}
    for impl, r in out.items():
        print(f"   {impl:9s} four metrics   {r['time']:7.1f} s  {memory(r)}{_times(runs[impl])}", flush=True)
    ratio = out["baseline"]["time"] / out["ours"]["time"]
    peak = max(r["peak_mb"] for r in runs["ours"]) * 2**20 / 1e9
    print(f"   ratio {ratio:.2f}×; ours < {MEMORY_TARGET_GB:.0f} GB (highest peak of its runs {peak:.2f} GB): "
          f"{'met' if peak < MEMORY_TARGET_GB else 'NOT met'}"
          + ("" if images == PAPER_IMAGES else f" (at n = {images})"))
    try:
        import importlib.metadata

        version = importlib.metadata.version("pytorch-cka")
    except importlib.metadata.PackageNotFoundError:
        print("   pytorch-cka is not installed (pip install -e .[bench]): its model-pair API is not compared")
        return out
    runs = _alternate(args, {"ours": dict(impl="ours", metrics=["cka_linear"], **common),
                             "pytorch-cka": dict(impl="pytorch-cka", metrics=["cka_linear"], **common)})
    lin, peer = _median_run(runs["ours"]), _median_run(runs["pytorch-cka"])
    ours_v = {(a, b): v for a, b, v in lin["values"]}
    diff = max(abs(ours_v[(a, b)] - v) for a, b, v in peer["values"])
    print(f"   linear CKA only: ours {lin['time']:7.1f} s  {memory(lin)}{_times(runs['ours'])}")
    print(f"   pytorch-cka {version} compute_cka {peer['time']:7.1f} s  {memory(peer)}{_times(runs['pytorch-cka'])}")
    pairs = ", ".join(f"{a['time'] / b['time']:.2f}" for a, b in zip(runs["ours"], runs["pytorch-cka"]))
    print(f"   ours / pytorch-cka time {lin['time'] / peer['time']:.2f}"
          + ("" if args.pair_repeats == 1 else f" (run by run: {pairs})")
          + f"; largest |difference| of the 361 values {diff:.1e}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, metavar="REV",
                        help=f"the git revision whose code is the baseline (default {BASELINE}: before the fused "
                             "kernels)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--n", type=int, default=2000, help="inputs of the per-metric comparison (part 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each implementation (median)")
    parser.add_argument("--images", type=int, default=PAPER_IMAGES, help=f"images of part 4, a multiple of {BATCH}")
    parser.add_argument("--pair-repeats", type=int, default=1,
                        help="runs of each implementation in part 4, alternating (medians are reported)")
    parser.add_argument("--naive-budget", type=float, default=30.0,
                        help="seconds beyond which the straightforward version is timed on a prefix of rows")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-pairs", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.images, args.repeats = 200, BATCH, 1
    if args.images % BATCH:
        parser.error(f"--images must be a multiple of {BATCH}")
    torch.set_num_threads(args.threads)
    if args.tree:  # a baseline's process: that revision's symstitch
        sys.path.insert(0, args.tree)
        import symstitch

        assert Path(symstitch.__file__).resolve().is_relative_to(Path(args.tree).resolve()), symstitch.__file__
    if args.serve:
        serve(torch.device(args.device))
        return
    if args.child:
        params = json.loads(args.params)
        params.pop("task")
        print(json.dumps(child_pairs(**params)))
        return
    with source_tree(args.baseline) as tree:
        args.tree = tree
        compare(args)


def compare(args: argparse.Namespace) -> None:
    """Parts 1 to 4, the baseline's code in ``args.tree``."""
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"torch {torch.__version__}, {where}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY {policy}, load "
          f"average {os.getloadavg()[0]:.2f}" + (" [--quick: tiny sizes]" if args.quick else ""))
    print(f"baseline: the code of {args.baseline} (git archive, in processes of its own); ours: {HERE.parents[1]}")
    if policy.upper() == "PASSIVE":
        print("   note: with PASSIVE, idle OpenMP threads sleep and every parallel operation pays their wake-up "
              "(tens of µs here): code made of many short operations looks slower than users will see it")

    gemm = gemm_gflops(1024 if args.quick else GEMM_N, device)
    print(f"\n1. float32 GEMM {GEMM_N}×{GEMM_N}: {gemm:.0f} GFLOP/s")
    print(f"\n2. per metric, n = {args.n}, float32 ReLU features, baseline vs ours (median of {args.repeats}, "
          "interleaved)")
    base = Baseline(args, args.tree)
    try:
        metric_table(args.n, args.repeats, gemm, device, base)
    finally:
        base.close()
    if not args.skip_naive:
        shape = SHAPES[1]
        x = features(args.n, shape, 0, torch.device("cpu"))
        t, how = naive_time(x, args.naive_budget)
        from symstitch.metrics import cka

        t_ours, _ = timed(lambda: cka(x, x.flip(0), kernel="relu"), torch.device("cpu"))
        print(f"\n3. straightforward G_ReLU-CKA at {(args.n, *shape)} on the CPU: {t:.1f} s ({how}); ours {t_ours:.2f} s "
              f"→ {t / t_ours:.0f}×")
    if not args.skip_pairs:
        pairs_section(args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
