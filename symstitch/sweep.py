"""The paper's experiments as resumable grids: ``symstitch sweep --config experiments/<name>.yaml``.

A sweep config names an experiment kind (:data:`symstitch.runner.EXPERIMENTS`: ``zoo``, ``stitch``, ``align``,
``projection``), its results folder and its grid:

    experiment: stitch            # zoo | stitch | align | projection
    out: runs/digits/stitch       # results folder (relative to the current directory)
    zoo: runs/digits/zoo          # model library the networks come from
    arch: resnet20
    seeds: 0-1                    # pairs of these seeds (unordered: source seed < target seed)
    points: all
    layers: [standard, birkhoff]
    repeats: 1
    fit_args: [--trainer.max_epochs, "4"]

Each cell runs in this process through the same code path as the single-run command (a stitch cell is
``symstitch fit --config configs/stitch/<layer>.yaml --model.source … --model.point …``, a zoo cell one seed of
``symstitch zoo``) and leaves one :class:`~symstitch.runner.CellRecord`; :class:`~symstitch.runner.Runner`
resumes, locks and records. ``--emit slurm`` writes a SLURM array script whose task i runs ``symstitch sweep
--config … --cell i``.

Paths inside a sweep config (``stitch_config``, ``--config``/``--data`` values in ``fit_args``) are relative to
the config file, or name a shipped config (``configs/stitch/birkhoff.yaml``); ``out`` and ``zoo`` are relative
to the current directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

# every experiment kind registers itself in EXPERIMENTS when its module is imported
from symstitch import align, projection, zoo  # noqa: F401
from symstitch.stitching import experiment as _stitch_experiment  # noqa: F401
from symstitch.dissect import experiment as _dissect_experiment  # noqa: F401
from symstitch.merge import experiment as _merge_experiment  # noqa: F401
from symstitch.io import writable_folder, write_atomic
from symstitch.runner import EXPERIMENTS, CellRecord, Runner

#: keys of a sweep config that are the runner's, not the experiment's
RUNNER_KEYS = ("experiment", "out", "slurm")


def read_config(config_path: Path | str) -> dict:
    config_path = Path(config_path)
    if not config_path.is_file():
        raise ValueError(f"no sweep config {config_path}; the paper's experiments are in experiments/*.yaml")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{config_path} is not valid YAML: {err}") from None
    if not isinstance(config, dict) or "experiment" not in config:
        raise ValueError(f"{config_path}: a sweep config needs `experiment:` (one of {', '.join(EXPERIMENTS)})")
    return config


def runner_for(config: dict, out: Optional[Path | str], base: Path, label: str) -> Runner:
    """The :class:`Runner` of a sweep config (a dict); ``out`` overrides the config's folder."""
    kind = EXPERIMENTS.get(config["experiment"])
    settings = {k: v for k, v in config.items() if k not in RUNNER_KEYS}
    try:
        experiment = kind(settings, base)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None
    folder = Path(out or config.get("out") or f"runs/sweeps/{Path(label).stem}")
    return Runner(experiment, folder, label=label, slurm=config.get("slurm"))


def load_sweep(config_path: Path | str, out: Optional[Path | str] = None) -> Runner:
    """The :class:`Runner` of the sweep config file ``config_path``."""
    config_path = Path(config_path)
    return runner_for(read_config(config_path), out, config_path.resolve().parent, str(config_path))


def run_generated(config: dict, out: Path, command: str, progress: bool = True) -> list[CellRecord]:
    """Run an experiment that a command (``symstitch stitch``, ``align``, ``projection``) built from its options.

    The grid is expanded and checked first; only then is the config written to ``<out>/<experiment>.yaml`` (so
    the same grid can be rerun, listed or sent to SLURM with ``symstitch sweep --config`` that file) and the
    cells run. A folder holding other settings is refused; a failed start writes nothing."""
    runner = runner_for(config, out, Path.cwd(), f"{command} → {out}")
    runner.prepare()
    path = Path(out) / f"{config['experiment']}.yaml"
    if path.exists() and yaml.safe_load(path.read_text()) != config:
        raise ValueError(f"{out} holds {config['experiment']} results of other settings ({path}); results are never "
                         "mixed or overwritten: choose another output folder")
    writable_folder(out)
    write_atomic(path, f"# written by `{command}`; rerun with `symstitch sweep --config` this file\n"
                 + yaml.safe_dump(config, sort_keys=False))
    return runner.run(progress=progress)
