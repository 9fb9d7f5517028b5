"""The ``symstitch`` command: every subcommand's arguments, parsed here and nowhere else.

Training commands (``fit``, ``validate``, ``test``, ``predict``) are LightningCLI's (:mod:`symstitch.cli`); the
others are parsed with argparse here and then call the module that does the work. Nothing heavy (torch,
Lightning, W&B) is imported before the arguments are parsed, so ``--help`` and every argument error answer at
once; the modules are imported lazily, on purpose, by :func:`_load`.
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from symstitch import __version__
from symstitch.defaults import LIGHTNING_COMMANDS, PAPER_METRICS, PROJECTION_ARCHS, STITCH_DEFAULTS

USAGE = """usage: symstitch [-v] COMMAND [options]

training (LightningCLI; `symstitch fit --help`, `--print_config` after the command):
  fit         train a module from a config: symstitch fit --config configs/zoo/resnet20.yaml
  validate    evaluate a checkpoint on the validation split
  test        evaluate a checkpoint on the test split
  predict     run prediction
experiments:
{commands}

  -v, --verbose   Lightning's own messages too (device banners, summaries, tips)
  --version       print the version
"""


def _load(module: str) -> Any:
    """``symstitch.<module>``, imported when a command runs (torch and Lightning take seconds to import)."""
    return importlib.import_module(f"symstitch.{module}")


# ------------------------------------------------------------------------------------------------ value types
def _number(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``cast`` the text and check it with ``ok``; the error says what was ``expected``."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer ≥ 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


def _points(text: str) -> Any:
    return "all" if text == "all" else name_list(text)


def default_folder(kind: str, config: dict, *refs: str) -> Path:
    """``runs/<kind>/<names of the networks>-<hash of the settings>``: distinct settings never share a folder,
    the same settings find their earlier results (and resume)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    slug = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", str(r)).strip("_")[-40:] for r in refs)
    return Path("runs") / kind / (f"{slug}-{digest}" if slug else digest)


