"""`symstitch align` end to end: a network against its symmetry-transformed copy (exact ground truth)."""

from __future__ import annotations

import csv

import pytest
import torch

from symstitch.align import AlignExperiment
from symstitch.commands import main
from symstitch.symmetry import act, intertwiner_group
from symstitch.training import ClassifierModule

POINT = "layer2.act"


@pytest.fixture()
def pair(tmp_path):
    torch.manual_seed(0)
    module = ClassifierModule("mcnn", arch_kwargs={"width": 0.25}, num_classes=10).eval()
    for m in module.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    paths = {}
    for name, net in (("A", module.net), ("B", None)):
        if net is None:
            n = module.net.feature_shapes()[POINT][0]
            g = intertwiner_group("relu").sample(n, generator=torch.Generator().manual_seed(3))
            net = act(module.net, POINT, g)
        paths[name] = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                    "hyper_parameters": dict(module.hparams)}, paths[name])
    return paths


@pytest.mark.groundtruth
def test_align_net_vs_its_transformed_copy(pair, tmp_path):
    out = tmp_path / "align"
    assert main(["align", "--source", str(pair["A"]), "--target", str(pair["B"]), "--images", "120", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "report" / "align.csv")))
    value = {(r["metric"], r["point_a"], r["point_b"]): float(r["value"]) for r in rows}
    points = sorted({r["point_a"] for r in rows})
    assert len(rows) == 4 * len(points) ** 2  # every metric, every pair
    for metric in ("procrustes_relu", "cka_relu"):  # invariant to the positive-scaled permutation g
        assert value[metric, POINT, POINT] == pytest.approx(1.0, abs=1e-5)
    assert value["cka_linear", POINT, POINT] < 1 - 1e-3  # not invariant to the scales of g
    for p in points:  # features away from the edited layer are identical
        if p != POINT:
            assert value["cka_linear", p, p] == pytest.approx(1.0, abs=1e-5)
    for name in ("align_cka_relu.png", "align_diagonal.png", "report.md"):
        assert (out / "report" / name).stat().st_size > 1000
    assert list((out / "report").rglob("offline-run-*"))  # logged to W&B, offline: nothing may need a network

    # the same pair and settings again: read back, not recomputed; other settings: refused, nothing overwritten
    files = {p: p.read_text() for p in (out / "cells").rglob("*.json")}
    assert len(files) == 1  # one cell: the pair, every metric from one pass
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AlignExperiment, "run_cell", lambda *a, **k: pytest.fail("recomputed"))
        assert main(["align", "--source", str(pair["A"]), "--target", str(pair["B"]), "--images", "120", "--out",
                     str(out), "--no-wandb"]) == 0
        assert main(["align", "--source", str(pair["A"]), "--target", str(pair["B"]), "--images", "60", "--out",
                     str(out), "--no-wandb"]) == 2
    assert {p: p.read_text() for p in (out / "cells").rglob("*.json")} == files


def test_align_errors(pair, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["align", "--source", str(pair["A"]), "--target", str(pair["B"]), "--metrics", "cka", "--out",
                 str(out), "--no-wandb"]) == 2
    assert "unknown metric 'cka'" in capsys.readouterr().err
    assert not out.exists()  # a failed start claims nothing
