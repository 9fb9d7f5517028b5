"""`symstitch check`: passes on a real network, fails loudly when the action is broken."""

from __future__ import annotations

import copy
import json

import torch

from symstitch import check
from symstitch.commands import main


def test_check_on_the_spot_model_passes(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["check", "--arch", "mcnn", "--width", "0.125", "--epochs", "1", "--samples", "64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["point"] for r in rows] == ["layer1.act", "layer2.act", "layer3.act", "layer4.act"]
    assert all(r["ok"] and r["prediction_agreement"] == 1.0 for r in rows)
    assert "G_ReLU" in capsys.readouterr().out


def test_check_resnet_covers_the_residual_stream(capsys, tmp_path):
    rows_file = tmp_path / "rows.json"
    assert main(["check", "--arch", "resnet20", "--width", "0.25", "--epochs", "1", "--samples", "32",
                 "--json", str(rows_file)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(rows_file.read_text())
    points = ["stem.act"] + [f"layer{s}.{b}.act{i}" for s in (1, 2, 3) for b in range(3) for i in (1, 2)]
    assert [r["point"] for r in rows] == points and all(r["ok"] for r in rows)
    assert "layer3.2.act2" in out and "no weight-space action" not in out


def test_check_fails_when_the_function_changes(monkeypatch, tmp_path):
    def broken_act(model, point, g):  # moves the conv but forgets the next layer
        moved = copy.deepcopy(model)
        with torch.no_grad():
            moved.get_submodule(point.rsplit(".", 1)[0]).conv.weight.mul_(2.0)
        return moved

    monkeypatch.setattr(check, "act", broken_act)
    out = tmp_path / "rows.json"
    assert main(["check", "--arch", "mcnn", "--width", "0.125", "--epochs", "1", "--samples", "32", "--json", str(out)]) == 1
    assert not any(r["ok"] for r in json.loads(out.read_text()))