# ------------------------------------------------------------------------------------------------ commands
class Command(abc.ABC):
    """A subcommand: ``help`` for the listing, ``build(parser)`` adds its options, ``run(args, extra)`` does it
    (``extra``: unparsed options, for the commands that pass them on to ``symstitch fit``)."""

    name: str = ""
    help: str = ""
    passes_fit_args = False
    #: the command runs Lightning (imported before its loggers are quietened: Lightning sets them on import)
    uses_lightning = True

    @abc.abstractmethod
    def build(self, parser: argparse.ArgumentParser) -> None:
        """Add the command's options."""

    @abc.abstractmethod
    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        """Do the work; the exit status."""

    def parser(self) -> argparse.ArgumentParser:
        doc = inspect.cleandoc(type(self).__doc__ or self.help)
        parser = argparse.ArgumentParser(prog=f"symstitch {self.name}", description=doc,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.build(parser)
        parser.add_argument("-v", "--verbose", action="store_true", help="Lightning's own messages too")
        return parser


COMMANDS: dict[str, Command] = {}


def command(cls: type[Command]) -> type[Command]:
    COMMANDS[cls.name] = cls()
    return cls


@command
class Zoo(Command):
    """Train many seeds of an architecture into a model library with a manifest.

    Any other option is passed to `symstitch fit`, e.g. --config configs/zoo/resnet20.yaml --data.dataset digits
    --trainer.max_epochs 15."""

    name, help, passes_fit_args = "zoo", "train many seeds of an architecture into a model library", True

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--arch", required=True, help="architecture (symstitch.models.available())")
        parser.add_argument("--seeds", default="0-9", help="seeds, e.g. 0-9 or 0,3,5-7 (default 0-9)")
        parser.add_argument("--out", default="zoo", help="model library folder (default ./zoo)")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        seeds = _load("io").parse_range(args.seeds, "seed")
        zoo = _load("zoo")
        entries = zoo.train_zoo(args.arch, seeds, args.out, extra)
        print_library(entries, Path(args.out) / "manifest.json")
        figure = zoo.plot_library(Path(args.out), args.arch)
        if figure:
            print(f"zoo: training curves in {figure}")
        return 0 if len(entries) == len(seeds) else 1


@command
class Stitch(Command):
    """Stitch two networks at every stitch point with several layers (a stitch experiment over one pair:
    resumable cells, penalty table and figure). The data is the networks' own, from their checkpoints."""

    name, help = "stitch", "stitch two networks at every stitch point with several layers; penalty table and plot"

    def build(self, parser: argparse.ArgumentParser) -> None:
        d = STITCH_DEFAULTS
        parser.add_argument("--source", required=True, help="checkpoint or model-library entry <zoo>:<arch>/seed<k>")
        parser.add_argument("--target", required=True, help="likewise")
        parser.add_argument("--points", type=_points, default="all",
                            help="comma-separated stitch points; all: every cut, inner: the points inside ResNet blocks")
        parser.add_argument("--layers", type=name_list, default=list(d["layers"]),
                            help=f"stitching layers, with options as name:key=value (default {','.join(d['layers'])};"
                                 " the paper's yardstick: standard,lowrank:rank=4,lowrank:rank=2,lowrank:rank=1,"
                                 "birkhoff)")
        parser.add_argument("--epochs", type=positive_int, default=d["epochs"], help=f"default {d['epochs']}")
        parser.add_argument("--relaxed-epochs", type=non_negative_int, default=d["relaxed_epochs"],
                            help=f"for birkhoff/softsort, epochs before hardening (default {d['relaxed_epochs']})")
        parser.add_argument("--lr", type=positive_float, default=d["lr"], help=f"Adam learning rate (default {d['lr']})")
        parser.add_argument("--init", choices=["data", "random"], default=d["init"],
                            help="start from the data where the layer has such a start (standard, lasso: least "
                                 "squares; birkhoff: channel matching), else the layer's own")
        parser.add_argument("--repeats", type=positive_int, default=1, help="seeds per cell (default 1)")
        parser.add_argument("--prefix-cache", choices=["float32", "bfloat16"], default=d["prefix_cache"],
                            help="train on cached source activations of the un-augmented training images")
        parser.add_argument("--out", default=None,
                            help="results folder (default runs/stitch/<pair>-<hash of the settings>)")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        stitching, sweep, report = _load("stitching"), _load("sweep"), _load("report")
        config = {
            "experiment": "stitch", "source": args.source, "target": args.target, "points": args.points,
            "layers": args.layers, "repeats": args.repeats, "stitch_config": "configs/stitch/{layer}.yaml",
            "fit_args": stitching.stitch_options(epochs=args.epochs, relaxed_epochs=args.relaxed_epochs, lr=args.lr,
                                                 init=args.init, prefix_cache=args.prefix_cache),
        }
        out = Path(args.out) if args.out else default_folder("stitch", config, args.source, args.target)
        records = sweep.run_generated(config, out, "symstitch stitch")
        md = report.write_report(out)
        print_penalties(records, args.layers)
        print(f"stitch: {md.parent / 'stitch.csv'}, {md.parent / 'stitch_penalty.png'}, {md}")
        return 0


@command
class Align(Command):
    """Similarity of every feature-point pair of two networks (Procrustes, CKA): CSV, heatmaps, W&B."""

    name, help = "align", "similarity of every feature-point pair of two networks (Procrustes, CKA): CSV, heatmaps"
    keys = ("source", "target", "metrics", "cka_mode", "points", "data", "split", "images", "batch_size", "out", "wandb")

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", default=None, help="YAML with any of the options below (configs/align/)")
        parser.add_argument("--source", help="network A: checkpoint or <zoo>:<arch>/seed<k>")
        parser.add_argument("--target", help="network B, likewise")
        parser.add_argument("--metrics", type=name_list, default=None, help=f"comma-separated (default {','.join(PAPER_METRICS)})")
        parser.add_argument("--cka-mode", choices=["exact", "minibatch"], default=None)
        parser.add_argument("--images", type=positive_int, default=None, help="only the first N evaluation images")
        parser.add_argument("--out", default=None, help="results folder (default runs/align/<pair>-<hash>)")
        parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                            help="log tables and figures to Weights & Biases (default; offline unless configured)")

    def settings(self, args: argparse.Namespace) -> dict:
        settings: dict[str, Any] = {"metrics": list(PAPER_METRICS), "cka_mode": "exact", "points": "all",
                                    "data": {}, "split": "test", "images": None, "batch_size": 500, "out": None,
                                    "wandb": True}
        if args.config:
            path = _load("configs").resolve(args.config)
            if not Path(path).is_file():
                raise ValueError(f"no align config {args.config}")
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            unknown = sorted(set(loaded) - set(self.keys))
            if unknown:
                raise ValueError(f"{args.config}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(self.keys))}")
            settings.update(loaded)
        for key in ("source", "target", "metrics", "cka_mode", "images", "out", "wandb"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        if not settings.get("source") or not settings.get("target"):
            raise ValueError("give the two networks: --source A --target B (or source:/target: in the config)")
        return settings

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        settings = self.settings(args)
        sweep, report = _load("sweep"), _load("report")
        config = {"experiment": "align", **{k: v for k, v in settings.items() if k not in ("out", "wandb")}}
        out = Path(settings["out"]) if settings["out"] else default_folder("align", config, settings["source"],
                                                                           settings["target"])
        sweep.run_generated(config, out, "symstitch align")
        md = report.write_report(out, wandb=bool(settings["wandb"]))
        print(f"align: {md.parent / 'align.csv'}, heatmaps and {md}")
        return 0


@command
class Projection(Command):
    """The projection experiment: insert M before the activation of each layer of trained networks, freeze up to
    it, retrain the rest.

    Networks come from a model library (--zoo, --models, --seed); missing ones are trained first with
    `symstitch zoo`, and any other option is passed to that training (e.g. --config
    configs/projection/digits.yaml --trainer.max_epochs 15). The cells retrain on the networks' own data."""

    name, help, passes_fit_args = "projection", "insert G_σ / orthogonal matrices per layer, retrain, plot", True

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--zoo", default="runs/projection/zoo", help="model library folder")
        parser.add_argument("--models", type=name_list, default=list(PROJECTION_ARCHS),
                            help="architectures (default mcnn,mcnn_sigmoid: a ReLU and a sigmoid net)")
        parser.add_argument("--seed", type=non_negative_int, default=0, help="which seed of each architecture")
        parser.add_argument("--kinds", type=name_list, default=["identity", "group", "orthogonal"],
                            help="matrix kinds (default identity,group,orthogonal)")
        parser.add_argument("--points", type=_points, default="all", help="comma-separated points, or all")
        parser.add_argument("--repeats", type=positive_int, default=1, help="random matrices per cell")
        parser.add_argument("--epochs", type=positive_int, default=8, help="retraining epochs per cell")
        parser.add_argument("--lr", type=positive_float, default=0.05, help="retraining learning rate (SGD, cosine)")
        parser.add_argument("--retrain", choices=["rest", "next"], default="rest",
                            help="retrain every layer after l (rest, docs/method.md §4) or only the next one (next)")
        parser.add_argument("--train-fraction", type=fraction, default=1.0,
                            help="retrain on this class-stratified fraction of the training split (default 1)")
        parser.add_argument("--out", default=None, help="results folder (default runs/projection/<hash>)")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        projection, sweep, report = _load("projection"), _load("sweep"), _load("report")
        for kind in args.kinds:
            projection.MATRICES.get(kind)  # unknown kinds fail before any training
        projection.library_networks(args.models, args.seed, args.zoo, extra)
        config = {"experiment": "projection", "zoo": str(Path(args.zoo).resolve()), "archs": args.models,
                  "seed": args.seed, "kinds": args.kinds, "points": args.points, "repeats": args.repeats,
                  "epochs": args.epochs, "lr": args.lr, "retrain": args.retrain, "train_fraction": args.train_fraction}
        out = Path(args.out) if args.out else default_folder("projection", config)
        sweep.run_generated(config, out, "symstitch projection")
        md = report.write_report(out)
        summary = md.parent / "projection" / "projection.md"
        print(summary.read_text())
        print(f"projection: {summary.parent / 'projection.csv'}, {summary.parent / 'projection.png'}, {summary}")
        return 0


@command
class Dissect(Command):
    """Network dissection (docs/method.md §6): which concept each unit at a point detects, NetDissect-Lite's
    semantics on any network. Writes tally.csv per point (unit, label, category, IoU; the best concept per
    category), the report with the interpretable units, unique concepts per category and each point's best
    units drawn over their top images.

        symstitch dissect --network runs/digits/zoo:resnet20/seed0 --points layer1.2.act2,layer3.2.act2
        symstitch dissect --network runs/zoo:mcnn/seed0 --alphas 0,0.5,1 --rotations 3     (the rotation test)
        symstitch dissect --network m.ckpt --concepts broden:/data/broden1_224 --image-size 32

    Concepts: the embedded digits twin (default, no download) or a local Broden copy."""

    name, help = "dissect", "network dissection: the concept each unit at a point detects (tally.csv, report)"

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--network", required=True, help="checkpoint, <zoo>:<arch>/seed<k> or a class path")
        parser.add_argument("--points", type=_points, default="all", help="comma-separated points, or all (default)")
        parser.add_argument("--concepts", default="digits-twin",
                            help="digits-twin[:train|test|all] (default, embedded) or broden:<folder>")
        parser.add_argument("--image-size", type=positive_int, default=None,
                            help="resize Broden's images to the network's input size (e.g. 32)")
        parser.add_argument("--q", type=_number(float, lambda v: 0 < v < 1, "a fraction in (0, 1)"), default=None,
                            help="top quantile of each unit's activations (default: the concepts' own; "
                                 "0.005 for Broden, 0.02 for the twin)")
        parser.add_argument("--iou", type=fraction, default=0.04, help="IoU of an interpretable unit (default 0.04)")
        parser.add_argument("--alphas", type=_number(lambda s: [float(a) for a in s.split(",")],
                                                     lambda v: all(0 <= a <= 1 for a in v), "numbers in [0, 1]"),
                            default=[0.0], help="rotations Q^α of the units to dissect too (default 0: none)")
        parser.add_argument("--rotations", type=positive_int, default=1, help="random Q per α > 0 (default 1)")
        parser.add_argument("--images", type=positive_int, default=None, help="only the first N concept images")
        parser.add_argument("--out", default=None, help="results folder (default runs/dissect/<network>-<hash>)")
        parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                            help="log the report's tables (each tally too) and figures to Weights & Biases")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        sweep, report = _load("sweep"), _load("report")
        concepts = args.concepts
        if concepts.startswith("broden:"):
            concepts = "broden:" + str(Path(concepts.partition(":")[2]).resolve())
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", args.network.rpartition(":")[2].removesuffix("model.ckpt")
                      .removesuffix(".ckpt")).strip("-.")[-40:] or "network"
        config = {"experiment": "dissect", "networks": {name: args.network}, "points": args.points,
                  "concepts": concepts, "image_size": args.image_size, "alphas": args.alphas,
                  "rotations": args.rotations, "q": args.q, "iou_threshold": args.iou, "images": args.images}
        out = Path(args.out) if args.out else default_folder("dissect", config, args.network)
        records = sweep.run_generated(config, out, "symstitch dissect")
        md = report.write_report(out, wandb=args.wandb)
        for record in records:
            r = record.result
            rotated = f" rotated by Q^{r['alpha']:g}" if r.get("alpha") else ""
            print(f"{r['point']}{rotated}: {r['headline']}; tally {out / r['tally_csv']}")
        print(f"dissect: {md}")
        return 0


