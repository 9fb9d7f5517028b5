"""``symstitch report RESULTS_DIR``: tidy tables, figures and a markdown report from sweep results.

A sweep (``symstitch sweep``) leaves one JSON file per finished cell under ``<out>/cells/``::

    {"experiment": "stitch" | "align" | "projection" | "zoo", "key": …, "cell": {…}, "result": {…},
     "seconds": …, "finished": "YYYY-mm-ddTHH:MM:SS"}

:func:`collect` gathers every such file below a folder (one sweep folder, or a folder holding several);
:func:`write_report` hands each experiment kind's records to its section (:mod:`symstitch.reports`: the
kind's CSVs, figures, tables and verdicts, each computed from the data, never assumed) and puts them together
into ``report.md``, after what was found and where it was computed; ``--wandb`` logs the tables and figures
as one W&B run in the sweep's group.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from symstitch.loggers import wandb_group, wandb_run
from symstitch.reports import SECTIONS, Section, section
from symstitch.reports.common import machines_lines, warn


# ----------------------------------------------------------------------------------------------------------
# Reading the cell files


def _cell_files(root: Path) -> list[Path]:
    files = {p.resolve(): p for p in root.rglob("cells/**/*.json") if p.is_file()}
    if root.name == "cells":  # the cells folder itself was given
        files.update({p.resolve(): p for p in root.rglob("*.json") if p.is_file()})
    return [files[k] for k in sorted(files)]


def collect(root: Path, skipped: Optional[list[tuple[Path, str]]] = None) -> dict[str, list[dict]]:
    """Every cell result below ``root``, grouped by experiment: ``{experiment: [record, …]}``.

    A record is the cell file's content plus ``"file"`` (its path). Files that do not parse, or are not cell
    results (no ``experiment``, no ``cell``/``result`` objects), are skipped with a warning, and listed with the
    reason in ``skipped`` when given.
    """
    root = Path(root)
    found: dict[str, list[dict]] = {}

    def skip(path: Path, why: str) -> None:
        warn(f"skipping {path}: {why}")
        if skipped is not None:
            skipped.append((path, why))

    for path in _cell_files(root):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skip(path, f"not readable JSON ({e})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("experiment"), str):
            skip(path, "not a cell result (no \"experiment\")")
            continue
        if not isinstance(record.get("cell", {}), dict) or not isinstance(record.get("result"), dict):
            skip(path, "not a cell result (no \"result\" object)")
            continue
        record.setdefault("cell", {})
        record["file"] = str(path)
        found.setdefault(record["experiment"], []).append(record)
    return found


# ----------------------------------------------------------------------------------------------------------
# The report


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


def _table_rows(data: list[list[str]]) -> list[list[Any]]:
    """CSV rows as a W&B table holds them: a column whose every field is a number as numbers (so W&B can plot
    it), the other columns as text; empty fields as None."""
    def number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    numeric = [all(number(v) for v in column if v != "") for column in zip(*data)]
    return [[None if v == "" else float(v) if numeric[i] else v for i, v in enumerate(row)] for row in data]


def _log_wandb(root: Path, out: Path, csvs: dict[str, Path], figures: list[Path], stats: dict) -> None:
    """One W&B run (offline unless configured) holding the tables and figures, in the group of the sweep whose
    folder ``root`` is (the group of its cells' runs: ``symstitch sweep --wandb``); failures only warn."""
    try:
        with wandb_run(out, job_type="report", name=f"report-{root.resolve().name}", group=wandb_group(root),
                       config={"results_dir": str(root)}) as run:
            import wandb  # loaded by wandb_run

            for name, path in csvs.items():
                columns, data = _read_csv(path)
                if columns:
                    run.log({f"{name}_table": wandb.Table(columns=columns, data=_table_rows(data))})
            for png in figures:  # figures of the report folder by name, the cells' by their path in the sweep
                inside = png.resolve().is_relative_to(out.resolve())
                name = png.stem if inside else "/".join(Path(os.path.relpath(png.resolve(), root.resolve())).parts)
                run.log({f"figures/{name.removesuffix('.png')}": wandb.Image(str(png))})
            run.summary.update(stats)
    except Exception as e:  # noqa: BLE001 - W&B must never cost the files already written
        warn(f"W&B logging failed ({type(e).__name__}: {e}); the report files are complete")


def _section(kind: str, records: list[dict], out: Path) -> Section:
    """The section of one kind; records it cannot read cost a warning and a line, never the rest of the report."""
    try:
        return section(kind, records, out)
    except (KeyError, TypeError, ValueError) as e:
        warn(f"{kind} cells could not be reported ({type(e).__name__}: {e})")
        return Section([f"## {kind}", "", f"The {kind} cells could not be reported: {type(e).__name__}: {e}.", ""])


def write_report(root: Path, out: Optional[Path] = None, wandb: bool = False) -> Path:
    """Read every cell below ``root``, write the CSVs, figures and ``report.md`` into ``out`` (default
    ``root/report``); returns the path of ``report.md``. ``wandb``: also log tables and figures to W&B."""
    return _write(root, out, wandb)[0]


def _write(root: Path, out: Optional[Path], wandb: bool) -> tuple[Path, dict[str, Any]]:
    """:func:`write_report`, also returning the headline numbers (cell counts, verdicts, alignment means)."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[tuple[Path, str]] = []
    found = collect(root, skipped)
    counts = {e: len(found.get(e, [])) for e in SECTIONS}
    others = {e: len(v) for e, v in found.items() if e not in SECTIONS}
    lines = [f"# symstitch report: {root.resolve().name}", "",
             f"Results folder: `{root}` · {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
             "## What was found", "", "| experiment | cells |", "|---|---|"]
    lines += [f"| {e} | {n} |" for e, n in counts.items()]
    lines += [f"| {e} (not reported) | {n} |" for e, n in others.items()]
    lines.append("")
    lines += machines_lines([r for records in found.values() for r in records])
    if skipped:
        lines += [f"Skipped {len(skipped)} file(s) among the cell records, which are not in any number below "
                  "(a sweep moves a damaged record aside and runs its cell again):", ""]
        lines += [f"- `{path}`: {why}" for path, why in skipped] + [""]
    if not any(counts.values()):
        lines += [f"No cell results (`cells/**/*.json`) under `{root}`.", ""]

    csvs: dict[str, Path] = {}
    figures: list[Path] = []
    stats: dict[str, Any] = {f"cells/{e}": n for e, n in counts.items()}
    for kind in SECTIONS:
        if found.get(kind):
            part = _section(kind, found[kind], out)
            lines += part.lines
            csvs.update(part.csvs)
            figures += part.figures
            stats.update(part.stats)

    md = out / "report.md"
    md.write_text("\n".join(lines).rstrip("\n") + "\n")
    if wandb:
        _log_wandb(root, out, csvs, figures, stats)
    return md, stats


def main_report(root: Path, out: Optional[Path] = None, wandb: bool = False) -> int:
    """``symstitch report``: write the report and print where it is and the verdicts; 1 when no cell was found."""
    md, stats = _write(root, out, wandb=wandb)
    cells = {k.split("/", 1)[1]: n for k, n in stats.items() if k.startswith("cells/") and n}
    print(f"report: {md}")
    print("cells: " + (", ".join(f"{e} {n}" for e, n in cells.items()) or f"none found under {root}"))
    for key, value in stats.items():
        if key.endswith("_verdict"):
            _, arch, *series, kind = key.split("/")
            print(f"stitch {arch} {'/'.join(series)} {kind.removesuffix('_verdict')}: {value}")
    return 0 if cells else 1
