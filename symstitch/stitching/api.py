"""One stitch from Python: :func:`stitch` runs the LightningCLI path of ``symstitch fit`` (one cell of a stitch
sweep) with the same defaults (:data:`symstitch.defaults.STITCH_DEFAULTS`, seeded), so one stitch gives one number
whichever way it was asked for; :class:`StitchResult` is what it returns.

The networks run on their own data: their checkpoints carry the DataModule settings they were trained with
(:func:`symstitch.library.datamodule_settings`); other data is refused. Loaders a user has run the same stitch
through :class:`~symstitch.data.LoaderData` (``stitch(…, data=(train, test))``).
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import yaml

from symstitch import configs, defaults
from symstitch.cli import fit_in_process, option_value
from symstitch.data import DataModule, LoaderData
from symstitch.inputs import Normalize
from symstitch.io import dumps
from symstitch.library import ModelRef, load_pair, ref_text
from symstitch.stitch_layers import StitchLayer
from symstitch.stitching.grammar import LayerSpec
from symstitch.stitching.record import StitchRecord

def stitch_options(*, epochs: int = defaults.STITCH_DEFAULTS["epochs"],
                   relaxed_epochs: Optional[int] = defaults.STITCH_DEFAULTS["relaxed_epochs"],
                   lr: float = defaults.STITCH_DEFAULTS["lr"], init: str = defaults.STITCH_DEFAULTS["init"],
                   prefix_cache: Optional[str] = None) -> list[str]:
    """``symstitch fit`` options of one stitch, after its layer's config ``configs/stitch/<layer>.yaml`` (and
    before the networks, point, seed and folder): these settings, CSV logs only, no per-epoch validation (the
    result is the test split, measured once at the end), no checkpoint (the record keeps the learned layer)."""
    return ["--config", str(configs.path("logger/csv.yaml")), "--trainer.max_epochs", option_value(epochs),
            "--model.init_args.relaxed_epochs", option_value(relaxed_epochs), "--model.init_args.init", init,
            "--model.init_args.optimizer.init_args.lr", option_value(lr),
            *(["--model.init_args.prefix_cache", prefix_cache] if prefix_cache else []),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0"]


@dataclass
class StitchResult:
    """What :func:`stitch` returns: penalties in points of accuracy, frozen (``penalty_pts``) and recalibrated
    (``penalty_recalibrated_pts``) where that protocol ran; ``permutation`` where the layer has one, and
    ``unidentifiable``, the source channels no stitch could place (``{"dead": [...], "duplicates": [[i, j], ...]}``,
    G stitches)."""

    point: str
    layer_name: str
    penalty_pts: Optional[float]
    stitched_acc: Optional[float]
    source_acc: float
    target_acc: float
    layer: StitchLayer = field(repr=False)
    permutation: Optional[list[int]] = None
    description: dict = field(default_factory=dict, repr=False)
    run_dir: Optional[str] = None
    penalty_recalibrated_pts: Optional[float] = None
    stitched_recalibrated_acc: Optional[float] = None
    unidentifiable: Optional[dict] = None

    def to_json(self) -> str:
        return dumps({k: v for k, v in asdict(self).items() if k != "layer"})


def stitch(
    source: ModelRef,
    target: ModelRef,
    point: str,
    layer: Union[str, Sequence[str]] = "birkhoff",
    *,
    epochs: int = defaults.STITCH_DEFAULTS["epochs"],
    relaxed_epochs: Optional[int] = defaults.STITCH_DEFAULTS["relaxed_epochs"],
    lr: float = defaults.STITCH_DEFAULTS["lr"],
    init: str = defaults.STITCH_DEFAULTS["init"],
    seed: int = defaults.STITCH_DEFAULTS["seed"],
    prefix_cache: Optional[str] = None,
    layer_kwargs: Optional[dict[str, Any]] = None,
    data: Optional[Union[DataModule, dict, LoaderData, tuple[Iterable[Any], Iterable[Any]]]] = None,
    normalize: Optional[Normalize] = None,
    run_dir: Optional[Union[str, Path]] = None,
    fit_args: tuple[str, ...] = (),
) -> Union[StitchResult, list[StitchResult]]:
    """Stitch ``source`` into ``target`` at ``point`` and evaluate on the test split, from Python.

    The same LightningCLI path and defaults as ``symstitch stitch`` (one cell of it), seeded: the same arguments
    give the same number both ways. ``source``/``target``: checkpoints or library entries, ``nn.Module``\ s in
    memory, or any other reference of :mod:`symstitch.library` (class path + state dict, ``timm:<name>``); a
    network outside the zoo has no saved data settings, so its data is ``data`` (default: digits). ``layer_kwargs``: the
    layer's options (replacing those of ``configs/stitch/<layer>.yaml``). ``data``: None (the
    networks' own, from their checkpoints), a dict of DataModule settings, or a DataModule (its settings are
    used); other data than the networks' is refused. ``run_dir``: where the CSV logs go (a temporary folder by
    default). ``fit_args``: any further ``symstitch fit`` options, e.g. ``("--trainer.accelerator", "gpu")``.

    ``layer`` may be a list (``["standard", "lowrank:rank=4", "birkhoff"]``): the layers train side by side in one
    pass of B's suffix (:class:`StitchingModule`), as a sweep trains the layers of one point, each with its own
    config's options (``layer_kwargs``, when given, replacing them for all), and a list of results comes back.
    Their configs must agree on everything else (optimizer, schedule, protocols).

    ``data`` may also be the loaders you have, ``(train_loader, test_loader)`` (or a
    :class:`~symstitch.data.LoaderData`), of (image, label) batches: T trains on the training loader's batches as
    they come (its batch size, its order — a shuffling loader draws it from the global random state, which
    ``seed`` fixes — and its augmentation, if any), the recalibrated protocol re-estimates the statistics in one
    no-grad pass over the training loader, and every accuracy is measured on the test loader. Float images are
    taken as the networks' inputs, already normalised; uint8 images are normalised as
    :func:`~symstitch.metrics.similarity_matrix` normalises them, ``(x / 255 − mean) / std`` per channel, by
    ``normalize`` (a (mean, std) pair on the 0..1 scale, a :class:`~symstitch.inputs.Normalization` or any
    callable), by default by the normalisation the loader's dataset carries (the DataModule's loaders carry
    theirs), else an error at the first batch. A batch that is not (image, label) is an error naming what came.
    Whether the loaders hold the networks' own data is not checked. Loaders stay in this process: a run on
    several devices (DDP) is refused (use data settings there), and so is ``prefix_cache``.
    """
    loaders = _loader_data(data, normalize)
    settings = {} if loaders is not None else dict(data.hparams) if isinstance(data, DataModule) else dict(data or {})
    data_args = [a for k, v in settings.items() for a in (f"--data.{k}", option_value(v))]
    specs = [LayerSpec.parse(name) for name in ([layer] if isinstance(layer, str) else layer)]  # unknown: the list
    side_by_side = [] if isinstance(layer, str) else ["--model.init_args.layer", json.dumps(_side_by_side(specs, layer_kwargs)),
                                                      "--model.init_args.layer_kwargs", "null"]
    with tempfile.TemporaryDirectory(prefix="symstitch-stitch-") as tmp:
        folder = Path(run_dir) if run_dir is not None else Path(tmp)
        load_pair(source, target, point)  # an unknown point (the nearest names) or mismatched widths: one clear error
        cli = fit_in_process(["--config", str(configs.path(f"stitch/{specs[0].name}.yaml")),
                              *stitch_options(epochs=epochs, relaxed_epochs=relaxed_epochs, lr=lr, init=init,
                                              prefix_cache=prefix_cache),
                              *(["--model.init_args.layer", specs[0].label] if specs[0].options else []),
                              *(["--model.init_args.layer_kwargs", json.dumps(layer_kwargs)] if layer_kwargs else []),
                              *side_by_side, *data_args, *fit_args, "--model.source", ref_text(source),
                              "--model.target", ref_text(target), "--model.point", point,
                              "--seed_everything", str(seed), "--trainer.default_root_dir", str(folder)],
                             datamodule=loaders)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    results = []
    for k, spec in enumerate(specs):
        r = StitchRecord.from_metrics(metrics, cli.model.log_names[k], cli.model.summary(k))
        results.append(StitchResult(
            point=point, layer_name=spec.label, penalty_pts=r.penalty_pts("frozen"),
            stitched_acc=r.stitched_acc("frozen"), source_acc=r.source_acc, target_acc=r.target_acc,
            layer=cli.model.stitches[k], permutation=r.permutation, description=r.model,
            run_dir=str(folder) if run_dir is not None else None,
            penalty_recalibrated_pts=r.penalty_pts("recalibrated"),
            stitched_recalibrated_acc=r.stitched_acc("recalibrated"), unidentifiable=r.model.get("unidentifiable")))
    return results[0] if isinstance(layer, str) else results


def _side_by_side(specs: Sequence[LayerSpec], layer_kwargs: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``layer`` list of a side-by-side stitch from Python: each layer with the options of its config
    (``layer_kwargs`` replacing them when given); refused when the configs differ in anything else."""
    loaded = {spec.name: yaml.safe_load(configs.path(f"stitch/{spec.name}.yaml").read_text()) for spec in specs}
    shared = {}
    for name, config in loaded.items():  # what stitch() does not set itself
        rest = copy.deepcopy(config)
        init = rest.get("model", {}).get("init_args", {})
        for key in ("layer", "layer_kwargs", "relaxed_epochs", "init"):
            init.pop(key, None)
        init.get("optimizer", {}).get("init_args", {}).pop("lr", None)
        rest.get("trainer", {}).pop("max_epochs", None)
        shared[name] = json.dumps(rest, sort_keys=True)
    if len(set(shared.values())) > 1:
        raise ValueError(f"layers trained side by side share one training setup, but the configs of "
                         f"{', '.join(sorted(shared))} (configs/stitch/) differ in more than the layer's options: "
                         "stitch them one at a time")
    return [{"layer": spec.label,
             "layer_kwargs": layer_kwargs if layer_kwargs is not None else
             loaded[spec.name]["model"]["init_args"].get("layer_kwargs") or {}} for spec in specs]


def _loader_data(data: Any, normalize: Optional[Normalize]) -> Optional[LoaderData]:
    """``stitch()``'s ``data`` as a :class:`~symstitch.data.LoaderData` when it is loaders, else None (then
    ``normalize``, which only concerns loaders, must not be given)."""
    if isinstance(data, LoaderData):
        if normalize is not None:
            raise ValueError("normalize goes into the LoaderData (LoaderData(train, test, normalize=…)), not stitch()")
        return data
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"data as loaders is a pair (train_loader, test_loader); got {len(data)} items")
        return LoaderData(*data, normalize=normalize)
    if normalize is not None:
        raise ValueError("normalize applies to loaders (data=(train_loader, test_loader)); a DataModule and data "
                         "settings normalise their images themselves")
    return None