@command
class Merge(Command):
    """Align network B to network A up to the intertwiner groups of their activations, interpolate their
    weights and measure the loss barrier (docs/method.md §7). One cell per alignment: none, permutations only,
    and the full group (positive-scaled permutations for ReLU, signed permutations for tanh), each with
    BatchNorm statistics interpolated and re-estimated; the midpoint network of each is saved as a checkpoint
    that every other command takes.

        symstitch merge --source runs/digits/zoo:resnet20/seed0 --target runs/digits/zoo:resnet20/seed1
        symstitch merge --source A.ckpt --target B.ckpt --methods activation,weight --lambdas 21
        symstitch merge --source "{class_path: torchvision.models.resnet18, state_dict: a.pt}" --target …"""

    name, help = "merge", "align B to A up to G_σ, interpolate, loss barrier, midpoint checkpoint"

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--source", required=True, help="network A: checkpoint, <zoo>:<arch>/seed<k> or a class path")
        parser.add_argument("--target", required=True, help="network B, likewise (aligned to A)")
        parser.add_argument("--methods", type=name_list, default=["activation"],
                            help="alignment methods: activation (default), weight, stitch")
        parser.add_argument("--groups", type=name_list, default=["none", "permutations", "full"],
                            help="alignments: none, permutations, full (default all three)")
        parser.add_argument("--lambdas", type=_number(int, lambda v: v >= 3, "an integer ≥ 3"), default=11,
                            help="values of λ from 0 to 1 (default 11)")
        parser.add_argument("--bn", type=name_list, default=["interpolated", "reestimated"],
                            help="BatchNorm statistics along the line: interpolated, reestimated (default both)")
        parser.add_argument("--match-images", type=positive_int, default=None,
                            help="training images for activation matching and re-estimation (default all)")
        parser.add_argument("--test-images", type=positive_int, default=None, help="only the first N test images")
        parser.add_argument("--out", default=None, help="results folder (default runs/merge/<pair>-<hash>)")
        parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                            help="log the report's tables and figures to Weights & Biases")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        sweep, report = _load("sweep"), _load("report")
        config = {"experiment": "merge", "source": args.source, "target": args.target, "methods": args.methods,
                  "groups": args.groups, "lambdas": args.lambdas, "bn": args.bn, "match_images": args.match_images,
                  "test_images": args.test_images}
        out = Path(args.out) if args.out else default_folder("merge", config, args.source, args.target)
        records = sweep.run_generated(config, out, "symstitch merge")
        md = report.write_report(out, wandb=args.wandb)
        for record in records:
            r, c = record.result, record.cell
            label = "none" if c["group"] == "none" else f"{c['group']} ({c['method']})"
            barriers = ", ".join(f"{m} {v:.3f}" for m, v in r["barrier_loss"].items())
            mids = ", ".join(f"{m} {100 * v:.1f} %" for m, v in r["midpoint_acc"].items())
            print(f"{label}: loss barrier {barriers}; midpoint accuracy {mids}"
                  + (f"; midpoint network {out / r['midpoint']}" if r.get("midpoint") else ""))
        print(f"merge: {md}")
        return 0


