"""The projection ("sanity test") experiment of docs/method.md §4 / paper §3.

Take a trained network, insert a fixed random matrix M on the pre-activation of layer l (after its
convolution and BatchNorm, right before σ), freeze every layer up to l and retrain the rest:

    h_l = σ(M · BN(W_l h_{l−1}))

- M ∈ G_σ (a permutation times log-normal positive scales for ReLU; a permutation for sigmoid): since
  σ(M z) = φ_σ(M) σ(z), the next layer can absorb φ_σ(M)^{-1} exactly and the accuracy comes back;
- M Haar-random orthogonal: σ(M z) is in general not a linear function of σ(z), so nothing guarantees it;
- M = I: the control, retraining alone.

docs/method.md §4 says "after the convolution of layer l"; where BatchNorm sits between the convolution and σ, M goes
after the BatchNorm, so that it meets σ directly and the intertwiner identity applies exactly (inserted
between the convolution and BatchNorm, M would be followed by a per-channel affine map first). For the
networks without BatchNorm the two places coincide.

What is retrained is chosen by name: ``rest`` (docs/method.md §4: every layer after l) or ``next`` (only the layer
right after l, W_{l+1}: the sharpest form of the test, since that single linear map can absorb a G_σ
insertion exactly, W_{l+1} φ_σ(M)^{-1}, but not an orthogonal one).

The retraining budget is ``epochs`` × ``lr`` × ``train_fraction``: retraining on a class-stratified random
fraction of the network's training split (:class:`TrainingSubset`) limits how much the retrained layers can
relearn from the data alone, so that what the inserted representation σ(M z) still offers them decides the
outcome (on a task as easy as digits, the full split and enough epochs relearn everything whatever M was).

:class:`ProjectionModule` is one cell (usable with ``symstitch fit``); :class:`ProjectionExperiment` is the grid
(networks × layers × matrix kinds × repeats), which ``symstitch projection`` writes and runs;
:func:`symstitch.reports.projection.projection_files` makes its tidy CSV, plot and markdown summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.classification import MulticlassAccuracy

from symstitch.checkpoints import classifier_spec, load_classifier, read_checkpoint
from symstitch.data import DataModule, TensorImageDataset
from symstitch.defaults import PROJECTION_ARCHS
from symstitch.io import parse_range, read_json, write_json
from symstitch.library import datamodule_settings, library_models, load_model, resolve_model
from symstitch.loggers import quiet_by_default
from symstitch.models import StagedNet
from symstitch.registry import Registry
from symstitch.runner import EXPERIMENTS, Cell, Experiment, names
from symstitch.symmetry import haar_orthogonal, intertwiner_group, next_layer
from symstitch.training import SGD, WarmupCosine, configure_schedule
from symstitch.zoo import train_zoo

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
# The retraining data


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a class-stratified random subset: of the n_c samples of each class c, a random
    max(1, round(fraction · n_c)) (drawn with a generator seeded by ``seed``), so every class stays in it and
    the class proportions stay those of ``labels`` up to rounding. ``fraction`` in (0, 1]."""
    check_fraction(fraction)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        take = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(keep).sort().values


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in (0, 1], else a ValueError that says so."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction is a fraction of the training split in (0, 1], got {fraction!r}")
    return float(fraction)


class TrainingSubset(DataModule):
    """A :class:`~symstitch.data.DataModule` that trains on :func:`stratified_subset` of its training split
    (``fraction``, ``subset_seed``); validation and test data are untouched. ``fraction`` 1 is the full split.
    The other arguments are the DataModule's."""

    def __init__(self, fraction: float = 1.0, subset_seed: int = 0, **settings):
        super().__init__(**settings)
        self.fraction, self.subset_seed = check_fraction(fraction), int(subset_seed)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        if self.fraction < 1.0:
            keep = stratified_subset(self.train_set.y, self.fraction, self.subset_seed)
            self.train_set = TensorImageDataset(self.train_set.x[keep], self.train_set.y[keep])


# ----------------------------------------------------------------------------------------------------------
# The grid: networks × points × matrix kinds × repeats


