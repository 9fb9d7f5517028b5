"""The paper's experiments as resumable grids: ``symstitch sweep --config experiments/<name>.yaml``.

A sweep config names an experiment (a registered :class:`Sweep` kind) and its grid:

    experiment: stitch            # zoo | stitch | align | projection
    out: runs/digits/stitch       # results folder (relative to the current directory)
    zoo: runs/digits/zoo          # model library the networks come from
    arch: resnet20
    seeds: 0-1                    # pairs of these seeds (unordered: source seed < target seed)
    points: all
    layers: [standard, birkhoff]
    repeats: 1
    fit_args: [--trainer.max_epochs, "4"]

The grid expands into *cells*; each cell runs through the same code path as the single-run command (a stitch
cell is ``symstitch fit --config configs/stitch/<layer>.yaml --model.source … --model.point …``, a zoo cell
is one seed of ``symstitch zoo``) and leaves one result file ``<out>/cells/<key>.json``, written atomically
once the cell has finished. Rerunning skips cells whose file exists, so a killed sweep loses only the cell in
progress. ``--emit slurm`` writes a SLURM array script whose task i runs ``symstitch sweep --config … --cell
i``; cells are independent, so any scheduler can run them in any order.

Paths inside a sweep config (``stitch_config``, ``--config``/``--data`` values in ``fit_args``) are relative
to the config file; ``out`` and ``zoo`` are relative to the current directory.
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import yaml

from symstitch.registry import Registry

SWEEPS: Registry[type["Sweep"]] = Registry("experiment")


@dataclass(frozen=True)
class Cell:
    """One unit of work: ``key`` names its result file (``cells/<key>.json``), ``params`` its settings."""

    key: str
    params: dict


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON through :func:`symstitch.zoo.write_atomic` (temporary file, then rename): all of it or nothing."""
    from symstitch.zoo import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, default=float))


def _seeds(value: Any) -> list[int]:
    from symstitch.zoo import parse_seeds

    return [int(value)] if isinstance(value, int) else list(value) if isinstance(value, list) else parse_seeds(str(value))