@command
class Check(Command):
    """A one-page sanity report of the symmetry tools on one network: a random g ∈ G_σ applied at every point
    preserves the function and moves the representation to g·h. Exit status 1 when any point fails.

        symstitch check --model zoo/mcnn/seed0/model.ckpt      (or a library entry runs/zoo:mcnn/seed0)
        symstitch check --arch mcnn --epochs 2                 (trains a small digits model on the spot)"""

    name, help = "check", "sanity report: a random symmetry g applied at every point preserves the function"

    def build(self, parser: argparse.ArgumentParser) -> None:
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--model", "--checkpoint", dest="model",
                            help="checkpoint or model-library entry <zoo>:<arch>/seed<k>")
        source.add_argument("--arch", default="mcnn", help="train this architecture on digits on the spot (default mcnn)")
        parser.add_argument("--width", type=positive_float, default=0.25, help="width multiplier of the on-the-spot model")
        parser.add_argument("--epochs", type=positive_int, default=2, help="epochs of the on-the-spot model")
        parser.add_argument("--dataset", default="digits", help="inputs: the test split of this dataset")
        parser.add_argument("--data-root", default="data")
        parser.add_argument("--samples", type=positive_int, default=256, help="number of test images")
        parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random group elements")
        parser.add_argument("--json", help="also write the rows to this JSON file")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        rows = _load("check").check(args.model, arch=args.arch, width=args.width, epochs=args.epochs,
                                    dataset=args.dataset, data_root=args.data_root, samples=args.samples, seed=args.seed)
        if args.json:
            _load("io").write_json(args.json, rows)
        return 1 if not rows or any(not r["ok"] for r in rows) else 0


