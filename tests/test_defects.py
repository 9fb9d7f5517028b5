"""What a new user hit, each reproduced and fixed: data tied to the networks, failed starts that claim nothing,
NaN runs never recorded, one writer per seed and per cell, settings never answered with old models, one-line
errors, W&B without network, quiet logs, one penalty unit, Python and the command giving the same stitch."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from symstitch import zoo
from symstitch.callbacks import TrainingDiverged
from symstitch.commands import main
from symstitch.io import Lock, dumps, write_json
from symstitch.stitching import stitch
from symstitch.sweep import load_sweep

from .conftest import CONFIGS, cli_env

FIT = ["--data.dataset", "digits", "--model.init_args.arch_kwargs", "{width: 0.125}", "--trainer.max_epochs", "1",
       "--config", str(CONFIGS / "logger/csv.yaml"), "--trainer.enable_progress_bar", "false"]
POINT = "layer1.act"


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    """Two 1-epoch eighth-width mCNNs on digits in a model library."""
    root = tmp_path_factory.mktemp("defects") / "lib"
    zoo.train_zoo("mcnn", [0, 1], root, FIT)
    return root


def _refs(lib: Path) -> tuple[str, str]:
    return f"{lib}:mcnn/seed0", f"{lib}:mcnn/seed1"


def _fake_cifar(lib: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The two networks' checkpoints, saying they were trained on CIFAR-10 (kept in a folder with no CIFAR-10)."""
    out = []
    for seed in (0, 1):
        ckpt = torch.load(lib / f"mcnn/seed{seed}/model.ckpt", weights_only=True)
        ckpt["datamodule_hyper_parameters"] = {**ckpt["datamodule_hyper_parameters"], "dataset": "cifar10",
                                               "root": str(tmp_path / "no-cifar")}
        torch.save(ckpt, tmp_path / f"cifar{seed}.ckpt")
        out.append(tmp_path / f"cifar{seed}.ckpt")
    return out[0], out[1]


def test_the_data_of_a_stitch_is_the_networks_own(lib, tmp_path, capsys):
    a, b = _fake_cifar(lib, tmp_path)
    fit = ["fit", "--config", str(CONFIGS / "stitch/standard.yaml"), "--model.point", POINT,
           "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    # networks trained on CIFAR-10 are stitched on CIFAR-10 (absent here: the error names it), never on digits
    assert main([*fit, "--model.source", str(a), "--model.target", str(b)]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10" in err and str(tmp_path / "no-cifar") in err
    # another dataset given explicitly is refused, from the command and from Python
    source, target = _refs(lib)
    assert main([*fit, "--model.source", source, "--model.target", target, "--data.dataset", "cifar100"]) == 2
    assert "trained on 'digits'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="trained on 'digits'"):
        stitch(source, target, POINT, layer="standard", epochs=1, data={"dataset": "cifar100"})
    # two networks trained on different data are not a pair
    with pytest.raises(ValueError, match="different datasets"):
        stitch(source, str(b), POINT, layer="standard", epochs=1)


def test_a_failed_start_writes_nothing(lib, tmp_path, capsys):
    source, target = _refs(lib)
    out = tmp_path / "st"
    assert main(["stitch", "--source", source, "--target", target, "--points", "layer9.act", "--out", str(out)]) == 2
    assert "valid stitch points" in capsys.readouterr().err and not out.exists()
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "stitch", "out": str(tmp_path / "sw"), "zoo": str(lib), "arch": "mcnn", "seeds": "0-1",
        "points": [POINT], "layers": ["standard"], "fit_args": ["--trainer.max_epochz", "1"]}))
    assert main(["sweep", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "do not parse: unrecognized arguments: --trainer.max_epochz 1" in err and not (tmp_path / "sw").exists()


def test_distinct_settings_get_distinct_default_folders(lib, tmp_path):
    source, target = _refs(lib)
    base = ["stitch", "--source", source, "--target", target, "--points", POINT, "--layers", "standard",
            "--epochs", "1"]
    assert main(base) == 0
    assert main([*base, "--lr", "0.01"]) == 0  # other settings: a folder of their own, not a refusal
    folders = sorted((tmp_path / "runs/stitch").iterdir())
    assert len(folders) == 2
    assert main(base) == 0  # the same settings again: their folder, read back
    assert sorted((tmp_path / "runs/stitch").iterdir()) == folders
    for folder in folders:
        (record,) = (folder / "cells").rglob("*.json")
        assert json.loads(record.read_text())["cell"]["point"] == POINT


def test_nan_training_stops_and_is_never_recorded(lib, tmp_path, capsys):
    huge = ["--model.init_args.optimizer.init_args.lr", "1e30"]
    with pytest.raises(TrainingDiverged, match="training diverged: the loss is nan"):
        zoo.train_zoo("mcnn", [0], tmp_path / "nan-lib", [*FIT, *huge])
    assert not (tmp_path / "nan-lib/manifest.json").exists()
    assert not list((tmp_path / "nan-lib").rglob("model.ckpt"))
    code = main(["fit", *FIT, "--model.init_args.arch", "mcnn", *huge])
    assert code == 2 and "training diverged" in capsys.readouterr().err
    assert not list(Path("runs/fit").glob("version_*"))  # a failed fit leaves no empty run folder
    # and JSON is always valid: a non-finite number is written as null
    write_json(tmp_path / "x.json", {"loss": math.nan, "acc": [1.0, math.inf]})
    strict = json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: pytest.fail(f"invalid {c}"))
    assert strict == {"loss": None, "acc": [1.0, None]} and "NaN" not in dumps({"x": float("nan")})


def test_a_second_writer_leaves_a_live_seed_alone(lib, tmp_path, capsys):
    """The first writer of seed 5 holds its lock: a second zoo on the same library leaves the seed to it."""
    live = lib / "mcnn/seed5"
    live.mkdir(parents=True)
    (live / "metrics.csv").write_text("epoch,train/acc\n0,0.5\n")
    with Lock(lib / "mcnn/.seed5.lock"):
        assert zoo.train_zoo("mcnn", [0, 5], lib, FIT) == [json.loads((lib / "manifest.json").read_text())["models"]
                                                           ["mcnn/seed0"]]
    assert (live / "metrics.csv").read_text() == "epoch,train/acc\n0,0.5\n"  # never deleted or written
    assert "mcnn/seed5" not in json.loads((lib / "manifest.json").read_text())["models"]
    assert "being written by another process" in capsys.readouterr().out


def test_a_cell_another_process_runs_is_left_to_it(lib, tmp_path, capsys):
    config = tmp_path / "stitch.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "stitch", "out": str(tmp_path / "sw"), "zoo": str(lib), "arch": "mcnn", "seeds": "0-1",
        "points": ["layer1.act", "layer2.act"], "layers": ["standard"],
        "fit_args": ["--trainer.max_epochs", "1", "--config", str(CONFIGS / "logger/csv.yaml"),
                     "--trainer.enable_progress_bar", "false"]}))
    runner = load_sweep(config)
    busy = runner.cells()[0]
    with Lock(runner.record_path(busy).with_suffix(".lock")):
        records = runner.run(progress=False)
    assert [r.key for r in records] == [runner.cells()[1].key]
    assert "being run by another process" in capsys.readouterr().out
    again = load_sweep(config).run(progress=False)  # released: the rerun computes it, and only it
    assert [r.key for r in again] == [c.key for c in runner.cells()] and again[1] == records[0]


