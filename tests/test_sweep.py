"""Sweeps: grid expansion, one atomic result file per cell, resume after SIGKILL, SLURM emission, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from symstitch.io import Lock
from symstitch.library import MissingModels
from symstitch.stitching import PrefixCache
from symstitch.sweep import load_sweep

from .conftest import CONFIGS, LIB_POINT, REPO, cli_env

TINY = ["--model.init_args.arch_kwargs", "{width: 0.25}", "--trainer.max_epochs", "1",
        "--config", str(REPO / "configs/logger/csv.yaml"), "--trainer.enable_progress_bar", "false"]


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Two 1-epoch quarter-width mCNNs on digits, trained by a zoo sweep."""
    root = tmp_path_factory.mktemp("sweep")
    config = _write(root / "zoo.yaml", {
        "experiment": "zoo", "out": str(root / "zoo"), "models": {"mcnn": "0-1"},
        "fit_args": ["--config", str(REPO / "configs/zoo/{arch}.yaml"), "--data",
                     str(REPO / "configs/data/digits.yaml"), *TINY],
    })
    from symstitch.commands import main

    assert main(["sweep", "--config", str(config), "--no-progress"]) == 0
    return root


def _stitch_config(zoo_root: Path, folder: Path, **over) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "experiment": "stitch", "out": str(folder / "stitch"), "zoo": str(zoo_root / "zoo"), "arch": "mcnn",
        "seeds": "0-1", "points": ["layer1.act", "layer2.act"], "layers": ["standard", "birkhoff"],
        "stitch_config": str(REPO / "configs/stitch/{layer}.yaml"),
        "fit_args": ["--trainer.max_epochs", "1", "--model.init_args.relaxed_epochs", "0",
                     "--config", str(REPO / "configs/logger/csv.yaml"), "--trainer.enable_progress_bar", "false"],
        **over,
    }
    return _write(folder / "stitch.yaml", config)


def test_zoo_sweep_records_every_model(zoo):
    cells = sorted((zoo / "zoo" / "cells").rglob("*.json"))
    assert [c.relative_to(zoo / "zoo" / "cells").as_posix() for c in cells] == ["mcnn/seed0.json", "mcnn/seed1.json"]
    manifest = json.loads((zoo / "zoo" / "manifest.json").read_text())
    for cell in cells:
        record = json.loads(cell.read_text())
        assert record["experiment"] == "zoo"
        assert record["result"]["test_acc"] == manifest["models"][record["key"]]["test_acc"]


def test_grid_expansion_and_cell_keys(zoo, tmp_path):
    sweep = load_sweep(_stitch_config(zoo, tmp_path, repeats=2))
    cells = sweep.cells()
    assert len(cells) == 1 * 2 * 2 * 2  # pairs × layers × points × repeats
    assert len({c.key for c in cells}) == len(cells)
    assert cells[0].key == "mcnn/s0-s1/standard/layer1.act/r0"
    # a point's cells run one after the other (they share its prefix cache)
    assert [c.params["point_index"] for c in cells] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [c.params["layer"] for c in cells[:4]] == ["standard", "standard", "birkhoff", "birkhoff"]
    one = load_sweep(_stitch_config(zoo, tmp_path / "one", points="layer2.act")).cells()  # a string names one point
    assert [c.params["point"] for c in one] == ["layer2.act", "layer2.act"]