@command
class Points(Command):
    """List the points of a network: graph node names and module names, each with its kind (cut: stitch anywhere
    there; inner: something bypasses it, and B continues with A's carry), operation, shape and the intertwiner
    group its activation gives (or why none).

        symstitch points runs/zoo:resnet20/seed0
        symstitch points resnet20          (a zoo architecture by name: its points, random weights)
        symstitch points '{class_path: torchvision.models.resnet18, init_args: {num_classes: 10}}'
        symstitch points timm:vit_tiny_patch16_224 --features"""

    name, help = "points", "list a network's points (node and module names), their kind, shape and group"
    uses_lightning = False

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL",
                            help="checkpoint, library entry, zoo architecture (resnet20, mcnn, …), "
                                 "{class_path: …, init_args: …, state_dict: …} or timm:<name>")
        parser.add_argument("--features", action="store_true", help="only the feature points (activation outputs)")
        parser.add_argument("--input-shape", default=None,
                            help="batch shape for the shapes, e.g. 1,3,224,224 (default: the model's own or 1,3,32,32)")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
        zoo = _load("models").MODELS
        if args.model in zoo and not Path(args.model).exists():  # an architecture's points do not need weights
            model = zoo.build(args.model).eval()
        else:
            library = _load("library")
            try:
                model = library.load_model(args.model)
            except library.CheckpointError as err:
                raise library.CheckpointError(f"{err}, nor a zoo architecture ({', '.join(zoo)})") from None
        net = model.as_graph(input_shape=shape)
        rows = net.describe()
        if args.features:
            chosen = set(net.feature_points)
            rows = [r for r in rows if r.name in chosen]
        width = max((len(r.name) for r in rows), default=5)
        print(f"{'point':<{width}}  {'kind':<5}  {'operation':<20}  {'shape':<18}  group")
        for r in rows:
            shape_text = "×".join(map(str, r.shape)) if r.shape else "—"
            print(f"{r.name:<{width}}  {r.kind:<5}  {r.op[:20]:<20}  {shape_text:<18}  {r.note}")
        mode = f" ({net.note})" if net.note else ""
        print(f"{len(rows)} points{mode}; stitch points (cuts after an activation): {', '.join(net.stitch_points)}")
        return 0


