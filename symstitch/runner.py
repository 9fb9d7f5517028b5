"""The experiment layer: one record type for every cell, one runner that runs, resumes and records cells.

An *experiment* (a registered :class:`Experiment` kind: ``zoo``, ``stitch``, ``align``, ``projection``) is a
grid of independent *cells*. A kind only says which cells its settings make (:meth:`Experiment.cells`) and
how one cell runs (:meth:`Experiment.run_cell`: build its LightningModule and fit/evaluate it, or compute it);
everything else is the :class:`Runner`'s, the same for every kind:

- the folder: ``<out>/sweep.json`` records the settings' fingerprint; a folder holding another grid is refused
  (results are never mixed or overwritten). It is written only once the grid has been expanded and checked,
  so a typo claims nothing;
- resuming: cell ``k`` is done when ``<out>/cells/<k>.json`` (a :class:`CellRecord`, written atomically after
  the cell finished) exists; a rerun skips it, so a killed sweep loses only the cell in progress;
- concurrency: a cell is run under a non-blocking lock ``<out>/cells/<k>.lock``; a cell another process is
  running is skipped (and reported), never computed twice or deleted;
- SLURM: :meth:`Runner.emit_slurm` writes an array script whose tasks run ``symstitch sweep --cell i``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from symstitch import configs
from symstitch.configs import OptionError
from symstitch.io import Busy, Lock, parse_range, read_json, write_json, writable_folder
from symstitch.library import library_missing, library_models, library_refs, ref_text
from symstitch.loggers import wandb_group, wandb_grouping, wandb_run
from symstitch.registry import Registry
from symstitch.reports import Section, section

#: experiment kind → its :class:`Experiment` class
EXPERIMENTS: Registry[type["Experiment"]] = Registry("experiment")


@dataclass(frozen=True)
class Cell:
    """One unit of work: ``key`` names its record (``cells/<key>.json``), ``params`` its settings."""

    key: str
    params: dict


def damage(path: Path) -> Optional[str]:
    """Why the file at ``path`` is not a readable cell record (None when it is one)."""
    try:
        CellRecord.read(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    except (KeyError, TypeError) as err:
        return f"not a cell record ({type(err).__name__}: {err})"
    return None


@dataclass
class CellRecord:
    """What a finished cell leaves, the same for every experiment (``cells/<key>.json``).

    ``result`` holds the experiment's numbers; a stitching penalty is ``penalty_pts``, in points of accuracy
    (×100), everywhere."""

    experiment: str
    key: str
    cell: dict
    result: dict
    seconds: float = 0.0
    finished: str = ""
    machine: dict = field(default_factory=dict)
    #: how many cells were computed together with this one (their ``seconds`` is that computation's time shared)
    side_by_side: int = 1
    file: Optional[str] = field(default=None, compare=False)

    @classmethod
    def read(cls, path: Path) -> "CellRecord":
        data = read_json(path)
        return cls(experiment=data["experiment"], key=data["key"], cell=data.get("cell") or {},
                   result=data["result"], seconds=data.get("seconds", 0.0), finished=data.get("finished", ""),
                   machine=data.get("machine") or {}, side_by_side=data.get("side_by_side", 1), file=str(path))

    def write(self, path: Path) -> None:
        write_json(path, {k: v for k, v in asdict(self).items() if k != "file"})


def machine() -> dict:
    """What computed a cell, as its numbers depend on it (another CPU path rounds otherwise, and a short training
    run amplifies that): the CPU's instruction path torch took, the accelerator, torch's version, the threads."""
    import platform

    torch = sys.modules.get("torch")  # loaded by every cell that computes anything
    info = {"cpu": platform.machine(), "torch": getattr(torch, "__version__", None)}
    if torch is not None:
        info["cpu"] = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
        info["threads"] = torch.get_num_threads()
        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


REQUIRED = object()


class Experiment(abc.ABC):
    """A grid of independent cells. Subclasses declare their settings in ``options`` (name → default;
    :data:`REQUIRED` marks required ones), list their cells and run one."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    #: cells run as one process per GPU (Lightning DDP inside the cell)
    multi_process_cells: ClassVar[bool] = False

    def __init__(self, settings: dict, base: Path = Path(".")):
        """``settings``: the sweep config without ``experiment``/``out``/``slurm``; ``base``: the folder paths
        written in it are relative to (the config file's)."""
        unknown = sorted(set(settings) - set(self.options))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} for a {self.name} experiment; valid keys: "
                             f"{', '.join(sorted(['experiment', 'out', 'slurm', *self.options]))}")
        missing = [k for k, v in self.options.items() if v is REQUIRED and k not in settings]
        if missing:
            raise ValueError(f"a {self.name} experiment needs {', '.join(missing)}")
        self.settings = {**self.options, **settings}
        self.base = Path(base)

    @abc.abstractmethod
    def cells(self) -> list[Cell]:
        """Every cell of the grid, in a fixed order (the SLURM array index is the position here). Checks the
        settings (names, points, networks) and raises before any work."""

    @abc.abstractmethod
    def run_cell(self, cell: Cell, out: Path) -> Optional[dict]:
        """Run one cell of the grid in the folder ``out`` (its own files under :meth:`cell_dir`); its result,
        or None on the non-zero ranks of a multi-process cell."""

    def groups(self, cells: Sequence[Cell]) -> list[list[Cell]]:
        """The cells that run together, in one computation (:meth:`run_group`), in order; each alone by default."""
        return [[cell] for cell in cells]

    def run_group(self, cells: Sequence[Cell], out: Path) -> Optional[dict[str, dict]]:
        """Run cells of one group together: ``{key: result}``, or None on the non-zero ranks of a multi-process
        run. By default each cell on its own (:meth:`run_cell`)."""
        results = {cell.key: self.run_cell(cell, out) for cell in cells}
        return None if any(r is None for r in results.values()) else results

    @staticmethod
    def cell_dir(out: Path, cell: Cell) -> Path:
        """Where a cell's own files (logs, checkpoints) go: ``<out>/runs/<key>``."""
        return Path(out) / "runs" / cell.key

    def check(self, cells: Sequence[Cell]) -> None:
        """Checks that need a cell (e.g. that its training arguments parse); nothing by default."""

    def after_run(self, out: Path, records: Sequence[CellRecord]) -> None:
        """What a kind does once its cells ran (e.g. a figure over all of them); nothing by default."""

    @classmethod
    def report(cls, records: Sequence[dict], out: Path) -> Section:
        """This kind's part of a report over its cell records (the dicts of :func:`symstitch.report.collect`):
        tables, figures and verdicts, its files written into ``out``. The section lives in the light module
        :mod:`symstitch.reports.<kind>`, so that ``symstitch report`` loads no torch."""
        return section(cls.name, records, out)

    def scope(self) -> ContextManager[Any]:
        """The context the cells of one run share, entered by :meth:`Runner.run` around them (a stitch sweep's
        prefix cache); nothing by default."""
        return contextlib.nullcontext()

    def wandb_fields(self, record: CellRecord) -> tuple[dict, dict]:
        """A finished cell as a W&B run: its config (the cell's settings and what computed it) and its summary
        (the numbers of its result, as recorded)."""
        numbers = {k: v for k, v in record.result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {**record.cell, "machine": record.machine}, {**numbers, "seconds": record.seconds}

    # ---------------------------------------------------------------- helpers for kinds
    def resolve(self, path: str) -> str:
        """A config path written in the settings: relative to the config file, else a shipped config."""
        return configs.resolve(path, self.base)

    def fit_args(self, **fmt: str) -> list[str]:
        """``fit_args`` of the settings with ``{name}`` filled in and config files resolved."""
        args = [str(a) for a in self.settings.get("fit_args") or []]
        for name, value in fmt.items():
            args = [a.replace("{" + name + "}", value) for a in args]
        for i, a in enumerate(args[:-1]):
            if a in ("--config", "-c", "--data", "--model", "--trainer") and args[i + 1].endswith((".yaml", ".yml")):
                args[i + 1] = self.resolve(args[i + 1])
        return args

    def fingerprint(self) -> str:
        """Hash of every setting (what changes a cell's outcome)."""
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def names(value: Any) -> list[str]:
    """A list of names from a YAML list or a comma-separated string."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [str(v) for v in value]


def pairs(items: Sequence[Any], kind: str) -> list[tuple[Any, Any]]:
    """Pairs of ``items``: ``unordered`` (i < j), ``ordered`` (i ≠ j), ``self`` (i = j) or ``disjoint`` (items 0–1,
    2–3, …: no network in two pairs, so the pairs are independent samples)."""
    kinds = {
        "unordered": [(a, b) for i, a in enumerate(items) for b in items[i + 1:]],
        "disjoint": [(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)],
        "ordered": [(a, b) for a in items for b in items if a != b],
        "self": [(a, a) for a in items],
    }
    if kind not in kinds:
        raise ValueError(f"pairs is one of {', '.join(kinds)}, got {kind!r}")
    return kinds[kind]


class PairExperiment(Experiment):
    """An experiment over pairs of networks, taken from a model library (``zoo``, ``arch``, ``seeds``, ``pairs``)
    or given as one pair (``source``, ``target``: checkpoints or library entries; what the one-pair commands
    write). Subclasses add their own ``options`` to :data:`PAIR_OPTIONS`."""

    def __init__(self, settings: dict, base: Path = Path(".")):
        super().__init__(settings, base)
        library = [k for k in ("zoo", "arch", "seeds") if settings.get(k) is not None]
        pair = [k for k in ("source", "target") if settings.get(k) is not None]
        if not ((len(library) == 3 and not pair) or (len(pair) == 2 and not library)):
            raise ValueError(f"the {self.name} experiment takes its networks from a model library (zoo, arch, seeds) "
                             "or as one pair (source, target)")

    def network_pairs(self) -> tuple[dict[Any, str], list[tuple[Any, Any]], str]:
        """Name → model reference, the pairs of names, and the pair's part of a cell key (``s0-s1`` for library
        seeds, ``A-B`` for a given pair), as a format string of ``a`` and ``b``."""
        s = self.settings
        if s["source"] is not None:
            return {"A": ref_text(s["source"]), "B": ref_text(s["target"])}, [("A", "B")], "{a}-{b}"
        models = library_refs(s["zoo"], s["arch"], parse_range(s["seeds"]))  # check() says which are missing
        return models, pairs(list(models), s["pairs"]), "s{a}-s{b}"

    def missing(self) -> list[int]:
        """The library's seeds that are not trained yet (none for a given pair): the grid can be listed before
        they exist (from the architecture), not run."""
        s = self.settings
        return [] if s["source"] is not None else library_missing(s["zoo"], s["arch"], parse_range(s["seeds"]))

    def check(self, cells: Sequence[Cell]) -> None:
        """The networks exist (:class:`~symstitch.library.MissingModels` names those to train first)."""
        if self.missing():
            s = self.settings
            library_models(s["zoo"], s["arch"], parse_range(s["seeds"]))


#: the settings of every :class:`PairExperiment`
PAIR_OPTIONS = {"zoo": None, "arch": None, "seeds": None, "pairs": "unordered", "source": None, "target": None}


def launched_rank() -> int:
    """The global rank this process was launched as (Lightning's DDP launcher sets ``LOCAL_RANK``/``NODE_RANK`` in
    the processes it starts, SLURM sets ``SLURM_PROCID`` in every task, torchrun ``RANK``); 0 for a lone process."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return int(os.environ.get("LOCAL_RANK", "0") or 0) + int(os.environ.get("NODE_RANK", "0") or 0)


