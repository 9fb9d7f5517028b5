"""The model library: seeds trained once, recorded atomically, never mixed across configurations."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from symstitch import zoo
from symstitch.checkpoints import load_classifier
from symstitch.io import parse_range
from symstitch.data import DataModule, normalize_batch

from .conftest import cli_env

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
