"""``symstitch report``: synthetic cell files with known numbers → CSVs, figures, report.md, W&B."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from symstitch import report
from symstitch.commands import print_penalties
from symstitch.reports import align as align_report
from symstitch.reports import common
from symstitch.reports import stitch as stitch_report
from symstitch.runner import CellRecord

ARCH = "mcnn"
# depth order differs from alphabetical order on purpose
POINTS = ["conv", "block1", "block2", "avgpool"]
PAIRS = [("mcnn/seed0", "mcnn/seed1"), ("mcnn/seed0", "mcnn/seed2")]

# penalties (fractions) per layer and pair, in depth order; layer names as a sweep writes them
PAPERLIKE = {
    # means in points [2, 9, 5, 1], std √2 at every point, Spearman −0.4
    "birkhoff": [[0.01, 0.08, 0.04, 0.00], [0.03, 0.10, 0.06, 0.02]],
    # means [1.5, 1.0, 0.5, 0.0], max 1.5 ≤ 2: G_ReLU ≥ full at every point
    "standard": [[0.01, 0.01, 0.00, 0.00], [0.02, 0.01, 0.01, 0.00]],
    # means [20, 30, 25, 10]: G_ReLU ≤ rank 1 at 4 of 4 points
    "lowrank:rank=1": [[0.20, 0.30, 0.25, 0.10]] * 2,
    # means [5, 8, 6, 2]: G_ReLU ≤ rank 2 at 3 of 4 (not at block1: 9 > 8)
    "lowrank:rank=2": [[0.05, 0.08, 0.06, 0.02]] * 2,
    # means [1, 2, 3, 0.5]: G_ReLU ≤ rank 4 at none
    "lowrank:rank=4": [[0.01, 0.02, 0.03, 0.005]] * 2,
}
OPPOSITE = {
    # means [0, 0, 10, 30]: below full at conv, ≤ rank 1 at 2 of 4 only, large at the last point
    "birkhoff": [[0.00, 0.00, 0.10, 0.30]] * 2,
    # means [5, 1, 1, 1], max 5 > 2
    "standard": [[0.04, 0.01, 0.01, 0.01], [0.06, 0.01, 0.01, 0.01]],
    "lowrank:rank=1": [[0.01, 0.01, 0.01, 0.01]] * 2,
}

ALIGN_POINTS = ["a", "b", "c"]
M1 = [[0.9, 0.5, 0.2], [0.4, 0.6, 0.9], [0.1, 0.6, 0.7]]
M2 = [[0.7, 0.3, None], [0.6, 0.6, 0.9], [0.3, 0.2, 0.9]]
# mean over the pairs, NaN left out: [[0.8, 0.4, 0.2], [0.5, 0.6, 0.9], [0.2, 0.4, 0.8]]
#   diagonal mean 2.2/3 = 0.733, off-diagonal mean 2.6/6 = 0.433, rows with their max on the diagonal: 2 of 3


def _write_cell(root: Path, name: str, experiment: str, cell: dict, result: dict) -> None:
    path = root / "cells" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"experiment": experiment, "key": name, "cell": cell, "result": result,
                                "seconds": 1.0, "finished": "2024-01-01T00:00:00"}))


def _stitch_cells(root: Path, penalties: dict) -> None:
    for layer, per_pair in penalties.items():
        for (source, target), values in zip(PAIRS, per_pair):
            for i, (point, penalty) in enumerate(zip(POINTS, values)):
                cell = {"arch": ARCH, "source": source, "target": target, "source_seed": 0,
                        "target_seed": int(target[-1]), "point": point, "point_index": i, "layer": layer,
                        "repeat": 0}
                result = {"penalty_pts": 100 * penalty, "stitched_acc": 0.9 - penalty, "source_acc": 0.9, "target_acc": 0.9,
                          "permutation": [0, 1], "model": {"x": 1}}
                _write_cell(root, f"stitch/{layer}/{target[-5:]}/{point}-r0", "stitch", cell, result)


def _align_cells(root: Path) -> None:
    for k, ((source, target), values) in enumerate(zip(PAIRS, [M1, M2])):
        cell = {"arch": ARCH, "source": source, "target": target, "metric": "cka_linear", "cka_mode": "exact"}
        result = {"points_a": ALIGN_POINTS, "points_b": ALIGN_POINTS, "values": values,
                  "errors": {"a|c": "degenerate"} if k == 1 else {}}
        _write_cell(root, f"align/cka_linear/pair{k}", "align", cell, result)
    cell = {"arch": ARCH, "source": PAIRS[0][0], "target": PAIRS[0][1], "metric": "procrustes_relu",
            "cka_mode": None}
    result = {"points_a": ALIGN_POINTS, "points_b": ALIGN_POINTS,
              "values": [[0.95, 0.5, 0.3], [0.5, 0.9, 0.5], [0.3, 0.5, 0.85]], "errors": {}}
    _write_cell(root, "align/procrustes_relu/pair0", "align", cell, result)


def _projection_cells(root: Path) -> None:
    for kind, recovered in (("group", 0.97), ("orthogonal", 0.6)):
        record = {"network": "mcnn-seed0", "activation": "relu", "point": "block1", "layer": 1, "matrix": kind,
                  "retrain": "next", "repeat": 0, "clean_acc": 0.98, "inserted_acc": 0.1, "recovered_acc": recovered,
                  "epochs": 2, "lr": 0.05}
        _write_cell(root, f"projection/{kind}", "projection", {"network": "mcnn-seed0", "matrix": kind}, record)


def _zoo_cells(root: Path) -> None:
    for seed, acc in ((0, 0.9812), (1, 0.9755)):
        entry = {"arch": ARCH, "seed": seed, "dataset": "digits", "test_acc": acc, "checkpoint": "x.ckpt"}
        _write_cell(root, f"zoo/{ARCH}-seed{seed}", "zoo", {"arch": ARCH, "seed": seed}, entry)


def _sweeps(root: Path, penalties: dict = PAPERLIKE, projection: bool = True) -> Path:
    """A folder holding several sweep folders, plus junk that must be skipped."""
    _stitch_cells(root / "stitch_sweep", penalties)
    _align_cells(root / "align_sweep")
    _zoo_cells(root / "zoo_sweep")
    if projection:
        _projection_cells(root / "projection_sweep")
    (root / "align_sweep" / "cells" / "broken.json").write_text('{"experiment": "align", "key": ')
    (root / "align_sweep" / "cells" / "other.json").write_text('{"something": 1}')
    return root


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full report (projection included), built once for the tests that only read it."""
    root = _sweeps(tmp_path_factory.mktemp("results"))
    md = report.write_report(root)
    return root, md


