"""``symstitch check``: a one-page sanity report of the symmetry tools on one network.

For every feature point where the weight-space action is defined, a random g ∈ G_σ is applied
(B = g·A, :func:`symstitch.symmetry.act`) and the report shows that B is functionally A (largest logit
difference, agreement of predictions) while its representation at the point is g·h (relative error).
Exit status 1 when any point fails, so the command can guard a pipeline.

    symstitch check --checkpoint zoo/mcnn/seed0/model.ckpt
    symstitch check --arch mcnn --epochs 2        # trains a small digits model on the spot
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table

from symstitch.data import DataModule, normalize_batch
from symstitch.library import load_model
from symstitch.loggers import quiet_by_default
from symstitch.models import StagedNet
from symstitch.symmetry import act, act_on_features, actionable_points, feature, intertwiner_group, sample_action
from symstitch.training import ClassifierModule

#: relative tolerance on logits and representation (float32 rounding is ~1e-7)
TOLERANCE = 1e-5


def train_on_the_spot(arch: str, width: float, epochs: int, seed: int) -> StagedNet:
    """A small network of ``arch`` trained on digits now (for a check without a checkpoint)."""
    quiet_by_default()
    pl.seed_everything(seed, verbose=False)
    dm = DataModule(dataset="digits")
    module = ClassifierModule(arch, arch_kwargs={"width": width}, num_classes=dm.num_classes)
    pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
               enable_progress_bar=False).fit(module, datamodule=dm)
    return module.net.eval()


def check_network(net: StagedNet, x: torch.Tensor, seed: int = 0) -> list[dict]:
    """One row per actionable point: the action's effect on outputs and on the representation."""
    net = net.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = net(x)
    rows = []
    for point in actionable_points(net):
        h = feature(net, point, x)
        g = sample_action(net, point, generator=generator)
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


def check(model: str | None, arch: str = "mcnn", width: float = 0.25, epochs: int = 2, dataset: str = "digits",
          data_root: str = "data", samples: int = 256, seed: int = 0) -> list[dict]:
    """``symstitch check``: the rows of :func:`check_network` for a model reference (checkpoint or library
    entry), or for ``arch`` trained on digits now; prints the report table."""
    if model:
        net, what = load_model(model), model
    else:
        net, what = train_on_the_spot(arch, width, epochs, seed), f"{arch} (trained now on digits)"
    dm = DataModule(dataset=dataset, root=data_root)
    dm.setup()
    x = normalize_batch(dm.test_set.x[:samples], dm.mean, dm.std, channels_last=False)
    rows = check_network(net, x, seed=seed)

    console = Console()
    console.print(f"[bold]symstitch check[/]: {what} — {type(net).__name__}, σ = {net.activation}, "
                  f"{intertwiner_group(net.activation).name}; {len(x)} {dataset} test images")
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
    failed = [r["point"] for r in rows if not r["ok"]]
    if failed:
        console.print(f"[red]function not preserved at: {', '.join(failed)}[/]")
    return rows
