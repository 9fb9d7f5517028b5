"""``symstitch check``: a one-page sanity report of the symmetry tools on one network.

For every feature point where the weight-space action is defined, a random g ∈ G_σ is applied
(B = g·A, :func:`symstitch.symmetry.act`) and the report shows that B is functionally A (largest logit
difference, agreement of predictions) while its representation at the point is g·h (relative error).
Exit status 1 when any point fails, so the command can guard a pipeline.

    symstitch check --checkpoint zoo/mcnn/seed0/model.ckpt
    symstitch check --arch mcnn --epochs 2        # trains a small digits model on the spot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from symstitch.models import StagedNet

#: relative tolerance on logits and representation (float32 rounding is ~1e-7)
TOLERANCE = 1e-5


def _train_on_the_spot(arch: str, width: float, epochs: int, seed: int) -> StagedNet:
    import lightning.pytorch as pl

    from symstitch.data import DataModule
    from symstitch.training import ClassifierModule

    pl.seed_everything(seed, verbose=False)
    dm = DataModule(dataset="digits")
    module = ClassifierModule(arch, arch_kwargs={"width": width}, num_classes=dm.num_classes)
    pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
               enable_progress_bar=False).fit(module, datamodule=dm)
    return module.net.eval()


def check_network(net: StagedNet, x: torch.Tensor, seed: int = 0) -> list[dict]:
    """One row per actionable point: the action's effect on outputs and on the representation."""
    from symstitch.symmetry import act, act_on_features, actionable_points, feature, intertwiner_group

    net = net.eval()
    group = intertwiner_group(net.activation)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = net(x)
    rows = []
    for point in actionable_points(net):
        h = feature(net, point, x)
        g = group.sample(h.shape[1], generator=generator)
        moved = act(net, point, g).eval()
        with torch.no_grad():
            logits_g = moved(x)
        h_g = feature(moved, point, x)
        expected = act_on_features(g.to(h.dtype), h)
        out_diff = (logits_g - logits).abs().max().item()
        rel_out = out_diff / logits.abs().max().clamp_min(1e-12).item()
        rel_feat = ((h_g - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        rows.append({
            "point": point,
            "channels": int(h.shape[1]),
            "max_logit_diff": out_diff,
            "relative_logit_diff": rel_out,
            "prediction_agreement": (logits_g.argmax(1) == logits.argmax(1)).float().mean().item(),
            "relative_feature_error": rel_feat,
            "ok": rel_out <= TOLERANCE and rel_feat <= TOLERANCE,
        })
    return rows


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="symstitch check", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="classifier checkpoint (e.g. from `symstitch zoo`)")
    source.add_argument("--arch", default="mcnn", help="train this architecture on digits on the spot (default mcnn)")
    parser.add_argument("--width", type=float, default=0.25, help="width multiplier of the on-the-spot model")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the on-the-spot model")
    parser.add_argument("--dataset", default="digits", help="inputs: the test split of this dataset")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--samples", type=int, default=256, help="number of test images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random group elements")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from symstitch.checkpoints import load_classifier
    from symstitch.data import DataModule, normalize_batch
    from symstitch.symmetry import actionable_points, intertwiner_group

    if args.checkpoint:
        net, what = load_classifier(args.checkpoint), args.checkpoint
    else:
        net, what = _train_on_the_spot(args.arch, args.width, args.epochs, args.seed), f"{args.arch} (trained now on digits)"
    dm = DataModule(dataset=args.dataset, root=args.data_root)
    dm.setup()
    x = normalize_batch(dm.test_set.x[: args.samples], dm.mean, dm.std, channels_last=False)
    rows = check_network(net, x, seed=args.seed)

    console = Console()
    console.print(f"[bold]symstitch check[/]: {what} — {type(net).__name__}, σ = {net.activation}, "
                  f"{intertwiner_group(net.activation).name}; {len(x)} {args.dataset} test images")
    table = Table(title="B = g·A with a random g at each point: same function, representation g·h")
    table.add_column("point", no_wrap=True)
    for col in ("C", "max|Δlogit|", "rel Δlogit", "same pred", "rel ‖h_B−g·h_A‖", "ok"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["point"], str(r["channels"]), f"{r['max_logit_diff']:.2e}", f"{r['relative_logit_diff']:.2e}",
                      f"{r['prediction_agreement']:.1%}", f"{r['relative_feature_error']:.2e}",
                      "[green]yes[/]" if r["ok"] else "[red]NO[/]")
    console.print(table)
    if not rows:
        console.print(f"[red]{type(net).__name__} has no feature point where the weight-space action is defined[/]")
    undefined = [p for p in net.feature_points if p not in actionable_points(net)]
    if undefined:
        console.print(f"no weight-space action at: {', '.join(undefined)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    failed = [r["point"] for r in rows if not r["ok"]]
    if failed:
        console.print(f"[red]function not preserved at: {', '.join(failed)}[/]")
    return 1 if failed or not rows else 0
