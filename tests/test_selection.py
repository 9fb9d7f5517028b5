"""Choosing a layer option on the validation split (the paper's cross-validated G_ReLU stitch): synthetic records
with known validation accuracies → known choices and penalties; ties; missing candidates; the report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from symstitch import report
from symstitch.reports import stitch as stitch_report
from symstitch.selection import preference, select
from symstitch.stitching.grammar import LayerChoice, LayerSpec

GRID = "birkhoff:alpha=0.001|0.01|0.1|1|10"
VALUES = [0.001, 0.01, 0.1, 1, 10]
SERIES = "birkhoff (cv alpha)"


def _record(point: str, value, val: dict, test: dict, repeat: int = 0, index: int = 0, grid: str = GRID,
            values=VALUES, option: str = "alpha", target: str = "mcnn/seed1") -> dict:
    """A candidate's record: ``val``/``test``: protocol → validation accuracy / test penalty in points."""
    keys = {"frozen": ("penalty_pts", "stitched_acc", "val_stitched_acc"),
            "recalibrated": ("penalty_recalibrated_pts", "stitched_recalibrated_acc", "val_stitched_recalibrated_acc")}
    result = {"source_acc": 0.9, "target_acc": 0.9}
    for protocol, (penalty_key, acc_key, val_key) in keys.items():
        if protocol in test:
            result[penalty_key] = test[protocol]
            result[acc_key] = 0.9 - test[protocol] / 100
        if protocol in val:
            result[val_key] = val[protocol]
    name, _, rest = grid.partition(":")
    cell = {"arch": "mcnn", "source": "mcnn/seed0", "target": target, "point": point, "point_index": index,
            "layer": f"{name}:{option}={value}", "repeat": repeat,
            "select": {"layer": grid, "series": f"{name} (cv {option})", "option": option, "value": value,
                       "values": list(values)}}
    return {"experiment": "stitch", "key": f"{point}/{value}/r{repeat}", "cell": cell, "result": result}


def _grid(point: str, val_frozen: list, test_frozen: list, val_recal: list, test_recal: list, **kw) -> list[dict]:
    return [_record(point, v, {"frozen": vf, "recalibrated": vr}, {"frozen": tf, "recalibrated": tr}, **kw)
            for v, vf, tf, vr, tr in zip(VALUES, val_frozen, test_frozen, val_recal, test_recal)]


# at p1 the validation split favours alpha = 0.1 (frozen) and alpha = 1 (recalibrated); the test split would
# have favoured others (alpha = 1: 2.0 frozen, alpha = 0.001: 1.0 recalibrated) and must not matter
P1 = _grid("p1", val_frozen=[0.80, 0.85, 0.90, 0.88, 0.50], test_frozen=[9.0, 8.0, 7.0, 2.0, 30.0],
           val_recal=[0.70, 0.75, 0.80, 0.95, 0.60], test_recal=[1.0, 6.0, 5.0, 4.0, 20.0])


def _by(selections, point="p1", protocol="frozen", repeat=0):
    (found,) = [s for s in selections if (s.point, s.protocol, s.repeat) == (point, protocol, repeat)]
    return found


def test_the_best_validation_accuracy_is_chosen_and_its_test_penalty_reported():
    selections = select(P1)
    assert len(selections) == 2  # one point, pair and repeat; two protocols
    frozen, recal = _by(selections), _by(selections, protocol="recalibrated")
    assert (frozen.chosen.value, frozen.chosen.penalty_pts, frozen.chosen_text) == (0.1, 7.0, "alpha=0.1")
    assert (recal.chosen.value, recal.chosen.penalty_pts) == (1, 4.0)
    assert frozen.series == SERIES and frozen.missing == [] and [c.value for c in frozen.candidates] == VALUES


def test_ties_go_to_the_smallest_value_whatever_the_listed_order():
    listed = [10, 1, 0.01]  # descending on purpose
    records = [_record("p1", v, {"frozen": acc}, {"frozen": pen}, values=listed)
               for v, acc, pen in zip(listed, [0.9, 0.95, 0.95], [1.0, 2.0, 3.0])]
    (only,) = select(records)
    assert (only.chosen.value, only.chosen.penalty_pts) == (0.01, 3.0)
    assert preference(["sinkhorn", "euclidean"]) == ["sinkhorn", "euclidean"]  # not numbers: as listed
    words = [_record("p1", v, {"frozen": 0.9}, {"frozen": pen}, grid="birkhoff:projection=sinkhorn|euclidean",
                     values=["sinkhorn", "euclidean"], option="projection")
             for v, pen in zip(["sinkhorn", "euclidean"], [5.0, 1.0])]
    (tie,) = select(words)
    assert tie.chosen.value == "sinkhorn" and tie.series == "birkhoff (cv projection)"


def test_a_missing_validation_accuracy_or_cell_means_no_choice():
    records = [dict(r, result=dict(r["result"])) for r in P1]
    del records[2]["result"]["val_stitched_acc"]  # alpha = 0.1, the frozen winner: its validation is missing
    frozen, recal = _by(select(records)), _by(select(records), protocol="recalibrated")
    assert frozen.chosen is None and frozen.missing == [0.1]
    assert recal.chosen.value == 1  # the other protocol is complete
    without_cell = select(P1[:4])  # alpha = 10's cell has not finished
    assert all(s.chosen is None and s.missing == [10] for s in without_cell)
    only_frozen = select([_record("p1", v, {"frozen": 0.5}, {"frozen": 1.0}) for v in VALUES])
    assert [s.protocol for s in only_frozen] == ["frozen"]  # a protocol no candidate ran is no choice at all