def test_collect_groups_and_skips_junk(tmp_path, capsys):
    root = _sweeps(tmp_path / "results", projection=False)
    found = report.collect(root)
    assert {k: len(v) for k, v in found.items()} == {"stitch": 40, "align": 3, "zoo": 2}
    err = capsys.readouterr().err
    assert "broken.json" in err and "not readable JSON" in err
    assert "other.json" in err and "no \"experiment\"" in err
    # the cells folder itself also works
    assert len(report.collect(root / "zoo_sweep" / "cells")["zoo"]) == 2


def test_stitch_csv(built):
    root, md = built
    rows = _csv(md.parent / "stitch.csv")
    assert list(rows[0]) == stitch_report.COLUMNS
    assert len(rows) == 40  # 5 layers × 2 pairs × 4 points, one protocol
    birkhoff = [r for r in rows if r["layer"] == "birkhoff" and r["target"] == "mcnn/seed1"]
    assert [r["point"] for r in birkhoff] == POINTS  # depth order, not alphabetical
    assert [float(r["penalty_pts"]) for r in birkhoff] == pytest.approx([100 * v for v in PAPERLIKE["birkhoff"][0]])
    assert [int(r["point_index"]) for r in birkhoff] == [0, 1, 2, 3]
    assert float(birkhoff[0]["stitched_acc"]) == pytest.approx(0.89)


def test_stitch_summary_numbers(built):
    rows = stitch_report.stitch_rows(report.collect(built[0])["stitch"])
    s = stitch_report.stitch_summary(rows)[ARCH]
    assert s["points"] == POINTS
    b = s["layers"]["birkhoff"]
    assert b["mean"] == pytest.approx([2, 9, 5, 1])
    # the paper's order: full, low rank by falling rank, then G_ReLU
    assert list(s["layers"]) == ["standard", "lowrank:rank=4", "lowrank:rank=2", "lowrank:rank=1", "birkhoff"]
    assert b["std"] == pytest.approx([math.sqrt(2)] * 4)
    assert b["n"] == [2, 2, 2, 2]
    assert common.spearman(b["mean"]) == pytest.approx(-0.4)
    assert s["layers"]["standard"]["mean"] == pytest.approx([1.5, 1.0, 0.5, 0.0])
    assert common.spearman([1.0, 1.0, 1.0]) is None and common.spearman([1.0, 2.0]) is None


