"""symstitch.stitching.record: the keys of a stitch record, built in one place and read back."""

import math

import pytest

from symstitch.stitching.record import PROTOCOLS, StitchRecord, penalty_of, record_key

LOG_NAMES = {"frozen": "stitch", "recalibrated": "stitch_recalibrated"}
METRICS = {"test/source/acc": 0.9, "test/target/acc": 0.8, "test/stitch/acc": 0.7, "test/stitch/penalty_pts": 15.0,
           "test/stitch_recalibrated/acc": 0.84, "test/stitch_recalibrated/penalty_pts": 1.0}


def test_record_keys():
    assert [record_key(q, p) for p in PROTOCOLS for q in ("penalty", "stitched")] == [
        "penalty_pts", "stitched_acc", "penalty_recalibrated_pts", "stitched_recalibrated_acc"]
    assert record_key("stitched", "recalibrated", "val") == "val_stitched_recalibrated_acc"
    with pytest.raises(ValueError, match="unknown protocol 'warm'; protocols: frozen, recalibrated"):
        record_key("penalty", "warm")


def test_a_record_from_logged_metrics_is_the_cell_result():
    summary = {"layer": "birkhoff", "permutation": [1, 0]}
    record = StitchRecord.from_metrics(METRICS, LOG_NAMES, summary, run_dir="runs/x")
    assert record.to_result() == {
        "penalty_pts": 15.0, "stitched_acc": 0.7, "penalty_recalibrated_pts": 1.0, "stitched_recalibrated_acc": 0.84,
        "source_acc": 0.9, "target_acc": 0.8, "permutation": [1, 0], "model": summary, "run_dir": "runs/x"}
    assert record.penalty_pts("recalibrated") == 1.0 and record.stitched_acc() == 0.7


def test_a_protocol_not_run_is_null_when_frozen_and_absent_otherwise():
    only_recalibrated = StitchRecord.from_metrics(METRICS, {"recalibrated": "stitch_recalibrated"}, {}).to_result()
    assert only_recalibrated["penalty_pts"] is None and only_recalibrated["stitched_acc"] is None
    only_frozen = StitchRecord.from_metrics(METRICS, {"frozen": "stitch"}, {}).to_result()
    assert "penalty_recalibrated_pts" not in only_frozen and "run_dir" not in only_frozen


def test_validation_numbers_carry_val_keys_for_the_protocols_evaluated():
    validation = {"val/source/acc": 0.95, "val/target/acc": 0.85, "val/stitch/acc": 0.75, "val/stitch/penalty_pts": 15.0}
    result = StitchRecord.from_metrics(METRICS, LOG_NAMES, {}, validation).to_result()
    assert {k: v for k, v in result.items() if k.startswith("val_")} == {
        "val_source_acc": 0.95, "val_target_acc": 0.85, "val_penalty_pts": 15.0, "val_stitched_acc": 0.75}


def test_penalties_read_back_from_records_old_and_new():
    assert penalty_of({"penalty_pts": 12.5}) == 12.5
    assert penalty_of({"penalty": 0.125}) == 12.5  # before the unit was points
    assert penalty_of({"penalty_recalibrated_pts": 3.0}, "recalibrated") == 3.0
    assert math.isnan(penalty_of({"penalty_pts": None})) and math.isnan(penalty_of({}, "recalibrated"))
