"""How much of B's representation a scaled permutation of A's can explain, per stitch point, in closed form.

For source A and target B (checkpoints or model-library entries) and each stitch point p, with X, Y ∈ R^{n×C}
the activations A_{≤p}(x), B_{≤p}(x) of the training images over every position:

* match channels as G_ReLU-Procrustes does: π = Hungarian(Ŷᵀ X̂) on unit-norm columns, report the mean and
  minimum matched cosine;
* fit y_i ≈ d_i x_{π(i)} + c_i per channel by least squares (d_i ≥ 0): the best G_ReLU map for this matching;
  fit Y ≈ X W + c with a full C×C W: the best unconstrained (``standard``) map;
* report the R² of both fits (mean over B's channels) and the test accuracy of B_{>p}(T(A_{≤p}(x))) for both
  closed-form T, with no training at all.

It separates "the two networks are not related by a scaled permutation at p" from "training the G_ReLU stitch
failed": a trained G_ReLU stitch that lands near the closed-form accuracy found what the channel matching allows.

    python experiments/diagnostics/channel_matching.py --source runs/demo/zoo:resnet20/seed0 \\
        --target runs/demo/zoo:resnet20/seed1
"""

from __future__ import annotations

import argparse
import warnings

import torch

from symstitch.data import normalize_batch
from symstitch.stitch_layers import hungarian
from symstitch.library import datamodule_for, load_pair, load_model


def r_squared(Y: torch.Tensor, fit: torch.Tensor) -> float:
    """Mean over channels of 1 − ‖y − ŷ‖² / ‖y − ȳ‖² (constant channels count as fully explained)."""
    resid = ((Y - fit) ** 2).sum(0)
    total = ((Y - Y.mean(0)) ** 2).sum(0)
    return float(torch.where(total > 0, 1 - resid / total.clamp_min(1e-300), torch.ones_like(total)).mean())


@torch.no_grad()
def analyse(source: str, target: str, point: str, train_x, test_x, test_y) -> dict:
    A, B = load_pair(source, target, point)
    ha, hb = A.forward_to(train_x, point), B.forward_to(train_x, point)
    C = ha.shape[1]
    X = ha.movedim(1, -1).reshape(-1, C).double()
    Y = hb.movedim(1, -1).reshape(-1, C).double()
    unit = lambda Z: Z / Z.norm(dim=0).clamp_min(1e-12)  # noqa: E731
    M = unit(Y).T @ unit(X)
    perm = hungarian(M)
    matched = M[torch.arange(C), perm]
    Xp = X[:, perm]
    xm, ym = Xp.mean(0), Y.mean(0)
    d = (((Xp - xm) * (Y - ym)).sum(0) / ((Xp - xm) ** 2).sum(0).clamp_min(1e-12)).clamp_min(0)
    c = ym - d * xm
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    W = torch.linalg.lstsq(X1, Y).solution

    def scaled_permutation(h):
        z = h.movedim(1, -1)
        return (d.float() * z[..., perm] + c.float()).movedim(-1, 1)

    def linear(h):
        z = h.movedim(1, -1)
        return (torch.cat([z, torch.ones(*z.shape[:-1], 1)], -1) @ W.float()).movedim(-1, 1)

    h_test = A.forward_to(test_x, point)

    def accuracy(T) -> float:
        return float((B.forward_from(T(h_test), point).argmax(1) == test_y).float().mean())

    return {"point": point, "channels": C, "cos_mean": float(matched.mean()), "cos_min": float(matched.min()),
            "r2_gp": r_squared(Y, d * Xp + c), "r2_linear": r_squared(Y, X1 @ W),
            "acc_gp": accuracy(scaled_permutation), "acc_linear": accuracy(linear)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--points", default="all")
    parser.add_argument("--train-images", type=int, default=2000, help="images the fits use")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dm = datamodule_for(args.source)
    dm.setup()
    prep = lambda x: normalize_batch(x, dm.mean, dm.std, channels_last=False)  # noqa: E731
    train_x = prep(dm.train_set.x[: args.train_images])
    test_x, test_y = prep(dm.test_set.x), dm.test_set.y
    net = load_pair(args.source, args.target, _first_point(args.source))[0]
    points = net.stitch_points if args.points == "all" else args.points.split(",")
    print(f"{'point':16s} {'C':>4s} {'cos mean':>8s} {'cos min':>8s} {'R² P·D':>7s} {'R² lin':>7s} "
          f"{'acc P·D':>8s} {'acc lin':>8s}")
    for point in points:
        r = analyse(args.source, args.target, point, train_x, test_x, test_y)
        print(f"{point:16s} {r['channels']:4d} {r['cos_mean']:8.3f} {r['cos_min']:8.3f} {r['r2_gp']:7.3f} "
              f"{r['r2_linear']:7.3f} {r['acc_gp']:8.3f} {r['acc_linear']:8.3f}")


def _first_point(ref: str) -> str:
    return load_model(ref).stitch_points[0]


if __name__ == "__main__":
    main()
