"""The projection experiment: where M goes, what is frozen, resumable grid, report."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from symstitch.data import DataModule
from symstitch.projection import (ProjectionExperiment, ProjectionModule, TrainingSubset, projection_points,
                                  stratified_subset)
from symstitch.reports.projection import COLUMNS as PROJECTION_COLUMNS
from symstitch.reports.projection import projection_files
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


@pytest.mark.groundtruth
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
    assert len(rows) == 5 and rows[0] == ",".join(PROJECTION_COLUMNS)
    assert rows[1].startswith("relu-net,relu-net,mcnn,relu,layer3.act,3,group,rest,0,")
    assert paths["png"].stat().st_size > 10_000
    md = paths["md"].read_text()
    assert "| relu-net | relu | rest | 3 |" in md and "| relu-net | relu | rest | 4 |" in md
    assert "- No verdict" in md  # no orthogonal cells: nothing to compare


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


def test_stratified_subset_keeps_every_class_in_proportion():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 1)
    keep = stratified_subset(labels, 0.5, seed=3)
    assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == len(keep)
    # round(0.5·10) = 5, round(0.5·4) = 2, max(1, round(0.5·1)) = 1
    assert torch.bincount(labels[keep]).tolist() == [5, 2, 1]
    assert torch.equal(stratified_subset(labels, 0.5, seed=3), keep)  # seeded
    assert not torch.equal(stratified_subset(labels, 0.5, seed=4), keep)
    assert torch.equal(stratified_subset(labels, 1.0, seed=0), torch.arange(15))
    for bad in (0.0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="train_fraction"):
            stratified_subset(labels, bad, seed=0)


def test_training_subset_trains_on_the_fraction_and_tests_on_everything():
    full = DataModule(dataset="digits")
    full.setup()
    part = TrainingSubset(0.25, subset_seed=1, dataset="digits")
    part.setup()
    counts_full, counts_part = torch.bincount(full.train_set.y), torch.bincount(part.train_set.y)
    assert counts_part.tolist() == [max(1, round(0.25 * int(c))) for c in counts_full]
    assert torch.equal(part.test_set.x, full.test_set.x) and torch.equal(part.test_set.y, full.test_set.y)
    keep = stratified_subset(full.train_set.y, 0.25, seed=1)  # the kept images are training images, own labels
    assert torch.equal(part.train_set.x, full.train_set.x[keep]) and torch.equal(part.train_set.y, full.train_set.y[keep])


def test_experiment_options_are_checked(trained):
    for bad in (0, 2.0, "all"):
        with pytest.raises(ValueError, match="train_fraction"):
            ProjectionExperiment({"models": {"n": str(trained)}, "train_fraction": bad})
    with pytest.raises(ValueError, match="seed"):
        ProjectionExperiment({"zoo": "z", "seed": "3-1"})
    cells = ProjectionExperiment({"models": {"relu-net": str(trained)}, "points": ["layer1.act"],
                                  "kinds": ["group", "orthogonal"], "repeats": 2}).cells()
    assert [(c.params["family"], c.params["matrix"], c.params["repeat"]) for c in cells] == [
        ("relu-net", "group", 0), ("relu-net", "group", 1), ("relu-net", "orthogonal", 0), ("relu-net", "orthogonal", 1)]


def _record(network, layer, kind, repeat, acc, family="mcnn_nobn", retrain="rest"):
    return {"network": network, "family": family, "activation": "relu", "point": f"layer{layer}.act", "layer": layer,
            "matrix": kind, "retrain": retrain, "repeat": repeat, "clean_acc": 0.95, "inserted_acc": 0.1,
            "recovered_acc": acc, "epochs": 2, "lr": 0.005, "train_fraction": 1.0}


def test_gaps_and_verdicts_on_synthetic_cells(tmp_path):
    """Paired differences G_σ − orthogonal in points, exact: layer 1 pairs d = 3, 5, 7 (mean 5, std 2, 95 % CI
    5 ± t_{0.975,2}·2/√3 = 5 ± 4.968); layer 2 pairs d = −1, +1 (CI contains 0); layer 3 a single pair."""
    from scipy.stats import t

    from symstitch.reports.projection import gap_verdict, projection_gaps, projection_summary

    records = []
    for (network, repeat), d in {("a-seed0", 0): 3, ("a-seed0", 1): 5, ("a-seed1", 0): 7}.items():
        records += [_record(network, 1, "group", repeat, 0.90), _record(network, 1, "orthogonal", repeat, 0.90 - d / 100),
                    _record(network, 1, "identity", repeat, 0.94)]
    records += [_record("a-seed0", 2, "group", 0, 0.80), _record("a-seed0", 2, "orthogonal", 0, 0.81),
                _record("a-seed1", 2, "group", 0, 0.80), _record("a-seed1", 2, "orthogonal", 0, 0.79)]
    records += [_record("a-seed0", 3, "group", 0, 0.70), _record("a-seed0", 3, "orthogonal", 0, 0.60),
                _record("a-seed1", 3, "orthogonal", 1, 0.10)]  # unpaired: no G_σ cell with repeat 1
    gaps = projection_gaps(records)
    assert [(g["layer"], g["n"]) for g in gaps] == [(1, 3), (2, 2), (3, 1)]
    g1, g2, g3 = gaps
    half = t.ppf(0.975, 2) * 2 / 3 ** 0.5
    assert g1["mean"] == pytest.approx(5.0) and g1["std"] == pytest.approx(2.0)
    assert g1["ci"] == pytest.approx((5.0 - half, 5.0 + half))
    assert half == pytest.approx(4.968, abs=1e-3)
    assert g2["mean"] == pytest.approx(0.0, abs=1e-12) and g2["std"] == pytest.approx(2 ** 0.5)
    assert g3["mean"] == pytest.approx(10.0) and g3["n"] == 1

    assert gap_verdict(g1, "relu") == (
        "orthogonal costs +5.00 ± 2.00 points more than G_relu at layer 1 (retrain rest; mean ± std over 3 paired "
        "run(s), 95 % CI [+0.03, +9.97]): orthogonal insertions cost more: resolved")
    assert gap_verdict(g2, "relu").endswith("no difference resolved (the interval contains 0)")
    assert gap_verdict(g3, "relu").endswith("a single pair, no error bar, nothing resolved")
    flipped = gap_verdict({**g1, "mean": -5.0, "ci": (-9.97, -0.03)}, "relu")
    assert flipped.endswith("G_σ insertions cost more: resolved, against the theory's expectation")

    (identity,) = [s for s in projection_summary(records) if s["matrix"] == "identity"]
    assert identity["layers"] == [1] and identity["recovered"][0]["mean"] == pytest.approx(0.94)
    assert identity["recovered"][0]["n"] == 3 and identity["networks"] == ["a-seed0", "a-seed1"]

    md = projection_files(records, tmp_path)["md"].read_text()
    assert "| mcnn_nobn | relu | rest | 1 | 95.0 ± 0.0 (n=2) | 94.0 ± 0.0 (n=3) | 90.0 ± 0.0 (n=3) | 85.0 ± 2.0 (n=3) | +5.00 ± 2.00 (n=3) |" in md
    assert f"- mcnn_nobn: {gap_verdict(g1, 'relu')}." in md


@pytest.mark.groundtruth
def test_three_networks_dissected_at_l_and_after(trained, tmp_path):
    """docs/method.md §6, three networks: with ``dissect`` every cell dissects the retrained network at l and at
    the next point, beside the clean network (once per network). At l the layers are frozen, so M = I gives the
    clean dissection exactly, and M = P·D ∈ G_ReLU gives it with unit i read from clean unit π(i) (a pixel on a
    threshold may round the other way: a few pixels of tens of thousands)."""
    import yaml

    from symstitch.io import read_json
    from symstitch.sweep import load_sweep

    out = tmp_path / "proj"
    config = tmp_path / "projection.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "projection", "models": {"relu-net": str(trained)}, "points": ["layer2.act"], "epochs": 1,
        "kinds": ["identity", "group", "orthogonal"], "dissect": {"concepts": "digits-twin:test", "images": 256}}))
    records = {r.result["matrix"]: r.result for r in load_sweep(config, out).run(progress=False)}
    assert set(records) == {"identity", "group", "orthogonal"}
    for r in records.values():
        assert [(d["state"], d["where"], d["point"]) for d in r["dissection"]] == [
            ("clean", "at", "layer2.act"), ("clean", "after", "layer3.act"),
            ("retrained", "at", "layer2.act"), ("retrained", "after", "layer3.act")]
        assert [d["units"] for d in r["dissection"]] == [32, 64, 32, 64]
        assert all((out / d["tally_csv"]).is_file() for d in r["dissection"])
    assert len(list(out.glob("runs/relu-net/clean/dissect/*/dissection.json"))) == 2  # made once

    def full(r, state, where):
        d = next(d for d in r["dissection"] if (d["state"], d["where"]) == (state, where))
        return read_json((out / d["tally_csv"]).parent / "dissection.json")

    clean = full(records["identity"], "clean", "at")
    same = full(records["identity"], "retrained", "at")
    assert (same["labels"], same["scores"], same["thresholds"]) == (clean["labels"], clean["scores"], clean["thresholds"])
    M = intertwiner_group("relu").sample(32, generator=torch.Generator().manual_seed(0))  # the group cell's (repeat 0)
    perm, scale = M.abs().argmax(dim=1), M.abs().amax(dim=1)
    moved = full(records["group"], "retrained", "at")
    assert moved["scores"] == pytest.approx([clean["scores"][j] for j in perm.tolist()], abs=0.01)
    assert moved["thresholds"] == pytest.approx([clean["thresholds"][j] * float(s) for j, s in zip(perm, scale)],
                                                rel=1e-5)

    paths = projection_files(list(records.values()), tmp_path / "report")
    md = paths["md"].read_text()
    assert "## Dissection of the three networks" in md and "Concepts: digits-twin:test at q = 0.02, IoU ≥ 0.04." in md
    assert "| relu-net | 2 | at l: layer2.act |" in md and "| relu-net | 2 | after l: layer3.act |" in md
    assert "- relu-net, layer 2, at l: " in md and "no interval from a single pair" in md
    rows = paths["projection_dissection_csv"].read_text().strip().splitlines()
    assert len(rows) == 1 + 2 + 3 * 2  # the clean network once per place, each kind at l and after l
    assert paths["dissection_png"].stat().st_size > 5_000


def test_dissect_setting_is_checked(trained, tmp_path):
    base = {"models": {"n": str(trained)}}
    for bad, message in (("digits-twin", "a mapping"), ({"q": 0.01}, "a mapping"),
                         ({"concepts": "digits-twin", "iou": 0.1}, "unknown dissect setting.*iou.*valid: concepts")):
        with pytest.raises(ValueError, match=message):
            ProjectionExperiment({**base, "dissect": bad})
    missing = ProjectionExperiment({**base, "dissect": {"concepts": f"broden:{tmp_path / 'nowhere'}"}})
    with pytest.raises(Exception, match="nowhere"):
        missing.check(missing.cells())
