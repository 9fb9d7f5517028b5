"""The `symstitch` command end to end: LightningCLI fit, configs, errors, W&B offline, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symstitch.checkpoints import load_classifier
from symstitch.commands import main
from symstitch.data import DataModule, DatasetNotFoundError, normalize_batch

from .conftest import CONFIGS, cli_env

TINY = ["--model.init_args.arch", "mcnn", "--model.init_args.arch_kwargs", "{width: 0.125}"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "zoo" in out


def test_print_config_composes_split_configs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / "zoo/resnet20.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "arch: resnet20" in out and "dataset: cifar10" in out and "max_epochs: 30" in out
    assert "symstitch.training.WarmupCosine" in out


@pytest.mark.parametrize("extra, says", [
    (["--data.batchsize", "64"], "unrecognized arguments: --data.batchsize 64"),
    (["--trainer.max_ep", "7"], "unrecognized arguments: --trainer.max_ep 7"),  # no option prefixes
    (["--data.flip", "maybe"], "--data.flip: expected bool or null, got maybe"),
    (["--model.init_args.optimizer.init_args.lr", "fast"], "--model.init_args.optimizer.init_args.lr: expected float, got fast"),
])
def test_bad_options_are_one_line_naming_the_option(capsys, extra, says):
    code = main(["fit", "--config", str(CONFIGS / "zoo/resnet20.yaml"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "symstitch fit --help" in err, err
    assert "usage:" not in err and len(err.strip().splitlines()) == 2  # the error, and how to see the traceback


def test_shipped_configs_from_any_folder_as_the_command_reads_them(tmp_path, monkeypatch, capsys):
    """`symstitch fit --config configs/zoo/resnet20.yaml` in a folder without configs/, the arguments read from the
    command line itself (no -v): the shipped config is found."""
    monkeypatch.setattr(sys, "argv", ["symstitch", "fit", "--config", "configs/zoo/resnet20.yaml",
                                      "--data.dataset", "digits", "--print_config"])
    assert not (tmp_path / "configs").exists()
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "arch: resnet20" in out and "dataset: digits" in out


def test_max_epochs_minus_one_is_lightnings_no_limit(tmp_path, capsys):
    """Lightning's -1: a schedule over the whole run cannot be laid out (one line saying what to do); without a
    schedule, or with max_steps, the run trains as Lightning says."""
    base = ["fit", *TINY, *QUIET, "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.max_epochs", "-1"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "has no end here" in err and "--model.init_args.scheduler null" in err and "Traceback" not in err
    assert main([*base, "--trainer.max_steps", "3"]) == 0
    assert main([*base, "--model.init_args.scheduler", "null", "--trainer.max_steps", "2"]) == 0


def test_a_yaml_error_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args: {a: [1, 2}\n")
    assert main(["fit", "--config", str(bad)]) == 2
    assert f"{bad}, line 2, column 23:" in capsys.readouterr().err


def test_missing_cifar_names_folder_and_flag(tmp_path, capsys):
    code = main(["fit", "--data.dataset", "cifar10", "--data.root", str(tmp_path / "nowhere"), *TINY, *QUIET,
                 "--trainer.max_epochs", "1", "--trainer.logger", "false"])
    message = capsys.readouterr().err
    assert code == 2 and message.startswith("symstitch: error:") and "Traceback" not in message
    assert str(tmp_path / "nowhere") in message and "--data.download true" in message
    with pytest.raises(DatasetNotFoundError):  # the Python API raises the typed error
        DataModule(dataset="cifar10", root=str(tmp_path / "nowhere")).setup()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"\x80\x04K\x01."])
def test_bad_checkpoint_path_is_a_clear_error(tmp_path, capsys, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    code = main(["fit", "--data.dataset", "digits", *TINY, *QUIET, "--trainer.max_epochs", "1",
                 "--trainer.logger", "false", "--ckpt_path", str(bad)])
    message = capsys.readouterr().err
    assert code == 2 and str(bad) in message and "Traceback" not in message


def test_fit_end_to_end_csv_and_offline_wandb(tmp_path, monkeypatch):
    """A real fit from the CLI: no network, no W&B key; the result file, the CSV log, the offline W&B run
    and the checkpoint all agree."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    main(["fit", "--data", str(CONFIGS / "data/digits.yaml"), *TINY, *QUIET, "--trainer.max_epochs", "3",
          "--seed_everything", "0"])
    run = Path("runs/fit/version_0")
    result = json.loads((run / "result.json").read_text())
    assert result["epochs"] == 3
    assert (run / "metrics.csv").read_text().startswith(("epoch", "step", "train", "val"))
    assert list(Path("runs/wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run written"
    # the checkpoint's network, evaluated by hand on the test split, gives the logged val/acc
    net = load_classifier(result["checkpoint"])
    dm = DataModule(dataset="digits")
    dm.setup()
    with torch.no_grad():
        pred = net(normalize_batch(dm.test_set.x, dm.mean, dm.std)).argmax(1)
    acc = (pred == dm.test_set.y).float().mean().item()
    assert result["metrics"]["val/acc"] == pytest.approx(acc, abs=1e-6)
    assert result["metrics"]["test/acc"] == pytest.approx(acc, abs=1e-6)  # val_split 0: the same split
    assert acc > 0.7


@pytest.mark.slow  # DDP in the default suite: tests/test_stitching.py::test_ddp_stitch_weights_identical_on_both_ranks
def test_ddp_two_ranks_end_identical(tmp_path):
    """Two CPU processes with Lightning DDP (gloo): both ranks end with bit-identical weights."""
    cmd = [sys.executable, "-m", "symstitch", "fit", "--data.dataset", "digits", *TINY, *QUIET,
           "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--config", str(CONFIGS / "logger/csv.yaml"), "--seed_everything", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs/fit/version_0/ranks.json").read_text())
    assert report["world_size"] == 2 and report["consistent"]
    digests = {(r["parameters"], r["buffers"]) for r in report["ranks"]}
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and len(digests) == 1
    # and the digest is that of the weights rank 0 checkpointed
    from symstitch.callbacks import tensor_digest

    result = json.loads((tmp_path / "runs/fit/version_0/result.json").read_text())
    ckpt = torch.load(tmp_path / result["checkpoint"], map_location="cpu", weights_only=True)
    module_params = [v for k, v in ckpt["state_dict"].items() if "running_" not in k and "num_batches" not in k]
    assert tensor_digest(module_params) == report["ranks"][1]["parameters"]


@pytest.mark.slow  # the default suite trains networks to high accuracy in tests/test_training.py
def test_acceptance_resnet20_digits_95(tmp_path):
    """README acceptance: ResNet-20, the zoo config on digits with the demo zoo's budget (6 epochs in batches of
    64) → ≥ 95 % test accuracy (measured 98.1–99.7 % over 6 seeds on the AVX-512 and AVX2 paths)."""
    main(["fit", "--config", str(CONFIGS / "zoo/resnet20.yaml"), "--data.dataset", "digits",
          "--trainer.max_epochs", "6", "--data.batch_size", "64", "--config", str(CONFIGS / "logger/csv.yaml"), *QUIET])
    result = json.loads(Path("runs/fit/version_0/result.json").read_text())
    assert result["metrics"]["test/acc"] >= 0.95


def test_fit_is_seeded_without_saying_so():
    """`symstitch fit` is seeded (0) unless told otherwise, without Lightning's "No seed found" on every run."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--model.init_args.arch", "mcnn", "--model.init_args.arch_kwargs", "{width: 0.125}",
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.logger", "false",
                     "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]) == 0
    assert not [w for w in caught if "seed" in str(w.message).lower()]
    assert os.environ.get("PL_GLOBAL_SEED") == "0"
