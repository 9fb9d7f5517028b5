"""Cost of aligning two networks (``symstitch.merge``): weight matching of two ResNet-20s against a
permutation-only weight matching written the straightforward way, and activation matching from one pass of the
data, in one run.

The networks: two ResNet-20s of the digits zoo (``--zoo``, seeds 0 and 1) when it holds them, else two randomly
initialised ones (seeds 0 and 1; the cost of a matching does not depend on training, only its number of passes
does, so the output says which pair it used).

1. Weight matching, ``align(a, b, "weight", group)`` with ``group`` = ``permutations`` and ``full`` (G_ReLU: the
   positive scales are part of every step), against the reference: git-re-basin's algorithm as research code
   writes it. One dense permutation matrix per site; at every step, for the site s, every weight that touches s
   is rebuilt from B's original weights by multiplying *all* the current permutation matrices onto both of its
   channel axes (dense n×n matrix products on the whole tensors, s's own left at the identity), and the cost
   matrix Σ_W W_A W_Bᵀ over the unit axis comes from those copies; one Hungarian per site (per block of a
   residual stream; scipy), on the same tensors as symstitch's cost (BatchNorm's statistics left out); random site
   order; passes until no permutation changes. Both visit the sites in the same order (same seed). The
   permutation-only results must agree (the printed check); the ratio is reference / ours, medians of
   ``--repeats`` interleaved calls.
2. Activation matching, ``align(a, b, "activation", data=…)``: one pass of ``--images`` training images (float,
   normalised, in memory) through both networks recording all 19 points, then the Procrustes matching per site;
   seconds and images per second, beside the forward passes alone (both networks, the same images).

    python experiments/benchmarks/merge.py [--zoo runs/digits/zoo] [--width 1] [--images 1437] [--repeats 3]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout this script belongs to, before any installed copy

from symstitch import models  # noqa: E402
from symstitch.merge import align, alignment_sites  # noqa: E402

Tensor = torch.Tensor


def networks(zoo: str, width: float) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    from symstitch.library import Manifest, load_model

    if width == 1 and (Path(zoo) / "manifest.json").exists() and \
            {"resnet20/seed0", "resnet20/seed1"} <= set(Manifest(zoo).load()):
        return load_model(f"{zoo}:resnet20/seed0"), load_model(f"{zoo}:resnet20/seed1"), f"trained ({zoo})"
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        pair.append(models.build("resnet20", width=width).eval())
    return pair[0], pair[1], f"randomly initialised (width {width:g})"


# ------------------------------------------------------------------------------------- the straightforward way
def reference_spec(net: torch.nn.Module) -> tuple[list[str], list[tuple[Tensor, str, int, list]]]:
    """The permutation spec of git-re-basin's code, read off the network's sites: every weight (by name) with,
    per channel axis, the site (and channel range) that permutes it."""
    sites = alignment_sites(net)[0]
    names = {id(p): n for n, p in net.named_parameters()}
    names.update({id(b): n for n, b in net.named_buffers()})
    axes: dict[str, dict[int, tuple[str, int, int]]] = {}
    full_sites = net.symmetry_sites()
    for site in sites:
        s = full_sites[site.point]
        for segment in s.segments:
            for layer, norm in segment.producers:
                tensors = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
                if norm is not None:  # the same tensors as symstitch's cost (BatchNorm's statistics left out)
                    tensors += [norm.weight, norm.bias]
                for t in tensors:
                    axes.setdefault(names[id(t)], {})[0] = (site.point, 0, segment.size)
            for consumer in segment.consumers:
                axes.setdefault(names[id(consumer.weight)], {})[1] = (site.point, 0, segment.size)
    return [s.point for s in sites], [(k, v) for k, v in axes.items()]


def straightforward_permutation_matching(a: torch.nn.Module, b: torch.nn.Module, seed: int = 0,
                                         max_iter: int = 100) -> dict[str, Tensor]:
    """One dense permutation matrix per site; every step rebuilds each affected weight of B from scratch with all
    the current permutations (dense matrix products), then one Hungarian (module docstring)."""
    points, spec = reference_spec(a)
    sizes = {s.point: s.size for s in alignment_sites(a)[0]}
    blocks = {s.point: s.block_ranges() for s in alignment_sites(a)[0]}
    state_a = {k: v.double() for k, v in a.state_dict().items()}
    state_b = {k: v.double() for k, v in b.state_dict().items()}
    P = {p: torch.eye(sizes[p], dtype=torch.float64) for p in points}

    def permuted(name: str, axes: dict, skip: str) -> Tensor:
        w = state_b[name]
        for axis, (point, _, size) in axes.items():
            if point == skip:
                continue
            M = P[point][:size, :size] if size <= sizes[point] else torch.block_diag(
                P[point], torch.eye(size - sizes[point], dtype=torch.float64))
            w = torch.movedim(torch.tensordot(M, w, dims=([1], [axis])), 0, axis) if axis == 0 else \
                torch.movedim(torch.tensordot(w, M.T, dims=([axis], [0])), -1, axis)
        return w

    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for k in torch.randperm(len(points), generator=generator).tolist():
            point = points[k]
            n = sizes[point]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for name, axes in spec:
                for axis, (p, _, size) in axes.items():
                    if p != point:
                        continue
                    w_a = torch.movedim(state_a[name], axis, 0)[:n].reshape(min(n, size), -1)
                    w_b = torch.movedim(permuted(name, axes, point), axis, 0)[:n].reshape(min(n, size), -1)
                    cost[:min(n, size), :min(n, size)] += w_a @ w_b.T
            cols = torch.cat([torch.as_tensor(linear_sum_assignment(cost[lo:hi, lo:hi].numpy(), maximize=True)[1]) + lo
                              for lo, hi in blocks[point]])  # a residual stream's blocks, one Hungarian each
            new = torch.eye(n, dtype=torch.float64)[cols]
            if not torch.equal(new, P[point]):
                changed = True
            P[point] = new
        if not changed:
            break
    return P


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="runs/digits/zoo")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=1437)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    a, b, which = networks(args.zoo, args.width)
    print(f"networks: two ResNet-20s, {which}")

    print("\n1. weight matching")
    ours_perm, ours_full, ref = [], [], []
    for _ in range(args.repeats):  # interleaved
        ours_perm.append(timed(lambda: align(a, b, "weight", "permutations"), 1))
        ours_full.append(timed(lambda: align(a, b, "weight", "full"), 1))
        ref.append(timed(lambda: straightforward_permutation_matching(a, b), 1))
    t_perm, al_perm = statistics.median(t for t, _ in ours_perm), ours_perm[-1][1]
    t_full, al_full = statistics.median(t for t, _ in ours_full), ours_full[-1][1]
    t_ref, P = statistics.median(t for t, _ in ref), ref[-1][1]
    agree = all(torch.equal(al_perm.elements[p], P[p]) for p in P)
    print(f"   symstitch, permutations: {t_perm:7.2f} s ({al_perm.details['passes']} passes)")
    print(f"   symstitch, full G_ReLU:  {t_full:7.2f} s ({al_full.details['passes']} passes, "
          f"converged {al_full.details['converged']})")
    print(f"   straightforward, permutations: {t_ref:7.2f} s")
    print(f"   ratio straightforward / symstitch (permutations): {t_ref / t_perm:.1f}×; same permutations: {agree}")

    print("\n2. activation matching")
    from symstitch.align import evaluation_loader

    if which.startswith("trained"):
        loader = list(evaluation_loader(f"{args.zoo}:resnet20/seed0", None, "train", args.images, 250))
    else:
        generator = torch.Generator().manual_seed(0)
        loader = [(torch.randn(min(250, args.images - k), 3, 32, 32, generator=generator), torch.zeros(1))
                  for k in range(0, args.images, 250)]
    n = sum(len(x) for x, _ in loader)

    def forward_only() -> None:
        with torch.no_grad():
            for x, _ in loader:
                a(x)
                b(x)

    t_act, _ = timed(lambda: align(a, b, "activation", data=loader), args.repeats)
    t_fwd, _ = timed(forward_only, args.repeats)
    print(f"   {n} images, all 19 points: {t_act:.2f} s ({n / t_act:.0f} images/s); the two forward passes alone "
          f"{t_fwd:.2f} s ({t_act / t_fwd:.1f}× that)")
    print(f"\nload average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