def test_report_md_states_measured_numbers(built):
    _, md = built
    text = md.read_text()
    assert "| stitch | 40 |" in text and "| align | 3 |" in text and "| zoo | 2 |" in text
    assert "| projection | 2 |" in text
    # per layer: first, middle, last, max, Spearman
    assert "| birkhoff | 2 | 2.00 (conv) | 9.00 (block1) | 1.00 (avgpool) | 9.00 (block1) | -0.400 |" in text
    assert "| standard | 2 | 1.50 (conv) | 1.00 (block1) | 0.00 (avgpool) | 1.50 (conv) | -1.000 |" in text
    # against the paper's claims (docs/method.md §2), every number shown
    assert "**mcnn, frozen:**" in text and "**mcnn, recalibrated:**" not in text  # no recalibrated penalties here
    assert "(a) `birkhoff`: G_ReLU ≥ full − 1 pts at 4 of 4 points → **agrees**." in text
    assert ("(b) `birkhoff`: G_ReLU ≤ rank 1 at 4 of 4 points; G_ReLU ≤ rank 2 at 3 of 4 points; "
            "G_ReLU ≤ rank 4 at 0 of 4 points → **agrees**.") in text
    assert "(c) `birkhoff`: last point avgpool: 1.00 pts (≤ 10; mean over the other points 5.33) → **agrees**." in text
    assert "(d) `standard`: max mean penalty 1.50 pts ≤ 2 pts → **agrees**." in text
    assert "**does not agree**" not in text and "grows with depth" not in text
    # figures linked with relative paths
    for link in ("(stitch_penalty.png)", "(align_cka_linear.png)", "(align_procrustes_relu.png)",
                 "(align_diagonal.png)", "(projection/projection.png)"):
        assert link in text
    # alignment: diagonal / off-diagonal means, rows with their max on the diagonal, NaN count
    assert "| cka_linear | mcnn | 2 | 0.733 | 0.433 | 2/3 (67%) | 1 of 18 |" in text
    assert "| procrustes_relu | mcnn | 1 | 0.900 | 0.433 | 3/3 (100%) | 0 of 9 |" in text
    assert "cka_linear (mcnn): 1 of 18 similarities were not computed (NaN)" in text
    # model library
    assert "| mcnn | 0 | digits | 98.12 % |" in text and "| mcnn | 1 | digits | 97.55 % |" in text
    # projection, through its section's projection_files
    assert "| mcnn-seed0 | relu | next | 1 | 98.0 (n=1) | 97.0 (n=1) | 60.0 (n=1) | +37.00 ± n/a (n=1) |" in text
    assert "orthogonal costs +37.00 ± n/a points more than G_relu at layer 1 (retrain next; mean ± std over 1 paired " \
           "run(s)): a single pair, no error bar, nothing resolved" in text


def test_opposite_data_gives_opposite_verdicts(tmp_path):
    root = _sweeps(tmp_path / "results", OPPOSITE, projection=False)
    text = report.write_report(root, tmp_path / "out").read_text()
    assert ("(a) `birkhoff`: G_ReLU ≥ full − 1 pts at 3 of 4 points (below at conv: 0.00 vs 5.00) → "
            "**does not agree**.") in text
    assert "(b) `birkhoff`: G_ReLU ≤ rank 1 at 2 of 4 points → **does not agree**." in text
    assert "(c) `birkhoff`: last point avgpool: 30.00 pts (> 10; mean over the other points 3.33)" in text
    assert "max mean penalty 5.00 pts > 2 pts → **does not agree**" in text
    assert "**agrees**" not in text


