"""symstitch.io: atomic files, strict JSON, locks, ranges."""

import json
import math
import multiprocessing as mp
import os
import stat

import numpy as np
import pytest
import torch

from symstitch.io import Busy, Lock, NotWritable, dumps, finite_json, parse_range, read_json, write_atomic, write_json


def test_non_finite_floats_are_null_everywhere_and_scalars_are_plain():
    data = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], 3: {"c": np.float64(np.nan)},
            "t": torch.tensor(0.25), "n": np.int64(7)}
    assert finite_json(data) == {"a": None, "b": [1.5, None, [None, 2]], "3": {"c": None}, "t": 0.25, "n": 7}
    text = dumps(data)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["b"] == [1.5, None, [None, 2]]


def test_write_json_round_trips_and_leaves_no_temporary(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"x": [1, 2], "y": "z"})
    assert read_json(path) == {"x": [1, 2], "y": "z"}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_atomic(tmp_path / "r.txt", "old\n")
    with pytest.raises(TypeError):
        write_atomic(path, object())  # write_text refuses a non-string: the rename never happens
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir() if "r.txt" in p.name] == ["r.txt"]  # no temporary left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(NotWritable, match="not writable") as err:
            write_json(locked / "r.json", {})
        assert "\n" not in str(err.value)
        with pytest.raises(NotWritable, match="cannot create the folder"):
            write_json(locked / "deeper" / "r.json", {})
    finally:
        locked.chmod(stat.S_IRWXU)


def _hold(path, ready, release):
    with Lock(path):
        ready.set()
        release.wait(30)


def test_a_lock_held_by_another_process_is_busy_without_waiting_and_free_after():
    import tempfile
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cell.lock")
        ready, release = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_hold, args=(path, ready, release))
        holder.start()
        try:
            assert ready.wait(30)
            with pytest.raises(Busy, match="seed 3 is being written by another process"):
                with Lock(path, what="seed 3", wait=False):
                    pass
        finally:
            release.set()
            holder.join(30)
        with Lock(path, wait=False):  # the holder is gone: free again, no stale lock left behind
            pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path / "l", ready, release))
    holder.start()
    assert ready.wait(30)
    holder.kill()
    holder.join(30)
    with Lock(tmp_path / "l", wait=False):
        pass


@pytest.mark.parametrize("text, expected", [
    ("0-3,7", [0, 1, 2, 3, 7]), ("5", [5]), (4, [4]), ([1, "3-4"], [1, 3, 4]), ("2, 2,1-2", [2, 1]),
    (" 0 - 1 ", [0, 1]),
])
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("text, message", [
    ("3-1", "3-1 is an empty range"), ("a", "use e.g. 0-9"), ("", "it names none"), (True, "use e.g."),
    ("1-", "use e.g."),
])
def test_parse_range_refuses_in_one_line_naming_the_list(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_range(text, what="cell")
    assert str(err.value).startswith("bad cell list")
