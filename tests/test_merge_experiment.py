"""The merge experiment end to end: ``symstitch merge`` on two zoo networks and on two torchvision models, the
midpoint checkpoint taken by other commands, the stitch method's route, and the report section's table and
verdicts on records with known numbers."""

from __future__ import annotations

import json

import pytest
import torch

from symstitch.commands import main
from symstitch.library import load_model
from symstitch.reports.merge import merge_rows, merge_summary, paired_gaps, report
from tests.conftest import library_refs


def test_merge_command_on_two_zoo_networks(mcnn_lib, tmp_path, capsys):
    """Three alignments side by side, the report with its figure, and a midpoint checkpoint that the other
    commands take (``check``, ``merge`` itself)."""
    source, target = library_refs(mcnn_lib)
    out = tmp_path / "m"
    args = ["merge", "--source", source, "--target", target, "--methods", "weight", "--lambdas", "3",
            "--match-images", "128", "--test-images", "128", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "none: loss barrier interpolated" in printed and "full (weight): loss barrier" in printed
    cells = sorted(p.name for p in (out / "cells").rglob("*.json"))
    assert len(cells) == 3
    report_dir = out / "report"
    assert (report_dir / "merge_curves.png").stat().st_size > 10_000
    md = (report_dir / "report.md").read_text()
    assert "## Merging up to the intertwiner groups" in md and "| mcnn×0.125 | full (weight) | reestimated | 1 |" in md
    from symstitch.merge import MergeExperiment
    from symstitch.report import collect

    part = MergeExperiment.report(collect(out)["merge"], tmp_path / "part")  # the section report.md holds
    assert part.lines and "\n".join(part.lines).strip() in md and part.figures[0].exists()
    records = [json.loads(p.read_text()) for p in (out / "cells").rglob("*.json")]
    full = [r for r in records if r["cell"]["group"] == "full"][0]["result"]
    assert len(full["lambdas"]) == 3 and set(full["loss"]) == {"interpolated", "reestimated"}
    midpoint = out / full["midpoint"]
    net = load_model(str(midpoint))
    assert net.label == "MCNN" and not net.training
    ckpt = torch.load(midpoint, weights_only=True)
    assert ckpt["merged"]["group"] == "full" and ckpt["merged"]["batchnorm"] == "reestimated"
    assert main(["check", "--model", str(midpoint), "--samples", "32"]) == 0
    assert main(args) == 0  # rerun: every cell is there already, nothing is recomputed
    assert sorted(p.name for p in (out / "cells").rglob("*.json")) == cells


def test_merge_command_on_two_torchvision_models(tmp_path, capsys):
    import torchvision
    refs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"tv{seed}.pt"
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
        refs.append(f"{{class_path: torchvision.models.resnet18, init_args: {{num_classes: 10}}, state_dict: {path}}}")
    out = tmp_path / "tv"
    assert main(["merge", "--source", refs[0], "--target", refs[1], "--methods", "activation", "--groups", "full",
                 "--lambdas", "3", "--bn", "reestimated", "--match-images", "32", "--test-images", "32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full (activation): loss barrier reestimated" in printed
    record = json.loads(next((out / "cells").rglob("*.json")).read_text())["result"]
    assert len(record["alignment"]["sites"]) == 8 and record["alignment"]["unaligned"]  # the streams: why not
    midpoint = out / record["midpoint"]
    assert midpoint.suffix == ".yaml"
    net = load_model(midpoint.read_text())
    assert type(net.model).__name__ == "ResNet"


def test_stitch_method_route(mcnn_lib):
    """The hardened P·D of a birkhoff stitch B → A at one site, a scaled permutation with positive scales."""
    from symstitch.merge import align
    from symstitch.symmetry import intertwiner_group

    source, target = library_refs(mcnn_lib)
    a, b = load_model(source), load_model(target)
    al = align(a, b, "stitch", points=["layer1.act"], epochs=1, relaxed_epochs=1)
    assert list(al.elements) == ["layer1.act"]
    assert intertwiner_group("relu").contains(al.elements["layer1.act"])
    assert isinstance(al.details["stitch_penalty_pts"]["layer1.act"], float)
    merged = al.apply(b)
    x = torch.randn(8, 3, 32, 32)
    assert torch.allclose(merged(x), b(x), atol=1e-4)  # the function of B, unchanged


def _record(family: str, pair: str, method: str, group: str, barriers: dict[str, float]) -> dict:
    lams = [0.0, 0.5, 1.0]
    loss = {m: [0.1, 0.1 + b, 0.1] for m, b in barriers.items()}
    acc = {m: [0.9, 0.9 - b / 10, 0.9] for m, b in barriers.items()}
    a, b = pair.split("-")
    return {"file": f"{family}-{pair}-{group}.json", "machine": {"cpu": "x86_64 AVX2"},
            "cell": {"family": family, "arch": family, "source_seed": a, "target_seed": b, "method": method,
                     "group": group},
            "result": {"lambdas": lams, "loss": loss, "acc": acc, "barrier_loss": barriers,
                       "barrier_acc_pts": {m: 100 * b / 10 for m, b in barriers.items()},
                       "midpoint_acc": {m: acc[m][1] for m in barriers}}}


def test_report_table_and_paired_verdicts(tmp_path):
    """Three pairs whose full-group barrier is 0.2 below the permutations' (exactly, paired): the interval of the
    gap is a point at +0.2, the verdict resolves it; none vs permutations differs by pair and the interval says
    so."""
    records = []
    for pair, none, perm in (("0-1", 2.0, 1.0), ("0-2", 1.0, 1.5), ("1-2", 1.5, 1.2)):
        records.append(_record("toy", pair, "none", "none", {"interpolated": none}))
        records.append(_record("toy", pair, "weight", "permutations", {"interpolated": perm}))
        records.append(_record("toy", pair, "weight", "full", {"interpolated": perm - 0.2}))
    rows, curves = merge_rows(records)
    assert len(rows) == 9 and len(curves) == 27
    summary = merge_summary(rows, curves)
    full = [s for s in summary if s["group"] == "full"][0]
    assert full["barrier"]["n"] == 3 and full["barrier"]["mean"] == pytest.approx((0.8 + 1.3 + 1.0) / 3)
    gaps = {(g["worse"], g["better"]): g for g in paired_gaps(rows)}
    assert gaps["permutations", "full"]["mean"] == pytest.approx(0.2)
    assert gaps["permutations", "full"]["half"] == pytest.approx(0.0, abs=1e-12)
    assert gaps["none", "permutations"]["mean"] == pytest.approx((1.0 - 0.5 + 0.3) / 3)
    section = report(records, tmp_path)
    text = "\n".join(section.lines)
    assert "| toy | full (weight) | interpolated | 3 | 1.033 ± " in text
    assert "full instead of permutations lowers the loss barrier by +0.200" in text
    assert "full resolves a lower barrier" in text
    assert "none instead" not in text and "permutations instead of none" in text
    assert "no difference resolved" in text  # none vs permutations: the interval contains 0
    assert (tmp_path / "merge.csv").read_text().count("\n") == 10
    assert section.stats["merge/toy/full (weight)/interpolated/barrier"] == pytest.approx(1.0333333, rel=1e-6)


def test_a_cell_as_a_wandb_run():
    from symstitch.merge import MergeExperiment
    from symstitch.runner import CellRecord

    rec = _record("toy", "0-1", "weight", "full", {"interpolated": 0.5, "reestimated": 0.1})
    record = CellRecord("merge", "toy/s0-s1/weight-full", rec["cell"], rec["result"], 3.0, machine={"cpu": "x"})
    config, summary = MergeExperiment({"source": "a", "target": "b"}).wandb_fields(record)
    assert config["group"] == "full" and config["machine"] == {"cpu": "x"}
    assert summary == {"barrier_loss/interpolated": 0.5, "barrier_loss/reestimated": 0.1,
                       "barrier_acc_pts/interpolated": 5.0, "barrier_acc_pts/reestimated": 1.0,
                       "midpoint_acc/interpolated": 0.85, "midpoint_acc/reestimated": 0.89, "seconds": 3.0}