def test_groups_are_per_point_pair_and_repeat():
    records = [*P1, *_grid("p1", [0.9, 0.1, 0.1, 0.1, 0.1], [3.0] * 5, [0.1] * 5, [2.0] * 5, repeat=1),
               *_grid("p2", [0.1, 0.1, 0.1, 0.1, 0.9], [1.0, 1.0, 1.0, 1.0, 6.0], [0.1] * 5, [2.0] * 5, index=1)]
    selections = select(records + [{"experiment": "stitch", "cell": {"layer": "birkhoff", "point": "p1"},
                                    "result": {"penalty_pts": 0.0}}])  # not a candidate: ignored
    assert len(selections) == 6
    assert _by(selections, repeat=1).chosen.value == 0.001
    assert (_by(selections, point="p2").chosen.value, _by(selections, point="p2").chosen.penalty_pts) == (10, 6.0)


def _write(root: Path, records: list[dict]) -> None:
    for rec in records:
        path = root / "cells" / f"{rec['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_lists_the_choices_and_judges_only_the_selected_records(tmp_path):
    """Two repeats at p1 (alpha 0.1 and 0.001 chosen, frozen), one at p2 (alpha 10), a plain birkhoff beside:
    the selected series holds exactly the chosen candidates' test penalties, and nothing else."""
    records = [*P1, *_grid("p1", [0.9, 0.1, 0.1, 0.1, 0.1], [3.0] * 5, [0.1] * 5, [2.0] * 5, repeat=1),
               *_grid("p2", [0.1, 0.1, 0.1, 0.1, 0.9], [1.0, 1.0, 1.0, 1.0, 6.0], [0.1] * 5, [2.0] * 5, index=1)]
    for i, point in enumerate(["p1", "p2"]):
        records.append({"experiment": "stitch", "key": f"plain/{point}", "result": {
            "penalty_pts": 50.0, "stitched_acc": 0.4, "source_acc": 0.9, "target_acc": 0.9},
            "cell": {"arch": "mcnn", "source": "mcnn/seed0", "target": "mcnn/seed1", "point": point,
                     "point_index": i, "layer": "birkhoff", "repeat": 0}})
    _write(tmp_path / "sweep", records)
    md = report.write_report(tmp_path / "sweep")
    rows = _csv(md.parent / "stitch.csv")
    assert {r["layer"] for r in rows} == {"birkhoff", SERIES}  # no row per candidate
    chosen = [r for r in rows if r["layer"] == SERIES and r["protocol"] == "frozen"]
    assert [(r["point"], r["repeat"], r["selected"], float(r["penalty_pts"])) for r in chosen] == [
        ("p1", "0", "alpha=0.1", 7.0), ("p1", "1", "alpha=0.001", 3.0), ("p2", "0", "alpha=10", 6.0)]
    assert len(_csv(md.parent / "stitch_selection.csv")) == 3 * 2 * 5  # choices × protocols × candidates
    summary = stitch_report.stitch_summary(stitch_report.stitch_rows(report.collect(tmp_path / "sweep")["stitch"]))["mcnn"]
    assert summary["layers"][SERIES]["mean"] == pytest.approx([5.0, 6.0])  # (7 + 3) / 2 and 6: chosen ones only
    assert summary["layers"][SERIES]["std"][0] == pytest.approx(math.sqrt(8))
    assert summary["layers"][f"{SERIES}/recalibrated"]["mean"] == pytest.approx([3.0, 2.0])
    text = md.read_text()
    assert "| p1 | frozen | 0.001 ×1, 0.1 ×1 | 5.00 ± 2.83 (n=2) |" in text
    assert "| p2 | frozen | 10 ×1 | 6.00 (n=1) |" in text
    assert f"(c) `{SERIES}`: last point p2: 6.00 pts" in text  # judged as a G_ReLU layer, on the chosen penalties
    assert "(c) `birkhoff`: last point p2: 50.00 pts" in text


def test_the_report_names_points_without_a_choice(tmp_path):
    _write(tmp_path / "sweep", P1[:4])
    text = report.write_report(tmp_path / "sweep").read_text()
    assert "No choice (2)" in text and "mcnn/seed0→mcnn/seed1 at p1, repeat 0, frozen: missing alpha=10" in text


def test_a_choice_is_named_by_its_candidate_values():
    choice = LayerChoice.parse("birkhoff:projection=euclidean;alpha=0.001|1e-2|1")
    assert choice.option == "alpha" and choice.values == (0.001, 0.01, 1)
    assert [c.label for c in choice.candidates] == ["birkhoff:projection=euclidean;alpha=0.001",
                                                    "birkhoff:projection=euclidean;alpha=1e-2",
                                                    "birkhoff:projection=euclidean;alpha=1"]
    assert choice.candidates[1].options == {"projection": "euclidean", "alpha": 0.01}
    assert choice.series == "birkhoff:projection=euclidean (cv alpha)"
    assert LayerChoice.parse("lowrank:rank=4") is None and LayerChoice.parse("birkhoff") is None
    for bad, message in [("birkhoff:alpha=0.1|", "two distinct"), ("birkhoff:alpha=1|1", "two distinct"),
                         ("lasso:lam=1|2;threshold=1|2", "one option")]:
        with pytest.raises(ValueError, match=message):
            LayerChoice.parse(bad)
    with pytest.raises(ValueError, match="only a stitch sweep chooses"):
        LayerSpec.parse("birkhoff:alpha=0.1|1")