@command
class Sweep(Command):
    """Run an experiment grid of experiments/*.yaml, resumable cell by cell (or write a SLURM array script)."""

    name, help = "sweep", "run an experiment grid of experiments/*.yaml, resumable cell by cell (or --emit slurm)"

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", required=True, nargs="+", metavar="CONFIG",
                            help="experiments/<name>.yaml; several run one after the other in this process (the "
                                 "digits pipeline: zoo_digits.yaml stitch_digits.yaml align_digits.yaml)")
        parser.add_argument("--out", default=None, help="results folder (default: the config's `out`; one config)")
        parser.add_argument("--cell", default=None,
                            help="run only these cells: an index or a list, e.g. 3 or 0-4,9 (one config)")
        parser.add_argument("--emit", choices=["slurm"], default=None, help="write a job script instead of running")
        parser.add_argument("--list", action="store_true", help="print the cells and whether each has finished")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar (batch jobs)")
        parser.add_argument("--wandb", action="store_true",
                            help="also log each finished cell (of --cell) as a W&B run, once, in the sweep's group "
                                 "(the folder's name; offline unless W&B is configured); with --emit slurm, every "
                                 "array task does")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        if len(args.config) > 1 and (args.out or args.cell or args.emit):
            raise ValueError("--out, --cell and --emit go with one --config")
        if args.cell is not None:
            _load("io").parse_range(args.cell, "cell")  # a bad list fails before anything loads
        for config in args.config:  # in order: a later sweep may read what an earlier one made (a model library)
            runner = _load("sweep").load_sweep(config, args.out)
            if args.emit == "slurm":
                path = runner.emit_slurm(Path(config), wandb=args.wandb)
                print(f"sweep: {len(runner.cells())} cells; submit with `sbatch {path}`")
                continue
            if args.list:
                try:
                    cells, note = runner.prepare(), ""
                except _load("library").MissingModels as err:  # the grid is known before its networks exist
                    cells, note = runner.cells(), f"{config}: its cells run once the networks exist: {err}"
                for i, cell in enumerate(cells):
                    print(f"{i:5d}  {runner.status(cell):<7}  {cell.key}")
                if note:
                    print(note, file=sys.stderr)
                continue
            records = runner.run(args.cell, progress=not args.no_progress, wandb=args.wandb)
            left = runner.unfinished()
            print(f"sweep: {len(records)} cells finished in {runner.out}" + (f", {left} left" if left else "")
                  + f"; report: symstitch report {runner.out}")
        return 0


@command
class Report(Command):
    """Tables, figures and a markdown report from the cell records of one or more sweeps."""

    name, help = "report", "tidy CSVs, figures and a markdown summary of sweep results"
    uses_lightning = False

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("results_dir", metavar="RESULTS_DIR",
                            help="a sweep's results folder (with cells/), or a folder holding several")
        parser.add_argument("--out", default=None, help="where to write the report (default: RESULTS_DIR/report)")
        parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                            help="also log the tables and figures to one W&B run, in the group of the sweep's cells "
                                 "(offline unless W&B is configured)")

    def run(self, args: argparse.Namespace, extra: list[str]) -> int:
        root = Path(args.results_dir)
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder")
        return _load("report").main_report(root, Path(args.out) if args.out else None, wandb=args.wandb)


