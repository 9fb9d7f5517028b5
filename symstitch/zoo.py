"""A model library: many independently seeded networks of one architecture, with a manifest.

    symstitch zoo --arch resnet20 --seeds 0-9 --out zoo --config configs/zoo/resnet20.yaml [fit overrides]

Each seed is one ``symstitch fit`` run (the same LightningCLI code path) in ``<out>/<arch>/seed<k>/``, followed
by a test-set evaluation; its weights-only checkpoint is written atomically and only then is the seed recorded
in ``<out>/manifest.json`` (:class:`symstitch.library.Manifest`). Rerunning skips the seeds the manifest holds;
a run killed mid-way loses only the seed in progress, whose partial folder is discarded on the next run.

Each seed trains under a lock of its folder: a second process asked for the same seed leaves it to the first
(never deletes a live folder). A seed recorded with a different training configuration is an error, never
silently mixed into the library or returned in place of the one asked for; a run whose loss became NaN or
infinite stops with an error and is never recorded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from symstitch.cli import build_cli
from symstitch.io import Busy, Lock, parse_range, write_atomic
from symstitch.library import Manifest, key_of
from symstitch.loggers import finish_wandb
from symstitch.models import MODELS
from symstitch.plots import training_curves
from symstitch.runner import EXPERIMENTS, Cell, Experiment, REQUIRED

#: Config keys that do not change the trained network (left out of the configuration hash).
_NOT_HASHED = (
    "seed_everything", "trainer.default_root_dir", "trainer.logger", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "data.root", "data.download", "data.num_workers", "data.verify_checksums",
)


def config_hash(config: dict) -> str:
    """Hash of the training configuration, without the keys that do not change the network."""
    cfg = json.loads(json.dumps(config, default=str))
    for dotted in _NOT_HASHED:
        node, *rest = dotted.split(".")
        parent = cfg
        for part in rest:
            parent = parent.get(node) if isinstance(parent, dict) else None
            node = part
        if isinstance(parent, dict):
            parent.pop(node, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _seed_args(arch: str, seed: int, seed_dir: Path, fit_args: Sequence[str]) -> list[str]:
    return [*fit_args, "--model.init_args.arch", arch, "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(seed_dir)]


def planned_hash(arch: str, out: Path, fit_args: Sequence[str]) -> str:
    """The configuration hash a seed of ``arch`` would be trained with (arguments parsed, nothing built)."""
    cli = build_cli(_seed_args(arch, 0, out / arch / "seed0", fit_args), run=False, parse_only=True)
    return config_hash(yaml.safe_load(cli.parser.dump(cli.config, format="yaml", skip_check=True)))


def train_seed(arch: str, seed: int, out: Path, fit_args: Sequence[str]) -> dict:
    """Train, test and save one seed under the lock of its folder; returns its manifest entry (not yet
    recorded), or {} on the non-zero ranks. :class:`~symstitch.io.Busy` when another process trains it."""
    seed_dir = out / arch / f"seed{seed}"
    with Lock(out / arch / f".seed{seed}.lock", what=f"{key_of(arch, seed)} in {out}", wait=False):
        start = time.time()
        try:
            cli = build_cli(_seed_args(arch, seed, seed_dir, fit_args), run=False)
            config = cli.parser.dump(cli.config, format="yaml", skip_check=True)
            cfg_dict = yaml.safe_load(config)
            trainer = cli.trainer
            if trainer.world_size > 1:
                raise ValueError("symstitch zoo trains one process per seed; for several devices per seed run "
                                 "`symstitch fit` once per seed (e.g. a SLURM array), or run several zoo processes")
            if seed_dir.exists():  # ours alone (we hold its lock): what a killed run left
                print(f"zoo: discarding the unfinished run in {seed_dir}")
                shutil.rmtree(seed_dir)
            seed_dir.mkdir(parents=True)
            trainer.fit(cli.model, datamodule=cli.datamodule)
            tested = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
            if not trainer.is_global_zero:
                return {}
            if not all(math.isfinite(float(v)) for v in tested.values()):
                raise ValueError(f"{key_of(arch, seed)}: the trained network's test metrics are not finite "
                                 f"({tested}); it is not recorded")
            write_atomic(seed_dir / "config.yaml", config)
            tmp = seed_dir / ".model.ckpt.tmp"
            trainer.save_checkpoint(tmp, weights_only=True)
            os.replace(tmp, seed_dir / "model.ckpt")
        finally:
            finish_wandb()
    return {
        "arch": arch,
        "seed": seed,
        "dataset": cfg_dict["data"]["dataset"],
        "test_acc": float(tested["test/acc"]),
        "test_loss": float(tested["test/loss"]),
        "epochs": int(trainer.current_epoch),
        "checkpoint": str((seed_dir / "model.ckpt").relative_to(out)),
        "config": str((seed_dir / "config.yaml").relative_to(out)),
        "config_hash": config_hash(cfg_dict),
        "seconds": round(time.time() - start, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def train_zoo(arch: str, seeds: Sequence[int], out: Path | str, fit_args: Sequence[str] = ()) -> list[dict]:
    """Train every seed the library lacks; returns the manifest entries of ``seeds`` that are recorded.

    Every seed of ``arch`` in the library, recorded or asked for, must share one training configuration: a
    rerun with other settings is refused before anything trains, never answered with the old models. Seeds
    another process is training are left to it (and missing from the return value)."""
    MODELS.get(arch)  # an unknown architecture: the list of known ones
    out = Path(out)
    manifest = Manifest(out)
    done = manifest.load()
    wanted = planned_hash(arch, out, fit_args)
    recorded = {e["config_hash"] for e in done.values() if e["arch"] == arch}
    if recorded - {wanted}:
        raise ValueError(f"{out} holds {arch} models trained with another configuration (hash "
                         f"{', '.join(sorted(recorded))}, this run {wanted}); a library must not mix them and an "
                         "old model is never returned for new settings: use another --out")
    todo = [s for s in seeds if key_of(arch, s) not in done or not manifest.checkpoint(done[key_of(arch, s)]).exists()]
    print(f"zoo: {arch}: {len(seeds) - len(todo)} of {len(seeds)} seeds already in {manifest.path}")
    for i, seed in enumerate(todo, 1):
        print(f"zoo: {arch} seed {seed} ({i}/{len(todo)})")
        try:
            entry = train_seed(arch, seed, out, fit_args)
        except Busy as busy:
            print(f"zoo: {busy}; left to it")
            continue
        if not entry:
            continue
        stale = key_of(arch, seed) in done  # recorded, but its checkpoint had gone missing: retrained
        if not manifest.add(key_of(arch, seed), entry, replace=stale):
            print(f"zoo: {key_of(arch, seed)} was recorded by another process meanwhile; kept that one")
    done = manifest.load()
    return [done[key_of(arch, s)] for s in seeds if key_of(arch, s) in done]


def plot_library(out: Path, arch: str) -> Optional[Path]:
    """``<out>/<arch>_curves.png``: train and validation accuracy per epoch of every seed of ``arch``."""
    runs, datasets = {}, set()
    for key, entry in Manifest(out).load().items():
        if entry["arch"] == arch:
            logs = sorted((out / key).glob("fit/version_*/metrics.csv"))
            if logs:
                runs[f"seed {entry['seed']} (test {entry['test_acc']:.3f})"] = logs[-1]
                datasets.add(entry["dataset"])
    if not runs:
        return None
    return training_curves(runs, out / f"{arch}_curves.png", title=f"{arch} on {', '.join(sorted(datasets))}")


@EXPERIMENTS.register("zoo")
class ZooExperiment(Experiment):
    """Paper §5 zoo: every architecture × seed, each trained by the code path of ``symstitch zoo`` into the
    model library ``<out>`` (its ``manifest.json``)."""

    name = "zoo"
    options = {"models": REQUIRED, "fit_args": []}

    def cells(self) -> list[Cell]:
        chosen = self.settings["models"]  # {arch: seeds}
        if not isinstance(chosen, dict):
            raise ValueError("models maps architectures to seeds, e.g. {resnet20: 0-9}")
        for arch in chosen:
            MODELS.get(arch)
        return [Cell(f"{a}/seed{s}", {"arch": a, "seed": s}) for a, seeds in chosen.items() for s in parse_range(seeds)]

    def check(self, cells: list[Cell]) -> None:
        for arch in dict.fromkeys(c.params["arch"] for c in cells):
            planned_hash(arch, Path("."), self.fit_args(arch=arch))  # arguments parse, before anything is written

    def run_cell(self, cell: Cell, out: Path) -> Optional[dict]:
        # the library is the sweep folder itself: the seed lives in <out>/<arch>/seed<k>/; the sweep shows the
        # progress (a second live display per cell costs the training time on a small machine)
        args = [*self.fit_args(arch=cell.params["arch"]), "--trainer.enable_progress_bar", "false"]
        entries = train_zoo(cell.params["arch"], [cell.params["seed"]], out, args)
        if not entries:
            raise Busy(f"cell {cell.key} is being trained by another process")
        return entries[0]

    def after_run(self, out: Path, records: Sequence) -> None:
        for arch in dict.fromkeys(r.cell["arch"] for r in records):
            figure = plot_library(out, arch)
            if figure:
                print(f"zoo: training curves of {arch} in {figure}")
