"""The model library: seeds trained once, recorded atomically, never mixed across configurations."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from symstitch import zoo
from symstitch.callbacks import TrainingDiverged
from symstitch.checkpoints import load_classifier
from symstitch.commands import main
from symstitch.data import DataModule, normalize_batch
from symstitch.io import Lock, dumps, parse_range, write_json

from .conftest import LIB_FIT, cli_env

FIT = ["--data.dataset", "digits", "--model.init_args.arch_kwargs", "{width: 0.125}",
       "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_model_summary", "false"]


def test_parse_range():
    assert parse_range("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_range("5") == [5]
    assert parse_range("2,1-3") == [2, 1, 3]
    assert parse_range(4) == [4] and parse_range([1, "3-4"]) == [1, 3, 4]
    for bad in ("", "a-b", "1-x", "5-2"):
        with pytest.raises(ValueError, match="bad seed list"):
            parse_range(bad)
    with pytest.raises(ValueError, match="bad cell list 'x'"):
        parse_range("x", "cell")


def test_zoo_trains_records_and_skips(tmp_path, monkeypatch):
    entries = zoo.train_zoo("mcnn", [0, 1], tmp_path / "lib", FIT)
    assert [e["seed"] for e in entries] == [0, 1]
    manifest = json.loads((tmp_path / "lib/manifest.json").read_text())["models"]
    assert sorted(manifest) == ["mcnn/seed0", "mcnn/seed1"]
    # different seeds give different networks; the recorded accuracy is the checkpoint's own
    dm = DataModule(dataset="digits")
    dm.setup()
    x = normalize_batch(dm.test_set.x, dm.mean, dm.std)
    nets = [load_classifier(tmp_path / "lib" / e["checkpoint"]) for e in entries]
    assert not torch.equal(nets[0].layer1.conv.weight, nets[1].layer1.conv.weight)
    for net, e in zip(nets, entries):
        with torch.no_grad():
            acc = (net(x).argmax(1) == dm.test_set.y).float().mean().item()
        assert e["test_acc"] == pytest.approx(acc, abs=1e-6)

    # a rerun trains nothing
    def no_training(*args, **kwargs):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(zoo, "train_seed", no_training)
    again = zoo.train_zoo("mcnn", [0, 1], tmp_path / "lib", FIT)
    assert again == entries


def test_zoo_refuses_to_mix_configurations(tmp_path):
    zoo.train_zoo("mcnn", [0], tmp_path / "lib", FIT)
    other = [a if a != "{width: 0.125}" else "{width: 0.25}" for a in FIT]
    with pytest.raises(ValueError, match="another configuration"):
        zoo.train_zoo("mcnn", [1], tmp_path / "lib", other)
    assert not (tmp_path / "lib/mcnn/seed1").exists()


@pytest.mark.slow
def test_zoo_killed_mid_run_then_rerun_trains_each_seed_once(tmp_path):
    """SIGKILL the zoo while a later seed trains; the rerun keeps what finished and completes the rest."""
    lib = tmp_path / "lib"
    cmd = [sys.executable, "-m", "symstitch", "zoo", "--arch", "mcnn", "--seeds", "0-2", "--out", str(lib),
           *FIT, "--trainer.max_epochs", "4", "--config", str(Path(__file__).parents[1] / "configs/logger/csv.yaml")]
    env = cli_env(tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = lib / "manifest.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and "mcnn/seed0" in manifest.read_text() and (lib / "mcnn/seed1/fit").exists():
            break  # seed 0 recorded and seed 1 training
        time.sleep(0.05)
    assert proc.poll() is None, "the zoo ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = json.loads(manifest.read_text())["models"]
    assert "mcnn/seed0" in first and len(first) < 3
    assert "mcnn/seed1" in killed_mid_seed_candidates(first, lib)
    seed0_ckpt = lib / first["mcnn/seed0"]["checkpoint"]
    stamp = seed0_ckpt.stat().st_mtime_ns
    killed_mid_seed = killed_mid_seed_candidates(first, lib)

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = json.loads(manifest.read_text())["models"]
    assert sorted(final) == ["mcnn/seed0", "mcnn/seed1", "mcnn/seed2"]
    assert final["mcnn/seed0"] == first["mcnn/seed0"]  # not retrained
    assert seed0_ckpt.stat().st_mtime_ns == stamp
    assert f"{len(first)} of 3 seeds already" in rerun.stdout
    for key in killed_mid_seed:  # the half-trained folder was discarded, not resumed or kept beside
        assert f"discarding the unfinished run in {lib / key}" in rerun.stdout
    for key, entry in final.items():
        assert (lib / entry["checkpoint"]).is_file()
        assert list((lib / key).glob("fit/version_*")) == [lib / key / "fit/version_0"]  # trained once


def killed_mid_seed_candidates(recorded: dict, lib: Path) -> list[str]:
    """Seeds with a folder but no manifest record: the run that the kill interrupted."""
    return [k for k in ("mcnn/seed1", "mcnn/seed2") if k not in recorded and (lib / k).exists()]


def test_nan_training_stops_and_is_never_recorded(mcnn_lib, tmp_path, capsys):
    huge = ["--model.init_args.optimizer.init_args.lr", "1e30"]
    with pytest.raises(TrainingDiverged, match="training diverged: the loss is nan"):
        zoo.train_zoo("mcnn", [0], tmp_path / "nan-lib", [*LIB_FIT, *huge])
    assert not (tmp_path / "nan-lib/manifest.json").exists()
    assert not list((tmp_path / "nan-lib").rglob("model.ckpt"))
    code = main(["fit", *LIB_FIT, "--model.init_args.arch", "mcnn", *huge])
    assert code == 2 and "training diverged" in capsys.readouterr().err
    assert not list(Path("runs/fit").glob("version_*"))  # a failed fit leaves no empty run folder
    # and JSON is always valid: a non-finite number is written as null
    write_json(tmp_path / "x.json", {"loss": math.nan, "acc": [1.0, math.inf]})
    strict = json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: pytest.fail(f"invalid {c}"))
    assert strict == {"loss": None, "acc": [1.0, None]} and "NaN" not in dumps({"x": float("nan")})


def test_a_second_writer_leaves_a_live_seed_alone(mcnn_lib, tmp_path, capsys):
    """The first writer of seed 5 holds its lock: a second zoo on the same library leaves the seed to it."""
    live = mcnn_lib / "mcnn/seed5"
    live.mkdir(parents=True)
    (live / "metrics.csv").write_text("epoch,train/acc\n0,0.5\n")
    with Lock(mcnn_lib / "mcnn/.seed5.lock"):
        assert zoo.train_zoo("mcnn", [0, 5], mcnn_lib, LIB_FIT) == [json.loads((mcnn_lib / "manifest.json").read_text())["models"]
                                                           ["mcnn/seed0"]]
    assert (live / "metrics.csv").read_text() == "epoch,train/acc\n0,0.5\n"  # never deleted or written
    assert "mcnn/seed5" not in json.loads((mcnn_lib / "manifest.json").read_text())["models"]
    assert "being written by another process" in capsys.readouterr().out


def test_zoo_rerun_with_other_settings_is_refused_not_answered_with_old_models(mcnn_lib):
    other = [a if a != "{width: 0.125}" else "{width: 0.25}" for a in LIB_FIT]
    with pytest.raises(ValueError, match="another configuration"):
        zoo.train_zoo("mcnn", [0], mcnn_lib, other)  # seed 0 exists, but not with these settings
