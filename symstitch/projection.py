"""The projection ("sanity test") experiment of SPEC §4 / paper §3.

Take a trained network, insert a fixed random matrix M on the pre-activation of layer l (after its
convolution and BatchNorm, right before σ), freeze every layer up to l and retrain the rest:

    h_l = σ(M · BN(W_l h_{l−1}))

- M ∈ G_σ (a permutation times log-normal positive scales for ReLU; a permutation for sigmoid): since
  σ(M z) = φ_σ(M) σ(z), the next layer can absorb φ_σ(M)^{-1} exactly and the accuracy comes back;
- M Haar-random orthogonal: σ(M z) is in general not a linear function of σ(z), so nothing guarantees it;
- M = I: the control, retraining alone.

SPEC §4 says "after the convolution of layer l"; where BatchNorm sits between the convolution and σ, M goes
after the BatchNorm, so that it meets σ directly and the intertwiner identity applies exactly (inserted
between the convolution and BatchNorm, M would be followed by a per-channel affine map first). For the
networks without BatchNorm the two places coincide.

What is retrained is chosen by name: ``rest`` (SPEC §4: every layer after l) or ``next`` (only the layer
right after l, W_{l+1}: the sharpest form of the test, since that single linear map can absorb a G_σ
insertion exactly, W_{l+1} φ_σ(M)^{-1}, but not an orthogonal one).

:class:`ProjectionModule` is one cell (usable with ``symstitch fit``) and :func:`run_cell` runs one; the grid
(layers × matrix kinds × repeats over networks) is a projection sweep of :mod:`symstitch.sweep`, which
``symstitch projection`` writes and runs; :func:`write_report` makes a tidy CSV, a plot and a markdown summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

from symstitch.checkpoints import load_classifier
from symstitch.models import StagedNet
from symstitch.registry import Registry
from symstitch.symmetry import haar_orthogonal, intertwiner_group, next_layer
from symstitch.training import SGD, WarmupCosine, configure_schedule

#: kind name → ``(net, n, generator) → n×n matrix`` (float64)
MATRICES: Registry[Callable[[StagedNet, int, torch.Generator], torch.Tensor]] = Registry("matrix kind")


@MATRICES.register("identity")
def _identity(net: StagedNet, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


@MATRICES.register("group")
def _group(net: StagedNet, n: int, generator: torch.Generator) -> torch.Tensor:
    return intertwiner_group(net.activation).sample(n, generator=generator)


@MATRICES.register("orthogonal")
def _orthogonal(net: StagedNet, n: int, generator: torch.Generator) -> torch.Tensor:
    return haar_orthogonal(n, generator=generator)


def projection_points(net: StagedNet) -> tuple[str, ...]:
    """Points where the experiment is defined: stitch points that are activation outputs (cuts)."""
    features = set(net.feature_points)
    return tuple(p for p in net.stitch_points if p in features)


class ProjectionModule(pl.LightningModule):
    """One cell: a trained network with M inserted before the activation at ``point``; layers ≤ l frozen.

    Args:
        checkpoint: classifier checkpoint of the trained network.
        point: where to insert (see :func:`projection_points`).
        matrix: ``identity``, ``group`` (a random element of G_σ for the network's σ) or ``orthogonal``.
        matrix_seed: seed of M.
        retrain: ``rest`` (every layer after ``point``) or ``next`` (only the layer right after it).
        optimizer, scheduler: for the retrained layers (after ``point``), which start from their trained weights.

    The frozen part stays in eval mode (BatchNorm statistics untouched) even while the rest trains.
    Logs ``val/acc`` and ``test/acc``; :attr:`inserted_acc` is measured by ``trainer.validate`` before fit.
    """

    def __init__(
        self,
        checkpoint: str,
        point: str,
        matrix: str = "group",
        matrix_seed: int = 0,
        retrain: Literal["rest", "next"] = "rest",
        optimizer: OptimizerCallable = SGD,
        scheduler: Optional[LRSchedulerCallable] = WarmupCosine,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = load_classifier(checkpoint)
        valid = projection_points(self.net)
        if point not in valid:
            raise ValueError(f"no projection point {point!r} in {type(self.net).__name__}; valid: {', '.join(valid)}")
        n = self.net.feature_shapes()[point][0]
        generator = torch.Generator().manual_seed(matrix_seed)
        M = MATRICES.get(matrix)(self.net, n, generator)
        self.register_buffer("M", M.to(torch.float32))
        self.net.get_submodule(point).register_forward_pre_hook(self._insert)
        if retrain == "rest":
            self.num_frozen = self.net.check_stitch_point(point) + 1
            for module in self.frozen_stages():
                module.requires_grad_(False)
        elif retrain == "next":
            self.num_frozen = len(self.net.stages()) + 1  # everything frozen (eval, head too) but one layer
            self.net.requires_grad_(False)
            next_layer(self.net, point).requires_grad_(True)
        else:
            raise ValueError(f"retrain is 'rest' or 'next', got {retrain!r}")
        self.train()  # retrained layers in train mode, frozen ones in eval mode (see `train`)
        self.optimizer, self.scheduler = optimizer, scheduler
        num_classes = self.net.num_classes
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def _insert(self, _module, inputs):
        (z,) = inputs
        return (torch.einsum("ij,nj...->ni...", self.M.to(z.dtype), z),)

    def frozen_stages(self) -> list[torch.nn.Module]:
        """The stages up to and including the one that ends at ``point``."""
        stages = [module for _, module in self.net.stages()] + [self.net.head]
        return stages[: self.num_frozen]

    def train(self, mode: bool = True):
        super().train(mode)
        frozen = self.frozen_stages()
        for module in frozen:
            module.eval()  # frozen layers never update BatchNorm statistics
        if len(frozen) > len(self.net.stages()):
            self.net.eval()
        return self

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(self.net(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc.update(self.net(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        return configure_schedule(self, self.optimizer(params), self.scheduler)


# ----------------------------------------------------------------------------------------------------------
# The grid: networks × points × matrix kinds × repeats


def _quiet_trainer(max_epochs: int, root: Path) -> pl.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="auto",
        devices=1,
        logger=CSVLogger(root, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _accuracy(module: pl.LightningModule, datamodule: pl.LightningDataModule, root: Path) -> float:
    (res,) = _quiet_trainer(1, root).test(module, datamodule=datamodule, verbose=False)
    return float(res["test/acc"])


def run_cell(source: str, checkpoint: Path, point: str, kind: str, repeat: int, epochs: int, lr: float,
             datamodule: pl.LightningDataModule, cell_dir: Path, retrain: str = "rest") -> dict:
    """Insert, measure, retrain, measure; returns the cell's record."""
    pl.seed_everything(repeat, verbose=False)
    module = ProjectionModule(
        str(checkpoint), point, matrix=kind, matrix_seed=repeat, retrain=retrain,
        optimizer=lambda params: SGD(params, lr=lr), scheduler=lambda opt: WarmupCosine(opt, warmup=0.1),
    )
    inserted = _accuracy(module, datamodule, cell_dir / "before")
    trainer = _quiet_trainer(epochs, cell_dir)
    trainer.fit(module, datamodule=datamodule)
    (res,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return {
        "network": source,
        "activation": module.net.activation,
        "point": point,
        "layer": projection_points(module.net).index(point) + 1,
        "matrix": kind,
        "retrain": retrain,
        "repeat": repeat,
        "inserted_acc": inserted,
        "recovered_acc": float(res["test/acc"]),
        "epochs": epochs,
        "lr": lr,
    }


def clean_accuracy(checkpoint: Path, datamodule: pl.LightningDataModule, root: Path) -> float:
    """Test accuracy of the unmodified network, measured once and kept in ``root/clean.json``."""
    path = root / "clean.json"
    if not path.exists():
        from symstitch.sweep import write_json_atomic

        write_json_atomic(path, {"clean_acc": _accuracy(_PlainClassifier(checkpoint), datamodule, root)})
    return json.loads(path.read_text())["clean_acc"]


class _PlainClassifier(pl.LightningModule):
    """A trained classifier, for measuring its clean test accuracy."""

    def __init__(self, checkpoint: Path):
        super().__init__()
        self.net = load_classifier(checkpoint)
        self.test_acc = MulticlassAccuracy(self.net.num_classes, average="micro")

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc.update(self.net(x), y)
        self.log("test/acc", self.test_acc)


# ----------------------------------------------------------------------------------------------------------
# Report: tidy CSV, plot, markdown


def write_report(records: list[dict], out: Path) -> dict[str, Path]:
    """``projection.csv`` (one row per cell), ``projection.png`` and ``projection.md`` in ``out``."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    columns = ["network", "activation", "point", "layer", "matrix", "retrain", "repeat", "clean_acc", "inserted_acc",
               "recovered_acc", "epochs", "lr"]
    csv_path = out / "projection.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in sorted(records, key=lambda r: (r["network"], r["layer"], r["matrix"], r["repeat"])):
            writer.writerow({c: r[c] for c in columns})

    networks = sorted({r["network"] for r in records})
    series_keys = sorted({(r["matrix"], r["retrain"]) for r in records})
    fig, axes = plt.subplots(1, len(networks), figsize=(4.6 * len(networks), 3.6), squeeze=False)
    summary = []
    for ax, network in zip(axes[0], networks):
        rows = [r for r in records if r["network"] == network]
        clean = rows[0]["clean_acc"]
        ax.axhline(clean, color="black", linestyle=":", label="clean")
        for kind, retrain in series_keys:
            by_layer: dict[int, list[dict]] = {}
            for r in rows:
                if (r["matrix"], r["retrain"]) == (kind, retrain):
                    by_layer.setdefault(r["layer"], []).append(r)
            if not by_layer:
                continue
            layers = sorted(by_layer)
            mean = lambda key, l: sum(r[key] for r in by_layer[l]) / len(by_layer[l])  # noqa: E731
            recovered = [mean("recovered_acc", l) for l in layers]
            inserted = [mean("inserted_acc", l) for l in layers]
            label = f"{kind}, retrain {retrain}"
            line = ax.plot(layers, recovered, marker="o", label=label)[0]
            ax.plot(layers, inserted, marker="x", linestyle="--", color=line.get_color(), alpha=0.5,
                    label=f"{label}: before retraining")
            summary.append((network, rows[0]["activation"], kind, retrain, clean, inserted, recovered, layers))
        ax.set_title(f"{network} ({rows[0]['activation']})")
        ax.set_xlabel("layer l (M inserted before its activation)")
        ax.set_ylabel("test accuracy")
        ax.set_xticks(sorted({r["layer"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    png = out / "projection.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)

    lines = ["# Projection experiment (SPEC §4)", "",
             "A fixed matrix M is inserted before the activation of layer l and the network is retrained with",
             "layers ≤ l frozen: every later layer (retrain `rest`) or only layer l+1 (retrain `next`), starting",
             "from their trained weights. Test accuracy, mean over repeats.", "",
             "| network | σ | M | retrain | clean | before retraining | after retraining | worst gap to clean |",
             "|---|---|---|---|---|---|---|---|"]
    for network, activation, kind, retrain, clean, inserted, recovered, layers in summary:
        fmt = lambda accs: ", ".join(f"l{l}: {a:.3f}" for l, a in zip(layers, accs))  # noqa: E731
        worst = min(recovered) - clean
        lines.append(f"| {network} | {activation} | {kind} | {retrain} | {clean:.3f} | {fmt(inserted)} | "
                     f"{fmt(recovered)} | {worst * 100:+.1f} pts |")
    lines += ["", f"![accuracy per layer]({png.name})", "", f"Data: [{csv_path.name}]({csv_path.name})", ""]
    md = out / "projection.md"
    md.write_text("\n".join(lines))
    return {"csv": csv_path, "png": png, "md": md}


def main(argv: Sequence[str]) -> int:
    """``symstitch projection``: trains the missing networks into a model library, then runs the experiment as a
    projection sweep (``<out>/projection.yaml``, resumable cells) and writes its report."""
    parser = argparse.ArgumentParser(
        prog="symstitch projection",
        description="The projection experiment: insert M before the activation of each layer of trained "
        "networks, freeze up to it, retrain the rest.",
        epilog="Networks come from a model library (--zoo, --models, --seed); missing ones are trained first "
        "with `symstitch zoo`, and any other option is passed to that training (e.g. --data.dataset digits "
        "--trainer.max_epochs 15). The cells retrain on the dataset the networks were trained on.",
    )
    parser.add_argument("--zoo", default="runs/projection/zoo", help="model library folder")
    parser.add_argument("--models", default="mcnn,mcnn_sigmoid", help="architectures (a ReLU and a sigmoid net)")
    parser.add_argument("--seed", type=int, default=0, help="which seed of each architecture")
    parser.add_argument("--kinds", default="identity,group,orthogonal", help=f"matrix kinds: {', '.join(MATRICES)}")
    parser.add_argument("--points", default="all", help="comma-separated points, or all")
    parser.add_argument("--repeats", type=int, default=1, help="random matrices per cell")
    parser.add_argument("--epochs", type=int, default=8, help="retraining epochs per cell")
    parser.add_argument("--lr", type=float, default=0.05, help="retraining learning rate (SGD, cosine)")
    parser.add_argument("--retrain", choices=["rest", "next"], default="rest",
                        help="retrain every layer after l (rest, SPEC §4) or only the next one (next)")
    parser.add_argument("--out", default="runs/projection", help="results folder")
    args, fit_args = parser.parse_known_args(argv)
    import yaml

    from symstitch.report import write_report as report
    from symstitch.sweep import run_generated
    from symstitch.zoo import train_zoo

    archs = args.models.split(",")
    data = []
    for arch in archs:
        (entry,) = train_zoo(arch, [args.seed], args.zoo, fit_args)
        trained_on = yaml.safe_load((Path(args.zoo) / entry["config"]).read_text())["data"]
        data.append((trained_on["dataset"], trained_on.get("root", "data")))
    if len(set(data)) > 1:
        parser.error(f"the networks were trained on different data: {data}")
    for kind in args.kinds.split(","):
        MATRICES.get(kind)  # unknown kinds fail before any work
    config = {"experiment": "projection", "zoo": str(Path(args.zoo).resolve()), "archs": archs, "seed": args.seed,
              "kinds": args.kinds.split(","), "points": "all" if args.points == "all" else args.points.split(","),
              "repeats": args.repeats, "epochs": args.epochs, "lr": args.lr, "retrain": args.retrain}
    out = Path(args.out)
    run_generated(config, out, "symstitch projection")
    md = report(out)
    summary = md.parent / "projection" / "projection.md"
    print(summary.read_text())
    print(f"projection: {summary.parent / 'projection.csv'}, {summary.parent / 'projection.png'}, {summary}")
    return 0