def test_verdict_edge_cases():
    g = {"a": 3.0, "b": 5.0}
    assert stitch_report.g_relu_vs_full(g, {"c": 1.0})[0] == "cannot be tested"
    assert stitch_report.g_relu_vs_full(g, {"a": 3.9, "b": 5.0})[0] == "agrees"  # within the 1-point noise
    assert stitch_report.g_relu_vs_full(g, {"a": 4.01, "b": 5.0})[0] == "does not agree"
    assert stitch_report.g_relu_vs_ranks(g, {2: {"a": 9.0, "b": 9.0}}) == (
        "cannot be tested", "no rank-1 stitch (lowrank:rank=1) in these results")
    assert stitch_report.g_relu_vs_ranks(g, {1: {"a": 3.0, "b": 4.0}})[0] == "does not agree"  # 1 of 2 is not most
    assert stitch_report.g_relu_vs_ranks(g, {1: {"a": 3.0, "b": 5.0}})[0] == "agrees"  # ties count as ≤
    assert stitch_report.g_relu_last([1.0], ["a"])[0] == "cannot be tested"
    assert stitch_report.g_relu_last([4.0, 4.0], ["a", "b"])[0] == "does not agree"  # not below the rest
    assert stitch_report.g_relu_last([20.0, 10.0], ["a", "b"])[0] == "agrees"
    assert stitch_report.g_relu_last([30.0, 10.5], ["a", "b"])[0] == "does not agree"  # above our line
    assert stitch_report.standard_verdict([0.0, 2.0])[0] == "agrees"
    assert stitch_report.standard_verdict([0.0, 2.01])[0] == "does not agree"


def test_both_protocols_are_reported_and_judged_apart(tmp_path, capsys):
    """Cells carrying frozen and recalibrated penalties: one CSV row per protocol, verdicts for each, the console
    table shows both."""
    root = tmp_path / "results"
    records = []
    for i, point in enumerate(POINTS):
        for layer, frozen, recalibrated in (("birkhoff", 0.30, 0.05), ("standard", 0.01, 0.0)):
            cell = {"arch": ARCH, "source": "a", "target": "b", "point": point, "point_index": i, "layer": layer,
                    "repeat": 0}
            result = {"penalty_pts": 100 * frozen, "stitched_acc": 0.9 - frozen, "penalty_recalibrated_pts":
                      100 * recalibrated, "stitched_recalibrated_acc": 0.9 - recalibrated, "source_acc": 0.9,
                      "target_acc": 0.9}
            _write_cell(root, f"stitch/{layer}/{point}", "stitch", cell, result)
    md = report.write_report(root)
    rows = _csv(md.parent / "stitch.csv")
    assert len(rows) == 16 and {r["protocol"] for r in rows} == {"frozen", "recalibrated"}
    recal = [r for r in rows if r["layer"] == "birkhoff" and r["protocol"] == "recalibrated"]
    assert [float(r["penalty_pts"]) for r in recal] == pytest.approx([5.0] * 4)
    assert float(recal[0]["stitched_acc"]) == pytest.approx(0.85)
    text = md.read_text()
    assert "**mcnn, frozen:**" in text and "**mcnn, recalibrated:**" in text
    assert "(c) `birkhoff`: last point avgpool: 30.00 pts" in text and "(c) `birkhoff`: last point avgpool: 5.00 pts" in text
    records = [CellRecord("stitch", rec["key"], rec["cell"], rec["result"]) for rec in report.collect(root)["stitch"]]
    print_penalties(records, ["birkhoff", "standard"])  # the table symstitch stitch prints
    assert "+30.00 / +5.00" in capsys.readouterr().out


def test_align_csv_keeps_nan_empty(built):
    rows = _csv(built[1].parent / "align.csv")
    assert len(rows) == 27  # 2 pairs × 9 + 1 pair × 9
    cka = [r for r in rows if r["metric"] == "cka_linear"]
    by_key = {(r["target"], r["point_a"], r["point_b"]): r["value"] for r in cka}
    assert by_key[("mcnn/seed2", "a", "c")] == ""  # null stays empty, never 1
    assert by_key[("mcnn/seed1", "a", "c")] == "0.2"
    assert sum(r["value"] == "" for r in rows) == 1
    assert all(float(r["value"]) != 1.0 for r in rows if r["value"])
    summary = align_report.align_summary(align_report.align_rows(report.collect(built[0])["align"])[1])
    mean = summary[("cka_linear", ARCH)]["mean"]
    assert mean[0, 2] == pytest.approx(0.2)  # the mean over the pairs where it was computed
    assert summary[("cka_linear", ARCH)]["nan_raw"] == 1


