"""symstitch.commands: the experiment commands as a user types them — failed starts that claim nothing, one
folder per setting, one-line errors, library entries everywhere, SLURM scripts that find their environment."""

from __future__ import annotations

import json
import sys

import yaml

from symstitch.commands import main
from symstitch.sweep import load_sweep

from .conftest import LIB_POINT, library_refs



def test_a_failed_start_writes_nothing(mcnn_lib, tmp_path, capsys):
    source, target = library_refs(mcnn_lib)
    out = tmp_path / "st"
    assert main(["stitch", "--source", source, "--target", target, "--points", "layer9.act", "--out", str(out)]) == 2
    assert "valid stitch points" in capsys.readouterr().err and not out.exists()
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "stitch", "out": str(tmp_path / "sw"), "zoo": str(mcnn_lib), "arch": "mcnn", "seeds": "0-1",
        "points": [LIB_POINT], "layers": ["standard"], "fit_args": ["--trainer.max_epochz", "1"]}))
    assert main(["sweep", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "do not parse: unrecognized arguments: --trainer.max_epochz 1" in err and not (tmp_path / "sw").exists()


def test_distinct_settings_get_distinct_default_folders(mcnn_lib, tmp_path):
    source, target = library_refs(mcnn_lib)
    base = ["stitch", "--source", source, "--target", target, "--points", LIB_POINT, "--layers", "standard",
            "--epochs", "1"]
    assert main(base) == 0
    assert main([*base, "--lr", "0.01"]) == 0  # other settings: a folder of their own, not a refusal
    folders = sorted((tmp_path / "runs/stitch").iterdir())
    assert len(folders) == 2
    assert main(base) == 0  # the same settings again: their folder, read back
    assert sorted((tmp_path / "runs/stitch").iterdir()) == folders
    for folder in folders:
        (record,) = (folder / "cells").rglob("*.json")
        assert json.loads(record.read_text())["cell"]["point"] == LIB_POINT


def test_unwritable_output_folder_is_one_line(mcnn_lib, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    source, target = library_refs(mcnn_lib)
    code = main(["stitch", "--source", source, "--target", target, "--points", LIB_POINT, "--layers", "standard",
                 "--epochs", "1", "--out", str(tmp_path / "a-file" / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create the folder" in err and "Traceback" not in err


def test_check_takes_library_entries_and_slurm_activates_the_environment(mcnn_lib, tmp_path):
    assert main(["check", "--model", f"{mcnn_lib}:mcnn/seed0", "--samples", "32"]) == 0
    config = tmp_path / "stitch.yaml"
    config.write_text(yaml.safe_dump({"experiment": "stitch", "out": str(tmp_path / "sw"), "zoo": str(mcnn_lib),
                                      "arch": "mcnn", "seeds": "0-1", "points": [LIB_POINT], "layers": ["standard"]}))
    script = load_sweep(config).emit_slurm(config).read_text()
    assert f"srun {sys.executable} -m symstitch sweep" in script  # the Python of this environment, by path


def test_points_of_every_zoo_architecture_by_name(capsys):
    """``symstitch points <arch>``: a zoo architecture's points without weights (random initialisation)."""
    from symstitch.models import MODELS

    for arch in MODELS:
        assert main(["points", arch]) == 0, arch
        out = capsys.readouterr().out.splitlines()
        graph = MODELS.build(arch).as_graph()  # what a checkpoint of the architecture lists
        assert out[0].startswith("point ") and len(out) == len(graph.describe()) + 2, arch
        assert out[-1].endswith("stitch points (cuts after an activation): " + ", ".join(graph.stitch_points)), arch
        if arch == "mcnn":
            assert {f"layer{i}.act" for i in range(1, 5)} <= {line.split()[0] for line in out[1:-1]}
    assert main(["points", "resnet21"]) == 2
    err = capsys.readouterr().err
    assert "'resnet21' is neither a checkpoint file nor a model-library entry" in err
    assert "nor a zoo architecture (" in err and "resnet20" in err and len(err.strip().splitlines()) <= 2
