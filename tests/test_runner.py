"""symstitch.runner: the one record and the one runner of every experiment, on a toy experiment (no torch work)."""

import json

import pytest

from symstitch.io import read_json
from symstitch.runner import REQUIRED, Cell, CellRecord, Experiment, Runner, damage, names, pairs


class Squares(Experiment):
    """Cells n = 0..size-1 with result n²; ``together`` cells per group; the cell ``fail_at`` (not a setting: a
    failure of the machine, say) raises."""

    name = "squares"
    options = {"size": REQUIRED, "together": 1, "bad": False}

    def __init__(self, settings, fail_at=None):
        super().__init__(settings)
        self.ran: list[str] = []
        self.fail_at = fail_at

    def cells(self):
        return [Cell(f"n{n}", {"n": n}) for n in range(self.settings["size"])]

    def check(self, cells):
        if self.settings["bad"]:
            raise ValueError("cell n0 does not check out")

    def groups(self, cells):
        k = self.settings["together"]
        return [list(cells[i:i + k]) for i in range(0, len(cells), k)]

    def run_cell(self, cell, out):
        if cell.params["n"] == self.fail_at:
            raise RuntimeError(f"cell {cell.key} failed")
        self.ran.append(cell.key)
        return {"square": cell.params["n"] ** 2}


def test_every_cell_is_recorded_once_and_a_rerun_skips_finished_cells(tmp_path):
    progress_label = "toy"
    runner = Runner(Squares({"size": 4}), tmp_path, progress_label)
    records = runner.run(progress=False)
    assert [r.result["square"] for r in records] == [0, 1, 4, 9]
    assert runner.experiment.ran == ["n0", "n1", "n2", "n3"]
    on_disk = read_json(tmp_path / "cells" / "n3.json")
    assert on_disk["experiment"] == "squares" and on_disk["cell"] == {"n": 3} and on_disk["result"] == {"square": 9}
    assert on_disk["side_by_side"] == 1 and "cpu" in on_disk["machine"] and "file" not in on_disk
    again = Runner(Squares({"size": 4}), tmp_path, progress_label)
    assert again.run(progress=False) == records
    assert again.experiment.ran == [] and again.unfinished() == 0


def test_a_failed_cell_keeps_the_records_before_it_and_only_it_runs_again(tmp_path):
    with pytest.raises(RuntimeError, match="cell n2 failed"):
        Runner(Squares({"size": 4}, fail_at=2), tmp_path).run(progress=False)
    assert sorted(p.name for p in (tmp_path / "cells").glob("*.json")) == ["n0.json", "n1.json"]
    rerun = Runner(Squares({"size": 4}), tmp_path)  # the cause fixed, the settings the same
    assert [r.key for r in rerun.run(progress=False)] == ["n0", "n1", "n2", "n3"]
    assert rerun.experiment.ran == ["n2", "n3"]


def test_cells_run_together_share_the_time_and_say_so(tmp_path):
    records = Runner(Squares({"size": 5, "together": 2}), tmp_path).run(progress=False)
    assert [r.side_by_side for r in records] == [2, 2, 2, 2, 1]
    assert records[0].seconds == records[1].seconds


def test_a_folder_belongs_to_one_configuration(tmp_path):
    Runner(Squares({"size": 2}), tmp_path, "first").run(progress=False)
    with pytest.raises(ValueError, match="holds results of another squares configuration \\(first\\)"):
        Runner(Squares({"size": 3}), tmp_path).run(progress=False)
    assert read_json(tmp_path / "sweep.json")["settings"]["size"] == 2


def test_a_grid_that_does_not_check_out_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="does not check out"):
        Runner(Squares({"size": 2, "bad": True}), tmp_path / "out").run(progress=False)
    assert not (tmp_path / "out").exists()


def test_a_damaged_record_is_kept_aside_and_its_cell_runs_again(tmp_path, capsys):
    runner = Runner(Squares({"size": 2}), tmp_path)
    runner.run(progress=False)
    path = tmp_path / "cells" / "n1.json"
    path.write_text('{"experiment": "squares", "key": "n1", "res')
    assert "JSONDecodeError" in damage(path)
    assert [runner.status(c) for c in runner.cells()] == ["done", "damaged"]
    again = Runner(Squares({"size": 2}), tmp_path)
    assert [r.result for r in again.run(progress=False)] == [{"square": 0}, {"square": 1}]
    assert again.experiment.ran == ["n1"]
    aside = list((tmp_path / "cells").glob("n1.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text().endswith('"res')
    assert "moved to n1.json.damaged-" in capsys.readouterr().err
    path.write_text(json.dumps({"experiment": "squares"}))
    assert damage(path).startswith("not a cell record (KeyError")


def test_only_the_chosen_cells_run(tmp_path):
    runner = Runner(Squares({"size": 5}), tmp_path)
    assert [r.key for r in runner.run("1,3-4", progress=False)] == ["n1", "n3", "n4"]
    assert runner.experiment.ran == ["n1", "n3", "n4"]
    with pytest.raises(ValueError, match="cell index 5 is outside 0..4"):
        runner.run([5], progress=False)


def test_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="unknown key\\(s\\) sise for a squares experiment; valid keys: bad, "
                                         "experiment, out, size, slurm, together"):
        Squares({"sise": 3})
    with pytest.raises(ValueError, match="a squares experiment needs size"):
        Squares({})
    assert Squares({"size": 2}).fingerprint() != Squares({"size": 3}).fingerprint()
    assert Squares({"size": 2}).fingerprint() == Squares({"size": 2, "together": 1}).fingerprint()


def test_records_round_trip(tmp_path):
    record = CellRecord("squares", "n2", {"n": 2}, {"square": 4}, 1.5, "2026-01-01T00:00:00", {"cpu": "x"}, 3)
    record.write(tmp_path / "r.json")
    assert CellRecord.read(tmp_path / "r.json") == record


def test_pairs_and_names():
    assert pairs([0, 1, 2], "unordered") == [(0, 1), (0, 2), (1, 2)]
    assert pairs([0, 1], "ordered") == [(0, 1), (1, 0)]
    assert pairs([0, 1], "self") == [(0, 0), (1, 1)]
    assert pairs([0, 1, 2, 3, 4], "disjoint") == [(0, 1), (2, 3)]  # seed 4 has no partner: left out
    with pytest.raises(ValueError, match="pairs is one of unordered, disjoint, ordered, self"):
        pairs([0], "all")
    assert names("a, b,,c") == ["a", "b", "c"] and names([1, "x"]) == ["1", "x"]


def test_a_slurm_array_gives_each_task_a_range_when_the_grid_is_larger_than_the_cluster_allows(tmp_path):
    runner = Runner(Squares({"size": 7}), tmp_path, slurm={"max_array": 3, "gpus": 0, "partition": "p"})
    script = runner.emit_slurm(tmp_path / "squares.yaml").read_text()
    assert "#SBATCH --array=0-2%32" in script  # 7 cells, 3 per task
    assert "FIRST=$((SLURM_ARRAY_TASK_ID * 3))" in script and "#SBATCH --partition=p" in script
    assert "--gres" not in script and "--cell ${FIRST}-${LAST}" in script
    assert (tmp_path / "sweep.json").exists() and not (tmp_path / "cells").exists()
    assert "--wandb" not in script
    logged = runner.emit_slurm(tmp_path / "squares.yaml", wandb=True).read_text()  # every task logs its cells to W&B
    assert logged.rstrip().endswith("--cell ${FIRST}-${LAST} --no-progress --wandb")
