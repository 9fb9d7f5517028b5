"""Fixed overhead of a stitch cell: what a cell costs beyond its training and test steps.

A stitch sweep runs every cell in its own process's LightningCLI path (parse the cell's arguments, build the
networks, the data and a Trainer, fit, test, write the record). This script runs one stitch sweep of the digits
twin's settings (two 1-epoch digits ResNet-20s, 4 stitch points × standard/birkhoff = 8 cells, 1 epoch each) and
splits each cell's wall time into

- work: the training steps (forward, backward, optimizer step, projection), the data-driven start and the test
  steps, timed by a callback around every batch;
- overhead: everything else (argument parsing, checkpoints, data, Trainer, loops, records).

With ``--compare REF`` it runs the same sweep, in the same run, with the code of git revision REF (its files from
git in a temporary folder, ``git_tree.source_tree``; a subprocess: that code as it was) and prints the ratio of
the two median cell times; the work per cell is the same computation in both, so the difference is overhead.

    python experiments/benchmarks/cell_overhead.py [--compare 6d5f7c2] [--out runs/bench/cell_overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import yaml

from symstitch import cli, configs, zoo
from symstitch.loggers import quiet
from symstitch.stitching import StitchingModule
from symstitch.sweep import load_sweep

from git_tree import source_tree

POINTS = ["stem.act", "layer1.0.act2", "layer2.0.act2", "layer3.0.act2"]


class WorkClock(pl.Callback):
    """Seconds spent inside training and test batches (all of a batch's compute), summed over the process."""

    seconds = 0.0

    def _start(self, *args) -> None:
        self._t = time.perf_counter()

    def _stop(self, *args) -> None:
        WorkClock.seconds += time.perf_counter() - self._t

    on_train_batch_start = on_test_batch_start = _start
    on_train_batch_end = on_test_batch_end = _stop


def _timed(method):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            WorkClock.seconds += time.perf_counter() - start
    return wrapper


def sweep_config(out: Path, library: Path, configs_dir: Path) -> dict:
    return {"experiment": "stitch", "out": str(out), "zoo": str(library), "arch": "resnet20", "seeds": "0-1",
            "points": POINTS, "layers": ["standard", "birkhoff"],
            "stitch_config": str(configs_dir / "stitch" / "{layer}.yaml"),
            "fit_args": ["--trainer.max_epochs", "1", "--model.init_args.relaxed_epochs", "0",
                         "--model.init_args.init", "data", "--model.init_args.optimizer.init_args.lr", "0.005",
                         "--config", str(configs_dir / "logger" / "csv.yaml"), "--trainer.enable_progress_bar",
                         "false", "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0"]}


def seconds_of(cells: Path) -> list[float]:
    return [json.loads(p.read_text())["seconds"] for p in sorted(cells.rglob("*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench/cell_overhead")
    parser.add_argument("--compare", default=None, help="a git revision to run the same sweep with, side by side")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    quiet()
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}  (quote no ratio measured under load)")
    library = out / "lib"
    zoo.train_zoo("resnet20", [0, 1], library, ["--config", str(configs.path("zoo/resnet20.yaml")), "--data",
                                                str(configs.path("data/digits.yaml")), "--trainer.max_epochs", "1",
                                                "--config", str(configs.path("logger/csv.yaml"))])

    # this code, in process, with the work clocked
    defaults = cli.trainer_defaults
    cli.trainer_defaults = lambda: {**defaults(), "callbacks": [*defaults()["callbacks"], WorkClock()]}
    StitchingModule._init_from_data = _timed(StitchingModule._init_from_data)
    config = out / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep_config(out / "now", library, configs.ROOT)))
    start = time.perf_counter()
    records = load_sweep(config, out / f"now-{int(time.time())}").run(progress=False)
    total = time.perf_counter() - start
    walls = [r.seconds for r in records]
    work = WorkClock.seconds / len(records)
    print(f"\nthis code: {len(records)} cells in {total:.1f} s; per cell: median {statistics.median(walls):.2f} s, of "
          f"which work {work:.2f} s (mean) → fixed overhead ≈ {statistics.median(walls) - work:.2f} s per cell")

    if args.compare:
        with tempfile.TemporaryDirectory() as tmp, source_tree(args.compare) as tree:
            cfg = Path(tmp) / "sweep.yaml"
            cfg.write_text(yaml.safe_dump(sweep_config(Path(tmp) / "then", library, tree / "configs")))
            env = {**os.environ, "PYTHONPATH": str(tree)}
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "symstitch", "sweep", "--config", str(cfg), "--no-progress"],
                           check=True, env=env, cwd=tmp, capture_output=True)
            then_total = time.perf_counter() - start
            then = seconds_of(Path(tmp) / "then" / "cells")
        print(f"{args.compare}: {len(then)} cells in {then_total:.1f} s; per cell: median {statistics.median(then):.2f} s "
              f"→ overhead ≈ {statistics.median(then) - work:.2f} s per cell (same work)")
        print(f"median cell time, {args.compare} / this code: {statistics.median(then) / statistics.median(walls):.2f}×")


if __name__ == "__main__":
    main()
