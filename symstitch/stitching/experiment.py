"""The stitch experiment (docs/method.md §2; the paper's §4): pairs × stitch points × stitching layers × repeats,
one cell each, run by ``symstitch stitch`` and stitch sweeps through the LightningCLI path of ``symstitch fit``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

from symstitch.cli import check_args, fit_in_process
from symstitch.library import architecture, load_model, load_pair
from symstitch.models import MODELS
from symstitch.network import PointNetwork
from symstitch.runner import EXPERIMENTS, PAIR_OPTIONS, Cell, CellRecord, PairExperiment, launched_rank, names
from symstitch.stitching.grammar import LayerChoice, LayerSpec
from symstitch.stitching.prefix import PrefixCache
from symstitch.stitching.record import PROTOCOLS, StitchRecord, record_key

#: point-list keywords → the points they stand for
POINT_SETS: dict[str, Callable[[PointNetwork], Sequence[str]]] = {
    "all": lambda net: net.stitch_points,
    "inner": lambda net: net.inner_points,
}


def point_list(net: PointNetwork, points: Union[str, Sequence[str]]) -> list[str]:
    """The stitch points a sweep names, in forward order: point names and the keywords of :data:`POINT_SETS`
    (``all``: the cuts, ``inner``: the points inside ResNet blocks; ``[all, inner]``: the paper's 19 points of
    ResNet-20)."""
    order = net.split_points
    chosen = set()
    for name in names(points):
        if name in POINT_SETS:
            chosen.update(POINT_SETS[name](net))
        elif name in order:
            chosen.add(name)
        else:
            inner = f"; inner points: {', '.join(net.inner_points)}" if net.inner_points else ""
            raise ValueError(f"{type(net).__name__} has no stitch point {name!r}; valid stitch points: "
                             f"{', '.join(net.stitch_points)}{inner} (or {', '.join(POINT_SETS)})")
    return [p for p in order if p in chosen]


@EXPERIMENTS.register("stitch")
class StitchExperiment(PairExperiment):
    """Paper §4 stitching: pairs × stitch points × stitch layers × repeats, each cell ``symstitch fit`` with
    ``stitch_config`` (``{layer}`` replaced by the layer's name) plus ``fit_args``, seed = the repeat. The cells of
    one pair, point and repeat that train alike but for their layer run side by side in one fit (:meth:`groups`);
    each keeps its own record.

    The networks come from a model library (``zoo``, ``arch``, ``seeds``, ``pairs``) or are one explicit pair
    (``source``, ``target``: checkpoints or library entries), which is what ``symstitch stitch`` writes.

    A layer whose option lists candidate values, ``birkhoff:alpha=0.001|0.01|0.1|1|10``
    (:class:`~symstitch.stitching.grammar.LayerChoice`), is chosen on the validation split: one cell per candidate
    (key ``…/cv_<candidate>/…``, ``cell["select"]`` says which choice and value), each also evaluated on the
    held-out validation split after its fit (``val_…`` in its record); :mod:`symstitch.selection` chooses from
    the records. Such a sweep needs ``val_split`` > 0 in its data (in ``fit_args``: ``--data.val_split 0.1``, or
    the networks' own); it is refused before any cell runs when validation would use the test split."""

    name = "stitch"
    multi_process_cells = True
    options = {**PAIR_OPTIONS, "points": "all", "layers": ["standard", "birkhoff"], "repeats": 1,
               "stitch_config": "configs/stitch/{layer}.yaml", "fit_args": []}

    def cells(self) -> list[Cell]:
        s = self.settings
        # (spec, its part of the cell key, the choice it is a candidate of)
        specs: list[tuple[LayerSpec, str, Optional[dict]]] = []
        for layer in names(s["layers"]):
            choice = LayerChoice.parse(layer)
            if choice is None:
                spec = LayerSpec.parse(layer)
                specs.append((spec, spec.slug, None))
                continue
            values = list(choice.values)
            specs += [(spec, f"cv_{spec.slug}", {"layer": choice.label, "series": choice.series,
                                                 "option": choice.option, "value": value, "values": values})
                      for spec, value in zip(choice.candidates, values)]
        models, chosen, key = self.network_pairs()
        if not chosen:
            return []
        first = models[chosen[0][0]]
        if self.missing():  # not trained yet: the grid from the architecture (its points need no weights)
            net, arch = MODELS.build(s["arch"]), s["arch"]
            order = list(net.split_points)
        else:
            net = load_model(first)
            arch, order = architecture(first), list(net.split_points)
            for a, b in chosen:
                load_pair(models[a], models[b], order[0])  # same architecture, shapes and data, before any cell runs
        points = point_list(net, s["points"])
        cells = [
            Cell(f"{arch}/{key.format(a=a, b=b)}/{slug}/{point}/r{r}",
                 {"arch": arch, "source": models[a], "target": models[b], "source_seed": a, "target_seed": b,
                  "point": point, "point_index": order.index(point), "layer": spec.label, "repeat": r,
                  **({"select": select} if select else {})})
            # a point's cells one after the other: they share its prefix cache (see PrefixCache)
            for a, b in chosen for point in points for spec, slug, select in specs for r in range(int(s["repeats"]))
        ]
        twice = sorted(k for k, n in Counter(c.key for c in cells).items() if n > 1)
        if twice:
            raise ValueError(f"these layers make the same cell twice: {twice[0]} (a layer listed twice, or two "
                             "choices sharing a candidate)")
        return cells

    def _args(self, cell: Cell, cell_dir: Path) -> list[str]:
        p, spec = cell.params, LayerSpec.parse(cell.params["layer"])
        options = ["--model.init_args.layer_kwargs", json.dumps(spec.options)] if spec.options else []
        return ["--config", self.resolve(self.settings["stitch_config"].replace("{layer}", spec.name)),
                *self.fit_args(layer=spec.name), *options,
                "--model.source", p["source"], "--model.target", p["target"], "--model.point", p["point"],
                "--seed_everything", str(p["repeat"]), "--trainer.default_root_dir", str(cell_dir)]

    @staticmethod
    def _kind(cell: Cell) -> tuple[str, bool]:
        return cell.params["layer"], "select" in cell.params

    def check(self, cells: list[Cell]) -> None:
        """The networks exist; the arguments of each layer parse (once per layer config: layers that differ only in
        their options share the parse); a choice has a held-out validation split to choose on."""
        super().check(cells)
        self._configs: dict[tuple[str, bool], Any] = {}
        self._layer_kwargs: dict[tuple[str, bool], dict] = {}
        parsed: dict[tuple[str, bool], Any] = {}
        for kind in dict.fromkeys(self._kind(c) for c in cells):
            cell = next(c for c in cells if self._kind(c) == kind)
            spec = LayerSpec.parse(cell.params["layer"])
            if (spec.name, kind[1]) not in parsed:  # the layer's config with its own options
                bare = Cell(cell.key, {**cell.params, "layer": spec.name})
                parsed[spec.name, kind[1]] = check_args(["fit", *self._args(bare, Path("."))])
            config = self._configs[kind] = parsed[spec.name, kind[1]]
            if config is not None:  # a label's options replace the config's (as in a cell's arguments)
                self._layer_kwargs[kind] = dict(spec.options or config.model.init_args.layer_kwargs or {})
            select = cell.params.get("select")
            if select and config is not None and not float(config.data.val_split or 0) > 0:
                raise ValueError(f"{select['layer']}: choosing {select['option']} needs a held-out validation "
                                 f"split, but the data validates on the test split (val_split "
                                 f"{config.data.val_split}); add --data.val_split 0.1 (say) to fit_args")

    def _training(self, kind: tuple[str, bool]) -> Optional[str]:
        """What a cell of this kind trains with, its layer aside: its parsed settings without the layer, its
        options, the networks, the point, the seed and the folder (None when they were not parsed)."""
        config = getattr(self, "_configs", {}).get(kind)
        if config is None:
            return None
        settings = config.clone().as_dict()
        init = settings.get("model", {}).get("init_args", {})
        for key in ("layer", "layer_kwargs", "source", "target", "point"):
            init.pop(key, None)
        for key in ("seed_everything", "config"):  # the config files named: their settings are compared instead
            settings.pop(key, None)
        settings.get("trainer", {}).pop("default_root_dir", None)
        return json.dumps(settings, sort_keys=True, default=str)

    def groups(self, cells: Sequence[Cell]) -> list[list[Cell]]:
        """The layers of one pair, point and repeat train side by side, in one pass of B's frozen suffix (see
        :class:`StitchingModule`), when everything else they train with is the same; each layer still has its own
        cell and record. Cells whose settings differ otherwise, or were not parsed, run on their own."""
        groups: dict[tuple, list[Cell]] = {}
        for cell in cells:
            p, training = cell.params, self._training(self._kind(cell))
            key = ((p["source"], p["target"], p["point"], p["repeat"], "select" in p, training) if training is not None
                   else (cell.key,))
            groups.setdefault(key, []).append(cell)
        # one source and point after another: their groups share the prefix cache (a PrefixCache holds one)
        return sorted(groups.values(), key=lambda g: (g[0].params["source"], g[0].params["point_index"]))

    def _layer_entry(self, cell: Cell) -> dict[str, Any]:
        """A cell's layer as an entry of a side-by-side module's ``layer`` list: its label and the options its
        config and its label give it."""
        return {"layer": cell.params["layer"], "layer_kwargs": self._layer_kwargs[self._kind(cell)]}

    def run_cell(self, cell: Cell, out: Path) -> Optional[dict]:
        return (self.run_group([cell], out) or {}).get(cell.key)

    def run_group(self, cells: Sequence[Cell], out: Path) -> Optional[dict[str, dict]]:
        """One fit for the cells (one, or the layers of one point side by side): ``{key: record}``."""
        first = cells[0]
        arch, pair, _, *point, repeat = first.key.split("/")  # the layer's part of the key names the folder
        folder = self.cell_dir(out, first) if len(cells) == 1 else \
            Path(out, "runs", arch, pair, "side_by_side", *point, repeat)
        if folder.exists() and launched_rank() == 0:  # an attempt that never recorded (killed): kept, labelled
            aside = folder.with_name(f"{folder.name}.abandoned-{time.strftime('%Y%m%dT%H%M%S')}")
            folder.rename(aside)
            print(f"stitch: the logs of an attempt that did not finish moved to {aside}", flush=True)
        args = self._args(first, folder)
        if len(cells) > 1:
            args += ["--model.init_args.layer", json.dumps([self._layer_entry(c) for c in cells]),
                     "--model.init_args.layer_kwargs", "null"]
        candidate = "select" in first.params
        cli = fit_in_process(args, validate=candidate)
        run_dir = str(cli.trainer.log_dir or folder)  # the fit's own log folder (…/fit/version_0); every rank asks
        if not cli.trainer.is_global_zero:
            return None
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
        return {cell.key: StitchRecord.from_metrics(metrics, cli.model.log_names[k], cli.model.summary(k),
                                                    cli.metrics if candidate else None, run_dir).to_result()
                for k, cell in enumerate(cells)}

    def wandb_fields(self, record: CellRecord) -> tuple[dict, dict]:
        """A stitch cell's W&B run: the pair, point, layer, repeat, the layer's name and options and the protocols
        evaluated as config; each protocol's penalty and accuracies, as recorded, as summary."""
        config, summary = super().wandb_fields(record)
        spec = LayerSpec.parse(record.cell["layer"])
        protocols = [p for p in PROTOCOLS if summary.get(record_key("penalty", p)) is not None]
        return {**config, "layer_name": spec.name, "layer_options": spec.options, "protocols": protocols}, summary

    def scope(self) -> ContextManager[PrefixCache]:
        """One prefix cache for the sweep's run: the cells of one source and point, run one after another, compute
        A_{≤p}(x) once (:meth:`groups` orders them so); released when the run ends."""
        return PrefixCache().scope()
