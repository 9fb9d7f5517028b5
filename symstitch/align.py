"""The alignment experiment (paper §5, docs/method.md §3): similarity of every feature-point pair of two networks.

    symstitch align --config configs/align/digits.yaml --source A --target B

A and B are checkpoints or model-library entries ``<zoo>:<arch>/seed<k>``. One pass of the evaluation images
through each network (:func:`symstitch.metrics.similarity_matrix`) gives every metric for every pair
(point of A, point of B). A cell of :class:`AlignExperiment` is one pair of networks with all its metrics;
``symstitch align`` is such an experiment over one pair, and its report section (:mod:`symstitch.reports.align`)
turns the records into ``align.csv`` (tidy: point_a, point_b, metric, value), heatmaps and the diagonal bar chart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from symstitch.data import TensorImageDataset, batch_loader, normalize_batch
from symstitch.defaults import PAPER_METRICS
from symstitch.library import architecture, check_same_data, datamodule_for, load_model
from symstitch.metrics import METRICS, similarity_matrix
from symstitch.runner import EXPERIMENTS, PAIR_OPTIONS, Cell, PairExperiment, names

SPLITS = ("test", "val", "train")


def evaluation_loader(source: str, data: Optional[dict], split: str, images: Optional[int], batch_size: int) -> DataLoader:
    """Normalised float batches of the evaluation images: ``data`` (DataModule settings, which must be the
    networks' dataset) or the data ``source`` was trained on."""
    if split not in SPLITS:
        raise ValueError(f"split is one of {', '.join(SPLITS)}; got {split!r}")
    dm = datamodule_for(source, **(data or {}))
    check_same_data([source], dm)
    dm.setup()
    dataset = {"test": dm.test_set, "val": dm.val_set, "train": dm.train_set}[split]
    x, y = dataset.x, dataset.y
    if images:
        x, y = x[:images], y[:images]
    return batch_loader(TensorImageDataset(normalize_batch(x, dm.mean, dm.std, channels_last=False), y), batch_size)


def align_pair(source: str, target: str, metrics: Sequence[str], *, points: Any = "all", cka_mode: str = "exact",
               data: Optional[dict] = None, split: str = "test", images: Optional[int] = None,
               batch_size: int = 500, progress: bool = True, device: Optional[str] = None) -> dict[str, dict]:
    """``{metric: {"points_a", "points_b", "values" (rows: A's points; None where not computed), "errors"}}``."""
    check_same_data([source, target])
    net_a, net_b = load_model(source), load_model(target)
    if device:
        net_a, net_b = net_a.to(device), net_b.to(device)
    rows = similarity_matrix(net_a, net_b, evaluation_loader(source, data, split, images, batch_size), metrics,
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


@EXPERIMENTS.register("align")
class AlignExperiment(PairExperiment):
    """Paper §5 alignment: one cell per pair of networks, every metric and every feature-point pair in one pass
    of the evaluation data (``split``). The networks come from a model library (``zoo``, ``arch``, ``seeds``,
    ``pairs``) or are one pair (``source``, ``target``), which is what ``symstitch align`` writes."""

    name = "align"
    options = {**PAIR_OPTIONS, "metrics": list(PAPER_METRICS), "points": "all", "cka_mode": "exact", "data": {},
               "split": "test", "images": None, "batch_size": 500}

    def cells(self) -> list[Cell]:
        s = self.settings
        metrics = names(s["metrics"])
        for metric in metrics:
            METRICS.get(metric)
        if s["split"] not in SPLITS:
            raise ValueError(f"split is one of {', '.join(SPLITS)}; got {s['split']!r}")
        models, chosen, key = self.network_pairs()
        if self.missing():  # not trained yet: listed, not run (check() says which)
            arch = s["arch"]
        else:
            arch = architecture(next(iter(models.values())))
            for a, b in chosen:
                check_same_data([models[a], models[b]])
        return [Cell(f"{arch}/{key.format(a=a, b=b)}",
                     {"arch": arch, "source": models[a], "target": models[b], "source_seed": a, "target_seed": b,
                      "metrics": metrics, "cka_mode": s["cka_mode"], "points": s["points"], "split": s["split"],
                      "images": s["images"]})
                for a, b in chosen]

    def run_cell(self, cell: Cell, out: Path) -> Optional[dict]:
        s, p = self.settings, cell.params
        device = "cuda" if torch.cuda.is_available() else None
        return {"metrics": align_pair(p["source"], p["target"], p["metrics"], points=s["points"],
                                      cka_mode=s["cka_mode"], data=s["data"], split=s["split"], images=s["images"],
                                      batch_size=s["batch_size"], progress=False, device=device)}
