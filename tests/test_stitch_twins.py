"""The stitching twins of experiments/ (the mCNN, ResNet-18, the CCT and the lasso sweep over λ) end to end at a
tiny size: each shipped config with its zoo replaced by 1-epoch eighth-width networks, one pair, one point and two
of its layers, swept and reported with its own section. The mCNN and lasso twins run on the session's mCNNs; the
ResNet-18 and CCT twins train a tiny zoo of their own and are in the slow suite. The full twins are the configs
themselves."""

from __future__ import annotations

import pytest
import yaml

from symstitch import report
from symstitch.sweep import load_sweep

from .conftest import LIB_FIT, REPO


@pytest.fixture(scope="module")
def twins_lib(tmp_path_factory):
    """ResNet-18 and CCT seeds 0 and 1, eighth width, 3 batches of one epoch."""
    from symstitch import zoo

    root = tmp_path_factory.mktemp("twins") / "lib"
    for arch in ("resnet18", "cct"):
        zoo.train_zoo(arch, [0, 1], root, LIB_FIT + ["--trainer.limit_train_batches", "3"])
    return root


@pytest.mark.parametrize("name, arch, layers", [
    ("stitch_mcnn_digits.yaml", "mcnn", ["standard", "birkhoff"]),
    pytest.param("stitch_resnet18_digits.yaml", "resnet18", ["standard", "birkhoff"], marks=pytest.mark.slow),
    pytest.param("stitch_cct_digits.yaml", "cct", ["lowrank:rank=1", "birkhoff"], marks=pytest.mark.slow),
    ("stitch_lasso_digits.yaml", "mcnn", ["lasso:lam=0.0001", "lasso:lam=0.1"]),
])
def test_stitch_twin_end_to_end(name, arch, layers, mcnn_lib, request, tmp_path):
    from symstitch.library import load_model

    config = yaml.safe_load((REPO / "experiments" / name).read_text())
    assert config["arch"] == arch and set(layers) <= set(config["layers"])
    lib = mcnn_lib if arch == "mcnn" else request.getfixturevalue("twins_lib")

    first = load_model(f"{lib}:{arch}/seed0").stitch_points[-1]
    config.update(zoo=str(lib), seeds="0-1", points=[first], layers=layers, out=str(tmp_path / "out"),
                  stitch_config=str(REPO / "configs/stitch/{layer}.yaml"),
                  fit_args=[a.replace("../configs", str(REPO / "configs")) for a in config["fit_args"]]
                  + ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3"]
                  + (["--model.init_args.relaxed_epochs", "1"] if "birkhoff" in layers else []))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    records = load_sweep(path).run(progress=False)
    assert sorted(r.cell["layer"] for r in records) == sorted(layers)
    assert all(isinstance(r.result["penalty_pts"], float) for r in records)
    md = report.write_report(tmp_path / "out", tmp_path / "report").read_text()
    assert f"### {arch}" in md and f"**{arch}, frozen:**" in md
    if "lasso" in name:
        assert "### The lasso stitch against λ" in md and (tmp_path / "report" / "stitch_lasso.png").is_file()
        assert {r.result["model"]["lam"] for r in records} == {0.0001, 0.1}