def test_all_nan_entry_stays_nan():
    mats = [{"arch": "m", "source": "s", "target": "t", "metric": "cka_relu", "points_a": ["a", "b"],
             "points_b": ["a", "b"], "values": [[1.0, None], [0.3, 0.8]], "errors": {}}]
    records = [{"experiment": "align", "cell": {k: m[k] for k in ("arch", "source", "target", "metric")},
                "result": {k: m[k] for k in ("points_a", "points_b", "values", "errors")}} for m in mats]
    rows, parsed = align_report.align_rows(records)
    s = align_report.align_summary(parsed)[("cka_relu", "m")]
    assert math.isnan(s["mean"][0, 1]) and s["nan_mean"] == 1
    assert [r["value"] for r in rows if (r["point_a"], r["point_b"]) == ("a", "b")][0] != 1.0


def test_zoo_csv(built):
    rows = _csv(built[1].parent / "zoo.csv")
    assert [(r["arch"], r["seed"], r["dataset"], float(r["test_acc"])) for r in rows] == [
        (ARCH, "0", "digits", 0.9812), (ARCH, "1", "digits", 0.9755)]


def test_figures_exist(built):
    out = built[1].parent
    for name in ("stitch_bars.png", "stitch_penalty.png", "align_cka_linear.png", "align_procrustes_relu.png", "align_diagonal.png",
                 "projection/projection.png"):
        assert (out / name).stat().st_size > 5000, name
    rows = _csv(out / "projection" / "projection.csv")
    assert [r["matrix"] for r in rows] == ["group", "orthogonal"]