# ------------------------------------------------------------------------------------------------ main
def _usage() -> str:
    return USAGE.format(commands="\n".join(f"  {c.name:<11} {c.help}" for c in COMMANDS.values()))


def _is_user_error(err: BaseException) -> bool:
    """Errors that are the user's to fix (names, paths, files, settings, a busy folder, a diverged run): one line,
    no traceback. Unknown registry names raise KeyError and invalid settings ValueError, with what is valid."""
    if isinstance(err, (KeyError, ValueError, OSError)):
        return True
    return type(err).__module__.startswith("symstitch.") and isinstance(err, RuntimeError)


# ----------------------------------------------------------------------------------------------------------
# Tables on the console (rich, loaded when a command prints one)


def print_penalties(records: Sequence[Any], layers: Sequence[str]) -> None:
    """The stitching penalty of every stitch point × layer of one pair's records (mean over repeats), in points:
    frozen / recalibrated."""
    import math
    from statistics import fmean

    from rich.console import Console
    from rich.table import Table

    from symstitch.stitching.record import PROTOCOLS, as_number, record_key

    table = Table(title="stitching penalty = (acc A + acc B)/2 − acc stitched, in points: frozen / recalibrated")
    table.add_column("stitch point", no_wrap=True)
    for layer in layers:
        table.add_column(layer, justify="right")
    values: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        for protocol in PROTOCOLS:
            value = as_number(r.result.get(record_key("penalty", protocol)))
            if math.isfinite(value):
                values.setdefault((r.cell["point"], r.cell["layer"], protocol), []).append(value)

    def shown(point: str, layer: str) -> str:
        return " / ".join(f"{fmean(values[point, layer, p]):+.2f}" if (point, layer, p) in values else "–"
                          for p in PROTOCOLS)

    for point in dict.fromkeys(r.cell["point"] for r in records):
        table.add_row(point, *[shown(point, layer) for layer in layers])
    Console().print(table)


def print_library(entries: Sequence[dict], manifest_path: Path) -> None:
    """The models of a library: key, dataset, test accuracy, epochs, checkpoint."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model library {manifest_path}")
    for col in ("model", "dataset", "test acc", "epochs", "checkpoint"):
        table.add_column(col)
    for e in entries:
        table.add_row(f"{e['arch']}/seed{e['seed']}", e["dataset"], f"{e['test_acc']:.4f}", str(e["epochs"]),
                      e["checkpoint"])
    Console().print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    if not rest or rest[0] in ("-h", "--help"):
        print(_usage())
        return 0 if rest else 2
    if rest[0] == "--version":
        print(f"symstitch {__version__}")
        return 0
    name = rest[0]
    if name not in COMMANDS and name not in LIGHTNING_COMMANDS:
        known = ", ".join([*LIGHTNING_COMMANDS, *COMMANDS])
        print(f"symstitch: unknown command {name!r}; commands: {known}", file=sys.stderr)
        return 2
    runner: Callable[[], int]
    if name in COMMANDS:
        cmd, tail = COMMANDS[name], argv[argv.index(name) + 1:]
        parser = cmd.parser()
        args, extra = parser.parse_known_args(tail) if cmd.passes_fit_args else (parser.parse_args(tail), [])
        runner = lambda: cmd.run(args, extra)  # noqa: E731
    else:
        args_ = None if from_sys and not verbose else rest
        runner = lambda: (_load("cli").build_cli(args_), 0)[1]  # noqa: E731
    if COMMANDS[name].uses_lightning if name in COMMANDS else True:
        importlib.import_module("lightning.pytorch")  # after the arguments parsed: --help never pays for it
    loggers = _load("loggers")  # light: no torch
    loggers.quiet(verbose)
    loggers.default_wandb_offline()
    try:
        return runner() or 0
    except Exception as err:  # noqa: BLE001 - sorted into the user's errors (one line) and ours (traceback)
        if os.environ.get("SYMSTITCH_DEBUG") or not _is_user_error(err):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"symstitch: error: {message}\n(set SYMSTITCH_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    finally:
        loggers.finish_wandb()
