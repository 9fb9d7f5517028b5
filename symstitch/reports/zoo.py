"""The model library's report section: test accuracy of every network, and per architecture and dataset the
mean and sample standard deviation over seeds (``zoo.csv``)."""

from __future__ import annotations

import math
from pathlib import Path

from symstitch.reports import Section
from symstitch.reports.common import mean_std, write_csv
from symstitch.stitching.record import as_number

COLUMNS = ["arch", "seed", "dataset", "test_acc"]


def report(records: list[dict], out: Path) -> Section:
    """``zoo.csv`` and the two tables."""
    rows = zoo_rows(records)
    return Section(_lines(rows), {"zoo": write_csv(out / "zoo.csv", COLUMNS, rows)})


def zoo_rows(records: list[dict]) -> list[dict]:
    """One row per network, sorted by architecture, dataset and seed."""
    rows = []
    for rec in records:
        c, r = rec["cell"], rec["result"]
        rows.append({"arch": r.get("arch", c.get("arch")), "seed": r.get("seed", c.get("seed")),
                     "dataset": r.get("dataset"), "test_acc": as_number(r.get("test_acc"))})
    return sorted(rows, key=lambda r: (str(r["arch"]), str(r["dataset"]), as_number(r["seed"]), str(r["seed"])))


def _lines(rows: list[dict]) -> list[str]:
    lines = ["## Model library", "", "Data: [zoo.csv](zoo.csv)", "",
             "| architecture | seed | dataset | test accuracy |", "|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['test_acc']:.2f} %" if math.isfinite(r["test_acc"]) else "n/a"
        lines.append(f"| {r['arch']} | {r['seed']} | {r['dataset']} | {acc} |")
    lines += ["", "| architecture | dataset | models | mean test accuracy | std |", "|---|---|---|---|---|"]
    for arch, dataset in sorted({(str(r["arch"]), str(r["dataset"])) for r in rows}):
        m, s, n = mean_std([r["test_acc"] for r in rows if (str(r["arch"]), str(r["dataset"])) == (arch, dataset)])
        std = f"{100 * s:.2f}" if math.isfinite(s) else "–"
        lines.append(f"| {arch} | {dataset} | {n} | {100 * m:.2f} % | {std} |" if n else
                     f"| {arch} | {dataset} | 0 | n/a | – |")
    lines.append("")
    return lines