def test_zoo_rerun_with_other_settings_is_refused_not_answered_with_old_models(lib):
    other = [a if a != "{width: 0.125}" else "{width: 0.25}" for a in FIT]
    with pytest.raises(ValueError, match="another configuration"):
        zoo.train_zoo("mcnn", [0], lib, other)  # seed 0 exists, but not with these settings


def test_unwritable_output_folder_is_one_line(lib, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    source, target = _refs(lib)
    code = main(["stitch", "--source", source, "--target", target, "--points", POINT, "--layers", "standard",
                 "--epochs", "1", "--out", str(tmp_path / "a-file" / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create the folder" in err and "Traceback" not in err


def test_wandb_key_without_network_goes_offline_at_once_and_logs_are_quiet(tmp_path, caplog):
    """WANDB_API_KEY set, the W&B server unreachable: a warning, an offline run, a complete fit; and none of
    Lightning's banners and tips, nor the known harmless warnings, unless -v."""
    env = {**cli_env(tmp_path), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    fit = [sys.executable, "-m", "symstitch", "fit", "--model.init_args.arch", "mcnn",
           "--model.init_args.arch_kwargs", "{width: 0.125}", "--trainer.max_epochs", "1"]
    proc = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cannot be reached" in proc.stderr and "logging offline" in proc.stderr
    assert list((tmp_path / "runs/wandb").glob("offline-run-*"))
    said = proc.stdout + proc.stderr
    for noise in ("Tip:", "GPU available", "LeafSpec", "in eval mode", "Total FLOPs", "wandb: WARNING",
                  "does not have many workers"):
        assert noise not in said, noise

    from symstitch import loggers  # -v: Lightning's own messages (in this process, then quiet again)

    caplog.set_level(logging.INFO)  # what Lightning's loggers let through reaches pytest's handler
    try:
        assert main(["-v", "fit", *fit[4:], "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]) == 0
        assert any("GPU available" in r.getMessage() for r in caplog.records)
    finally:
        loggers.quiet(False)


def test_a_refused_wandb_key_goes_offline_in_one_line(monkeypatch, capsys):
    """A W&B server that answers but refuses the key (a loopback stand-in answering 401): one warning line with the
    server's reason, and the process logs offline instead of ending in W&B's traceback."""
    import http.server
    import threading

    from symstitch import loggers

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors": [{"message": "invalid api key"}]}')

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    try:
        loggers.default_wandb_offline()
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert os.environ["WANDB_MODE"] == "offline"
    assert f"the W&B server {url} refused the credentials" in err and "invalid api key" in err
    assert len(err.strip().splitlines()) == 1


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


def test_python_entry_points_are_quiet_and_raise_value_errors(tmp_path):
    """From Python, ``stitch()`` is as quiet as the commands (no banners, tips or loader notes), takes a DataModule
    and the None its signature allows, and a bad option is a ValueError naming it — never SystemExit, which a
    script's ``except Exception`` cannot catch. ``symstitch.verbose()`` brings Lightning's messages back (a verbose
    fit shows them: tests/test_defects.py::test_wandb_key_without_network_goes_offline_at_once_and_logs_are_quiet)."""
    code = """
import symstitch
from symstitch import models
from symstitch.data import DataModule
a, b = (models.build("mcnn", width=0.125) for _ in range(2))
r = symstitch.stitch(a, b, "layer1.act", layer="birkhoff", epochs=1, relaxed_epochs=None,
                     data=DataModule(dataset="digits", flip=None))
print("PENALTY", r.penalty_pts is not None)
try:
    symstitch.stitch(a, b, "layer1.act", epochs=1, fit_args=("--trainer.max_ep", "1"))
except ValueError as err:
    print("VALUEERROR", err)
import logging
symstitch.verbose()
print("VERBOSE", logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.INFO)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PENALTY True" in proc.stdout
    assert "VALUEERROR unrecognized arguments: --trainer.max_ep 1 (every option: symstitch fit --help)" in proc.stdout
    for noise in ("GPU available", "Tip:", "Loading `train_dataloader`", "LeafSpec", "in eval mode", "usage:"):
        assert noise not in proc.stdout + proc.stderr, noise
    assert "VERBOSE True" in proc.stdout  # Lightning's own messages on request


def test_check_takes_library_entries_and_slurm_activates_the_environment(lib, tmp_path):
    assert main(["check", "--model", f"{lib}:mcnn/seed0", "--samples", "32"]) == 0
    config = tmp_path / "stitch.yaml"
    config.write_text(yaml.safe_dump({"experiment": "stitch", "out": str(tmp_path / "sw"), "zoo": str(lib),
                                      "arch": "mcnn", "seeds": "0-1", "points": [POINT], "layers": ["standard"]}))
    script = load_sweep(config).emit_slurm(config).read_text()
    assert f"srun {sys.executable} -m symstitch sweep" in script  # the Python of this environment, by path


def test_stitch_from_python_equals_the_command(lib, tmp_path):
    """Same defaults, same path, seeded: one stitch gives one number whichever way it is asked for."""
    source, target = _refs(lib)
    first = stitch(source, target, POINT, layer="standard", epochs=1)
    again = stitch(source, target, POINT, layer="standard", epochs=1)
    assert first.penalty_pts == again.penalty_pts and torch.equal(first.layer.matrix(), again.layer.matrix())
    out = tmp_path / "cmd"
    assert main(["stitch", "--source", source, "--target", target, "--points", POINT, "--layers", "standard",
                 "--epochs", "1", "--out", str(out)]) == 0
    (record,) = [json.loads(p.read_text()) for p in (out / "cells").rglob("*.json")]
    assert record["result"]["penalty_pts"] == first.penalty_pts
    assert record["result"]["stitched_acc"] == first.stitched_acc


@pytest.mark.slow
def test_a_ddp_cell_in_a_sweep_is_locked_once_and_recorded_once(lib, tmp_path):
    """A stitch cell on 2 CPU processes (Lightning DDP relaunches the sweep command for rank 1): only rank 0 takes
    the cell's lock and writes its record; rank 1 runs the same cell with it instead of skipping it (a hang)."""
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "stitch", "out": str(tmp_path / "sw"), "zoo": str(lib), "arch": "mcnn", "seeds": "0-1",
        "points": [POINT], "layers": ["standard"],
        "fit_args": ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.strategy", "ddp", "--config", str(CONFIGS / "logger/csv.yaml"),
                     "--trainer.enable_progress_bar", "false"]}))
    proc = subprocess.run([sys.executable, "-m", "symstitch", "sweep", "--config", str(config), "--no-progress"],
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = (tmp_path / "sw/cells").rglob("*.json")
    ranks = json.loads(next((tmp_path / "sw/runs").rglob("ranks.json")).read_text())
    assert ranks["world_size"] == 2 and ranks["consistent"]
    assert json.loads(record.read_text())["result"]["penalty_pts"] is not None