def test_several_sweeps_in_one_command(zoo, tmp_path, capsys):
    """`symstitch sweep --config a.yaml b.yaml` takes them in order in one process (the demo's pipeline); options
    that name one sweep's folder or cells are refused with several."""
    from symstitch.commands import main

    stitch_a = _stitch_config(zoo, tmp_path / "a")
    stitch_b = _stitch_config(zoo, tmp_path / "b", points="layer2.act")
    assert main(["sweep", "--config", str(stitch_a), str(stitch_b), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 4 + 2 and all("pending" in line for line in listed)
    assert main(["sweep", "--config", str(stitch_a), str(stitch_b), "--cell", "0"]) == 2
    assert "go with one --config" in capsys.readouterr().err


def test_a_damaged_record_is_named_set_aside_and_run_again(zoo, tmp_path, capsys):
    """A finished cell's record cut short: `--list` says damaged, the report names the file it skipped, and the
    sweep moves the record aside (never deleted) and runs the cell again; the new record names its own run folder
    and the logs of the attempt without a record are labelled, not mixed with the new ones."""
    from symstitch.commands import main

    config = _stitch_config(zoo, tmp_path, points=["layer1.act"], layers=["standard"])
    assert main(["sweep", "--config", str(config), "--no-progress"]) == 0
    (record,) = (tmp_path / "stitch" / "cells").rglob("*.json")
    good = json.loads(record.read_text())
    cut = record.read_text()[:200]
    record.write_text(cut)
    capsys.readouterr()
    assert main(["sweep", "--config", str(config), "--list"]) == 0
    assert "damaged  mcnn/s0-s1/standard/layer1.act/r0" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "stitch")]) == 1  # no cell left to report
    report = (tmp_path / "stitch" / "report" / "report.md").read_text()
    assert f"`{record}`: not readable JSON" in report
    assert main(["sweep", "--config", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"{record} is not a readable cell record" in err and "the cell runs again" in err
    (aside,) = record.parent.glob(f"{record.name}.damaged-*")
    assert aside.read_text() == cut  # kept, never deleted
    again = json.loads(record.read_text())["result"]
    assert again["penalty_pts"] == good["result"]["penalty_pts"]
    # the record names its own log folder; the earlier attempt's logs (no record of theirs stands) are labelled
    run_dir = Path(again["run_dir"])
    assert run_dir.name == "version_0" and (run_dir / "metrics.csv").exists()
    (abandoned,) = run_dir.parents[1].parent.glob(f"{run_dir.parents[1].name}.abandoned-*")
    assert (abandoned / "fit" / "version_0" / "metrics.csv").exists()


def test_layers_that_train_alike_run_side_by_side(zoo, tmp_path):
    """A pair, point and repeat's layers form one group when they train alike but for their layer; here the layers'
    own configs give them other learning rates and starts, until the sweep sets both."""
    apart = load_sweep(_stitch_config(zoo, tmp_path / "apart", repeats=2))
    apart.prepare()
    assert [len(g) for g in apart.experiment.groups(apart.cells())] == [1] * 8
    same = ["--model.init_args.optimizer.init_args.lr", "0.005", "--model.init_args.init", "data"]
    alike = load_sweep(_stitch_config(zoo, tmp_path / "alike", repeats=2,
                                      fit_args=["--trainer.max_epochs", "1", "--model.init_args.relaxed_epochs", "0",
                                                *same]))
    alike.prepare()
    groups = alike.experiment.groups(alike.cells())
    assert [[c.params["layer"] for c in g] for g in groups] == [["standard", "birkhoff"]] * 4
    assert sorted((g[0].params["point"], g[0].params["repeat"]) for g in groups) == \
        [("layer1.act", 0), ("layer1.act", 1), ("layer2.act", 0), ("layer2.act", 1)]


@pytest.mark.slow  # the default suite reruns a finished sweep in process (test_stitch_command_every_point_resumable)
def test_killed_sweep_resumes_without_recomputing(zoo, tmp_path):
    """SIGKILL once the first cell has finished; the rerun runs only the missing cells, each exactly once."""
    config = _stitch_config(zoo, tmp_path)
    command = [sys.executable, "-m", "symstitch", "sweep", "--config", str(config), "--no-progress"]
    cells_dir = tmp_path / "stitch" / "cells"
    proc = subprocess.Popen(command, cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(cells_dir.rglob("*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: (p.stat().st_mtime_ns, p.read_text()) for p in cells_dir.rglob("*.json")}
    assert 1 <= len(finished) < 4, "kill the sweep between its first and last cell"

    out = subprocess.run(command, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{len(finished)} finished, running {4 - len(finished)}" in out.stdout
    results = sorted(cells_dir.rglob("*.json"))
    assert len(results) == 4
    for path, (mtime, text) in finished.items():  # not recomputed
        assert path.stat().st_mtime_ns == mtime and path.read_text() == text
    keys = [json.loads(p.read_text())["key"] for p in results]
    assert sorted(keys) == sorted(c.key for c in load_sweep(config).cells())
    for p in results:
        r = json.loads(p.read_text())["result"]  # the penalty in points of accuracy
        assert r["penalty_pts"] == pytest.approx(100 * ((r["source_acc"] + r["target_acc"]) / 2 - r["stitched_acc"]),
                                                 abs=1e-4)

    again = subprocess.run(command, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True)
    assert "4 finished, running 0" in again.stdout


def test_emit_slurm_and_single_cell(zoo, tmp_path):
    config = _stitch_config(zoo, tmp_path, slurm={"gpus": 2, "time": "00:10:00", "partition": "gpu"})
    sweep = load_sweep(config)
    script = sweep.emit_slurm(config).read_text()
    assert "#SBATCH --array=0-3%32" in script
    assert "#SBATCH --gres=gpu:2" in script and "#SBATCH --ntasks-per-node=2" in script
    assert "#SBATCH --partition=gpu" in script
    assert "--cell ${FIRST}-${LAST}" in script and str(config.resolve()) in script
    # a cluster's MaxArraySize: 4 cells in at most 3 tasks → 2 tasks of 2 consecutive cells
    small_config = _stitch_config(zoo, tmp_path / "small", slurm={"max_array": 3})
    script = load_sweep(small_config).emit_slurm(small_config).read_text()
    assert "#SBATCH --array=0-1%32" in script and "#SBATCH --ntasks-per-node=1" in script
    ranges = []
    for task in (0, 1):
        lines = [line for line in script.splitlines() if line.startswith(("FIRST=", "LAST="))]
        out = subprocess.run(["bash", "-c", "; ".join(lines) + '; echo "$FIRST-$LAST"'], capture_output=True,
                             text=True, env={"SLURM_ARRAY_TASK_ID": str(task)}, check=True)
        ranges.append(out.stdout.strip())
    assert ranges == ["0-1", "2-3"]
    # what one array task runs
    records = sweep.run(only=[2], progress=False)
    assert [r.key for r in records] == [sweep.cells()[2].key]


def test_errors(zoo, tmp_path):
    with pytest.raises(ValueError, match="unknown key.*pointz"):
        load_sweep(_stitch_config(zoo, tmp_path, pointz="all"))
    with pytest.raises(KeyError, match="unknown stitch layer 'birkof'"):
        load_sweep(_stitch_config(zoo, tmp_path, layers=["birkof"])).cells()
    with pytest.raises(ValueError, match="valid stitch points"):
        load_sweep(_stitch_config(zoo, tmp_path, points=["layer9.act"])).cells()
    # networks not trained yet: the grid is listed (from the architecture), never run
    waiting = load_sweep(_stitch_config(zoo, tmp_path, seeds="0,7"))
    assert {c.params["target"] for c in waiting.cells()} == {f"{zoo / 'zoo'}:mcnn/seed7"}
    with pytest.raises(MissingModels, match="lacks mcnn seeds \\[7\\]"):
        waiting.run(progress=False)
    assert not (tmp_path / "stitch").exists()
    with pytest.raises(KeyError, match="unknown experiment"):
        load_sweep(_write(tmp_path / "x.yaml", {"experiment": "stich"}))
    # a folder holding another grid's results is never reused
    first = load_sweep(_stitch_config(zoo, tmp_path))
    first.claim()
    with pytest.raises(ValueError, match="another stitch configuration"):
        load_sweep(_stitch_config(zoo, tmp_path, repeats=2)).claim()


def test_align_and_projection_sweeps_then_report(zoo, tmp_path):
    """The two other kinds end to end on the same library, and the report over all of them."""
    from symstitch.report import write_report

    align = load_sweep(_write(tmp_path / "align.yaml", {
        "experiment": "align", "out": str(tmp_path / "res" / "align"), "zoo": str(zoo / "zoo"), "arch": "mcnn",
        "seeds": "0-1", "metrics": ["procrustes_relu", "cka_linear"], "images": 100}))
    (record,) = align.run(progress=False)  # one cell per pair, every metric in one pass
    assert record.cell["metrics"] == ["procrustes_relu", "cka_linear"]
    assert list(record.result["metrics"]) == ["procrustes_relu", "cka_linear"]
    for r in record.result["metrics"].values():
        values = r["values"]
        assert len(values) == len(r["points_a"]) == 4 and all(len(row) == 4 for row in values)
        assert all(v is not None and -0.1 < v <= 1 + 1e-9 for row in values for v in row)

    projection = load_sweep(_write(tmp_path / "projection.yaml", {
        "experiment": "projection", "out": str(tmp_path / "res" / "projection"), "zoo": str(zoo / "zoo"),
        "archs": ["mcnn"], "points": ["layer2.act"], "kinds": ["identity", "group"], "epochs": 1}))
    records = projection.run(progress=False)
    assert [r.cell["matrix"] for r in records] == ["identity", "group"]
    for r in records:
        assert 0 <= r.result["recovered_acc"] <= 1 and 0 <= r.result["clean_acc"] <= 1
    identity = records[0].result
    assert identity["inserted_acc"] == pytest.approx(identity["clean_acc"])  # M = I changes nothing

    report = write_report(tmp_path / "res")
    text = report.read_text()
    assert "## Alignment" in text and "## Projection" in text
    assert (report.parent / "align_cka_linear.png").exists()


def test_stitch_command_on_library_models(zoo, tmp_path):
    """`symstitch stitch` on models trained through the CLI (their DataModule settings carry CLI extras)."""
    from symstitch.commands import main

    out = tmp_path / "st"
    argv = ["stitch", "--source", f"{zoo / 'zoo'}:mcnn/seed0", "--target", f"{zoo / 'zoo'}:mcnn/seed1",
            "--points", "layer1.act", "--layers", "standard", "--epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    (config,) = (out / "runs").rglob("config.yaml")  # the cell ran on the networks' own data and its settings
    assert yaml.safe_load(config.read_text())["data"]["crop_padding"] == 2  # configs/data/digits.yaml's, not 4
    (record,) = [json.loads(p.read_text()) for p in (out / "cells").rglob("*.json")]
    assert record["cell"]["point"] == "layer1.act" and 0 <= record["result"]["stitched_acc"] <= 1


def test_the_paper_family_by_name(zoo, tmp_path):
    """Layers with options (the paper's low-rank yardstick): the cell key is file-safe, the layer gets the options
    and its data start (reduced-rank regression); a layer without a data start keeps its own under `init: data`."""
    config = _stitch_config(zoo, tmp_path, points=["layer2.act"], layers=["lowrank:rank=2", "softsort"],
                            fit_args=["--trainer.max_epochs", "1", "--model.init_args.relaxed_epochs", "0",
                                      "--model.init_args.init", "data", "--model.init_args.prefix_cache", "float32",
                                      "--config",
                                      str(REPO / "configs/logger/csv.yaml"), "--trainer.enable_progress_bar", "false"])
    records = load_sweep(config).run(progress=False)
    assert [r.key for r in records] == ["mcnn/s0-s1/lowrank_rank_2/layer2.act/r0", "mcnn/s0-s1/softsort/layer2.act/r0"]
    assert PrefixCache.scoped() is None  # the sweep's prefix cache went with its run
    low, soft = (r.result["model"] for r in records)
    assert low["rank"] == 2 and low["numerical_rank"] <= 2 and low["init"] == "data"
    assert soft["init"] == "random" and records[0].cell["layer"] == "lowrank:rank=2"


def test_option_chosen_on_the_validation_split(zoo, tmp_path):
    """`birkhoff:alpha=0.01|10`: one cell per candidate, each with its final validation accuracies recorded; the
    chosen alpha is the one with the best recorded validation accuracy (ties: the smaller) and the reported
    penalty is that cell's test penalty. Without a held-out validation split the sweep is refused up front."""
    from symstitch.report import write_report
    from symstitch.selection import select

    fit_args = ["--trainer.max_epochs", "2", "--model.init_args.relaxed_epochs", "1",
                "--config", str(REPO / "configs/logger/csv.yaml"), "--trainer.enable_progress_bar", "false",
                "--trainer.limit_val_batches", "0"]
    with pytest.raises(ValueError, match="choosing alpha needs a held-out validation split"):
        load_sweep(_stitch_config(zoo, tmp_path / "no_val", points=["layer2.act"], layers=["birkhoff:alpha=0.01|10"],
                                  fit_args=fit_args)).prepare()
    config = _stitch_config(zoo, tmp_path, points=["layer2.act"], layers=["birkhoff:alpha=0.01|10"],
                            fit_args=[*fit_args, "--data.val_split", "0.2"])
    records = load_sweep(config).run(progress=False)
    assert [r.key for r in records] == ["mcnn/s0-s1/cv_birkhoff_alpha_0.01/layer2.act/r0",
                                        "mcnn/s0-s1/cv_birkhoff_alpha_10/layer2.act/r0"]
    assert [r.result["model"]["alpha"] for r in records] == [0.01, 10]
    by_value = {r.cell["select"]["value"]: r.result for r in records}
    for protocol, (penalty, val_acc) in {"frozen": ("penalty_pts", "val_stitched_acc"), "recalibrated": (
            "penalty_recalibrated_pts", "val_stitched_recalibrated_acc")}.items():
        best = max(by_value, key=lambda v: (by_value[v][val_acc], -v))  # highest validation accuracy, then smaller
        (chosen,) = [s for s in select([vars(r) for r in records]) if s.protocol == protocol]
        assert chosen.chosen.value == best
        assert chosen.chosen.penalty_pts == by_value[best][penalty]
        for result in by_value.values():
            assert 0 <= result[val_acc] <= 1
            assert result[val_acc.replace("stitched", "penalty").replace("_acc", "_pts")] == pytest.approx(
                100 * ((result["val_source_acc"] + result["val_target_acc"]) / 2 - result[val_acc]), abs=1e-4)
    rows = (write_report(tmp_path / "stitch").parent / "stitch.csv").read_text().splitlines()
    assert sum(",birkhoff (cv alpha)," in row for row in rows) == 2 and len(rows) == 3  # the choices, per protocol


def test_a_cell_another_process_runs_is_left_to_it(mcnn_lib, tmp_path, capsys):
    config = tmp_path / "stitch.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "stitch", "out": str(tmp_path / "sw"), "zoo": str(mcnn_lib), "arch": "mcnn", "seeds": "0-1",
        "points": ["layer1.act", "layer2.act"], "layers": ["standard"],
        "fit_args": ["--trainer.max_epochs", "1", "--config", str(CONFIGS / "logger/csv.yaml"),
                     "--trainer.enable_progress_bar", "false"]}))
    runner = load_sweep(config)
    busy = runner.cells()[0]
    with Lock(runner.record_path(busy).with_suffix(".lock")):
        records = runner.run(progress=False)
    assert [r.key for r in records] == [runner.cells()[1].key]
    assert "being run by another process" in capsys.readouterr().out
    again = load_sweep(config).run(progress=False)  # released: the rerun computes it, and only it
    assert [r.key for r in again] == [c.key for c in runner.cells()] and again[1] == records[0]


@pytest.mark.slow
def test_a_ddp_cell_in_a_sweep_is_locked_once_and_recorded_once(mcnn_lib, tmp_path):
    """A stitch cell on 2 CPU processes (Lightning DDP relaunches the sweep command for rank 1): only rank 0 takes
    the cell's lock and writes its record; rank 1 runs the same cell with it instead of skipping it (a hang)."""
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "stitch", "out": str(tmp_path / "sw"), "zoo": str(mcnn_lib), "arch": "mcnn", "seeds": "0-1",
        "points": [LIB_POINT], "layers": ["standard"],
        "fit_args": ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.strategy", "ddp", "--config", str(CONFIGS / "logger/csv.yaml"),
                     "--trainer.enable_progress_bar", "false"]}))
    proc = subprocess.run([sys.executable, "-m", "symstitch", "sweep", "--config", str(config), "--no-progress"],
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = (tmp_path / "sw/cells").rglob("*.json")
    ranks = json.loads(next((tmp_path / "sw/runs").rglob("ranks.json")).read_text())
    assert ranks["world_size"] == 2 and ranks["consistent"]
    assert json.loads(record.read_text())["result"]["penalty_pts"] is not None


def test_sweep_cells_as_wandb_runs_grouped_by_the_sweep(zoo, tmp_path, monkeypatch):
    """`sweep --wandb`: every cell a W&B run of its own, in the sweep's group (its folder's name) with the experiment
    as job type, the cell's settings as config and its record's numbers as summary; a cell's fit that logs to W&B
    through fit_args joins the same group. Read back from the offline run files; a rerun logs nothing twice."""
    from symstitch.commands import main

    from .wandb_records import runs

    from symstitch.loggers import wandb_run

    monkeypatch.delenv("WANDB_MODE", raising=False)  # no W&B configured: offline
    with wandb_run(tmp_path / "earlier", name="earlier"):  # W&B used before in this process: the group still holds
        pass
    out = tmp_path / "grid_a"
    config = _stitch_config(zoo, tmp_path, out=str(out), points=["layer1.act"], fit_args=[
        "--trainer.max_epochs", "1", "--model.init_args.relaxed_epochs", "0", "--trainer.enable_progress_bar",
        "false", "--config", str(REPO / "configs/logger/wandb.yaml")])
    assert main(["sweep", "--config", str(config), "--wandb", "--no-progress"]) == 0
    records = {r["key"]: r for r in (json.loads(p.read_text()) for p in (out / "cells").rglob("*.json"))}
    cells = runs(out)
    assert [run.name for run in cells] == sorted(records) and len(cells) == 2
    for run in cells:
        record = records[run.name]
        assert (run.group, run.job_type) == ("grid_a", "stitch")
        for key in ("source", "target", "source_seed", "target_seed", "point", "layer", "repeat"):
            assert run.config[key] == record["cell"][key], key
        assert run.config["layer_name"] == record["cell"]["layer"] and run.config["layer_options"] == {}
        assert run.config["protocols"] == ["frozen", "recalibrated"]
        for key in ("penalty_pts", "penalty_recalibrated_pts", "stitched_acc", "stitched_recalibrated_acc",
                    "source_acc", "target_acc"):
            assert run.summary[key] == record["result"][key], key
    # the cells' own fits logged to W&B (fit_args): in the same group, with the same numbers
    fits = [run for folder in (out / "runs").rglob("wandb") for run in runs(folder.parent)]
    assert len(fits) == 2 and all((run.group, run.job_type) == ("grid_a", "stitch") for run in fits)
    for run in fits:
        (record,) = [r for r in records.values() if r["cell"]["layer"] == run.config["layer"]]
        for name, key in (("stitch", "penalty_pts"), ("stitch_recalibrated", "penalty_recalibrated_pts")):
            assert run.summary[f"test/{name}/penalty_pts"] == pytest.approx(record["result"][key], abs=1e-4)
    assert "WANDB_RUN_GROUP" not in os.environ and "WANDB_JOB_TYPE" not in os.environ
    assert main(["sweep", "--config", str(config), "--wandb", "--no-progress"]) == 0
    assert len(runs(out)) == 2  # each record once



@pytest.mark.parametrize("config", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_config_is_valid(config, tmp_path):
    """Each config in experiments/ names a known experiment with valid settings (checked when the experiment is
    built, before any network or dataset is needed)."""
    from symstitch.runner import EXPERIMENTS

    runner = load_sweep(config, tmp_path / "out")
    assert runner.experiment.name in EXPERIMENTS and runner.experiment.name == yaml.safe_load(config.read_text())["experiment"]


def test_every_shipped_sweep_lists_its_cells_from_a_fresh_clone(tmp_path, capsys, monkeypatch):
    """`symstitch sweep --list` before any network is trained: the stitch twins' grids from their architectures,
    with a note naming the networks to train first."""
    from symstitch.commands import main

    monkeypatch.chdir(tmp_path)
    for name, cells in (("stitch_mcnn_digits.yaml", 3 * 4 * 5), ("stitch_cct_digits.yaml", 3 * 3 * 5),
                        ("stitch_resnet18_digits.yaml", 3 * 4 * 5), ("stitch_lasso_digits.yaml", 3 * 4 * 5),
                        ("stitch_resnet18_cifar10.yaml", 10 * 17 * 5 * 3)):
        assert main(["sweep", "--config", str(REPO / "experiments" / name), "--list"]) == 0, name
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == cells and all(" pending " in line for line in out.splitlines()), name
        assert "its cells run once the networks exist" in err and "train them first" in err, name
    assert not (tmp_path / "runs").exists()  # listing writes nothing
