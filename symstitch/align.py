"""``symstitch align``: similarity of every feature-point pair of two networks (paper §5, SPEC §3).

    symstitch align --config configs/align/digits.yaml --source A --target B

A and B are checkpoints or model-library entries ``<zoo>:<arch>/seed<k>``. One pass of the evaluation images
through each network (:func:`symstitch.metrics.similarity_matrix`) gives every metric for every pair
(point of A, point of B). Written to ``--out``: one result file per metric under ``cells/`` (the records of an
alignment sweep) and, through :mod:`symstitch.report`, ``report/align.csv`` (tidy: point_a, point_b, metric,
value), ``report/align_<metric>.png`` heatmaps (rows: A's points, columns: B's), ``report/align_diagonal.png``
(similarity of point p of A with point p of B), ``report/report.md``, and the same logged to Weights & Biases
(offline unless configured; ``--no-wandb`` skips it).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml


def _loader(source: str, data: Optional[dict], split: str, images: Optional[int], batch_size: int):
    """The evaluation images: ``data`` (DataModule arguments) or the data ``source`` was trained on."""
    from symstitch.data import DataModule, TensorImageDataset, batch_loader, normalize_batch
    from symstitch.stitching import datamodule_for

    dm = DataModule(**data) if data else datamodule_for(source)
    dm.setup()
    if split not in ("test", "val", "train"):
        raise ValueError(f"split is test, val or train; got {split!r}")
    dataset = {"test": dm.test_set, "val": dm.val_set, "train": dm.train_set}[split]
    x, y = dataset.x, dataset.y
    if images:
        x, y = x[:images], y[:images]
    x = normalize_batch(x, dm.mean, dm.std, channels_last=False)
    return batch_loader(TensorImageDataset(x, y), batch_size)


def align_pair(source: str, target: str, metrics: Sequence[str], *, points: Any = "all", cka_mode: str = "exact",
               data: Optional[dict] = None, split: str = "test", images: Optional[int] = None,
               batch_size: int = 500, progress: bool = True, device: Optional[str] = None) -> dict[str, dict]:
    """``{metric: {"points_a", "points_b", "values" (rows: A's points; None where not computed), "errors"}}``."""
    from symstitch.checkpoints import load_classifier
    from symstitch.metrics import similarity_matrix
    from symstitch.stitching import resolve_model

    net_a, net_b = (load_classifier(resolve_model(m)) for m in (source, target))
    if device:
        net_a, net_b = net_a.to(device), net_b.to(device)
    rows = similarity_matrix(net_a, net_b, _loader(source, data, split, images, batch_size), metrics,
                             points=points, cka_mode=cka_mode, progress=progress)
    out = {}
    for metric in metrics:
        mine = [r for r in rows if r["metric"] == metric]
        points_a = list(dict.fromkeys(r["point_a"] for r in mine))
        points_b = list(dict.fromkeys(r["point_b"] for r in mine))
        value = {(r["point_a"], r["point_b"]): r["value"] for r in mine}
        out[metric] = {
            "points_a": points_a,
            "points_b": points_b,
            "values": [[None if math.isnan(value[a, b]) else float(value[a, b]) for b in points_b] for a in points_a],
            "errors": {f"{r['point_a']}|{r['point_b']}": r["error"] for r in mine if r.get("error")},
        }
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="symstitch align", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML with any of the options below (configs/align/)")
    parser.add_argument("--source", help="network A: checkpoint or <zoo>:<arch>/seed<k>")
    parser.add_argument("--target", help="network B, likewise")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated: procrustes_relu, procrustes_orthogonal, cka_linear, cka_relu")
    parser.add_argument("--cka-mode", choices=["exact", "minibatch"], default=None)
    parser.add_argument("--images", type=int, default=None, help="only the first N evaluation images")
    parser.add_argument("--out", default=None, help="results folder (default runs/align)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log tables and figures to Weights & Biases (default; offline unless configured)")
    args = parser.parse_args(argv)

    settings: dict[str, Any] = {"metrics": ["procrustes_relu", "procrustes_orthogonal", "cka_linear", "cka_relu"],
                                "cka_mode": "exact", "points": "all", "data": None, "split": "test",
                                "images": None, "batch_size": 500, "out": "runs/align", "wandb": True}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = sorted(set(loaded) - set(settings) - {"source", "target"})
        if unknown:
            raise ValueError(f"{args.config}: unknown key(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted([*settings, 'source', 'target']))}")
        settings.update(loaded)
    for key in ("source", "target", "cka_mode", "images", "out", "wandb"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.metrics:
        settings["metrics"] = args.metrics.split(",")
    if not settings.get("source") or not settings.get("target"):
        parser.error("give the two networks: --source A --target B (or source:/target: in the config)")

    import json
    import re
    import time

    from symstitch.report import write_report
    from symstitch.sweep import write_json_atomic

    # one result file per (pair, metric), the records of an alignment sweep's cells, so `symstitch report` makes
    # the files and figures; a file of the same pair and settings is reused, one of other settings refused
    out = Path(settings["out"])
    slug = lambda ref: re.sub(r"[^A-Za-z0-9._-]+", "_", str(ref)).strip("_")[-80:]  # noqa: E731
    pair_dir = out / "cells" / f"{slug(settings['source'])}__{slug(settings['target'])}"
    arch = _arch(settings["source"])
    cells, todo = {}, []
    for metric in settings["metrics"]:
        cells[metric] = {"arch": arch, "source": settings["source"], "target": settings["target"], "metric": metric,
                         **{k: settings[k] for k in ("cka_mode", "points", "data", "split", "images")}}
        path = pair_dir / f"{metric}.json"
        if path.exists():
            if json.loads(path.read_text()).get("cell") != cells[metric]:
                raise ValueError(f"{path} holds {metric} of this pair with other settings; results are never "
                                 "overwritten: pass another --out")
            continue
        todo.append(metric)
    if todo:
        start = time.time()
        result = align_pair(settings["source"], settings["target"], todo, points=settings["points"],
                            cka_mode=settings["cka_mode"], data=settings["data"], split=settings["split"],
                            images=settings["images"], batch_size=settings["batch_size"],
                            device="cuda" if torch.cuda.is_available() else None)
        for metric, r in result.items():
            write_json_atomic(pair_dir / f"{metric}.json", {
                "experiment": "align", "key": f"{pair_dir.name}/{metric}", "cell": cells[metric], "result": r,
                "seconds": round(time.time() - start, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
    else:
        print(f"align: every metric of this pair is in {pair_dir} already")
    report = write_report(out, out / "report", wandb=bool(settings["wandb"]))
    print(f"align: {out / 'report' / 'align.csv'}, heatmaps and {report}")
    return 0


def _arch(ref: str) -> str:
    from symstitch.checkpoints import classifier_spec, read_checkpoint
    from symstitch.stitching import resolve_model

    path = resolve_model(ref)
    return str(classifier_spec(read_checkpoint(path), path)["arch"])
