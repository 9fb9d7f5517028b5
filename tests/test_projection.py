"""The projection experiment: where M goes, what is frozen, resumable grid, report."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from symstitch.data import DataModule
from symstitch.projection import ProjectionExperiment, ProjectionModule, projection_points
from symstitch.report import projection_files
from symstitch.symmetry import feature, intertwiner_group, monomial_inverse, next_layer
from symstitch.training import ClassifierModule

from .conftest import CONFIGS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small ReLU mcnn trained 2 epochs on digits, saved as a classifier checkpoint."""
    pl.seed_everything(0, verbose=False)
    dm = DataModule(dataset="digits")
    module = ClassifierModule("mcnn", arch_kwargs={"width": 0.25}, num_classes=10)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    path = tmp_path_factory.mktemp("proj") / "mcnn.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return path


def _x():
    dm = DataModule(dataset="digits")
    dm.setup()
    from symstitch.data import normalize_batch

    return normalize_batch(dm.test_set.x[:64], dm.mean, dm.std)


def test_group_insertion_sits_before_the_activation_and_is_absorbed_exactly(trained):
    """M ∈ G_ReLU inserted at layer l, then W_{l+1} ← W_{l+1} φ(M)^{-1}: the original function, exactly as
    the theory says; the representation at the point is M·h."""
    x = _x()
    for point in ("layer1.act", "layer2.act", "layer4.act"):
        cell = ProjectionModule(str(trained), point, matrix="group", matrix_seed=3).eval()
        clean = ProjectionModule(str(trained), point, matrix="identity").eval()
        M = cell.M.double()
        assert intertwiner_group("relu").contains(M) and not torch.equal(M, torch.eye(len(M), dtype=M.dtype))
        h, h_m = feature(clean.net, point, x), feature(cell.net, point, x)
        torch.testing.assert_close(h_m, torch.einsum("ij,nj...->ni...", M.float(), h), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert not torch.allclose(cell(x), clean(x), atol=1e-3)  # the insertion does change the output
            layer = next_layer(cell.net, point)
            W = layer.weight.double()
            layer.weight.copy_(torch.einsum("oi...,ij->oj...", W, monomial_inverse(M)).float())
            torch.testing.assert_close(cell(x), clean(x), rtol=1e-4, atol=1e-4)


def test_frozen_layers_and_statistics_do_not_move(trained):
    dm = DataModule(dataset="digits")
    cell = ProjectionModule(str(trained), "layer2.act", matrix="orthogonal")
    before = {k: v.clone() for k, v in cell.net.state_dict().items()}
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_train_batches=4, limit_val_batches=1).fit(cell, datamodule=dm)
    after = cell.net.state_dict()
    for k in before:
        frozen = k.startswith(("layer1.", "layer2."))
        assert torch.equal(before[k], after[k]) == frozen or "num_batches" in k, k
    assert torch.allclose(cell.M @ cell.M.T, torch.eye(len(cell.M)), atol=1e-5)


def test_retrain_next_trains_exactly_one_layer(trained):
    cell = ProjectionModule(str(trained), "layer3.act", matrix="group", retrain="next")
    trainable = [n for n, p in cell.net.named_parameters() if p.requires_grad]
    assert trainable == ["layer4.conv.weight"]
    assert not any(m.training for m in cell.net.modules())
    with pytest.raises(ValueError, match="valid"):
        ProjectionModule(str(trained), "layer9.act")
    with pytest.raises(KeyError, match="identity"):
        ProjectionModule(str(trained), "layer1.act", matrix="hadamard")


def test_grid_is_resumable_and_reported(trained, tmp_path, monkeypatch):
    import yaml

    from symstitch.sweep import load_sweep

    out = tmp_path / "proj"
    config = tmp_path / "projection.yaml"
    config.write_text(yaml.safe_dump({"experiment": "projection", "models": {"relu-net": str(trained)},
                                      "kinds": ["identity", "group"], "points": ["layer3.act", "layer4.act"],
                                      "epochs": 1}))
    records = [r.result for r in load_sweep(config, out).run(progress=False)]
    assert len(records) == 4 and {r["matrix"] for r in records} == {"identity", "group"}
    for r in records:
        if r["matrix"] == "identity":  # inserting I changes nothing before retraining
            assert r["inserted_acc"] == pytest.approx(r["clean_acc"], abs=1e-9)
    assert len(list(out.glob("cells/relu-net/*/*.json"))) == 4

    def no_work(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(ProjectionExperiment, "run_cell", no_work)
    assert [r.result for r in load_sweep(config, out).run(progress=False)] == records
    paths = projection_files(records, out)
    rows = paths["csv"].read_text().strip().splitlines()
    assert len(rows) == 5 and rows[0].startswith("network,activation,point,layer,matrix")
    assert paths["png"].stat().st_size > 10_000
    assert "| relu-net | relu | group | rest |" in paths["md"].read_text()


def test_points(trained):
    from symstitch import models

    assert projection_points(models.build("mcnn", width=0.25)) == ("layer1.act", "layer2.act", "layer3.act", "layer4.act")
    assert projection_points(models.build("resnet20", width=0.25))[:2] == ("stem.act", "layer1.0.act2")


@pytest.mark.slow
def test_acceptance_group_insertions_recover_on_digits(tmp_path):
    """Issue acceptance: G_ReLU insertions come back to the clean accuracy (within 1 point) at every layer."""
    from symstitch.commands import main

    assert main(["projection", "--models", "mcnn", "--kinds", "group", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "out"),
                 "--data.dataset", "digits", "--model.arch_kwargs", "{width: 0.5}", "--trainer.max_epochs", "20",
                 "--config", str(CONFIGS / "logger/csv.yaml"), "--trainer.enable_progress_bar", "false"]) == 0
    rows = [json.loads(p.read_text())["result"] for p in (tmp_path / "out").glob("cells/*/*/*.json")]
    assert len(rows) == 4
    for r in rows:
        assert r["recovered_acc"] >= r["clean_acc"] - 0.01, r
