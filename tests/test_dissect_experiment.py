"""The dissection experiment end to end (a sweep over networks × points × rotations, resumed, reported, on W&B),
the ``symstitch dissect`` command and its one-line errors, and the report's numbers on records with known
values."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from symstitch import report
from symstitch.reports import dissect as dissect_report

from .conftest import cli_env, library_refs


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def swept(mcnn_lib, tmp_path_factory):
    """Two networks × two points × (α = 0, and α = 1 under two rotations) on 64 twin images."""
    from symstitch.sweep import load_sweep

    root = tmp_path_factory.mktemp("dissect")
    config = root / "dissect.yaml"
    config.write_text(yaml.safe_dump({"experiment": "dissect", "zoo": str(mcnn_lib), "models": {"mcnn": "0-1"},
                                      "points": ["layer1.act", "layer2.act"], "alphas": [0, 1], "rotations": 2,
                                      "concepts": "digits-twin:test", "images": 64, "top_units": 3}))
    records = load_sweep(config, root / "out").run(progress=False)
    return config, root / "out", records


def test_sweep_cells_records_and_files(swept):
    _, out, records = swept
    assert len(records) == 2 * 2 * (1 + 2)
    keys = sorted(r.key for r in records)
    assert "mcnn-seed0/layer1.act/alpha0" in keys and "mcnn-seed1/layer2.act/alpha1-r1" in keys
    for record in records:
        r = record.result
        assert r["q"] == 0.02 and r["images"] == 64 and r["quantile"]["exact"]  # the twin's own q
        rows = _csv(out / r["tally_csv"])
        assert len(rows) == r["units"] and {"unit", "label", "score", "color-label", "texture-iou"} <= set(rows[0])
        by_unit = {int(row["unit"]): row for row in rows}
        assert [by_unit[u]["label"] for u in range(r["units"])] == r["labels"]
        assert r["interpretable"] == sum(s >= 0.04 for s in r["scores"])
        assert (out / r["units_png"]).stat().st_size > 0
        assert (r["alpha"] == 0) == (r["transform"] == "")


def test_sweep_resumes_without_recomputing(swept, monkeypatch):
    from symstitch.dissect.experiment import DissectExperiment
    from symstitch.sweep import load_sweep

    config, out, records = swept

    def no_work(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(DissectExperiment, "run_cell", no_work)
    assert [r.result for r in load_sweep(config, out).run(progress=False)] == [r.result for r in records]


def test_report_of_the_sweep(swept, tmp_path):
    _, out, records = swept
    md = report.write_report(out, tmp_path / "report")
    text = md.read_text()
    assert "| dissect | 12 |" in text and "## Network dissection" in text
    rows = _csv(tmp_path / "report" / "dissect.csv")
    assert len(rows) == 12 and {r["alpha"] for r in rows} == {"0.0", "1.0"}
    for point in ("layer1.act", "layer2.act"):
        assert f"- mcnn at {point}: the activation basis has" in text
        assert f"| mcnn | {point} | 0 |" in text and f"| mcnn | {point} | 1 |" in text
    for png in ("dissect_rotation.png", "dissect_categories.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0 and f"({png})" in text
    links = [line for line in text.splitlines() if "([units](" in line]
    assert len(links) == 2
    for line in links:
        for target in (line.split("([units](")[1].split(")")[0], line.split("[tally](")[1].split(")")[0]):
            assert (tmp_path / "report" / target).resolve().is_file()


def test_report_numbers_and_verdicts_from_known_records():
    def record(network, alpha, interpretable, rotation=None, per_cat=None):
        return {"file": f"/x/cells/{network}/p/a{alpha}.json", "result": {
            "network": network, "family": "fam", "seed": 0, "point": "p", "alpha": alpha, "rotation": rotation,
            "units": 10, "interpretable": interpretable, "unique_concepts": interpretable // 2,
            "unique_per_category": per_cat or {"color": 1, "object": 2}, "iou_threshold": 0.04, "q": 0.02,
            "quantile": {"exact": True}, "images": 5, "concepts": "twin", "headline": "h"}}

    records = [record("n0", 0.0, 8), record("n0", 1.0, 4, 0), record("n0", 1.0, 2, 1),
               record("n1", 0.0, 6), record("n1", 1.0, 3, 0), record("n1", 1.0, 3, 1),
               record("n2", 0.0, 7), record("n2", 1.0, 5, 0), record("n2", 1.0, 3, 1)]
    rows, categories = dissect_report.dissect_rows(records)
    assert categories == ["color", "object"]
    summary = dissect_report.dissect_summary(rows, categories)
    zero = next(s for s in summary if s["alpha"] == 0)
    assert zero["interpretable"]["mean"] == pytest.approx(0.7) and zero["interpretable"]["n"] == 3
    # per network: 0.8 − 0.3, 0.6 − 0.3, 0.7 − 0.4 → 0.5, 0.3, 0.3: mean 11/30, std 0.11547
    (gap,) = dissect_report.basis_gaps(rows)
    assert gap["mean"] == pytest.approx(11 / 30) and gap["std"] == pytest.approx(0.2 / 3 ** 0.5) and gap["n"] == 3
    lo, hi = gap["ci"]
    assert lo > 0 and hi == pytest.approx(2 * 11 / 30 - lo)
    assert dissect_report.basis_verdict(gap).endswith("the activation basis is more interpretable: resolved")
    flipped = {**gap, "ci": (-hi, -lo)}
    assert dissect_report.basis_verdict(flipped).endswith("the rotated basis is more interpretable: resolved")
    assert "no interval" in dissect_report.basis_verdict({**gap, "n": 1, "ci": (float("nan"),) * 2})


def test_report_on_wandb_holds_the_tallies(swept, tmp_path, monkeypatch):
    from .wandb_records import runs

    monkeypatch.delenv("WANDB_MODE", raising=False)
    _, out, _ = swept
    report.write_report(out, tmp_path / "r", wandb=True)
    (run,) = runs(tmp_path / "r")
    assert run.history["dissect_table"]["nrows"] == 12
    tally = run.history["tally/mcnn-seed0/layer1.act_table"]
    assert tally["_type"] == "table-file" and tally["ncols"] == len(_csv(out / "runs/mcnn-seed0/layer1.act/alpha0/tally.csv")[0])
    assert run.history["figures/dissect_rotation"]["_type"] == "image-file"
    assert run.history["figures/runs/mcnn-seed0/layer1.act/alpha0/units"]["_type"] == "image-file"


def test_experiment_refuses_bad_settings(mcnn_lib, tmp_path):
    from symstitch.dissect.experiment import DissectExperiment, concept_source

    base = {"points": ["layer1.act"]}
    with pytest.raises(ValueError, match="takes its networks from a model library .* or by name"):
        DissectExperiment({**base, "zoo": str(mcnn_lib), "models": {"mcnn": 0}, "networks": {"a": "b"}})
    with pytest.raises(ValueError, match=r"alphas lie in \[0, 1\], got \[1.5\]"):
        DissectExperiment({**base, "networks": {"a": "b"}, "alphas": [1.5]})
    with pytest.raises(ValueError, match="unknown concept source 'imagenet'; valid: digits-twin"):
        DissectExperiment({**base, "networks": {"a": "b"}, "concepts": "imagenet"})
    with pytest.raises(ValueError, match="broden needs its folder"):
        concept_source("broden")
    ref = library_refs(mcnn_lib)[0]
    experiment = DissectExperiment({"points": ["layer7.act"], "networks": {"a": ref}})
    with pytest.raises(ValueError, match=r"unknown point 'layer7.act' of a \(.*\); valid points: layer1.act"):
        experiment.cells()


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "symstitch", "dissect", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=cli_env(tmp_path), timeout=300)


def test_command_end_to_end(mcnn_lib, tmp_path):
    ref = library_refs(mcnn_lib)[0]
    done = _cli(tmp_path, "--network", ref, "--points", "layer2.act", "--images", "40", "--out", "d")
    assert done.returncode == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("layer2.act: ")]
    record = json.loads(next((tmp_path / "d" / "cells").rglob("*.json")).read_text())["result"]
    assert line.startswith(f"layer2.act: {record['headline']}; tally ") and record["network"] == "mcnn-seed0"
    assert (tmp_path / "d" / "report" / "report.md").is_file()



def test_command_errors_are_one_line(mcnn_lib, tmp_path, capsys, monkeypatch):
    from symstitch.commands import main

    monkeypatch.chdir(tmp_path)
    ref = library_refs(mcnn_lib)[0]
    assert main(["dissect", "--network", ref, "--points", "layer9", "--out", "e"]) == 2
    err = capsys.readouterr().err
    assert "unknown point 'layer9' of mcnn-seed0" in err and len(err.strip().splitlines()) <= 2
    assert "valid points: layer1.act, layer2.act, layer3.act, layer4.act" in err
    assert main(["dissect", "--network", ref, "--concepts", f"broden:{tmp_path / 'nowhere'}", "--out", "f"]) == 2
    err = capsys.readouterr().err
    assert "dlbroden.sh" in err and "Traceback" not in err
    assert not (tmp_path / "f").exists()  # refused before anything was written


def test_a_torchvision_model_from_the_command_line(tmp_path, capsys):
    """The command on a network outside the zoo, given by class path (random weights): its points are torch.fx
    node names; the default concepts are the twin."""
    from symstitch.commands import main

    spec = "{class_path: torchvision.models.resnet18, init_args: {num_classes: 10}}"
    assert main(["dissect", "--network", spec, "--points", "layer1.1.relu_1", "--images", "32",
                 "--out", str(tmp_path / "tv")]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("layer1.1.relu_1: ")]
    assert " of 64 units cover " in line
    (tally,) = (tmp_path / "tv").rglob("tally.csv")
    assert len(_csv(tally)) == 64


def test_concept_images_of_another_size_than_the_network_s_are_refused(mcnn_lib, tmp_path):
    from symstitch.dissect.api import dissect
    from symstitch.dissect.broden import BrodenSource
    from symstitch.library import load_model

    from .test_dissect_broden import IH, IW, make_broden

    make_broden(tmp_path / "broden")
    ref = library_refs(mcnn_lib)[0]
    with pytest.raises(ValueError, match=rf"trained on digits's 32×32 images but .* serves {IH}×{IW}: resize .*"
                                         r"--image-size 32"):
        dissect(ref, "layer1.act", BrodenSource(tmp_path / "broden"))
    net = load_model(ref)  # an nn.Module: no saved data settings, only its forward can object
    resized = dissect(ref, "layer1.act", BrodenSource(tmp_path / "broden", image_size=32))
    assert resized.units == net.point_channels("layer1.act") and resized.images == 4
    with pytest.raises(ValueError, match=rf"cannot run on .*{IH}×{IW} images \(.*\): resize them"):
        dissect(net, "layer4.act", BrodenSource(tmp_path / "broden"))
