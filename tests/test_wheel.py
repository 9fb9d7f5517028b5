"""The package installs anywhere: a wheel built from the repository, installed into a fresh virtual environment,
runs a zoo, a stitch and an align from a folder outside the repository, with the configs it ships."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from .conftest import REPO


def _run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_in_a_fresh_venv_runs_every_command_from_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MASTER_ADDR", "MASTER_PORT",
                                                             "WANDB_MODE", "WANDB_API_KEY")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, REPO],
         tmp_path, env)
    (wheel,) = dist.glob("symstitch-*.whl")
    shipped = zipfile.ZipFile(wheel).namelist()
    for config in ("stitch/birkhoff.yaml", "zoo/resnet20.yaml", "data/digits.yaml", "align/digits.yaml"):
        assert f"symstitch/configs/{config}" in shipped

    # a fresh environment with the wheel; its dependencies are this environment's (a path entry, so that no
    # multi-GB download is needed), which holds symstitch only as an editable install whose hook is not loaded
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    purelib = Path(_run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, env).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([venv / "bin/python", "-m", "pip", "install", "-q", "--no-deps", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"  # no configs/ here, no repository above
    work.mkdir()
    where = _run([venv / "bin/python", "-c", "import symstitch; print(symstitch.__file__)"], work, env).stdout
    assert where.strip().startswith(str(venv))
    bin_ = venv / "bin"
    _run([bin_ / "symstitch", "zoo", "--arch", "mcnn", "--seeds", "0-1", "--out", "lib", "--config",
          "configs/zoo/mcnn.yaml", "--data", "configs/data/digits.yaml", "--config", "configs/logger/csv.yaml",
          "--model.init_args.arch_kwargs", "{width: 0.125}", "--trainer.max_epochs", "1"], work, env)
    stitched = _run([bin_ / "symstitch", "stitch", "--source", "lib:mcnn/seed0", "--target", "lib:mcnn/seed1",
                     "--points", "layer1.act", "--layers", "standard,birkhoff", "--epochs", "1", "--out", "st"],
                    work, env)
    assert "layer1.act" in stitched.stdout and len(list((work / "st/cells").rglob("*.json"))) == 2
    _run([bin_ / "symstitch", "align", "--config", "configs/align/digits.yaml", "--source", "lib:mcnn/seed0",
          "--target", "lib:mcnn/seed1", "--images", "100", "--out", "al", "--no-wandb"], work, env)
    assert (work / "al/report/align.csv").stat().st_size > 1000
    assert (work / "al/report/align_cka_relu.png").exists()
