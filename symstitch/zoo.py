"""A model library: many independently seeded networks of one architecture, with a manifest.

    symstitch zoo --arch resnet20 --seeds 0-9 --out zoo --config configs/zoo/resnet20.yaml [fit overrides]

Each seed is one ``symstitch fit`` run (the same LightningCLI code path) in ``<out>/<arch>/seed<k>/``,
followed by a test-set evaluation; its weights-only checkpoint is written atomically and only then is the
seed recorded in ``<out>/manifest.json`` (also replaced atomically, under a file lock). Rerunning skips the
seeds the manifest holds; a run killed mid-way loses only the seed in progress, whose partial folder is
discarded on the next run. A seed recorded with a different training configuration is an error, never
silently mixed into the library.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import yaml

MANIFEST = "manifest.json"

#: Config keys that do not change the trained network (left out of the configuration hash).
_NOT_HASHED = (
    "seed_everything", "trainer.default_root_dir", "trainer.logger", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "data.root", "data.download", "data.num_workers", "data.verify_checksums",
)


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` → ``[0, 1, 2, 3, 7]``."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            rng = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"bad seed list {text!r}: use e.g. 0-9 or 0,3,5-7") from None
        seeds.extend(s for s in rng if s not in seeds)
    if not seeds:
        raise ValueError(f"bad seed list {text!r}: no seeds")
    return seeds


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Manifest:
    """``<library>/manifest.json``: ``{"models": {"<arch>/seed<k>": entry, ...}}``; paths relative to it."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.path = self.root / MANIFEST

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())["models"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{self.path} is not a symstitch zoo manifest: {err}") from None

    def add(self, key: str, entry: dict, replace: bool = False) -> bool:
        """Record ``entry``; False (and nothing written) when ``key`` is already there, unless ``replace``."""
        with self.locked():
            models = self.load()
            if key in models and not replace:
                return False
            models[key] = entry
            write_atomic(self.path, json.dumps({"models": dict(sorted(models.items()))}, indent=2) + "\n")
            return True

    def entry(self, arch: str, seed: int) -> Optional[dict]:
        return self.load().get(key_of(arch, seed))

    def checkpoint(self, entry: dict) -> Path:
        return self.root / entry["checkpoint"]


def key_of(arch: str, seed: int) -> str:
    return f"{arch}/seed{seed}"


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


def train_seed(arch: str, seed: int, out: Path, fit_args: Sequence[str], expected_hash: Optional[str] = None) -> dict:
    """Train, test and save one seed; returns its manifest entry (not yet recorded)."""
    from symstitch.cli import build_cli
    from symstitch.loggers import finish_wandb

    seed_dir = out / arch / f"seed{seed}"
    args = [
        *fit_args,
        "--model.init_args.arch",
        arch,
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(seed_dir),
    ]
    start = time.time()
    try:
        cli = build_cli(args, run=False)
        config = cli.parser.dump(cli.config, format="yaml", skip_check=True)
        cfg_dict = yaml.safe_load(config)
        digest = config_hash(cfg_dict)
        if expected_hash is not None and digest != expected_hash:
            raise ValueError(
                f"{out} already holds {arch} models trained with another configuration (hash "
                f"{expected_hash}, this run {digest}); a library must not mix them: use another --out"
            )
        trainer = cli.trainer
        if trainer.world_size > 1:
            raise ValueError(
                "symstitch zoo trains one process per seed; for several devices per seed run `symstitch fit` "
                "once per seed (e.g. a SLURM array), or run several zoo processes on disjoint --seeds"
            )
        if seed_dir.exists():
            print(f"zoo: discarding the unfinished run in {seed_dir}")
            shutil.rmtree(seed_dir)
        seed_dir.mkdir(parents=True)
        trainer.fit(cli.model, datamodule=cli.datamodule)
        tested = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        if not trainer.is_global_zero:
            return {}
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
        "config_hash": digest,
        "seconds": round(time.time() - start, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def train_zoo(arch: str, seeds: Sequence[int], out: Path | str, fit_args: Sequence[str] = ()) -> list[dict]:
    """Train every seed the manifest lacks; returns the manifest entries of ``seeds``."""
    out = Path(out)
    manifest = Manifest(out)
    done = manifest.load()
    reference = next((e["config_hash"] for k, e in done.items() if e["arch"] == arch), None)
    todo = [s for s in seeds if key_of(arch, s) not in done or not manifest.checkpoint(done[key_of(arch, s)]).exists()]
    print(f"zoo: {arch}: {len(seeds) - len(todo)} of {len(seeds)} seeds already in {manifest.path}")
    for i, seed in enumerate(todo, 1):
        print(f"zoo: {arch} seed {seed} ({i}/{len(todo)})")
        entry = train_seed(arch, seed, out, fit_args, expected_hash=reference)
        if not entry:
            continue
        reference = reference or entry["config_hash"]
        stale = key_of(arch, seed) in done  # recorded, but its checkpoint had gone missing: retrained
        if not manifest.add(key_of(arch, seed), entry, replace=stale):
            print(f"zoo: {key_of(arch, seed)} was recorded by another process meanwhile; kept that one")
    done = manifest.load()
    return [done[key_of(arch, s)] for s in seeds if key_of(arch, s) in done]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="symstitch zoo",
        description=__doc__.split("\n\n")[0],
        epilog="Any other option is passed to `symstitch fit`, e.g. --config FILE --data.dataset digits "
        "--trainer.max_epochs 15.",
    )
    parser.add_argument("--arch", required=True, help="architecture (symstitch.models.available())")
    parser.add_argument("--seeds", default="0-9", help="seeds, e.g. 0-9 or 0,3,5-7 (default 0-9)")
    parser.add_argument("--out", default="zoo", help="model library folder (default ./zoo)")
    args, fit_args = parser.parse_known_args(argv)
    from symstitch import models

    if args.arch not in models.MODELS:
        parser.error(f"unknown architecture {args.arch!r}; available: {', '.join(models.available())}")
    entries = train_zoo(args.arch, parse_seeds(args.seeds), args.out, fit_args)
    _print_table(entries, Path(args.out) / MANIFEST)
    figure = plot_library(Path(args.out), args.arch)
    if figure:
        print(f"zoo: training curves in {figure}")
    return 0


def plot_library(out: Path, arch: str) -> Optional[Path]:
    """``<out>/<arch>_curves.png``: train and validation accuracy per epoch of every seed of ``arch``."""
    from symstitch.plots import training_curves

    runs, datasets = {}, set()
    for key, entry in Manifest(out).load().items():
        if entry["arch"] == arch:
            logs = sorted((out / key).glob("fit/version_*/metrics.csv"))
            if logs:
                runs[f"seed {entry['seed']} (test {entry['test_acc']:.3f})"] = logs[-1]
                datasets.add(entry["dataset"])
    if not runs:
        return None
    dataset = ", ".join(sorted(datasets))
    return training_curves(runs, out / f"{arch}_curves.png", title=f"{arch} on {dataset}")


def _print_table(entries: list[dict], manifest_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model library {manifest_path}")
    for col in ("model", "dataset", "test acc", "epochs", "checkpoint"):
        table.add_column(col)
    for e in entries:
        table.add_row(key_of(e["arch"], e["seed"]), e["dataset"], f"{e['test_acc']:.4f}", str(e["epochs"]), e["checkpoint"])
    Console().print(table)