def test_main(tmp_path, capsys):
    from symstitch.commands import main

    root = _sweeps(tmp_path / "results", projection=False)
    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'rep' / 'report.md'}" in out
    assert "stitch 40" in out and "stitch mcnn birkhoff g_relu_vs_ranks: agrees" in out
    assert (tmp_path / "rep" / "stitch.csv").exists()
    assert main(["report", str(root)]) == 0  # default out: RESULTS_DIR/report
    assert (root / "report" / "report.md").exists()
    assert main(["report", str(root)]) == 0  # rerun over its own earlier report
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 1
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_wandb_failure_keeps_files(tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("no W&B here")

    monkeypatch.setattr(report, "wandb_run", boom)
    root = _sweeps(tmp_path / "results", projection=False)
    md = report.write_report(root, tmp_path / "out", wandb=True)
    assert md.exists() and (tmp_path / "out" / "stitch.csv").exists()
    assert "W&B logging failed" in capsys.readouterr().err


def test_wandb_offline_run(tmp_path, monkeypatch):
    """`report --wandb` of a sweep folder: one run in the sweep's group (its cells' runs, `sweep --wandb`) holding
    the tables of the CSVs (numbers as numbers) and the figures, the grouped bars among them; read back from the
    offline run's files."""
    from .wandb_records import runs

    monkeypatch.delenv("WANDB_MODE", raising=False)  # no W&B configured: offline
    root = _sweeps(tmp_path / "results", projection=False) / "stitch_sweep"
    out = tmp_path / "out"
    report.write_report(root, out, wandb=True)
    (run,) = runs(out)
    assert (run.name, run.group, run.job_type) == ("report-stitch_sweep", "stitch_sweep", "report")
    assert run.summary["cells/stitch"] == 40
    table = run.history["stitch_table"]
    assert table["_type"] == "table-file" and table["ncols"] == len(stitch_report.COLUMNS)
    (path,) = (out / "wandb").glob(f"offline-run-*/files/{table['path']}")
    written = json.loads(path.read_text())
    rows = _csv(out / "stitch.csv")
    assert written["columns"] == stitch_report.COLUMNS and len(written["data"]) == len(rows) == table["nrows"]
    penalty = stitch_report.COLUMNS.index("penalty_pts")
    assert [r[penalty] for r in written["data"]] == [float(r["penalty_pts"]) for r in rows]
    for figure in ("stitch_bars", "stitch_penalty"):
        assert run.history[f"figures/{figure}"]["_type"] == "image-file"
        assert list((out / "wandb").glob(f"offline-run-*/files/media/images/figures/{figure}*.png"))


def test_each_experiment_kind_owns_its_section(built, tmp_path):
    """Every experiment kind has a report section and every section a kind; ``Experiment.report`` is that
    section over the kind's records, the same lines and files ``report.md`` holds."""
    import symstitch.sweep  # noqa: F401 - registers every kind
    from symstitch.reports import SECTIONS
    from symstitch.runner import EXPERIMENTS

    assert set(EXPERIMENTS) == set(SECTIONS)
    root, md = built
    text = md.read_text()
    found = report.collect(root)
    # the dissection and merge sections read real results; tests/test_dissect_experiment.py and
    # tests/test_merge_experiment.py check them the same way
    assert set(found) == set(SECTIONS) - {"dissect", "merge"}
    for kind in found:
        part = EXPERIMENTS.get(kind).report(found[kind], tmp_path / kind)
        assert part.lines and "\n".join(part.lines).strip() in text
        assert all(p.exists() and p.is_relative_to(tmp_path / kind) for p in [*part.csvs.values(), *part.figures])
    with pytest.raises(KeyError, match="no report section for experiment 'fusion'; known: zoo, stitch"):
        report.section("fusion", [], tmp_path)


def test_a_section_that_cannot_read_its_cells_costs_only_itself(tmp_path, capsys):
    root = _sweeps(tmp_path / "results", projection=False)
    bad = {"experiment": "projection", "key": "p", "cell": {}, "result": {"network": "mcnn-seed0"}}
    (root / "zoo_sweep" / "cells" / "bad.json").write_text(json.dumps(bad))
    text = report.write_report(root, tmp_path / "out").read_text()
    assert "The projection cells could not be reported: KeyError" in text
    assert "## Stitching" in text and "## Alignment" in text and "## Model library" in text
    assert "projection cells could not be reported (KeyError" in capsys.readouterr().err


def test_lasso_against_lambda_from_known_cells(tmp_path):
    """Lasso cells at λ = 1e-3 and 1e-1 (two pairs, one point): the penalties and the non-zero fractions
    (1 − sparsity) averaged exactly, a row per cell and protocol, the figure; one λ alone gives no such part."""
    root = tmp_path / "results" / "lasso"
    known = {0.001: ([1.0, 3.0], [0.50, 0.70]), 0.1: ([10.0, 20.0], [0.05, 0.15])}
    for lam, (penalties, nonzero) in known.items():
        for (source, target), penalty, nz in zip(PAIRS, penalties, nonzero):
            cell = {"arch": ARCH, "source": source, "target": target, "point": "block1", "point_index": 1,
                    "layer": f"lasso:lam={lam}", "repeat": 0}
            result = {"penalty_pts": penalty, "penalty_recalibrated_pts": penalty / 2, "stitched_acc": 0.8,
                      "source_acc": 0.9, "target_acc": 0.9, "model": {"lam": lam, "sparsity": 1.0 - nz}}
            _write_cell(root, f"lasso/{lam}/{target[-5:]}", "stitch", cell, result)
    md = report.write_report(root.parent, tmp_path / "out").read_text()
    assert "### The lasso stitch against λ" in md and "(stitch_lasso.png)" in md
    rows = _csv(tmp_path / "out" / "stitch_lasso.csv")
    assert len(rows) == 2 * 2 * 2 and list(rows[0]) == stitch_report.LASSO_COLUMNS
    summary = {(s["protocol"]): s for s in stitch_report.lasso_summary(stitch_report.lasso_rows(report.collect(root)["stitch"]))}
    frozen, recal = summary["frozen"], summary["recalibrated"]
    assert frozen["lams"] == [0.001, 0.1]
    assert [p["mean"] for p in frozen["penalty"]] == pytest.approx([2.0, 15.0])
    assert [p["mean"] for p in recal["penalty"]] == pytest.approx([1.0, 7.5])
    assert [z["mean"] for z in frozen["nonzero"]] == pytest.approx([0.6, 0.1])
    assert "| mcnn | block1 | frozen | 0.001 | 2.00 ± " in md and "| 60.0 ± " in md
    assert (tmp_path / "out" / "stitch_lasso.png").stat().st_size > 5_000

    single = tmp_path / "single" / "lasso"
    for path in (root / "cells").rglob("*.json"):
        if "0.001" in str(path):
            (single / "cells" / path.relative_to(root / "cells")).parent.mkdir(parents=True, exist_ok=True)
            (single / "cells" / path.relative_to(root / "cells")).write_text(path.read_text())
    assert "lasso stitch against λ" not in report.write_report(single.parent, tmp_path / "out1").read_text()
