"""The LightningCLI wiring: ``symstitch fit/validate/test/predict`` over any symstitch LightningModule and the
:class:`~symstitch.data.DataModule`, and the same code path for the cells of a sweep (:func:`build_cli`).

What it adds to LightningCLI: trainer defaults (CSV + W&B offline logging, bf16 on GPU, DDP consistency checks,
a stop on a non-finite loss), the number of classes from the data, the data of a stitch taken from the
networks' own checkpoints, shipped configs found by name (``--config configs/stitch/birkhoff.yaml`` from any
folder), ``<log dir>/result.json`` after every fit, and from Python, loaders in place of the DataModule
(:class:`~symstitch.data.LoaderData`, one process). Argument parsing of the other commands lives in
:mod:`symstitch.commands`.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_helpers import is_overridden

from symstitch import configs
from symstitch.configs import OptionError
from symstitch.defaults import LIGHTNING_COMMANDS
from symstitch.callbacks import DDPConsistency, FiniteLoss
from symstitch.checkpoints import read_checkpoint
from symstitch.data import DataModule, LoaderData, dataset_info
from symstitch.io import write_json
from symstitch.library import check_same_data, datamodule_settings
from symstitch.loggers import (DEFAULT_RUN_DIR, default_loggers, default_wandb_offline, finish_wandb, quiet_by_default,
                               verbose)

#: options whose value is a config file
CONFIG_OPTIONS = ("--config", "-c", "--data", "--model", "--trainer")


def trainer_defaults() -> dict:
    """Defaults for every trainer: CSV + W&B logging, bf16 autocast on GPU, DDP consistency checks, a stop on a
    non-finite loss; the model summary table only with ``-v``."""
    return {
        "default_root_dir": DEFAULT_RUN_DIR,
        "enable_model_summary": verbose(),
        "max_epochs": 30,
        "logger": default_loggers("fit"),
        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
        "callbacks": [DDPConsistency(), FiniteLoss()],  # persistent: always present, whatever the config says
    }


def shipped_configs(args: Sequence[str]) -> list[str]:
    """``args`` with every config-file value that does not exist here replaced by the shipped config of that
    name (``configs/stitch/birkhoff.yaml`` works from any folder, and from a wheel install)."""
    args = list(args)
    for i, a in enumerate(args[:-1]):
        if a in CONFIG_OPTIONS and args[i + 1].endswith((".yaml", ".yml")):
            args[i + 1] = configs.resolve(args[i + 1])
        elif a.startswith(tuple(f"{o}=" for o in CONFIG_OPTIONS)):
            key, value = a.split("=", 1)
            args[i] = f"{key}={configs.resolve(value)}"
    return args


def _option_error(message: str) -> str:
    """jsonargparse's many-line message as one line: the option, what it expects and what it was given."""
    text = message.strip()
    keys = re.findall(r'Parser key "([^"]+)"', text)
    if not keys:
        return " ".join(line.strip() for line in text.splitlines())
    key, given = keys[0], None
    nested = re.search(r"NestedArg\(key='([^']+)', val=(.*)\)\s*$", text, re.M)
    if nested:  # an option inside a class_path/init_args group
        key, given = f"{key}.init_args.{nested.group(1)}", nested.group(2).strip("'\"")
    else:
        values = re.findall(r"(?:Given value|Got value): (.*)", text)
        given = values[-1].strip() if values else None
    inner = re.search(r"Expected an? <class '([\w.]+)'>\. Got value: ", text)
    union = re.search(r"Subtypes: \[(.*?)\]", text)
    expected = ([inner.group(1)] if inner else re.findall(r"<class '([\w.]+)'>", union.group(1)) if union
                else re.findall(r"Expected an? <class '([\w.]+)'>", text))
    names = [{"NoneType": "null"}.get(e, e.rsplit(".", 1)[-1]) for e in expected]
    if names and given is not None:
        return f"--{key}: expected {' or '.join(dict.fromkeys(names))}, got {given}"
    first = text.splitlines()[0].split(":", 1)[1].strip() if ":" in text.splitlines()[0] else ""
    return f"--{key}: {first or ' '.join(line.strip() for line in text.splitlines()[1:])}"


