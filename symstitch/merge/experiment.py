"""The merge experiment (docs/method.md §7): align B to A, interpolate, measure the barrier.

    symstitch merge --source A --target B                    (one pair: every alignment side by side)
    symstitch sweep --config experiments/merge_resnet20_digits.yaml

A cell is one pair of networks under one alignment: ``none`` (B as it is), or ``permutations`` / ``full`` (the
whole intertwiner group) found by a method (``activation``, ``weight``, ``stitch``). It records the loss and
accuracy of θ(λ) on the test images at every λ for each BatchNorm mode (interpolated, re-estimated on the
training images), the barriers, the alignment's summary, and saves the midpoint network θ(½) (BatchNorm
re-estimated where it has any) as ``midpoint.ckpt`` in its folder: a checkpoint every other command takes (a
network outside the zoo: ``midpoint.pt``, a state dict, and ``midpoint.yaml``, the reference that loads it).
The report section is :mod:`symstitch.reports.merge`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from symstitch.align import evaluation_loader
from symstitch.batchnorm import batch_norms
from symstitch.checkpoints import classifier_spec, read_checkpoint
from symstitch.io import write_json
from symstitch.library import (architecture, check_same_data, datamodule_settings, load_model, model_spec,
                               resolve_model)
from symstitch.merge.alignment import align
from symstitch.merge.methods import METHODS
from symstitch.merge.path import BN_MODES, interpolate, merge_path, reestimate_batchnorm
from symstitch.merge.sites import GROUP_CHOICES
from symstitch.runner import EXPERIMENTS, PAIR_OPTIONS, Cell, CellRecord, PairExperiment, names


def _plain(net: nn.Module) -> nn.Module:
    """The module a reference's weights belong to: the model a wrapper (:class:`~symstitch.graph.GraphNet`) holds as
    its submodule ``model`` when the wrapper holds nothing else, else the network itself."""
    inner = getattr(net, "model", None)
    if isinstance(inner, nn.Module) and {f"model.{k}" for k in inner.state_dict()} == set(net.state_dict()):
        return inner
    return net


def save_merged(net: nn.Module, like: str, folder: Path, stem: str = "midpoint", info: Optional[dict] = None) -> Path:
    """Save a merged network where every command finds it: for a zoo network a classifier checkpoint
    ``<stem>.ckpt`` with A's architecture and data settings (``info`` under ``merged``); otherwise ``<stem>.pt``
    (a state dict) and ``<stem>.yaml``, the model reference on one line (A's class path and options, this state
    dict: ``--source "$(cat midpoint.yaml)"``). The path to pass to other commands (or to read) is returned."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = model_spec(like)
    if spec is None:
        ckpt = read_checkpoint(resolve_model(like))
        out = {"state_dict": {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()},
               "hyper_parameters": ckpt["hyper_parameters"], "merged": dict(info or {})}
        if "datamodule_hyper_parameters" in ckpt:
            out["datamodule_hyper_parameters"] = ckpt["datamodule_hyper_parameters"]
        path = folder / f"{stem}.ckpt"
        tmp = path.with_suffix(".ckpt.tmp")
        torch.save(out, tmp)
        tmp.replace(path)
        return path
    if spec.kind == "memory":
        raise ValueError("an in-memory network has no reference to save a merged copy under; save its state dict "
                         "yourself (al.apply(b).state_dict())")
    weights = folder / f"{stem}.pt"
    torch.save({k: v.detach().cpu() for k, v in _plain(net).state_dict().items()}, weights)
    key = "class_path" if spec.kind == "class" else "timm"
    ref = {key: spec.target, **({"init_args": spec.init_args} if spec.init_args else {}),
           **({"graph": spec.graph} if spec.graph else {}), "state_dict": str(weights)}
    path = folder / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(ref, sort_keys=False, default_flow_style=True, width=10_000))  # one line
    return path


def family(ref: str) -> str:
    """How the report names a network's family: its architecture, with its width where that is not 1
    (``resnet20×4``)."""
    if model_spec(ref) is None:
        path = resolve_model(ref)
        width = classifier_spec(read_checkpoint(path), path)["arch_kwargs"].get("width", 1)
        return architecture(ref) + (f"×{width:g}" if width != 1 else "")
    return architecture(ref)


