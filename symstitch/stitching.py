"""Model stitching (SPEC §2): S(x) = B_{>p}(T(A_{≤p}(x))), where only the stitching layer T trains.

A (source) and B (target) are trained networks of the same architecture, cut at the stitch point p. They are
frozen: no gradients, eval mode throughout (BatchNorm running statistics never change), parameters AND
buffers bit-identical before and after stitching. The stitching penalty is

    penalty(p) = (acc(A) + acc(B)) / 2 − acc(S),

all three measured on the same evaluation split with torchmetrics objects (exact under DDP).

G_σ stitches (``birkhoff``, ``softsort``) train in phases: relaxed for ``relaxed_epochs`` epochs, then
:meth:`~symstitch.stitch_layers.StitchLayer.harden` (Hungarian rounding: T becomes a true P·D) and the
remaining epochs fine-tune only the scales and bias. Evaluation always uses the hardened form: during the
relaxed phase a hardened copy of T is evaluated.

The projection onto the constraint set runs in :meth:`StitchingModule.on_after_optimizer_step`, called
exactly once after every real optimizer step by a torch optimizer step post-hook registered at fit start —
so steps skipped by a mixed-precision GradScaler and micro-batches of gradient accumulation do not count.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

from symstitch.checkpoints import CheckpointError, classifier_spec, load_classifier, read_checkpoint
from symstitch.models import StagedNet
from symstitch.stitch_layers import StitchLayer, build_stitch_layer
from symstitch.training import configure_schedule


def resolve_model(ref: Union[str, Path]) -> Path:
    """A checkpoint path, or a model-library entry ``<zoo folder>:<arch>/seed<k>`` → its checkpoint path."""
    ref = str(ref)
    path = Path(ref)
    if path.is_file():
        return path
    if ":" in ref:
        from symstitch.zoo import Manifest

        root, key = ref.rsplit(":", 1)
        manifest = Manifest(root)
        models = manifest.load()
        if key not in models:
            raise CheckpointError(
                f"{manifest.path} has no model {key!r}; it has: {', '.join(models) or '(none)'}"
            )
        return manifest.checkpoint(models[key])
    raise CheckpointError(f"{ref!r} is neither a checkpoint file nor a model-library entry '<zoo>:<arch>/seed<k>'")


def load_pair(source: Union[str, Path], target: Union[str, Path], point: str) -> tuple[StagedNet, StagedNet]:
    """Source and target networks, checked to be stitchable at ``point`` (before anything trains)."""
    paths = resolve_model(source), resolve_model(target)
    specs = [classifier_spec(read_checkpoint(p), p) for p in paths]
    if specs[0] != specs[1]:
        raise ValueError(
            f"source and target must share an architecture to be stitched: {paths[0]} is {specs[0]}, "
            f"{paths[1]} is {specs[1]}"
        )
    nets = load_classifier(paths[0]), load_classifier(paths[1])
    nets[0].check_stitch_point(point)  # unknown point → the list of valid ones
    shapes = [n.feature_shapes()[point] for n in nets]
    if shapes[0] != shapes[1]:
        raise ValueError(f"representations at {point!r} differ in shape: source {shapes[0]}, target {shapes[1]}")
    return nets


def _freeze(net: StagedNet) -> StagedNet:
    net.requires_grad_(False)
    return net.eval()


class StitchingModule(pl.LightningModule):
    """Trains a stitching layer between a frozen source prefix and a frozen target suffix.

    Args:
        source: source network A: a classifier checkpoint or a model-library entry ``<zoo>:<arch>/seed<k>``.
        target: target network B, likewise.
        point: the stitch point p (``net.stitch_points``).
        layer: stitching layer by registry name: ``standard``, ``birkhoff``, ``softsort``, ``lasso``, ``lowrank``.
        layer_kwargs: its options (e.g. ``{alpha: 0.01, projection: euclidean}``, ``{rank: 8}``, ``{norm: before}``).
        relaxed_epochs: epochs before ``harden()`` for layers that have a hardened form (then fine-tuning);
            ``None`` hardens only at the end of fit.
        init: ``random`` (the layer's own start) or ``data``: the layer's data-driven start from A's and B's
            activations on a few training batches (least squares for ``standard``/``lasso``, channel
            matching for ``birkhoff``).
        optimizer, scheduler: for the stitching layer's parameters.
        prefix_cache: ``None`` (default), or the dtype (``float32``, ``bfloat16``) of a cache of A_{≤p}(x) for
            every training image, computed once at fit start: training then skips the frozen prefix and
            augmentation (the stitch sees the un-augmented training images). Validation and test still run
            the whole source, stitched and target networks on the evaluation images. Needs the package's
            :class:`~symstitch.data.DataModule`; the cache lives in host memory (N·C·H·W values).
    """

    def __init__(
        self,
        source: str,
        target: str,
        point: str,
        layer: str = "birkhoff",
        layer_kwargs: Optional[dict[str, Any]] = None,
        relaxed_epochs: Optional[int] = None,
        init: Literal["random", "data"] = "random",
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: Optional[LRSchedulerCallable] = None,
        prefix_cache: Optional[Literal["float32", "bfloat16"]] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.source_net, self.target_net = (_freeze(n) for n in load_pair(source, target, point))
        self.point = point
        channels = self.source_net.feature_shapes()[point][0]
        self.stitch = build_stitch_layer(layer, channels, activation=self.source_net.activation, **(layer_kwargs or {}))
        if init not in ("random", "data"):
            raise ValueError(f"init is 'random' or 'data', got {init!r}")
        if init == "data" and not hasattr(self.stitch, "init_from_data"):
            raise ValueError(f"the {layer!r} layer has no data-driven initialisation; use init='random'")
        self.optimizer, self.scheduler = optimizer, scheduler
        num_classes = self.source_net.num_classes
        self.accuracy = torch.nn.ModuleDict(
            {k: MulticlassAccuracy(num_classes, average="micro") for k in ("stitch", "source", "target")}
        )
        if prefix_cache not in (None, "float32", "bfloat16"):
            raise ValueError(f"prefix_cache is None, 'float32' or 'bfloat16'; got {prefix_cache!r}")
        self._hooks: list = []
        self._uncached_train_set = None  # the DataModule's image train set while the cache replaces it
        self.__dict__["_eval_layer"] = None  # the evaluated form; not a registered submodule

    # ------------------------------------------------------------------ frozen parts stay frozen
    def train(self, mode: bool = True):
        super().train(mode)
        self.source_net.eval()
        self.target_net.eval()
        return self

    # ------------------------------------------------------------------ forward
    def stitched(self, x: torch.Tensor, layer: Optional[StitchLayer] = None) -> torch.Tensor:
        with torch.no_grad():
            h = self.source_net.forward_to(x, self.point)
        return self.target_net.forward_from((layer or self.stitch)(h), self.point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stitched(x)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        if stage == "fit" and isinstance(strategy, DDPStrategy) and self.hparams.relaxed_epochs is not None:
            # harden() mid-fit stops the relaxed parameters (W, θ) from taking part in the loss; DDP wraps the
            # module after this hook and must then look for parameters without gradients
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)
        # before configure_optimizers, which may already ask the fit loop for its train loader (step counts)
        if stage == "fit" and self.hparams.prefix_cache and self._uncached_train_set is None:
            self.source_net.to(self.trainer.strategy.root_device)
            self._cache_prefix(getattr(torch, self.hparams.prefix_cache))

    def teardown(self, stage: str) -> None:
        if self._uncached_train_set is not None:  # the DataModule gets its images back, also after an error
            self.trainer.datamodule.train_set, self._uncached_train_set = self._uncached_train_set, None

    def on_fit_start(self) -> None:
        self.train()
        if self.hparams.init == "data" and not self.trainer.ckpt_path:  # a resumed fit keeps its restored T
            self._init_from_data()
        for opt in self.trainer.optimizers:
            self._hooks.append(opt.register_step_post_hook(lambda *_: self.on_after_optimizer_step()))

    def on_fit_end(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if hasattr(self.stitch, "harden"):
            self.stitch.harden()  # the result is always the exact evaluated form

    def on_after_optimizer_step(self) -> None:
        """Projection onto the constraint set: runs once after every real optimizer step."""
        self.stitch.on_after_optimizer_step()

    def on_train_epoch_start(self) -> None:
        relaxed = self.hparams.relaxed_epochs
        if relaxed is not None and self.current_epoch >= relaxed and not self.stitch.hardened:
            self.stitch.harden()

    @torch.no_grad()
    def _init_from_data(self, batches: int = 4) -> None:
        dm = self.trainer.datamodule
        if self._uncached_train_set is not None:  # training sees un-augmented images: so does the start
            from symstitch.data import normalize_batch

            images = self._uncached_train_set.x
            idx = torch.randperm(len(images))[: batches * dm.batch_size]
            h_a = self._from_cache(dm.train_set.x[idx].to(self.device))
            x = normalize_batch(images[idx].to(self.device), dm.mean, dm.std, dm.channels_last)
            h_b = self.target_net.forward_to(x, self.point)
        else:
            h_a, h_b = [], []
            for i, batch in enumerate(dm.train_dataloader()):
                if i == batches:
                    break
                # the strategy runs the transfer hooks too (augmentation and normalisation on the device)
                batch = self.trainer.strategy.batch_to_device(batch, self.device)
                h_a.append(self.source_net.forward_to(batch[0], self.point))
                h_b.append(self.target_net.forward_to(batch[0], self.point))
            h_a, h_b = torch.cat(h_a), torch.cat(h_b)
        self.stitch.init_from_data(h_a, h_b)
        # each rank saw its own batches: every rank starts from rank 0's fit (DDP never re-syncs weights)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in [*self.stitch.parameters(), *self.stitch.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)

    @torch.no_grad()
    def _cache_prefix(self, dtype: torch.dtype) -> None:
        """Swap the DataModule's training images for A_{≤p}(x) of each un-augmented training image.

        Stored (N, H, W, C) on the host, so that a batch read back as (N, C, H, W) is channels_last. The
        DataModule passes floating-point batches through untouched; :meth:`teardown` restores the images.
        """
        from symstitch.data import DataModule, TensorImageDataset, normalize_batch

        dm = self.trainer.datamodule
        if not isinstance(dm, DataModule):
            raise ValueError("prefix_cache needs symstitch.data.DataModule (it reads its in-memory training images)")
        dm.setup()
        images, labels = dm.train_set.x, dm.train_set.y
        parts = []
        for i in range(0, len(images), dm.eval_batch_size):
            x = normalize_batch(images[i:i + dm.eval_batch_size].to(self.device), dm.mean, dm.std, dm.channels_last)
            h = self.source_net.forward_to(x, self.point)
            parts.append(h.movedim(1, -1).to("cpu", dtype).contiguous() if h.dim() == 4 else h.to("cpu", dtype))
        self._uncached_train_set = dm.train_set
        dm.train_set = TensorImageDataset(torch.cat(parts), labels)

    @staticmethod
    def _from_cache(h: torch.Tensor) -> torch.Tensor:
        """A cached batch, stored (N, H, W, C), as the (N, C, H, W) float32 view the stitch layer takes."""
        return (h.movedim(-1, 1) if h.dim() == 4 else h).float()

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self._uncached_train_set is not None:  # x holds cached A_{≤p}(x)
            h = self._from_cache(x)
            logits = self.target_net.forward_from(self.stitch(h), self.point)
        else:
            logits = self.stitched(x)
        loss = F.cross_entropy(logits, y) + self.stitch.regularization()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.stitch.parameters() if p.requires_grad]
        return configure_schedule(self, self.optimizer(params), self.scheduler)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self.__dict__["_eval_layer"] = self._hardened_layer()

    def on_test_epoch_start(self) -> None:
        self.__dict__["_eval_layer"] = self._hardened_layer()

    def _hardened_layer(self) -> StitchLayer:
        """The exact evaluated form of T (a hardened copy while T is still relaxed)."""
        if self.stitch.hardened:
            return self.stitch
        layer = copy.deepcopy(self.stitch)
        layer.harden()
        return layer.eval()

    def _evaluate(self, batch) -> None:
        x, y = batch
        outputs = {
            "stitch": self.stitched(x, self._eval_layer),
            "source": self.source_net(x),
            "target": self.target_net(x),
        }
        for name, logits in outputs.items():
            self.accuracy[name].update(logits, y)

    def _log_epoch(self, prefix: str) -> None:
        acc = {name: metric.compute() for name, metric in self.accuracy.items()}
        for name, value in acc.items():
            self.log(f"{prefix}{name}/acc", value, sync_dist=False)
        penalty = (acc["source"] + acc["target"]) / 2 - acc["stitch"]
        self.log(f"{prefix}stitch/penalty", penalty, prog_bar=True, sync_dist=False)
        for metric in self.accuracy.values():
            metric.reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("")
        self._log_permutation()

    def _log_permutation(self) -> None:
        """The evaluated T of a G stitch (a scaled permutation matrix) as an image, for W&B dashboards."""
        if self.trainer.sanity_checking or not hasattr(self.stitch, "permutation"):
            return
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if loggers and self.trainer.is_global_zero:
            T = (self._eval_layer or self.stitch).matrix().detach().abs().float().cpu()
            image = (T / T.max().clamp_min(1e-12)).numpy()
            for lg in loggers:
                lg.log_image("stitch/matrix", [image], step=self.global_step,
                             caption=[f"{self.hparams.layer} at {self.point} (|T|, rows: target channels)"])

    def test_step(self, batch, batch_idx):
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test/")

    # ------------------------------------------------------------------ result
    def summary(self) -> dict:
        """The learned layer, for result files: its description (permutation, scales, sparsity, rank)."""
        return {"point": self.point, "layer": self.hparams.layer, **self.stitch.describe()}


@dataclass
class StitchResult:
    """What :func:`stitch` returns; ``permutation`` where the layer defines one."""

    point: str
    layer_name: str
    penalty: float
    stitched_acc: float
    source_acc: float
    target_acc: float
    layer: StitchLayer = field(repr=False)
    permutation: Optional[list[int]] = None
    description: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "layer"}
        return json.dumps(data, indent=2)


def stitch(
    source: Union[str, Path],
    target: Union[str, Path],
    point: str,
    layer: str = "birkhoff",
    datamodule: Optional[pl.LightningDataModule] = None,
    layer_kwargs: Optional[dict] = None,
    relaxed_epochs: Optional[int] = None,
    init: str = "random",
    optimizer: OptimizerCallable = torch.optim.Adam,
    prefix_cache: Optional[str] = None,
    **trainer_kwargs: Any,
) -> StitchResult:
    """Stitch ``source`` into ``target`` at ``point`` and evaluate, from Python (a notebook, a script).

    The arguments are those of :class:`StitchingModule`; ``trainer_kwargs`` go to ``lightning.pytorch.Trainer``
    (defaults: 5 epochs, no logger, no checkpoints).
    """
    from symstitch.data import DataModule

    datamodule = datamodule or DataModule(dataset="digits")
    module = StitchingModule(str(source), str(target), point, layer=layer, layer_kwargs=layer_kwargs,
                             relaxed_epochs=relaxed_epochs, init=init, optimizer=optimizer,
                             prefix_cache=prefix_cache)
    defaults = dict(max_epochs=5, logger=False, enable_checkpointing=False, enable_model_summary=False,
                    enable_progress_bar=False, num_sanity_val_steps=0)
    trainer = pl.Trainer(**{**defaults, **trainer_kwargs})
    with warnings.catch_warnings():
        # the frozen source and target are in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r".*LeafSpec")
        trainer.fit(module, datamodule=datamodule)
        (res,) = trainer.test(module, datamodule=datamodule, verbose=False)
    described = module.stitch.describe()
    perm = getattr(module.stitch, "permutation", None)
    return StitchResult(
        point=point,
        layer_name=layer,
        penalty=float(res["test/stitch/penalty"]),
        stitched_acc=float(res["test/stitch/acc"]),
        source_acc=float(res["test/source/acc"]),
        target_acc=float(res["test/target/acc"]),
        layer=module.stitch,
        permutation=[int(i) for i in perm] if perm is not None else None,
        description=described,
    )


# ----------------------------------------------------------------------------------------------------------
# Every stitch point × layer for one pair: `symstitch stitch` (a stitch sweep over one pair)


def datamodule_settings(checkpoint: Union[str, Path]) -> dict:
    """The DataModule arguments a checkpoint was trained with (its saved hyper-parameters, without the extras
    LightningCLI adds); empty when it saved none."""
    import inspect

    from symstitch.data import DataModule

    saved = read_checkpoint(resolve_model(checkpoint)).get("datamodule_hyper_parameters") or {}
    return {k: v for k, v in saved.items() if k in inspect.signature(DataModule).parameters}


def datamodule_for(checkpoint: Union[str, Path]):
    """The DataModule a checkpoint was trained with, else digits."""
    from symstitch.data import DataModule

    return DataModule(**datamodule_settings(checkpoint))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main(argv) -> int:
    """``symstitch stitch``: writes ``<out>/stitch.yaml`` (a stitch sweep over this one pair), runs its cells
    through :mod:`symstitch.sweep` (resumable) and reports them (:mod:`symstitch.report`)."""
    import argparse
    import hashlib

    import yaml
    from rich.console import Console
    from rich.table import Table

    from symstitch.report import write_report
    from symstitch.stitch_layers import STITCH_LAYERS
    from symstitch.sweep import run_generated

    parser = argparse.ArgumentParser(prog="symstitch stitch",
                                     description="Stitch two networks at every stitch point with several layers.")
    parser.add_argument("--source", required=True, help="checkpoint or model-library entry <zoo>:<arch>/seed<k>")
    parser.add_argument("--target", required=True, help="likewise")
    parser.add_argument("--points", default="all", help="comma-separated stitch points, or all")
    parser.add_argument("--layers", default="standard,birkhoff", help="stitching layers (registry names)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--relaxed-epochs", type=int, default=3, help="for birkhoff/softsort, before hardening")
    parser.add_argument("--lr", type=float, default=0.005, help="Adam learning rate")
    parser.add_argument("--init", choices=["data", "random"], default="data",
                        help="start from the data (standard, lasso: least squares; birkhoff: channel matching)")
    parser.add_argument("--prefix-cache", choices=["float32", "bfloat16"], default=None,
                        help="train on cached source activations of the un-augmented training images")
    parser.add_argument("--out", default="runs/stitch", help="results folder")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    layers = args.layers.split(",")
    if args.init == "data":
        lacking = [name for name in layers if not hasattr(STITCH_LAYERS.get(name), "init_from_data")]
        if lacking:
            parser.error(f"--init data: the {', '.join(lacking)} layer(s) have no data-driven start; use --init random")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the data the source was trained on (its DataModule settings), else the stitch configs' default
    saved = datamodule_settings(args.source)
    data = []
    if saved:  # named by its content: a folder's earlier runs keep pointing at their own data settings
        text = yaml.safe_dump(saved, sort_keys=False)
        path = out / f"data-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml"
        path.write_text(text)
        data = ["--data", str(path.resolve())]
    config = {
        "experiment": "stitch", "source": args.source, "target": args.target,
        "points": "all" if args.points == "all" else args.points.split(","), "layers": layers, "repeats": 1,
        "stitch_config": str(CONFIGS / "stitch" / "{layer}.yaml"),
        "fit_args": [*data, "--trainer.max_epochs", str(args.epochs), "--model.init_args.relaxed_epochs",
                     str(args.relaxed_epochs), "--model.init_args.init", args.init,
                     "--model.init_args.optimizer.init_args.lr", str(args.lr),
                     *(["--model.init_args.prefix_cache", args.prefix_cache] if args.prefix_cache else []),
                     "--config", str(CONFIGS / "logger" / "csv.yaml"), "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
                     "--trainer.limit_val_batches", "0"],
    }
    records = run_generated(config, out, "symstitch stitch")
    report = write_report(out)

    table = Table(title="stitching penalty = (acc A + acc B)/2 − acc stitched, in points")
    table.add_column("stitch point", no_wrap=True)
    for layer in layers:
        table.add_column(layer, justify="right")
    for point in dict.fromkeys(r["cell"]["point"] for r in records):
        cells = {r["cell"]["layer"]: r["result"] for r in records if r["cell"]["point"] == point}
        table.add_row(point, *[f"{100 * cells[l]['penalty']:+.2f}" if l in cells else "" for l in layers])
    Console().print(table)
    print(f"stitch: {report.parent / 'stitch.csv'}, {report.parent / 'stitch_penalty.png'}, {report}")
    return 0