def check_config_files(args: Sequence[str]) -> None:
    """Every YAML config file named in ``args`` reads, else an :class:`OptionError` naming the file, the line and
    the column (LightningCLI's own message names neither)."""
    for i, a in enumerate(args):
        value = args[i + 1] if a in CONFIG_OPTIONS and i + 1 < len(args) else \
            a.split("=", 1)[1] if a.startswith(tuple(f"{o}=" for o in CONFIG_OPTIONS)) else None
        if value is None or not value.endswith((".yaml", ".yml")) or not Path(value).is_file():
            continue
        try:
            yaml.safe_load(Path(value).read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise OptionError(f"{value}{where}: {problem}") from None


def _init_args(cfg: Namespace) -> Optional[Namespace]:
    model = cfg.get("model")
    return model.get("init_args") if isinstance(model, Namespace) else None


class Parsed(Exception):
    """How a parse-only :class:`SymstitchCLI` stops once its arguments are parsed and checked (``cli``: it, with its
    ``config``): LightningCLI instantiates the classes and runs the subcommand next, and offers no other way to stop
    there than ``run=False``, which parses without the subcommand."""

    def __init__(self, cli: "SymstitchCLI"):
        super().__init__("parsed")
        self.cli = cli


class SymstitchCLI(LightningCLI):
    """LightningCLI over symstitch modules and the DataModule (see ``symstitch fit --help``)."""

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, parse_only: bool = False,
                 announce: bool = True, validate: bool = False, datamodule: Optional[LoaderData] = None, **kwargs):
        self.parse_only, self.announce, self.final_validation = parse_only, announce, validate
        self._asked = args[0] if args else None
        #: loaders given from Python (:class:`~symstitch.data.LoaderData`), in place of the ``--data`` DataModule
        self.given_datamodule = datamodule
        if datamodule is not None:  # the saved config would name the DataModule's data, not these loaders
            kwargs.setdefault("save_config_callback", None)
        #: after a fit: its metrics, ``val/…`` of the final validation (``validate``) and ``test/…``
        self.metrics: dict[str, float] = {}
        strict = {"exit_on_error": False, "allow_abbrev": False}  # errors raise (one line); no option prefixes
        kwargs.setdefault("parser_kwargs", {**strict, **{c: dict(strict) for c in self.subcommands()}})
        try:
            super().__init__(
                model_class=pl.LightningModule,
                subclass_mode_model=True,
                datamodule_class=DataModule,
                trainer_defaults=trainer_defaults(),
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                seed_everything_default=0,  # seeded unless told otherwise (Lightning would say "No seed found")
                args=list(args) if args is not None else None,
                run=run,
                **kwargs,
            )
        except Parsed:
            raise
        except BaseException:  # a run that failed (or was stopped) before it logged anything leaves no folder
            self._discard_empty_log_dirs()
            raise

    def subcommands(self) -> dict[str, set[str]]:
        """LightningCLI's commands; only the one asked for when the arguments are given (a sweep's cells,
        ``stitch()``): its parser is all that is built (a quarter of the set-up time of a cell)."""
        commands = LightningCLI.subcommands()
        asked = self.__dict__.get("_asked")
        return {asked: commands[asked]} if asked in commands else commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": "symstitch.training.ClassifierModule"}})

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        cfg = self.config.get(self.config.get("subcommand")) if self.config.get("subcommand") else self.config
        ckpt_path = cfg.get("ckpt_path") if cfg is not None else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            read_checkpoint(ckpt_path)  # a clear CheckpointError before Lightning unpickles it

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        init = _init_args(cfg)
        # the classifier's number of classes comes from the data unless given
        if init is not None and "num_classes" in init and init.num_classes is None:
            init.num_classes = dataset_info(cfg.data.dataset).num_classes
        # a module of trained networks (stitching: source; projection: checkpoint) runs on their data: every data
        # setting left at its default takes the value saved in the network's checkpoint
        ref = next((init.get(k) for k in ("source", "checkpoint") if init is not None and init.get(k)), None)
        if ref is not None:
            defaults = inspect.signature(DataModule).parameters
            for key, value in datamodule_settings(ref).items():
                if key in cfg.data and cfg.data[key] == defaults[key].default:
                    cfg.data[key] = value
            check_same_data([ref], cfg.data)  # a dataset given explicitly must be theirs
        # `--trainer.default_root_dir X` moves the default loggers' folders too
        root = cfg.trainer.default_root_dir
        loggers = cfg.trainer.logger
        for lg in loggers if isinstance(loggers, list) else []:
            args_ = lg.get("init_args") if hasattr(lg, "get") else None
            if args_ is None or not args_.get("save_dir"):
                continue
            if root and root != DEFAULT_RUN_DIR and args_.save_dir == DEFAULT_RUN_DIR:
                args_.save_dir = root
            # absolute: W&B's long-lived service process resolves relative folders in its own cwd
            args_.save_dir = os.path.abspath(args_.save_dir)
        if self.parse_only:
            raise Parsed(self)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.given_datamodule is not None:
            self.datamodule = self.given_datamodule
            LoaderData.check_one_process(self.trainer)  # before a DDP launch, not in every rank after it

    def _discard_empty_log_dirs(self) -> None:
        """A run that failed before it logged anything leaves no ``runs/fit/version_N`` behind (only its saved
        config would be there); a run that logged metrics or saved a checkpoint keeps its folder."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            folder = Path(getattr(logger, "log_dir", None) or "")
            if not isinstance(logger, CSVLogger) or not folder.is_dir():
                continue
            kept = [p for p in folder.rglob("*") if p.is_file() and p.name not in ("config.yaml", "hparams.yaml")]
            if not kept:
                shutil.rmtree(folder, ignore_errors=True)

    def after_fit(self) -> None:
        trainer = self.trainer
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if self.final_validation:
            metrics.update(self._validate_final())
        if is_overridden("test_step", self.model) and self.datamodule is not None:
            # the final network on the test split (the validation split may be carved from train)
            (tested,) = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            metrics.update({k: float(v) for k, v in tested.items()})
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and log_dir:
            checkpoint = trainer.checkpoint_callback.best_model_path or None if trainer.checkpoint_callback else None
            result: dict[str, Any] = {"metrics": metrics, "checkpoint": checkpoint, "epochs": trainer.current_epoch,
                                      "global_step": trainer.global_step}
            summary = getattr(self.model, "summary", None)
            if callable(summary):  # e.g. the stitching layer learned: permutation, scales, sparsity
                result["model"] = summary()
            out = write_json(Path(log_dir) / "result.json", result)
            if self.announce:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
                print(f"symstitch fit: {shown}\n  result: {out}\n  checkpoint: {checkpoint}")
        self.metrics = metrics
        teardown_distributed()

    def _validate_final(self) -> dict[str, float]:
        """The final network on the held-out validation split, as ``val/<metric>``: also when the fit itself did
        not validate (``limit_val_batches`` 0). Refused when there is no held-out split (``val_split`` 0: the
        DataModule would validate on the test split), so nothing chosen by these numbers ever saw the test set."""
        dm = self.datamodule
        if not isinstance(dm, DataModule):
            raise ValueError("a final validation needs symstitch.data.DataModule (its held-out validation split)")
        dm.setup()
        if dm.val_set is dm.test_set:
            raise ValueError(f"a final validation needs a held-out validation split, but the data validates on the "
                             f"test split (val_split {dm.val_split:g}): set --data.val_split, e.g. 0.1")
        trainer, limit = self.trainer, self.trainer.limit_val_batches
        trainer.limit_val_batches = 1.0
        try:
            (validated,) = trainer.validate(self.model, datamodule=dm, verbose=False)
        finally:
            trainer.limit_val_batches = limit
        return {f"val/{k}": float(v) for k, v in validated.items()}


def teardown_distributed() -> None:
    """Barrier and destroy the process group (gloo can abort at interpreter exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_cli(args: Optional[Sequence[str]] = None, run: bool = True, parse_only: bool = False,
              announce: bool = True, validate: bool = False, datamodule: Optional[LoaderData] = None) -> SymstitchCLI:
    """A :class:`SymstitchCLI` (``run=False``: parsed and instantiated, nothing trained yet; ``parse_only``:
    parsed and checked, nothing instantiated; ``announce``: print the result of a fit; ``validate``: after a fit,
    evaluate the final network on the held-out validation split too; ``datamodule``: loaders from Python, used
    instead of the ``--data`` DataModule, in this process only). ``args`` None reads ``sys.argv``."""
    default_wandb_offline()
    quiet_by_default()
    args = shipped_configs(args if args is not None else sys.argv[1:])
    check_config_files(args)
    with warnings.catch_warnings():
        # args given from Python (the commands, sweeps, tests) while sys.argv holds another program's options
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return SymstitchCLI(args=args, run=run, parse_only=parse_only, announce=announce, validate=validate,
                                datamodule=datamodule)
        except Parsed as parsed:
            return parsed.cli
        except ArgumentError as err:
            command = args[0] if args and args[0] in LIGHTNING_COMMANDS else "fit"
            raise OptionError(f"{_option_error(str(err))} (every option: symstitch {command} --help)") from None


def option_value(value: Any) -> str:
    """A Python value as the text of a command-line option that parses back to it: strings and paths as they are,
    None as ``null``, booleans, numbers, lists and dicts as JSON (which YAML reads)."""
    if isinstance(value, (str, Path)):
        return str(value)
    return json.dumps(value)


def check_args(args: Sequence[str]) -> Optional[Namespace]:
    """Raise ValueError when LightningCLI arguments do not parse (unknown keys, bad values, missing files):
    a sweep checks its cells' arguments before it claims a folder or runs anything. Returns the parsed config of
    the subcommand (``args[0]``), with the data settings taken from the networks' checkpoints filled in."""
    try:
        cli = build_cli(args, parse_only=True)
    except SystemExit as exit_:  # --help, --print_config
        if exit_.code:
            raise
        return None
    return cli.config.get(cli.config.get("subcommand")) if cli.config.get("subcommand") else cli.config


def fit_in_process(args: Sequence[str], validate: bool = False,
                   datamodule: Optional[LoaderData] = None) -> SymstitchCLI:
    """``symstitch fit ARGS`` in this process (the path of every training cell, which records its result itself);
    the W&B run is closed after. ``validate``: also evaluate the final network on the held-out validation split
    (``cli.metrics["val/…"]``; refused without one). ``datamodule``: loaders from Python
    (:class:`~symstitch.data.LoaderData`) instead of the ``--data`` DataModule."""
    try:
        return build_cli(["fit", *args], announce=False, validate=validate, datamodule=datamodule)
    finally:
        finish_wandb()