class Runner:
    """Runs, resumes and records the cells of one experiment in the folder ``out``."""

    def __init__(self, experiment: Experiment, out: Path, label: str = "", slurm: Optional[dict] = None):
        self.experiment = experiment
        self.out = Path(out)
        self.label = label or experiment.name
        self.slurm = slurm or {}
        self._cells: Optional[list[Cell]] = None
        self._checked = False

    def cells(self) -> list[Cell]:
        """The experiment's cells (expanded once)."""
        if self._cells is None:
            self._cells = self.experiment.cells()
        return self._cells

    def record_path(self, cell: Cell) -> Path:
        return self.out / "cells" / f"{cell.key}.json"

    def status(self, cell: Cell) -> str:
        """``done`` (a readable record), ``pending`` (none) or ``damaged`` (a file that is not a readable record:
        cut short, edited, not JSON)."""
        path = self.record_path(cell)
        if not path.exists():
            return "pending"
        return "done" if damage(path) is None else "damaged"

    def done(self, cell: Cell) -> bool:
        return self.status(cell) == "done"

    def set_aside(self, cell: Cell) -> Optional[Path]:
        """Move a damaged record out of the way (``<key>.json.damaged-<time>``, never deleted) so that its cell runs
        again; says so on stderr. Returns where it went (None when the record is not damaged)."""
        path = self.record_path(cell)
        why = damage(path) if path.exists() else None
        if why is None:
            return None
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(aside)
        print(f"{self.label}: warning: {path} is not a readable cell record ({why}); moved to {aside.name}, the "
              "cell runs again", file=sys.stderr, flush=True)
        return aside

    def select(self, only: Optional[str | Sequence[int]]) -> list[Cell]:
        """The cells at positions ``only`` (``"0-4,9"`` or a list), all when None."""
        cells = self.cells()
        if only is None:
            return cells
        index = parse_range(only, "cell") if isinstance(only, str) else list(only)
        bad = [i for i in index if not 0 <= i < len(cells)]
        if bad:
            raise ValueError(f"cell index {bad[0]} is outside 0..{len(cells) - 1}")
        return [cells[i] for i in index]

    def claim(self) -> None:
        """Record the grid in ``<out>/sweep.json``; refuse a folder holding another grid. Only after the grid
        and its arguments were checked, so a failed start writes nothing."""
        record = self.out / "sweep.json"
        mine = {"experiment": self.experiment.name, "fingerprint": self.experiment.fingerprint(),
                "settings": self.experiment.settings, "label": self.label}
        writable_folder(self.out)
        with Lock(self.out / ".sweep.lock", what=str(record)):
            if record.exists():
                theirs = read_json(record)
                if theirs.get("fingerprint") != mine["fingerprint"]:
                    raise ValueError(f"{self.out} holds results of another {theirs.get('experiment')} configuration "
                                     f"({theirs.get('label')}); results are never mixed or overwritten: choose "
                                     "another output folder")
                return
            write_json(record, mine)

    def prepare(self) -> list[Cell]:
        """Expand the grid and check it (names, points, networks, each cell kind's arguments): raises before
        anything is written."""
        if not self._checked:
            try:
                self.experiment.check(self.cells())
            except OptionError as err:  # the cells' training options come from the sweep's settings
                raise OptionError(f"the training options of this sweep's cells (fit_args, layer options) do not "
                                  f"parse: {err}") from None
            self._checked = True
        return self.cells()

    def run(self, only: Optional[str | Sequence[int]] = None, progress: bool = True,
            wandb: bool = False) -> list[CellRecord]:
        """Run every unfinished cell (or those at positions ``only``); returns every finished record. A W&B run
        a cell starts joins the sweep's group (:func:`~symstitch.loggers.wandb_grouping`); ``wandb``: each of these
        cells, once finished, is also logged as a W&B run of its own (:meth:`log_wandb`)."""
        self.prepare()
        chosen = self.select(only)
        self.claim()
        for cell in chosen:
            self.set_aside(cell)
        todo = [c for c in chosen if not self.done(c)]
        finished = len(self.cells()) - sum(not self.done(c) for c in self.cells())
        print(f"{self.label}: {len(self.cells())} cells, {finished} finished, running {len(todo)} → {self.out}", flush=True)
        busy: list[str] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        # its own console on stderr, no stream redirection: cells print and may start W&B, which wraps stdout;
        # redrawn when a cell starts or ends, not by a thread ten times a second (on 2 cores that thread cost the
        # training threads 15 % of the demo's time)
        with wandb_grouping(wandb_group(self.out), self.experiment.name), \
                Progress(*columns, disable=not progress, console=Console(stderr=True), redirect_stdout=False,
                         redirect_stderr=False, auto_refresh=False) as bar, self.experiment.scope():
            task = bar.add_task(f"{self.experiment.name} cells", total=len(todo))
            for group in self.experiment.groups(todo):
                shown = group[0].key + (f" (+{len(group) - 1} side by side)" if len(group) > 1 else "")
                bar.update(task, description=f"{self.experiment.name}: {shown}", refresh=True)
                busy += self._run_group(group)
                bar.advance(task, len(group))
                bar.refresh()
        if busy:
            print(f"{self.label}: {len(busy)} cell(s) are being run by another process and were left to it: "
                  f"{', '.join(busy[:5])}{' …' if len(busy) > 5 else ''}; rerun later to collect them", flush=True)
        records = self.records()
        self.experiment.after_run(self.out, records)
        if wandb:
            self.log_wandb([CellRecord.read(self.record_path(c)) for c in chosen if self.done(c)])
        return records

    def log_wandb(self, records: Sequence[CellRecord]) -> None:
        """Each record as one W&B run (offline unless W&B is configured) in ``<out>/wandb``: named by its cell key,
        in the sweep's group (the folder's name) with the experiment as its job type, the cell's settings as its
        config and its numbers as its summary (:meth:`Experiment.wandb_fields`), so that W&B's grouping, tables and
        parallel coordinates show the whole grid. A record is logged once: its run's id is made from the folder,
        the cell and when it finished. W&B failing only warns; the records stand."""
        if launched_rank() > 0:
            return
        group = wandb_group(self.out)
        try:
            for record in records:
                key = f"{self.out.resolve()}\n{record.key}\n{record.finished}"
                run_id = hashlib.sha256(key.encode()).hexdigest()[:16]
                if any((self.out / "wandb").glob(f"*run-*-{run_id}")):
                    continue
                config, summary = self.experiment.wandb_fields(record)
                with wandb_run(self.out, id=run_id, name=record.key, group=group, job_type=self.experiment.name,
                               config=config) as run:
                    run.summary.update(summary)
        except Exception as err:  # noqa: BLE001 - W&B must never cost the records already written
            print(f"{self.label}: warning: W&B logging failed ({type(err).__name__}: {err}); the cell records are "
                  "complete", file=sys.stderr, flush=True)

    def _run_group(self, group: Sequence[Cell]) -> list[str]:
        """Run a group of cells (one computation) and write a record per cell; the keys of the cells another
        process holds (left to it)."""
        if launched_rank() > 0:
            # another process of a multi-process (DDP) run: its rank 0 holds the cells' locks and writes the records
            self.experiment.run_group(group, self.out)
            return []
        busy: list[str] = []
        with contextlib.ExitStack() as locks:
            mine = []
            for cell in group:
                path = self.record_path(cell)
                try:
                    locks.enter_context(Lock(path.with_suffix(".lock"), what=f"cell {cell.key}", wait=False))
                except Busy:
                    busy.append(cell.key)
                    continue
                if not path.exists():  # finished by another process while this one waited for its turn
                    mine.append(cell)
            if not mine:
                return busy
            start = time.time()
            results = self.experiment.run_group(mine, self.out)
            if results is None:  # the non-zero ranks of a multi-process cell
                return busy
            seconds = round((time.time() - start) / len(mine), 2)
            for cell in mine:
                CellRecord(self.experiment.name, cell.key, cell.params, results[cell.key], seconds,
                           time.strftime("%Y-%m-%dT%H:%M:%S"), machine(), len(mine)).write(self.record_path(cell))
        return busy

    def records(self) -> list[CellRecord]:
        return [CellRecord.read(self.record_path(c)) for c in self.cells() if self.done(c)]

    def unfinished(self) -> int:
        return sum(not self.done(c) for c in self.cells())

    # ---------------------------------------------------------------- SLURM
    def emit_slurm(self, config_path: Path, wandb: bool = False) -> Path:
        """``<out>/slurm.sh``: a SLURM array over the cells, each task running ``symstitch sweep --cell`` (with
        ``--wandb`` when ``wandb``: each task logs its finished cells as W&B runs in the sweep's group).

        ``slurm:`` in the config sets resources: ``gpus`` per cell (several, for stitch cells: one task per GPU,
        Lightning DDP inside the cell, Lightning reads the SLURM environment), ``cpus``, ``time``, ``partition``,
        ``max_parallel``, ``max_array`` (the cluster's MaxArraySize − 1, default 1000: larger grids give each
        task a consecutive range of cells), ``setup`` (a shell line run first; by default the Python
        environment this script was written from is activated)."""
        cells = self.prepare()
        if not cells:
            raise ValueError(f"{config_path}: the grid has no cells; nothing to submit")
        s = {"gpus": 1, "cpus": 8, "time": "04:00:00", "partition": None, "max_parallel": 32, "max_array": 1000,
             "setup": None, **self.slurm}
        gpus = int(s["gpus"])
        per_task = -(-len(cells) // int(s["max_array"]))  # ceil
        tasks = -(-len(cells) // per_task)
        log_dir = (self.out / "slurm").resolve()
        multi = self.experiment.multi_process_cells
        lines = ["#!/bin/bash", f"#SBATCH --job-name=symstitch-{Path(config_path).stem}",
                 f"#SBATCH --array=0-{tasks - 1}%{s['max_parallel']}",
                 f"#SBATCH --output={log_dir}/%A_%a.out", f"#SBATCH --time={s['time']}",
                 f"#SBATCH --cpus-per-task={s['cpus']}", "#SBATCH --nodes=1",
                 f"#SBATCH --ntasks-per-node={max(gpus, 1) if multi else 1}"]
        if gpus:
            lines.append(f"#SBATCH --gres=gpu:{gpus}")
        if s["partition"]:
            lines.append(f"#SBATCH --partition={s['partition']}")
        lines += ["", f"# {len(cells)} independent cells of {config_path}, {per_task} per array task.",
                  "# A cell that finished is skipped, so resubmitting the array only runs what is missing.",
                  "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
        # the environment symstitch runs in now (a venv or conda env), unless the config says how to get one
        lines.append(str(s["setup"]) if s["setup"] else
                     f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"")
        lines += [f"FIRST=$((SLURM_ARRAY_TASK_ID * {per_task}))",
                  f"LAST=$((FIRST + {per_task - 1} < {len(cells) - 1} ? FIRST + {per_task - 1} : {len(cells) - 1}))"]
        command = [sys.executable, "-m", "symstitch", "sweep", "--config", str(Path(config_path).resolve()),
                   "--out", str(self.out.resolve()), "--cell", "${FIRST}-${LAST}", "--no-progress",
                   *(["--wandb"] if wandb else [])]
        lines.append("srun " + " ".join(c if c.startswith("$") else shlex.quote(c) for c in command))
        self.claim()
        path = self.out / "slurm.sh"
        log_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        return path