def _quiet_trainer(max_epochs: int, root: Path) -> pl.Trainer:
    """A trainer without progress bars or checkpoints that validates once, after the last epoch."""
    quiet_by_default()
    return pl.Trainer(
        max_epochs=max_epochs,
        check_val_every_n_epoch=max_epochs,
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


def clean_accuracy(checkpoint: Path, datamodule: pl.LightningDataModule, root: Path) -> float:
    """Test accuracy of the unmodified network, measured once and kept in ``root/clean.json``."""
    path = root / "clean.json"
    if not path.exists():
        write_json(path, {"clean_acc": _accuracy(_PlainClassifier(checkpoint), datamodule, root)})
    return read_json(path)["clean_acc"]


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
# The experiment


def library_networks(archs: Sequence[str], seed: int, zoo: Path | str, fit_args: Sequence[str] = ()) -> None:
    """Train seed ``seed`` of each of ``archs`` into the library ``zoo`` if it lacks them (``symstitch zoo``'s
    path; ``fit_args`` say how); every network must have been trained on the same data."""
    data = []
    for arch in archs:
        entries = train_zoo(arch, [seed], zoo, fit_args)
        if not entries:
            raise ValueError(f"{arch} seed {seed} is being trained into {zoo} by another process; rerun when it is done")
        trained_on = yaml.safe_load((Path(zoo) / entries[0]["config"]).read_text())["data"]
        data.append((trained_on["dataset"], trained_on.get("root", "data")))
    if len(set(data)) > 1:
        raise ValueError(f"the networks were trained on different data: {data}")


@EXPERIMENTS.register("projection")
class ProjectionExperiment(Experiment):
    """Paper §3 projection experiment: networks × layers × matrix kinds × repeats. The networks are seeds
    ``seed`` (one seed or a list such as ``0-2``) of each of ``archs`` in the model library ``zoo``, or given by
    name as ``models: {name: checkpoint or library entry}``. Each cell retrains on the data its network was
    trained on: a stratified ``train_fraction`` of its training split, drawn per repeat (repeat r uses subset
    seed r and matrix seed r, the same for every kind and layer, so kinds are compared on the same data and
    the same training order), for ``epochs`` epochs of SGD at learning rate ``lr`` (cosine schedule).

    ``dissect: {concepts: digits-twin}`` (or ``broden:<folder>``, with q, iou_threshold, image_size, images)
    adds docs/method.md §6's three-networks comparison: each cell's retrained network and the clean one dissected
    at the point and at the next one (:meth:`dissect_cell`)."""

    name = "projection"
    options = {"zoo": None, "archs": list(PROJECTION_ARCHS), "seed": 0, "models": None,
               "kinds": ["identity", "group", "orthogonal"], "points": "all", "repeats": 1, "epochs": 8,
               "lr": 0.05, "retrain": "rest", "train_fraction": 1.0, "dissect": None}

    def __init__(self, settings: dict, base: Path = Path(".")):
        super().__init__(settings, base)
        if (settings.get("zoo") is None) == (settings.get("models") is None):
            raise ValueError("a projection experiment takes its networks from a model library (zoo, archs, seed) or "
                             "by name (models)")
        if int(self.settings["epochs"]) < 1:
            raise ValueError(f"epochs must be at least 1, got {self.settings['epochs']}")
        check_fraction(self.settings["train_fraction"])
        parse_range(self.settings["seed"])
        self.dissection = check_dissect(self.settings["dissect"])

    def networks(self) -> dict[str, tuple[str, str]]:
        """``name → (model reference, family)``: the family is what the report pools over seeds and repeats,
        the architecture for a zoo's seeds and the name itself for a network given by name."""
        s = self.settings
        if s["models"] is not None:
            return {str(name): (str(ref), str(name)) for name, ref in s["models"].items()}
        seeds = parse_range(s["seed"])
        return {f"{arch}-seed{seed}": (ref, arch) for arch in names(s["archs"])
                for seed, ref in library_models(s["zoo"], arch, seeds).items()}

    def cells(self) -> list[Cell]:
        s = self.settings
        for kind in names(s["kinds"]):
            MATRICES.get(kind)
        if s["retrain"] not in ("rest", "next"):
            raise ValueError(f"retrain is 'rest' or 'next', got {s['retrain']!r}")
        cells = []
        for network, (ref, family) in self.networks().items():
            valid = projection_points(load_model(ref))
            points = list(valid) if s["points"] == "all" else names(s["points"])
            for point in points:
                if point not in valid:
                    raise ValueError(f"no projection point {point!r} in {network}; valid: {', '.join(valid)}")
            cells += [Cell(f"{network}/{point}/{kind}-r{r}",
                           {"network": network, "family": family, "model": ref, "point": point, "matrix": kind,
                            "repeat": r})
                      for point in points for kind in names(s["kinds"]) for r in range(int(s["repeats"]))]
        return cells

    def check(self, cells: Sequence[Cell]) -> None:
        if self.dissection is not None:
            self.concepts()  # a missing or malformed concept folder fails before anything is written

    def concepts(self):
        """The concept source of ``dissect`` (a Broden folder relative to the folder the sweep runs in)."""
        from symstitch.dissect.experiment import concept_source

        return concept_source(str(self.dissection["concepts"]), self.dissection["image_size"])

    def dissect_cell(self, net: StagedNet, checkpoint: Path, point: str, cell_dir: Path, clean_dir: Path,
                     out: Path) -> list[dict]:
        """docs/method.md §6, three networks compared: the retrained network (M inserted at ``point``) and the
        clean one dissected at ``point`` (l) and at the next projection point (after l). The clean network's
        dissections are made once per network and point, in ``clean_dir``. One entry per (network state,
        where): the dissection's summary and its tally's path relative to ``out``."""
        from symstitch.dissect.api import default_normalization, dissect

        d, source = self.dissection, self.concepts()
        points = projection_points(net)
        where = {"at": point}
        if points.index(point) + 1 < len(points):
            where["after"] = points[points.index(point) + 1]
        norm = default_normalization(checkpoint)
        entries = []
        for state, model, root in (("clean", checkpoint, clean_dir), ("retrained", net, cell_dir)):
            for place, pt in where.items():
                folder = root / "dissect" / pt
                if not (folder / "dissection.json").exists():
                    result = dissect(model, pt, source, q=d["q"], iou_threshold=float(d["iou_threshold"]),
                                     limit=d["images"], normalization=norm)
                    result.write(folder)
                summary = read_json(folder / "dissection.json")
                entries.append({"state": state, "where": place, "point": pt, "source": summary["source"],
                                "q": summary["q"], "iou_threshold": summary["iou_threshold"],
                                **{k: summary[k] for k in DISSECTION_NUMBERS},
                                "tally_csv": str((folder / "tally.csv").relative_to(out))})
        return entries

    def run_cell(self, cell: Cell, out: Path) -> Optional[dict]:
        """Insert, measure, retrain, measure; the cell's record, with the network's clean accuracy (and, with
        ``dissect``, the dissections of :meth:`dissect_cell`)."""
        s, p = self.settings, cell.params
        checkpoint = resolve_model(p["model"])
        # the data the network was trained on; repeat r retrains on subset r
        fraction = check_fraction(s["train_fraction"])
        datamodule = TrainingSubset(fraction, p["repeat"], **datamodule_settings(checkpoint))
        epochs, lr = int(s["epochs"]), float(s["lr"])
        pl.seed_everything(p["repeat"], verbose=False)
        module = ProjectionModule(
            str(checkpoint), p["point"], matrix=p["matrix"], matrix_seed=p["repeat"], retrain=s["retrain"],
            optimizer=lambda params: SGD(params, lr=lr), scheduler=lambda opt: WarmupCosine(opt, warmup=0.1),
        )
        cell_dir = self.cell_dir(out, cell)
        inserted = _accuracy(module, datamodule, cell_dir / "before")
        trainer = _quiet_trainer(epochs, cell_dir)
        trainer.fit(module, datamodule=datamodule)
        (res,) = trainer.test(module, datamodule=datamodule, verbose=False)
        spec = classifier_spec(read_checkpoint(checkpoint), checkpoint)
        clean_dir = Path(out) / "runs" / p["network"] / "clean"
        record = {
            "network": p["network"],
            "family": p.get("family", p["network"]),
            "arch": spec["arch"],
            "activation": module.net.activation,
            "point": p["point"],
            "layer": projection_points(module.net).index(p["point"]) + 1,
            "matrix": p["matrix"],
            "retrain": s["retrain"],
            "repeat": p["repeat"],
            "inserted_acc": inserted,
            "recovered_acc": float(res["test/acc"]),
            "epochs": epochs,
            "lr": lr,
            "train_fraction": fraction,
            "clean_acc": clean_accuracy(checkpoint, datamodule, clean_dir),
        }
        if self.dissection is not None:
            record["dissection"] = self.dissect_cell(module.net, checkpoint, p["point"], cell_dir, clean_dir,
                                                     Path(out))
        return record


#: the settings of ``dissect`` in a projection experiment, with their defaults (``concepts`` is required)
DISSECT_SETTINGS = {"concepts": None, "q": None, "iou_threshold": 0.04, "image_size": None, "images": None}
#: the numbers of each dissection a projection record keeps
DISSECTION_NUMBERS = ("units", "interpretable", "unique_concepts", "unique_per_category")


def check_dissect(value: Any) -> Optional[dict]:
    """``dissect`` of a projection experiment: None (no dissection) or a mapping with ``concepts`` (a concept
    source: ``digits-twin``, ``broden:<folder>``) and optionally q, iou_threshold, image_size, images; the full
    settings, or a ValueError naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("concepts") is None:
        raise ValueError("dissect takes a mapping with at least the concept source, e.g. dissect: {concepts: "
                         f"digits-twin}}; got {value!r}")
    unknown = sorted(set(value) - set(DISSECT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown dissect setting(s) {', '.join(unknown)}; valid: {', '.join(DISSECT_SETTINGS)}")
    return {**DISSECT_SETTINGS, **value}