class Sweep(abc.ABC):
    """A grid of independent cells. Subclasses declare their config keys in ``options`` (name → default;
    ``REQUIRED`` marks the required ones), list their cells and run one."""

    REQUIRED: ClassVar[object] = object()
    experiment: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: dict, config_path: Path, out: Optional[Path] = None):
        self.config_path = config_path
        known = {"experiment", "out", "slurm", *self.options}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown key(s) {', '.join(unknown)} for a {self.experiment} sweep; "
                             f"valid keys: {', '.join(sorted(known))}")
        missing = [k for k, v in self.options.items() if v is self.REQUIRED and k not in config]
        if missing:
            raise ValueError(f"{config_path}: a {self.experiment} sweep needs {', '.join(missing)}")
        self.settings = {**self.options, **config}
        self.out = Path(out or config.get("out") or f"runs/sweeps/{config_path.stem}")
        self.slurm = config.get("slurm") or {}

    # ---------------------------------------------------------------- what a kind defines
    @abc.abstractmethod
    def cells(self) -> list[Cell]:
        """Every cell of the grid, in a fixed order (the SLURM array index is the position here)."""

    @abc.abstractmethod
    def run_cell(self, cell: Cell) -> Optional[dict]:
        """Run one cell; its result, or None on the non-zero ranks of a multi-process cell."""

    # ---------------------------------------------------------------- shared
    def resolve(self, path: str) -> str:
        """A path written in the config, relative to the config file."""
        p = Path(path)
        return str(p if p.is_absolute() else (self.config_path.parent / p).resolve())

    def fit_args(self, **fmt: str) -> list[str]:
        """``fit_args`` of the config with ``{name}`` filled in and config files resolved."""
        args = [str(a) for a in self.settings.get("fit_args") or []]
        for name, value in fmt.items():
            args = [a.replace("{" + name + "}", value) for a in args]
        for i, a in enumerate(args[:-1]):
            if a in ("--config", "--data", "--model", "--trainer") and args[i + 1].endswith((".yaml", ".yml")):
                args[i + 1] = self.resolve(args[i + 1])
        return args

    def result_path(self, cell: Cell) -> Path:
        return self.out / "cells" / f"{cell.key}.json"

    def fingerprint(self) -> str:
        """Hash of every setting that changes a cell's outcome (``out`` and ``slurm`` excluded)."""
        kept = {k: v for k, v in self.settings.items() if k not in ("out", "slurm")}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def claim_folder(self) -> None:
        """Record this sweep's settings in ``<out>/sweep.json``; refuse a folder that holds another grid."""
        record = self.out / "sweep.json"
        mine = {"experiment": self.experiment, "fingerprint": self.fingerprint(), "settings": self.settings,
                "config": str(self.config_path)}
        if record.exists():
            theirs = json.loads(record.read_text())
            if theirs.get("fingerprint") != mine["fingerprint"]:
                raise ValueError(
                    f"{self.out} holds results of another sweep configuration ({theirs.get('config')}); "
                    f"results are never mixed or overwritten: pass --out to choose another folder"
                )
            return
        write_json_atomic(record, mine)

    def run(self, only: Optional[Sequence[int]] = None, progress: bool = True) -> list[dict]:
        """Run every unfinished cell (or the cells at the positions ``only``); returns all finished records."""
        cells = self.cells()
        if only is not None:
            bad = [i for i in only if not 0 <= i < len(cells)]
            if bad:
                raise ValueError(f"cell index {bad[0]} is outside 0..{len(cells) - 1}")
            todo_cells = [cells[i] for i in only]
        else:
            todo_cells = cells
        self.claim_folder()
        todo = [c for c in todo_cells if not self.result_path(c).exists()]
        print(f"sweep {self.config_path.name}: {len(cells)} cells, {len(cells) - self.count_unfinished(cells)} "
              f"finished, running {len(todo)} → {self.out}", flush=True)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        # its own console, no stream redirection: the cells print, log and may start W&B, which wraps stdout
        with Progress(*columns, disable=not progress, console=Console(stderr=True), redirect_stdout=False,
                      redirect_stderr=False) as bar:
            task = bar.add_task(f"{self.experiment} cells", total=len(todo))
            for cell in todo:
                bar.update(task, description=f"{self.experiment}: {cell.key}")
                start = time.time()
                result = self.run_cell(cell)
                if result is not None:  # rank 0 of a multi-process cell writes; the others return None
                    write_json_atomic(self.result_path(cell), {
                        "experiment": self.experiment, "key": cell.key, "cell": cell.params, "result": result,
                        "seconds": round(time.time() - start, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    })
                bar.advance(task)
        self.after_run(cells)
        return self.records(cells)

    def after_run(self, cells: Sequence[Cell]) -> None:
        """What a kind does once its cells ran (e.g. a figure over all of them); nothing by default."""

    def count_unfinished(self, cells: Sequence[Cell]) -> int:
        return sum(not self.result_path(c).exists() for c in cells)

    def records(self, cells: Optional[Sequence[Cell]] = None) -> list[dict]:
        return [json.loads(self.result_path(c).read_text()) for c in (cells or self.cells())
                if self.result_path(c).exists()]

    # ---------------------------------------------------------------- SLURM
    #: cells run as one process per GPU (Lightning DDP inside the cell); other kinds run one process per cell
    multi_process_cells: ClassVar[bool] = False

    def emit_slurm(self) -> Path:
        """``<out>/slurm.sh``: a SLURM array over the cells, each task running ``symstitch sweep --cell``.

        ``slurm:`` in the config sets resources: ``gpus`` per cell (several, for stitch cells: one task per GPU,
        Lightning DDP inside the cell, Lightning reads the SLURM environment), ``cpus``, ``time``, ``partition``,
        ``max_parallel``, ``max_array`` (the cluster's MaxArraySize − 1, default 1000: larger grids give each
        task a consecutive range of cells), ``setup`` (a shell line run first, e.g. activating an environment).
        """
        cells = self.cells()
        if not cells:
            raise ValueError(f"{self.config_path}: the grid has no cells; nothing to submit")
        s = {"gpus": 1, "cpus": 8, "time": "04:00:00", "partition": None, "max_parallel": 32, "max_array": 1000,
             "setup": None, **self.slurm}
        gpus = int(s["gpus"])
        per_task = -(-len(cells) // int(s["max_array"]))  # ceil
        tasks = -(-len(cells) // per_task)
        log_dir = (self.out / "slurm").resolve()
        lines = ["#!/bin/bash", f"#SBATCH --job-name=symstitch-{self.config_path.stem}",
                 f"#SBATCH --array=0-{tasks - 1}%{s['max_parallel']}",
                 f"#SBATCH --output={log_dir}/%A_%a.out", f"#SBATCH --time={s['time']}",
                 f"#SBATCH --cpus-per-task={s['cpus']}", "#SBATCH --nodes=1",
                 f"#SBATCH --ntasks-per-node={max(gpus, 1) if self.multi_process_cells else 1}"]
        if gpus:
            lines.append(f"#SBATCH --gres=gpu:{gpus}")
        if s["partition"]:
            lines.append(f"#SBATCH --partition={s['partition']}")
        lines += ["", f"# {len(cells)} independent cells of {self.config_path}, {per_task} per array task.",
                  "# A cell that finished is skipped, so resubmitting the array only runs what is missing.",
                  "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
        if s["setup"]:
            lines.append(str(s["setup"]))
        lines += [f"FIRST=$((SLURM_ARRAY_TASK_ID * {per_task}))",
                  f"LAST=$((FIRST + {per_task - 1} < {len(cells) - 1} ? FIRST + {per_task - 1} : {len(cells) - 1}))"]
        command = ["symstitch", "sweep", "--config", str(self.config_path.resolve()), "--out",
                   str(self.out.resolve()), "--cell", "${FIRST}-${LAST}", "--no-progress"]
        lines.append("srun " + " ".join(c if c.startswith("$") else shlex.quote(c) for c in command))
        path = self.out / "slurm.sh"
        path.parent.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        self.claim_folder()
        return path


def load_sweep(config_path: Path | str, out: Optional[Path | str] = None) -> Sweep:
    config_path = Path(config_path)
    if not config_path.is_file():
        raise ValueError(f"no sweep config {config_path}; the experiments are in experiments/*.yaml")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{config_path} is not valid YAML: {err}") from None
    if not isinstance(config, dict) or "experiment" not in config:
        raise ValueError(f"{config_path}: a sweep config needs `experiment:` (one of {', '.join(SWEEPS)})")
    return SWEEPS.get(config["experiment"])(config, config_path, Path(out) if out else None)


def run_generated(config: dict, out: Path, command: str) -> list[dict]:
    """Run a sweep that a command (``symstitch stitch``, ``symstitch projection``) built from its options.

    The config is written to ``<out>/<experiment>.yaml`` first, so the same grid can be rerun, listed or sent to
    SLURM with ``symstitch sweep --config`` that file; a folder whose config differs is refused."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{config['experiment']}.yaml"
    if path.exists() and yaml.safe_load(path.read_text()) != config:
        raise ValueError(f"{out} holds {config['experiment']} results of other settings ({path}); results are "
                         "never mixed or overwritten: pass another --out")
    path.write_text(f"# written by `{command}`; rerun with `symstitch sweep --config` this file\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return load_sweep(path, out).run()


# ----------------------------------------------------------------------------------------------------------
# Experiment kinds


def _zoo_models(zoo: str, arch: str, seeds: Sequence[int]) -> dict[int, str]:
    """``seed → '<zoo>:<arch>/seed<k>'`` for seeds the library holds; a clear error naming the missing ones."""
    from symstitch.zoo import Manifest, key_of

    manifest = Manifest(zoo)
    have = manifest.load()
    missing = [s for s in seeds if key_of(arch, s) not in have]
    if missing:
        raise ValueError(f"the model library {zoo} lacks {arch} seeds {missing}; train them first, e.g. "
                         f"`symstitch sweep --config experiments/zoo_<dataset>.yaml` or `symstitch zoo --arch "
                         f"{arch} --seeds {','.join(map(str, missing))} --out {zoo} --config …`")
    return {s: f"{zoo}:{key_of(arch, s)}" for s in seeds}


def load_classifier_points(path: Path) -> tuple[str, ...]:
    """Stitch points, in depth order, of the classifier saved at ``path``."""
    from symstitch.checkpoints import load_classifier

    return load_classifier(path).stitch_points


def _names(value: Any) -> list[str]:
    """A list of names from a YAML list or a comma-separated string."""
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]


def _pairs(seeds: Sequence[int], kind: str) -> list[tuple[int, int]]:
    kinds = {
        "unordered": [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]],
        "ordered": [(a, b) for a in seeds for b in seeds if a != b],
        "self": [(a, a) for a in seeds],
    }
    if kind not in kinds:
        raise ValueError(f"pairs is one of {', '.join(kinds)}, got {kind!r}")
    return kinds[kind]


@SWEEPS.register("zoo")
class ZooSweep(Sweep):
    """Paper §5 zoo: every architecture × seed, each trained by the code path of ``symstitch zoo`` into the
    model library ``<out>`` (its ``manifest.json``)."""

    experiment = "zoo"
    options = {"models": Sweep.REQUIRED, "fit_args": []}

    def cells(self) -> list[Cell]:
        from symstitch import models

        chosen = self.settings["models"]  # {arch: seeds}
        if not isinstance(chosen, dict):
            raise ValueError(f"{self.config_path}: models maps architectures to seeds, e.g. {{resnet20: 0-9}}")
        for arch in chosen:
            models.MODELS.get(arch)
        return [Cell(f"{a}/seed{s}", {"arch": a, "seed": s}) for a, seeds in chosen.items() for s in _seeds(seeds)]

    def run_cell(self, cell: Cell) -> Optional[dict]:
        from symstitch.zoo import train_zoo

        entries = train_zoo(cell.params["arch"], [cell.params["seed"]], self.out, self.fit_args(arch=cell.params["arch"]))
        return entries[0] if entries else None

    def after_run(self, cells: Sequence[Cell]) -> None:
        from symstitch.zoo import plot_library

        for arch in dict.fromkeys(c.params["arch"] for c in cells):
            figure = plot_library(self.out, arch)
            if figure:
                print(f"zoo: training curves of {arch} in {figure}")


@SWEEPS.register("stitch")
class StitchSweep(Sweep):
    """Paper §4 stitching: pairs × stitch points × stitch layers × repeats, each cell ``symstitch fit`` with
    ``stitch_config`` (``{layer}`` replaced by the layer's name) plus ``fit_args``.

    The networks come from a model library (``zoo``, ``arch``, ``seeds``, ``pairs``) or are one explicit pair
    (``source``, ``target``: checkpoints or library entries), which is what ``symstitch stitch`` writes."""

    experiment = "stitch"
    multi_process_cells = True
    options = {"zoo": None, "arch": None, "seeds": None, "pairs": "unordered", "source": None, "target": None,
               "points": "all", "layers": ["standard", "birkhoff"], "repeats": 1,
               "stitch_config": "../configs/stitch/{layer}.yaml", "fit_args": []}

    def __init__(self, config: dict, config_path: Path, out: Optional[Path] = None):
        super().__init__(config, config_path, out)
        library = [k for k in ("zoo", "arch", "seeds") if config.get(k) is not None]
        pair = [k for k in ("source", "target") if config.get(k) is not None]
        if not ((len(library) == 3 and not pair) or (len(pair) == 2 and not library)):
            raise ValueError(f"{config_path}: a stitch sweep takes its networks from a model library (zoo, arch, "
                             "seeds) or as one pair (source, target)")

    def _networks(self) -> tuple[str, dict, list[tuple], list[str]]:
        """Architecture, name → model reference, pairs of names, and the net's stitch points in depth order
        (every pair checked to be stitchable before any cell runs)."""
        from symstitch.checkpoints import classifier_spec, read_checkpoint
        from symstitch.stitching import load_pair, resolve_model

        s = self.settings
        if s["source"] is not None:
            models, pairs = {"A": str(s["source"]), "B": str(s["target"])}, [("A", "B")]
        else:
            models = _zoo_models(s["zoo"], s["arch"], _seeds(s["seeds"]))
            pairs = _pairs(list(models), s["pairs"])
        if not pairs:
            return s["arch"] or "", models, [], []
        path = resolve_model(models[pairs[0][0]])
        arch = classifier_spec(read_checkpoint(path), path)["arch"]
        first = load_classifier_points(path)
        for a, b in pairs:
            load_pair(models[a], models[b], first[0])  # same architecture and shapes
        return arch, models, pairs, list(first)

    def cells(self) -> list[Cell]:
        from symstitch.stitch_layers import STITCH_LAYERS

        s = self.settings
        for layer in s["layers"]:
            STITCH_LAYERS.get(layer)
        arch, models, pairs, order = self._networks()
        points = order if s["points"] == "all" else _names(s["points"])
        for p in points:
            if p not in order:
                raise ValueError(f"{arch} has no stitch point {p!r}; valid stitch points: {', '.join(order)}")
        name = (lambda a, b: f"s{a}-s{b}") if s["source"] is None else (lambda a, b: f"{a}-{b}")
        return [
            Cell(f"{arch}/{name(a, b)}/{layer}/{point}/r{r}",
                 {"arch": arch, "source": models[a], "target": models[b], "source_seed": a, "target_seed": b,
                  "point": point, "point_index": order.index(point), "layer": layer, "repeat": r})
            for a, b in pairs for layer in s["layers"] for point in points for r in range(int(s["repeats"]))
        ]

    def run_cell(self, cell: Cell) -> Optional[dict]:
        from symstitch.cli import build_cli
        from symstitch.loggers import finish_wandb

        p = cell.params
        cell_dir = self.out / "runs" / cell.key
        args = ["fit", "--config", self.resolve(self.settings["stitch_config"].replace("{layer}", p["layer"])),
                *self.fit_args(layer=p["layer"]),
                "--model.source", p["source"], "--model.target", p["target"], "--model.point", p["point"],
                "--seed_everything", str(p["repeat"]), "--trainer.default_root_dir", str(cell_dir)]
        try:
            cli = build_cli(args)
        finally:
            finish_wandb()
        trainer = cli.trainer
        if not trainer.is_global_zero:
            return None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        summary = cli.model.summary()
        return {
            "penalty": metrics["test/stitch/penalty"],
            "stitched_acc": metrics["test/stitch/acc"],
            "source_acc": metrics["test/source/acc"],
            "target_acc": metrics["test/target/acc"],
            "permutation": summary.get("permutation"),
            "model": summary,
            "run_dir": str(cell_dir),
        }


@SWEEPS.register("align")
class AlignSweep(Sweep):
    """Paper §5 alignment: pairs × metrics, every feature-point pair of the two networks per cell, one pass of
    the evaluation data (``split``) through each network."""

    experiment = "align"
    options = {"zoo": Sweep.REQUIRED, "arch": Sweep.REQUIRED, "seeds": Sweep.REQUIRED, "pairs": "unordered",
               "metrics": ["procrustes_relu", "procrustes_orthogonal", "cka_linear", "cka_relu"],
               "points": "all", "cka_mode": "exact", "data": {}, "split": "test", "images": None,
               "batch_size": 500}

    def cells(self) -> list[Cell]:
        from symstitch.metrics import METRICS

        s = self.settings
        for metric in s["metrics"]:
            METRICS.get(metric)
        models = _zoo_models(s["zoo"], s["arch"], _seeds(s["seeds"]))
        return [Cell(f"{s['arch']}/s{a}-s{b}/{metric}",
                     {"arch": s["arch"], "source": models[a], "target": models[b], "source_seed": a,
                      "target_seed": b, "metric": metric, "cka_mode": s["cka_mode"]})
                for a, b in _pairs(list(models), s["pairs"]) for metric in s["metrics"]]

    def run_cell(self, cell: Cell) -> Optional[dict]:
        import torch

        from symstitch.align import align_pair

        s, p = self.settings, cell.params
        return align_pair(p["source"], p["target"], [p["metric"]], points=s["points"], cka_mode=s["cka_mode"],
                          data=s["data"], split=s["split"], images=s["images"], batch_size=s["batch_size"],
                          progress=False, device="cuda" if torch.cuda.is_available() else None)[p["metric"]]


@SWEEPS.register("projection")
class ProjectionSweep(Sweep):
    """Paper §3 projection experiment: networks × layers × matrix kinds × repeats, each cell
    :func:`symstitch.projection.run_cell`. The networks are seed ``seed`` of each of ``archs`` in the model
    library ``zoo``, or given by name as ``models: {name: checkpoint or library entry}``."""

    experiment = "projection"
    options = {"zoo": None, "archs": ["mcnn", "mcnn_sigmoid"], "seed": 0, "models": None,
               "kinds": ["identity", "group", "orthogonal"], "points": "all", "repeats": 1, "epochs": 8,
               "lr": 0.05, "retrain": "rest"}

    def __init__(self, config: dict, config_path: Path, out: Optional[Path] = None):
        super().__init__(config, config_path, out)
        if (config.get("zoo") is None) == (config.get("models") is None):
            raise ValueError(f"{config_path}: a projection sweep takes its networks from a model library (zoo, "
                             "archs, seed) or by name (models)")

    def networks(self) -> dict[str, str]:
        s = self.settings
        if s["models"] is not None:
            return {str(name): str(ref) for name, ref in s["models"].items()}
        seed = int(s["seed"])
        return {f"{arch}-seed{seed}": _zoo_models(s["zoo"], arch, [seed])[seed] for arch in s["archs"]}

    def cells(self) -> list[Cell]:
        from symstitch.checkpoints import load_classifier
        from symstitch.projection import MATRICES, projection_points
        from symstitch.stitching import resolve_model

        s = self.settings
        for kind in s["kinds"]:
            MATRICES.get(kind)
        cells = []
        for network, ref in self.networks().items():
            valid = projection_points(load_classifier(resolve_model(ref)))
            points = list(valid) if s["points"] == "all" else _names(s["points"])
            for point in points:
                if point not in valid:
                    raise ValueError(f"no projection point {point!r} in {network}; valid: {', '.join(valid)}")
            cells += [Cell(f"{network}/{point}/{kind}-r{r}",
                           {"network": network, "model": ref, "point": point, "matrix": kind, "repeat": r})
                      for point in points for kind in s["kinds"] for r in range(int(s["repeats"]))]
        return cells

    def run_cell(self, cell: Cell) -> Optional[dict]:
        from symstitch.projection import clean_accuracy, run_cell
        from symstitch.stitching import datamodule_for, resolve_model

        s, p = self.settings, cell.params
        ckpt = resolve_model(p["model"])
        datamodule = datamodule_for(ckpt)
        cell_dir = self.out / "runs" / cell.key
        record = run_cell(p["network"], ckpt, p["point"], p["matrix"], p["repeat"], int(s["epochs"]), float(s["lr"]),
                          datamodule, cell_dir, s["retrain"])
        record["clean_acc"] = clean_accuracy(ckpt, datamodule, self.out / "runs" / p["network"] / "clean")
        return record


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="symstitch sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiments/<name>.yaml")
    parser.add_argument("--out", default=None, help="results folder (default: the config's `out`)")
    parser.add_argument("--cell", default=None, help="run only these cells: an index or a list, e.g. 3 or 0-4,9")
    parser.add_argument("--emit", choices=["slurm"], default=None, help="write a job script instead of running")
    parser.add_argument("--list", action="store_true", help="print the cells and whether each has finished")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (batch jobs)")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    sweep = load_sweep(args.config, args.out)
    if args.emit == "slurm":
        path = sweep.emit_slurm()
        print(f"sweep: {len(sweep.cells())} cells; submit with `sbatch {path}`")
        return 0
    if args.list:
        for i, cell in enumerate(sweep.cells()):
            print(f"{i:5d}  {'done   ' if sweep.result_path(cell).exists() else 'pending'}  {cell.key}")
        return 0
    from symstitch.zoo import parse_seeds

    only = parse_seeds(args.cell) if args.cell is not None else None
    records = sweep.run(only, progress=not args.no_progress)
    left = sweep.count_unfinished(sweep.cells())
    print(f"sweep: {len(records)} cells finished in {sweep.out}" + (f", {left} left" if left else "")
          + f"; report: symstitch report {sweep.out}")
    return 0