@EXPERIMENTS.register("merge")
class MergeExperiment(PairExperiment):
    """Cells: pairs × (``none``, and each of ``methods`` × the other ``groups``). Settings: ``methods``
    (activation, weight, stitch), ``groups`` (none, permutations, full), ``lambdas`` (how many λ, ≥ 3), ``bn``
    (BatchNorm modes), ``data`` (DataModule settings; default the networks' own), ``match_images`` (training
    images for activation matching and BatchNorm re-estimation; default all), ``test_images``, ``batch_size``,
    ``max_iter`` and ``seed`` (weight matching), ``stitch_epochs`` (stitch method), ``save_midpoint``."""

    name = "merge"
    options = {**PAIR_OPTIONS, "methods": ["activation"], "groups": list(GROUP_CHOICES), "lambdas": 11,
               "bn": list(BN_MODES), "data": {}, "match_images": None, "test_images": None, "batch_size": 250,
               "max_iter": 100, "seed": 0, "stitch_epochs": 2, "save_midpoint": True}

    def cells(self) -> list[Cell]:
        s = self.settings
        methods, groups, modes = names(s["methods"]), names(s["groups"]), names(s["bn"])
        for method in methods:
            METHODS.get(method)
        bad = [g for g in groups if g not in GROUP_CHOICES] + [m for m in modes if m not in BN_MODES]
        if bad:
            raise ValueError(f"unknown group or BatchNorm mode {', '.join(bad)}; groups: {', '.join(GROUP_CHOICES)}; "
                             f"bn: {', '.join(BN_MODES)}")
        if int(s["lambdas"]) < 3:
            raise ValueError(f"lambdas is how many values of λ (at least 3); got {s['lambdas']}")
        models, chosen, key = self.network_pairs()
        if self.missing():
            arch = label = s["arch"]
        else:
            arch, label = architecture(next(iter(models.values()))), family(next(iter(models.values())))
            for a, b in chosen:
                check_same_data([models[a], models[b]])
        alignments = [("none", "none")] * ("none" in groups) + [(m, g) for m in methods for g in groups if g != "none"]
        return [Cell(f"{arch}/{key.format(a=a, b=b)}/{group if group == 'none' else f'{method}-{group}'}",
                     {"arch": arch, "family": label, "source": models[a], "target": models[b], "source_seed": a, "target_seed": b,
                      "method": method, "group": group})
                for a, b in chosen for method, group in alignments]

    def _loaders(self, source: str) -> tuple[Any, Any]:
        s = self.settings
        train = evaluation_loader(source, s["data"], "train", s["match_images"], s["batch_size"])
        test = evaluation_loader(source, s["data"], "test", s["test_images"], s["batch_size"])
        return train, test

    def wandb_fields(self, record: CellRecord) -> tuple[dict, dict]:
        """A cell as a W&B run: its settings, and per BatchNorm mode its barriers and midpoint accuracy."""
        r = record.result
        summary = {f"{what}/{mode}": value for what in ("barrier_loss", "barrier_acc_pts", "midpoint_acc")
                   for mode, value in (r.get(what) or {}).items()}
        return {**record.cell, "machine": record.machine}, {**summary, "seconds": record.seconds}

    def run_cell(self, cell: Cell, out: Path) -> Optional[dict]:
        s, p = self.settings, cell.params
        device = "cuda" if torch.cuda.is_available() else None
        a, b = load_model(p["source"]), load_model(p["target"])
        if device:
            a, b = a.to(device), b.to(device)
        train, test = self._loaders(p["source"])
        options: dict[str, Any] = {}
        if p["method"] == "activation":
            options = {"data": train}
        elif p["method"] == "weight":
            options = {"max_iter": int(s["max_iter"]), "seed": int(s["seed"])}
        elif p["method"] == "stitch":
            # the networks' own data (their checkpoints say which): in-memory networks would otherwise get digits
            options = {"epochs": int(s["stitch_epochs"]), "seed": int(s["seed"]),
                       "data": {**datamodule_settings(p["source"]), **(s["data"] or {})} or None}
        start = time.perf_counter()
        al = align(a, b, p["method"], p["group"], **options)
        align_seconds = time.perf_counter() - start
        b_aligned = al.apply(b)
        path = merge_path(a, b_aligned, test, train, count=int(s["lambdas"]), modes=names(s["bn"]), device=device)
        result = {**path.to_dict(), "alignment": al.summary(), "align_seconds": align_seconds,
                  "midpoint_acc": {m: path.midpoint(m) for m in path.acc},
                  "endpoint_acc": {m: [path.acc[m][0], path.acc[m][-1]] for m in path.acc}}
        if s["save_midpoint"]:
            mid = interpolate(a, b_aligned, 0.5)
            bn = "reestimated" if batch_norms(mid) else "interpolated"
            if bn == "reestimated":
                reestimate_batchnorm(mid, train, device=device)
            folder = self.cell_dir(out, cell)
            info = {"source": p["source"], "target": p["target"], "lambda": 0.5, "method": p["method"],
                    "group": p["group"], "batchnorm": bn}
            saved = save_merged(mid, p["source"], folder, info=info)
            write_json(folder / "alignment.json", {**al.summary(), "permutations": al.permutations(),
                                                    "scales": al.scales()})
            result["midpoint"] = str(saved.relative_to(out))
            result["midpoint_batchnorm"] = bn
        return result


__all__ = ["MergeExperiment", "save_merged"]
