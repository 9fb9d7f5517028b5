"""The ``symstitch`` command.

Training commands (``fit``, ``validate``, ``test``, ``predict``) are LightningCLI's, over any symstitch
LightningModule and the :class:`~symstitch.data.DataModule`; the other commands (``zoo``, …) are plain
functions registered in :data:`COMMANDS`. This module stays thin: the work lives in the modules it wires.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from symstitch.loggers import DEFAULT_RUN_DIR, default_loggers, default_wandb_offline, finish_wandb
from symstitch.registry import Registry

#: Non-training subcommands: name → ``main(argv) -> int``.
COMMANDS: Registry[Callable[[Sequence[str]], int]] = Registry("command")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _lazy_main(module: str) -> Callable[[Sequence[str]], int]:
    """``symstitch.<module>.main``, imported on first call (``symstitch --help`` must not import Lightning)."""

    def run(argv: Sequence[str]) -> int:
        import importlib

        return importlib.import_module(f"symstitch.{module}").main(argv)

    return run


for _name, _module in {"zoo": "zoo", "stitch": "stitching", "check": "check", "projection": "projection",
                       "sweep": "sweep", "align": "align", "report": "report"}.items():
    COMMANDS.register(_name)(_lazy_main(_module))


def trainer_defaults() -> dict:
    """Defaults for every trainer: CSV + W&B logging, bf16 autocast on GPU, DDP consistency checks."""
    from symstitch.callbacks import DDPConsistency

    return {
        "default_root_dir": DEFAULT_RUN_DIR,
        "max_epochs": 30,
        "logger": default_loggers("fit"),
        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
        "callbacks": [DDPConsistency()],  # persistent: always present, whatever the config says
    }


def _make_cli_class():
    # imported lazily: `import lightning.pytorch` costs seconds, `symstitch --help` should not
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    from symstitch.checkpoints import read_checkpoint
    from symstitch.data import DataModule, dataset_info

    class SymstitchCLI(LightningCLI):
        """LightningCLI over symstitch modules and the DataModule (see ``symstitch fit --help``)."""

        def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, **kwargs):
            super().__init__(
                model_class=pl.LightningModule,
                subclass_mode_model=True,
                datamodule_class=DataModule,
                trainer_defaults=trainer_defaults(),
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                args=list(args) if args is not None else None,
                run=run,
                **kwargs,
            )

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
            # the classifier's number of classes comes from the data unless given
            init = cfg.model.get("init_args")
            if init is not None and "num_classes" in init and init.num_classes is None:
                init.num_classes = dataset_info(cfg.data.dataset).num_classes
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

        def after_fit(self) -> None:
            from lightning.pytorch.utilities.model_helpers import is_overridden

            trainer = self.trainer
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            if is_overridden("test_step", self.model) and self.datamodule is not None:
                # the final network on the test split (the validation split may be carved from train)
                (tested,) = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
                metrics.update({k: float(v) for k, v in tested.items()})
            log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
            if trainer.is_global_zero and log_dir:
                result = {
                    "metrics": metrics,
                    "checkpoint": (trainer.checkpoint_callback.best_model_path or None)
                    if trainer.checkpoint_callback
                    else None,
                    "epochs": trainer.current_epoch,
                    "global_step": trainer.global_step,
                }
                summary = getattr(self.model, "summary", None)
                if callable(summary):  # e.g. the stitching layer learned: permutation, scales, sparsity
                    result["model"] = summary()
                out = Path(log_dir) / "result.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(result, indent=2))
                os.replace(tmp, out)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["metrics"].items()))
                print(f"symstitch fit: {shown}\n  result: {out}\n  checkpoint: {result['checkpoint']}")
            teardown_distributed()

    return SymstitchCLI


def teardown_distributed() -> None:
    """Barrier and destroy the process group (gloo can abort at interpreter exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_cli(args: Optional[Sequence[str]] = None, run: bool = True):
    """A :class:`SymstitchCLI` (run=False: parsed and instantiated, nothing trained yet)."""
    import warnings

    default_wandb_offline()
    with warnings.catch_warnings():
        # args given from Python (tests, the zoo) while sys.argv holds another program's options
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _make_cli_class()(args=args, run=run)


USAGE = """usage: symstitch COMMAND [options]

training (LightningCLI; `symstitch fit --help`, `--print_config` after the command):
  fit         train a module from a config: symstitch fit --config configs/zoo/resnet20.yaml
  validate    evaluate a checkpoint on the validation split
  test        evaluate a checkpoint on the test split
  predict     run prediction
library:
{commands}
"""

DESCRIPTIONS = {
    "zoo": "train many seeds of an architecture into a model library with a manifest",
    "stitch": "stitch two networks at every stitch point with several layers; penalty table and plot",
    "check": "sanity report: a random symmetry g applied at every point preserves the function",
    "projection": "the projection experiment: insert G_σ / orthogonal matrices per layer, retrain, plot",
    "align": "similarity of every feature-point pair of two networks (Procrustes, CKA): CSV, heatmaps",
    "sweep": "run an experiment grid of experiments/*.yaml, resumable cell by cell (or --emit slurm)",
    "report": "tidy CSVs, figures and a markdown summary of sweep results",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    default_wandb_offline()
    if not argv or argv[0] in ("-h", "--help"):
        commands = "\n".join(f"  {name:<11} {DESCRIPTIONS.get(name, '')}" for name in COMMANDS)
        print(USAGE.format(commands=commands))
        return 0 if argv else 2
    if argv[0] not in COMMANDS and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        known = ", ".join([*LIGHTNING_COMMANDS, *COMMANDS])
        print(f"symstitch: unknown command {argv[0]!r}; commands: {known}", file=sys.stderr)
        return 2
    try:
        if argv[0] in COMMANDS:
            return COMMANDS.get(argv[0])(argv[1:]) or 0
        build_cli(None if from_sys else argv)
    except user_errors() as err:
        if os.environ.get("SYMSTITCH_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"symstitch: error: {message}\n(set SYMSTITCH_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    finally:
        finish_wandb()
    return 0


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (bad names, paths, files, settings): one message, no traceback.

    Unknown registry names raise KeyError and invalid settings ValueError, both with messages that say
    what is valid; ``SYMSTITCH_DEBUG=1`` shows the traceback anyway.
    """
    from symstitch.checkpoints import CheckpointError
    from symstitch.data import DatasetChecksumError, DatasetNotFoundError

    return (CheckpointError, DatasetNotFoundError, DatasetChecksumError, KeyError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
