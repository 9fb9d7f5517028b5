"""Model stitching (docs/method.md §2): S(x) = B_{>p}(T(A_{≤p}(x))), where only the stitching layer T trains.

A (source) and B (target) are trained networks of the same architecture, cut at the stitch point p. They are
frozen: no gradients, eval mode throughout (BatchNorm running statistics never change), parameters AND
buffers bit-identical before and after stitching. The stitching penalty is

    penalty(p) = (acc(A) + acc(B)) / 2 − acc(S),

all three measured on the same evaluation split with torchmetrics objects (exact under DDP), and reported in
points of accuracy (×100) as ``…/stitch/penalty_pts`` everywhere (logs, result files, records, tables).

G_σ stitches (``birkhoff``, ``softsort``) train in phases: relaxed for ``relaxed_epochs`` epochs, then
:meth:`~symstitch.stitch_layers.StitchLayer.harden` (Hungarian rounding: T becomes a true P·D) and the
remaining epochs fine-tune only the scales and bias. Evaluation always uses the hardened form: during the
relaxed phase a hardened copy of T is evaluated.

The projection onto the constraint set runs in :meth:`StitchingModule.on_after_optimizer_step`, called
exactly once after every real optimizer step by a torch optimizer step post-hook registered at fit start —
so steps skipped by a mixed-precision GradScaler and micro-batches of gradient accumulation do not count.

Two evaluation protocols (docs/method.md §2), chosen by ``protocols``; each has its own accuracy and penalty:

- ``frozen``: S uses B's own BatchNorm running statistics (``…/stitch/acc``, ``…/stitch/penalty_pts``);
- ``recalibrated`` (the paper's): before each evaluation, a deep copy of B (and of T's own BatchNorm, if any)
  gets the running statistics of every BatchNorm after the stitch re-estimated — reset, ``momentum=None`` (an
  exact average), one no-grad pass of the stitched network over the un-augmented training images in train
  mode with T in its evaluated (hardened) form — and S is evaluated with that copy
  (``…/stitch_recalibrated/acc``, ``…/stitch_recalibrated/penalty_pts``). The stored networks never change.

The networks run on their own data: their checkpoints carry the DataModule settings they were trained with
(:func:`symstitch.library.datamodule_settings`); a DataModule of another dataset is refused at setup. Loaders a
user has run the same stitch through :class:`~symstitch.data.LoaderData` (``stitch(…, data=(train, test))``):
T trains on the training loader's batches as they come, the recalibration pass runs over that loader, and the
accuracies are measured on the test loader.

Several layers at one point train side by side (``layer`` a list): their outputs T_1(h) … T_K(h) stacked along
the batch pass through B's frozen suffix once, the loss is the sum of their losses (no parameter is shared, so each
layer gets exactly its own gradient), and each is hardened, recalibrated and evaluated on its own. Each layer draws
its start from the run's seed apart from the random stream that orders the batches, so it trains as it would alone
(bit for bit on the CPU path it was checked on). A stitch sweep trains the layers of each (pair, point, repeat) so:
one pass of B's suffix per step instead of K, one set-up, one evaluation of A and B.

:func:`stitch` (Python) and :class:`StitchExperiment` (``symstitch stitch``, stitch sweeps) run the same
LightningCLI path with the same defaults (:data:`symstitch.configs.STITCH_DEFAULTS`, seeded), so one stitch gives
one number whichever way it was asked for.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics.classification import MulticlassAccuracy

from symstitch import configs
from symstitch.cli import check_args, fit_in_process, option_value
from symstitch.data import DataModule, LoaderData, TensorImageDataset, normalize_batch
from symstitch.io import dumps
from symstitch.inputs import Normalize
from symstitch.library import ModelRef, architecture, check_same_data, load_model, load_pair, ref_identity, ref_text
from symstitch.network import PointNetwork
from symstitch.runner import EXPERIMENTS, PAIR_OPTIONS, Cell, CellRecord, PairExperiment, launched_rank, names
from symstitch.stitch_layers import (STITCH_LAYERS, ChannelMatch, LayerChoice, LayerSpec, MonomialStitch,
                                     StitchLayer, build_stitch_layer, channels_last)
from symstitch.symmetry import intertwiner_group
from symstitch.training import configure_schedule


#: training batches on which the data start and the trained relaxed form are compared before hardening
KEEP_START_BATCHES = 4
#: how much lower (relative) the loss of the relaxed phase's permutation must be to replace the data start's
KEEP_START_MARGIN = 0.01
#: source channels whose |cosine| over the training images is at least 1 − this are equal up to scale
DUPLICATE_TOLERANCE = 1e-4

#: evaluation protocol → the name its accuracy and penalty are logged under (``test/<name>/penalty_pts``)
PROTOCOLS = {"frozen": "stitch", "recalibrated": "stitch_recalibrated"}

class SharedPrefix:
    """The last prefix cache built in this process: the cells of a stitch sweep at one (source, point) — one per
    stitching layer and repeat, run one after the other — compute A_{≤p}(x) once.

    One entry at most (host memory holds one point's activations, the old entry is dropped before the new one is
    computed), and kept after a fit only while ``keep`` is set: a stitch sweep sets it for its cells and releases
    the entry when they are done, so a single fit (``stitch()``, ``symstitch fit``) leaves nothing behind."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.entry: Optional[tuple[tuple[list, bool], torch.Tensor]] = None
        self.keep = False

    def get(self, key: tuple, compute: Callable[[], tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
        if key != self.key:
            self.release()
            self.entry, self.key = compute(), key
        return self.entry

    def fit_done(self) -> None:
        if not self.keep:
            self.release()

    def release(self) -> None:
        self.key = self.entry = None


SHARED_PREFIX = SharedPrefix()


def _freeze(net: PointNetwork) -> PointNetwork:
    net.requires_grad_(False)
    return net.eval()


class StitchingModule(pl.LightningModule):
    """Trains a stitching layer between a frozen source prefix and a frozen target suffix.

    Args:
        source: source network A: a classifier checkpoint, a model-library entry ``<zoo>:<arch>/seed<k>``, any
            network by class path with a state dict (``{class_path: torchvision.models.resnet18, init_args:
            {num_classes: 10}, state_dict: a.pt}``, also as a YAML string), ``timm:<name>``, or an ``nn.Module``
            (from Python; see :mod:`symstitch.library`).
        target: target network B, likewise.
        point: the stitch point p: a cut (``net.stitch_points``) or an inner point (``net.inner_points``, a
            ResNet block's ``act1``), where B's block continues from T(h) while its shortcut takes A's block
            input; for networks outside the zoo any point of :class:`~symstitch.graph.GraphNet` (at a point that
            is not a cut, B continues from T(h) and A's carry). The G stitches (``birkhoff``, ``softsort``) take
            the group of the activation at the point and refuse a point without one.
        layer: stitching layer by registry name: ``standard``, ``birkhoff``, ``softsort``, ``lasso``, ``lowrank``
            (also with options, ``lowrank:rank=4``: :class:`~symstitch.stitch_layers.LayerSpec`); or a list of
            such names: several layers T_1 … T_K at the one point, trained side by side on the same batches in one
            pass of B's frozen suffix (their outputs stacked along the batch, the loss the sum of their losses),
            each evaluated, hardened and recalibrated on its own — what a sweep does with the layers of one point.
            An entry may carry its own options: ``{layer: birkhoff, layer_kwargs: {alpha: 0.1}}``.
        layer_kwargs: the layer's options (e.g. ``{alpha: 0.01, projection: euclidean}``, ``{rank: 8}``,
            ``{norm: before}``); for several layers, the options every layer takes before its own.
        relaxed_epochs: epochs before ``harden()`` for layers that have a hardened form (then fine-tuning);
            ``None`` hardens only at the end of fit.
        init: ``random`` (the layer's own start) or ``data``: the layer's data-driven start from A's and B's
            activations on a few training batches (least squares for ``standard``/``lasso``, channel
            matching for ``birkhoff``); a layer without one (``lowrank``, ``softsort``) keeps its own start,
            and the result says which start was used (``init``).
        optimizer, scheduler: for the stitching layer's parameters.
        prefix_cache: ``None`` (default), or the dtype (``float32``, ``bfloat16``) of a cache of A_{≤p}(x) for
            every training image, computed once at fit start: training then skips the frozen prefix and
            augmentation (the stitch sees the un-augmented training images). Validation and test still run
            the whole source, stitched and target networks on the evaluation images. Needs the package's
            :class:`~symstitch.data.DataModule`; the cache lives in host memory (N·C·H·W values).
        protocols: the evaluation protocols to report (see the module docstring): ``frozen``, ``recalibrated``
            or both. ``recalibrated`` costs one pass of the training images through the stitched network per
            evaluation: the DataModule's un-augmented training images, or one pass over the training loader of a
            :class:`~symstitch.data.LoaderData` (its batches as they come; its random order, if any, drawn
            without moving the run's random state).

    Several layers log and report under ``stitch[<layer>]`` (``test/stitch[lowrank:rank=4]/penalty_pts``); one
    layer under ``stitch``, as above. :attr:`stitch` is the one layer; :attr:`stitches` all of them.

    Data: the package's :class:`~symstitch.data.DataModule`, or loaders you have wrapped in a
    :class:`~symstitch.data.LoaderData` (``trainer.fit(module, datamodule=LoaderData(train_loader,
    test_loader))``; (image, label) batches, float images taken as normalised, uint8 images normalised).
    """

    def __init__(
        self,
        source: Union[str, dict],
        target: Union[str, dict],
        point: str,
        layer: Union[str, list[Union[str, dict[str, Any]]]] = "birkhoff",
        layer_kwargs: Optional[dict[str, Any]] = None,
        relaxed_epochs: Optional[int] = None,
        init: Literal["random", "data"] = "random",
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: Optional[LRSchedulerCallable] = None,
        prefix_cache: Optional[Literal["float32", "bfloat16"]] = None,
        protocols: Sequence[Literal["frozen", "recalibrated"]] = ("frozen",),
    ):
        super().__init__()
        # in-memory networks are saved by their memory:<n> names (a module among the hyper-parameters cannot be
        # checkpointed); mappings as one line of text
        source, target = (r if isinstance(r, str) else ref_text(r) for r in (source, target))
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.source_net, self.target_net = (_freeze(n) for n in load_pair(source, target, point))
        self.point = point
        entries = [{"layer": e} if isinstance(e, str) else dict(e) for e in ([layer] if isinstance(layer, str) else layer)]
        specs = [LayerSpec.parse(e["layer"]) for e in entries]
        labels = [spec.label for spec in specs]
        if not specs or len(set(labels)) != len(labels):
            raise ValueError(f"layer is one stitching layer or a list of distinct ones; got {layer!r}")
        channels = self.source_net.point_channels(point)
        try:
            activation = self.source_net.point_activation(point)
        except ValueError:
            if any(issubclass(STITCH_LAYERS.get(spec.name), MonomialStitch) for spec in specs):
                raise  # a G stitch needs the group at the point: the reason
            activation = "none"  # an unconstrained layer: the activation only labels it
        #: the group of the activation at the point (None where there is none): which source channels can swap
        self.group = intertwiner_group(activation) if activation != "none" else None
        # every layer draws its start from the run's seed, apart from the random stream that orders the batches:
        # a layer starts alike alone or beside others, and every layer of a sweep sees the same batches
        seed, layers = torch.initial_seed(), []
        for spec, entry in zip(specs, entries):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                layers.append(build_stitch_layer(spec.name, channels, activation=activation,
                                                 **{**(layer_kwargs or {}), **(entry.get("layer_kwargs") or {}),
                                                    **spec.options}))
        #: the stitching layers T_1 … T_K (one, unless ``layer`` listed several), trained side by side
        self.stitches = torch.nn.ModuleList(layers)
        self.labels = labels
        if init not in ("random", "data"):
            raise ValueError(f"init is 'random' or 'data', got {init!r}")
        #: the start of each layer: a layer without a data-driven one (lowrank, softsort) keeps its own, so one
        #: setting serves a mixed sweep
        self.inits = [init if hasattr(t, "init_from_data") else "random" for t in layers]
        self.optimizer, self.scheduler = optimizer, scheduler
        unknown = sorted(set(protocols) - set(PROTOCOLS))
        if unknown or not protocols:
            raise ValueError(f"protocols are some of {', '.join(PROTOCOLS)}; got {list(protocols)}")
        self.protocols = [p for p in PROTOCOLS if p in protocols]
        num_classes = self.source_net.num_classes
        #: the name each layer's accuracy and penalty are logged under, per protocol
        self.log_names = [{p: PROTOCOLS[p] + ("" if len(layers) == 1 else f"[{label}]") for p in self.protocols}
                          for label in labels]
        self.accuracy = torch.nn.ModuleDict(
            {k: MulticlassAccuracy(num_classes, average="micro")
             for k in ("source", "target", *(_metric_key(p, k) for k in range(len(layers)) for p in self.protocols))}
        )
        if prefix_cache not in (None, "float32", "bfloat16"):
            raise ValueError(f"prefix_cache is None, 'float32' or 'bfloat16'; got {prefix_cache!r}")
        self._hooks: list = []
        self._uncached_train_set = None  # the DataModule's image train set while the cache replaces it
        # per layer, not registered submodules: the evaluated forms, the (copy of B, copy of T) with re-estimated
        # BatchNorm statistics, the data starts of G stitches kept in reserve, and how each choice went
        self.__dict__["_eval_layers"] = [None] * len(layers)
        self.__dict__["_recalibrated"] = [None] * len(layers)
        self.__dict__["_starts"] = [None] * len(layers)
        self.__dict__["_choices"] = [{} for _ in layers]

    @property
    def stitch(self) -> StitchLayer:
        """The stitching layer T (of a module with one)."""
        if len(self.stitches) != 1:
            raise AttributeError(f"this module trains {len(self.stitches)} layers side by side ({', '.join(self.labels)}): "
                                 "read them from .stitches")
        return self.stitches[0]

    # ------------------------------------------------------------------ frozen parts stay frozen
    def train(self, mode: bool = True):
        super().train(mode)
        self.source_net.eval()
        self.target_net.eval()
        return self

    # ------------------------------------------------------------------ forward
    def stitched(self, x: torch.Tensor, layer: Optional[StitchLayer] = None) -> torch.Tensor:
        """S(x) = B_{>p}(T(A_{≤p}(x))) (T: ``layer``, else the module's one layer); at an inner point B's block
        continues from T(h) and its shortcut from A's block input (the carry)."""
        with torch.no_grad():
            h, carry = self.source_net.split(x, self.point)
        return self.target_net.forward_from((layer or self.stitch)(h), self.point, carry)

    def _side_by_side(self, h: torch.Tensor, carry: Any) -> list[torch.Tensor]:
        """B_{>p}(T_k(h)) for every layer k in one pass of B's suffix: the K outputs stacked along the batch (the
        carry repeated alike), the logits split back."""
        if len(self.stitches) == 1:
            return [self.target_net.forward_from(self.stitches[0](h), self.point, carry)]
        k = len(self.stitches)
        stacked = torch.cat([t(h) for t in self.stitches])
        logits = self.target_net.forward_from(stacked, self.point, _repeat(carry, k))
        return list(logits.chunk(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stitched(x)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        # the networks' own data, or a clear refusal (a stitch on other images is a silent wrong result)
        check_same_data([self.hparams.source, self.hparams.target], self.trainer.datamodule)
        strategy = self.trainer.strategy
        if stage == "fit" and isinstance(strategy, DDPStrategy) and self.hparams.relaxed_epochs is not None:
            # harden() mid-fit stops the relaxed parameters (W, θ) from taking part in the loss; DDP wraps the
            # module after this hook and must then look for parameters without gradients
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)
        # before configure_optimizers, which may already ask the fit loop for its train loader (step counts)
        if stage == "fit" and self.hparams.prefix_cache and self._uncached_train_set is None:
            self.source_net.to(self.trainer.strategy.root_device)
            self._cache_prefix(getattr(torch, self.hparams.prefix_cache))

    def teardown(self, stage: str) -> None:
        if self._uncached_train_set is not None:  # the DataModule gets its images back, also after an error
            self.trainer.datamodule.train_set, self._uncached_train_set = self._uncached_train_set, None
            SHARED_PREFIX.fit_done()

    def on_fit_start(self) -> None:
        self.train()
        if "data" in self.inits and not self.trainer.ckpt_path:  # a resumed fit keeps its restored layers
            self._init_from_data()
        for opt in self.trainer.optimizers:
            self._hooks.append(opt.register_step_post_hook(lambda *_: self.on_after_optimizer_step()))

    def on_fit_end(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._harden_stitch()  # the result is always the exact evaluated form

    def on_after_optimizer_step(self) -> None:
        """Projection onto the constraint set: runs once after every real optimizer step."""
        for t in self.stitches:
            t.on_after_optimizer_step()

    def on_train_epoch_start(self) -> None:
        relaxed = self.hparams.relaxed_epochs
        if relaxed is not None and self.current_epoch >= relaxed:
            self._harden_stitch()

    @torch.no_grad()
    def _harden_stitch(self) -> None:
        """Harden every layer: T (Hungarian rounding of the relaxed permutation), after choosing between the permutation the
        relaxed phase found and that of the data-driven start, and note which source channels no method could
        place (:meth:`_unidentifiable`).

        The start of a G stitch from the data (channel matching, :class:`~symstitch.stitch_layers.ChannelMatch`)
        is already a scaled permutation, and for B = g·A it is g exactly; the relaxed phase can only lose that
        by drifting between channels that the suffix treats alike. When the two permutations differ, they are
        compared like with like: each with the scales the channel matching gives it (least squares per matched
        pair, no bias, nothing tuned on the task loss), by the cross-entropy of the stitched network on the first
        :data:`KEEP_START_BATCHES` batches of un-augmented training images. The start's permutation is kept
        unless the relaxed phase's is lower by more than :data:`KEEP_START_MARGIN` (relative); either way the
        scales and bias go on from where they are. (Comparing the trained form as it is, its scales and bias
        already tuned on the task loss, against the untuned start rewarded that tuning, not the permutation.)
        Every DDP rank compares on the same images with rank 0's statistics, so all decide alike."""
        for k, layer in enumerate(self.stitches):
            if layer.hardened:
                continue
            if isinstance(layer, MonomialStitch) and self.__dict__.get("_unidentifiable") is None:
                self.__dict__["_unidentifiable"] = self._unidentifiable()
            start, match = self._starts[k] or (None, None)
            if start is not None:
                found, begun = layer.permutation, start.permutation
                moved = int((found != begun).sum())
                kept = True
                if moved:
                    rival = start.fixed(found, match.scales(found))
                    exact = start.fixed(begun, match.scales(begun))
                    kept = bool(self._training_loss(rival) >= self._training_loss(exact) * (1 - KEEP_START_MARGIN))
                self._choices[k] = {"data_start_kept": kept, "relaxed_moved_channels": moved}
                if kept and moved:
                    layer.load_state_dict(start.state_dict())
            layer.harden()

    @torch.no_grad()
    def _unidentifiable(self) -> dict[str, list]:
        """Source channels at the point whose place no stitch can tell, from A's activations on every
        un-augmented training image: ``dead`` (zero on every image: whatever T sends them to, they carry
        nothing) and ``duplicates``, pairs [i, j] with channel j = d·channel i for a scale d of the point's group
        (|cosine| ≥ 1 − :data:`DUPLICATE_TOLERANCE`): swapping two such channels, scales adjusted, is the same
        map. Channel numbers are A's (the values of the permutation)."""
        C, largest, gram = self.stitches[0].channels, None, None
        for h, _ in self._training_prefix():
            X = channels_last(h, C)[0].reshape(-1, C)
            peak = X.abs().amax(0).double()
            largest = peak if largest is None else torch.maximum(largest, peak)
            product = (X.T @ X).double()
            gram = product if gram is None else gram + product
        if gram is None:
            return {"dead": [], "duplicates": []}
        gram, dead = gram.cpu(), (largest == 0).cpu()
        sq = gram.diagonal()
        cosine = gram / (sq[:, None] * sq[None, :]).sqrt().clamp_min(1e-300)
        collinear = torch.triu(cosine.abs() >= 1 - DUPLICATE_TOLERANCE, diagonal=1) & ~dead[:, None] & ~dead[None, :]
        duplicates = [[i, j] for i, j in collinear.nonzero().tolist()  # channel j = d·channel i, d = ⟨i, j⟩ / ‖i‖²
                      if self.group.allowed_scales(gram[i, j:j + 1] / sq[i], atol=1e-3)]
        return {"dead": dead.nonzero().flatten().tolist(), "duplicates": duplicates}

    def _training_loss(self, layer: StitchLayer) -> float:
        total, count = 0.0, 0
        for h, carry, y in self._training_prefix(with_labels=True, limit=KEEP_START_BATCHES):
            logits = self.target_net.forward_from(layer(h), self.point, carry)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            count += len(y)
        return total / max(count, 1)

    @torch.no_grad()
    def _init_from_data(self, batches: int = 4) -> None:
        """The data-driven start of every layer that has one, from A's and B's activations on ``batches`` training
        batches, drawn on a fork of the random state: the batches training sees next are the same with or without
        a data start, so layers trained alone or side by side see the same batches."""
        dm = self.trainer.datamodule
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if self._uncached_train_set is not None:  # training sees un-augmented images: so does the start
                images = self._uncached_train_set.x
                idx = torch.randperm(len(images))[: batches * dm.batch_size]
                h_a = self._from_cache(dm.train_set.x[idx].to(self.device))[0]
                x = normalize_batch(images[idx].to(self.device), dm.mean, dm.std, dm.channels_last)
                h_b = self.target_net.forward_to(x, self.point)
            else:
                h_a, h_b = [], []
                for i, (x, _) in enumerate(self._train_batches()):
                    if i == batches:
                        break
                    h_a.append(self.source_net.forward_to(x, self.point))
                    h_b.append(self.target_net.forward_to(x, self.point))
                h_a, h_b = torch.cat(h_a), torch.cat(h_b)
        for k, layer in enumerate(self.stitches):
            if self.inits[k] != "data":
                continue
            match = None
            if hasattr(layer, "init_from_match"):  # a G stitch: the channel matching, kept to judge rivals by
                match = ChannelMatch.of(h_a, h_b, layer.channels)
                layer.init_from_match(match)
            else:
                layer.init_from_data(h_a, h_b)
            # each rank saw its own batches: every rank starts from rank 0's fit (DDP never re-syncs weights)
            if dist.is_available() and dist.is_initialized():
                for tensor in [*layer.parameters(), *layer.buffers(), *(match.tensors() if match is not None else [])]:
                    dist.broadcast(tensor.data, src=0)
            if match is not None and not layer.hardened:  # its data start, a scaled permutation, in reserve
                self._starts[k] = (copy.deepcopy(layer), match)

    def _train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches ``(inputs, labels)`` on this device, in the loader's order: a DataModule's through its
        transfer hooks (augmentation and normalisation on the device), a :class:`~symstitch.data.LoaderData`'s as
        they come (normalised where uint8)."""
        dm = self.trainer.datamodule
        if isinstance(dm, LoaderData):
            yield from dm.batches("train", self.device)
            return
        for batch in dm.train_dataloader():
            yield self.trainer.strategy.batch_to_device(batch, self.device)

    @torch.no_grad()
    def _cache_prefix(self, dtype: torch.dtype) -> None:
        """Swap the DataModule's training images for A_{≤p}(x) (and the carry at an inner point) of each
        un-augmented training image.

        One flat row per image on the host, each (N, C, H, W) part stored as (H, W, C), so that a batch read back
        as (N, C, H, W) is channels_last. The DataModule passes floating-point batches through untouched;
        :meth:`teardown` restores the images.
        """
        dm = self.trainer.datamodule
        if not isinstance(dm, DataModule):
            raise ValueError("prefix_cache needs symstitch.data.DataModule (it reads its in-memory training images); "
                             "with other loaders, leave prefix_cache out")
        dm.setup()
        labels, key = dm.train_set.y, self._prefix_key(dm, dtype)
        (layout, tuple_carry), rows = SHARED_PREFIX.get(key, lambda: self._compute_prefix(dm, dtype))
        self.__dict__["_cache_layout"] = layout
        self.__dict__["_cache_tuple"] = tuple_carry  # from the entry: also when another fit computed it
        # kept for the module's own passes over the training images after the fit (the recalibration before the
        # final test), as long as the DataModule holds the same images
        self.__dict__["_cache"] = (key, rows)
        self._uncached_train_set = dm.train_set
        dm.train_set = TensorImageDataset(rows, labels)

    def _cached_rows(self, dm: DataModule) -> Optional[torch.Tensor]:
        """The cached A_{≤p}(x) of ``dm``'s training images: during the fit, and after it while ``dm`` holds the
        images they were computed from (on the same device, in the same normalisation); else None."""
        entry = self.__dict__.get("_cache")
        if entry is None:
            return None
        if self._uncached_train_set is not None:
            return entry[1]
        return entry[1] if self._prefix_key(dm, getattr(torch, self.hparams.prefix_cache)) == entry[0] else None

    def _compute_prefix(self, dm: DataModule, dtype: torch.dtype) -> tuple[tuple[list, bool], torch.Tensor]:
        """``((layout, tuple_carry), rows)``: the shapes of the stored parts (h, then the carry at an inner point),
        whether the carry is a tuple (a graph's: every tensor the rest of the network needs), and one flat row per
        training image."""
        images, parts = dm.train_set.x, []
        for i in range(0, len(images), dm.eval_batch_size):
            x = normalize_batch(images[i:i + dm.eval_batch_size].to(self.device), dm.mean, dm.std, dm.channels_last)
            h, carry = self.source_net.split(x, self.point)
            carries = [] if carry is None else list(carry) if isinstance(carry, tuple) else [carry]
            if not all(isinstance(t, torch.Tensor) for t in carries):
                raise ValueError(f"prefix_cache: the carry at {self.point!r} holds values that are not tensors")
            stored = [t.movedim(1, -1) if t.dim() == 4 else t for t in (h, *carries)]
            parts.append(torch.cat([t.flatten(1) for t in stored], dim=1).to("cpu", dtype))
        return ([tuple(t.shape[1:]) for t in stored], isinstance(carry, tuple)), torch.cat(parts)

    def _prefix_key(self, dm: DataModule, dtype: torch.dtype) -> tuple:
        """What the cached activations depend on: the source's stored weights (checkpoint path and its size and
        modification time), the point, the dtype, the device and the training images (their count, a
        fingerprint of their values, the normalisation)."""
        x = dm.train_set.x
        fingerprint = (tuple(x.shape), str(x.dtype), float(x.flatten()[:: max(1, x.numel() // 4096)].double().sum()),
                       int(dm.train_set.y.sum()))
        return (ref_identity(self.hparams.source), self.point, str(dtype), str(self.device), fingerprint,
                tuple(dm.mean), tuple(dm.std), dm.channels_last)

    def _from_cache(self, rows: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A batch of cached rows as ``(h, carry)``: float32, (N, C, H, W) views of (H, W, C) storage (channels
        last), the carry ``None`` at a cut."""
        parts, start = [], 0
        for shape in self._cache_layout:
            size = math.prod(shape)
            t = rows[:, start:start + size].reshape(len(rows), *shape).float()
            parts.append(t.movedim(-1, 1) if t.dim() == 4 else t)
            start += size
        if self.__dict__.get("_cache_tuple"):  # a graph's carry: every tensor the rest of the network needs
            return parts[0], tuple(parts[1:])
        return parts[0], (parts[1] if len(parts) > 1 else None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self._uncached_train_set is not None:  # x holds cached A_{≤p}(x)
            h, carry = self._from_cache(x)
        else:
            with torch.no_grad():
                h, carry = self.source_net.split(x, self.point)
        # each layer's own loss: their sum trains each on its own (no parameter is shared)
        loss = sum(F.cross_entropy(logits, y) + t.regularization()
                   for logits, t in zip(self._side_by_side(h, carry), self.stitches))
        self.log("train/loss", loss / len(self.stitches), prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for t in self.stitches for p in t.parameters() if p.requires_grad]
        return configure_schedule(self, self.optimizer(params), self.scheduler)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._prepare_evaluation()

    def on_test_epoch_start(self) -> None:
        self._prepare_evaluation()

    def _prepare_evaluation(self) -> None:
        for k, layer in enumerate(self.stitches):
            self._eval_layers[k] = self._hardened_layer(layer)
            if "recalibrated" in self.protocols and not self.trainer.sanity_checking:
                self._recalibrated[k] = self.recalibrate(self._eval_layers[k])

    @torch.no_grad()
    def recalibrate(self, layer: StitchLayer) -> tuple[PointNetwork, StitchLayer]:
        """Copies of B and of ``layer`` whose BatchNorm running statistics after the stitch are re-estimated on
        one pass of the un-augmented training images through the stitched network (the paper's protocol).

        Every BatchNorm of the copies is reset with ``momentum=None`` (a cumulative average: the exact mean over
        the pass) and put in train mode for the pass; the copy of B only ever runs ``forward_from(·, point)``,
        so its BatchNorms before the point are never used. Each DDP rank makes the same pass over all the
        training images, so every rank ends with the same statistics. The stored networks are untouched."""
        suffix, layer = copy.deepcopy(self.target_net).eval(), copy.deepcopy(layer).eval()
        norms = [m for net in (suffix, layer) for m in net.modules() if isinstance(m, _BatchNorm)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        if norms:
            for h, carry in self._training_prefix():
                suffix.forward_from(layer(h), self.point, carry)
        for norm in norms:
            norm.eval()
        return suffix, layer

    def _training_prefix(self, with_labels: bool = False, limit: Optional[int] = None) -> Iterator[Any]:
        """``(A_{≤p}(x), carry)`` of the un-augmented training images (the first ``limit`` batches, else all),
        batch by batch, with their labels if asked (from the prefix cache when it holds them); for a
        :class:`~symstitch.data.LoaderData`, of its training loader's batches as they come."""
        dm = self.trainer.datamodule
        if isinstance(dm, LoaderData):
            # a shuffling loader draws its order here: on a fork of the random state, so that this pass (each
            # evaluation, the choice before hardening) leaves the training's random stream where it was
            with torch.random.fork_rng(devices=[]):
                for i, (x, y) in enumerate(dm.batches("train", self.device)):
                    if i == limit:
                        break
                    h, carry = self.source_net.split(x, self.point)
                    yield (h, carry, y) if with_labels else (h, carry)
            return
        if not isinstance(dm, DataModule):
            raise ValueError("this needs symstitch.data.DataModule or symstitch.data.LoaderData (it reads the "
                             "training images)")
        dm.setup()
        rows = self._cached_rows(dm)  # the cache holds exactly these activations
        inputs, labels = (rows if rows is not None else dm.train_set.x), dm.train_set.y
        stop = len(inputs) if limit is None else min(len(inputs), limit * dm.eval_batch_size)
        for i in range(0, stop, dm.eval_batch_size):
            chunk = inputs[i:i + dm.eval_batch_size].to(self.device)
            if rows is not None:
                h, carry = self._from_cache(chunk)
            else:
                h, carry = self.source_net.split(normalize_batch(chunk, dm.mean, dm.std, dm.channels_last), self.point)
            yield (h, carry, labels[i:i + dm.eval_batch_size].to(self.device)) if with_labels else (h, carry)

    def _hardened_layer(self, layer: StitchLayer) -> StitchLayer:
        """The exact evaluated form of ``layer`` (a hardened copy while it is still relaxed)."""
        return layer if layer.hardened else self._hardened_copy(layer)

    @staticmethod
    def _hardened_copy(layer: StitchLayer) -> StitchLayer:
        layer = copy.deepcopy(layer)
        layer.harden()
        return layer.eval()

    def _evaluate(self, batch) -> None:
        x, y = batch
        with torch.no_grad():
            h, carry = self.source_net.split(x, self.point)
        outputs = {"source": self.source_net(x), "target": self.target_net(x)}
        for k in range(len(self.stitches)):
            if "frozen" in self.protocols:
                outputs[_metric_key("frozen", k)] = self.target_net.forward_from(self._eval_layers[k](h), self.point,
                                                                                 carry)
            if "recalibrated" in self.protocols and self._recalibrated[k] is not None:
                suffix, layer = self._recalibrated[k]
                outputs[_metric_key("recalibrated", k)] = suffix.forward_from(layer(h), self.point, carry)
        for name, logits in outputs.items():
            self.accuracy[name].update(logits, y)

    def _log_epoch(self, prefix: str) -> None:
        acc = {name: metric.compute() for name, metric in self.accuracy.items() if metric.update_called}
        for name in ("source", "target"):
            if name in acc:
                self.log(f"{prefix}{name}/acc", acc[name], sync_dist=False)
        for k, names in enumerate(self.log_names):
            for protocol, name in names.items():
                key = _metric_key(protocol, k)
                if key in acc:  # penalty in points: (acc(A) + acc(B)) / 2 − acc(S)
                    self.log(f"{prefix}{name}/acc", acc[key], sync_dist=False)
                    penalty_pts = 100 * ((acc["source"] + acc["target"]) / 2 - acc[key])
                    self.log(f"{prefix}{name}/penalty_pts", penalty_pts,
                             prog_bar=k == 0 and protocol == self.protocols[0], sync_dist=False)
        for metric in self.accuracy.values():
            metric.reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("")
        self._log_permutation()

    def _log_permutation(self) -> None:
        """The evaluated T of each G stitch (a scaled permutation matrix) as an image, for W&B dashboards."""
        if self.trainer.sanity_checking:
            return
        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not self.trainer.is_global_zero:
            return
        for k, layer in enumerate(self.stitches):
            if not hasattr(layer, "permutation"):
                continue
            T = (self._eval_layers[k] or layer).matrix().detach().abs().float().cpu()
            image = (T / T.max().clamp_min(1e-12)).numpy()
            key = "stitch/matrix" if len(self.stitches) == 1 else f"stitch[{self.labels[k]}]/matrix"
            for lg in loggers:
                lg.log_image(key, [image], step=self.global_step,
                             caption=[f"{self.labels[k]} at {self.point} (|T|, rows: target channels)"])

    def test_step(self, batch, batch_idx):
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test/")

    # ------------------------------------------------------------------ result
    def summary(self, k: Optional[int] = None) -> dict:
        """A learned layer, for result files: its description (permutation, scales, sparsity, rank), how its start
        went and the source channels no stitch can place (G stitches). ``k``: which layer; by default the one
        layer, or every layer by its label (``{"point", "layers": {label: …}}``) of a module with several."""
        if k is None and len(self.stitches) > 1:
            return {"point": self.point, "layers": {label: self.summary(i) for i, label in enumerate(self.labels)}}
        k = k or 0
        layer = self.stitches[k]
        unidentifiable = self.__dict__.get("_unidentifiable") if isinstance(layer, MonomialStitch) else None
        return {"point": self.point, "layer": self.labels[k], "init": self.inits[k], **self._choices[k],
                **layer.describe(), **({"unidentifiable": unidentifiable} if unidentifiable is not None else {})}


def _metric_key(protocol: str, k: int) -> str:
    """The accuracy metric of layer ``k`` under ``protocol`` (a ModuleDict key)."""
    return f"{PROTOCOLS[protocol]}_{k}"


def _repeat(carry: Any, k: int) -> Any:
    """A carry (None, a tensor, or a tuple of them) repeated k times along the batch."""
    if carry is None:
        return None
    if isinstance(carry, tuple):
        return tuple(_repeat(c, k) for c in carry)
    return carry.repeat(k, *([1] * (carry.dim() - 1))) if isinstance(carry, torch.Tensor) else carry


# ----------------------------------------------------------------------------------------------------------
# One stitch from Python, and the stitch experiment (``symstitch stitch``, stitch sweeps): one LightningCLI path


def stitch_options(*, epochs: int = configs.STITCH_DEFAULTS["epochs"],
                   relaxed_epochs: Optional[int] = configs.STITCH_DEFAULTS["relaxed_epochs"],
                   lr: float = configs.STITCH_DEFAULTS["lr"], init: str = configs.STITCH_DEFAULTS["init"],
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


def stitch_result(module: StitchingModule, metrics: dict[str, float], k: int = 0) -> dict[str, Any]:
    """Layer ``k`` of a finished stitch as a record: the penalty in points and the stitched accuracy of each
    protocol (``penalty_pts``/``stitched_acc`` frozen, ``penalty_recalibrated_pts``/``stitched_recalibrated_acc``
    recalibrated; None for a protocol not run), the two networks' accuracies, the learned layer."""
    summary = module.summary(k)
    result: dict[str, Any] = {"penalty_pts": None, "stitched_acc": None}
    for protocol, name in module.log_names[k].items():
        suffix = "" if protocol == "frozen" else f"_{protocol}"
        result[f"penalty{suffix}_pts"] = metrics[f"test/{name}/penalty_pts"]
        result[f"stitched{suffix}_acc"] = metrics[f"test/{name}/acc"]
    return {**result, "source_acc": metrics["test/source/acc"], "target_acc": metrics["test/target/acc"],
            "permutation": summary.get("permutation"), "model": summary}


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
    epochs: int = configs.STITCH_DEFAULTS["epochs"],
    relaxed_epochs: Optional[int] = configs.STITCH_DEFAULTS["relaxed_epochs"],
    lr: float = configs.STITCH_DEFAULTS["lr"],
    init: str = configs.STITCH_DEFAULTS["init"],
    seed: int = configs.STITCH_DEFAULTS["seed"],
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
        r = stitch_result(cli.model, metrics, k)
        results.append(StitchResult(
            point=point, layer_name=spec.label, penalty_pts=r["penalty_pts"], stitched_acc=r["stitched_acc"],
            source_acc=r["source_acc"], target_acc=r["target_acc"], layer=cli.model.stitches[k],
            permutation=r["permutation"], description=r["model"], run_dir=str(folder) if run_dir is not None else None,
            penalty_recalibrated_pts=r.get("penalty_recalibrated_pts"),
            stitched_recalibrated_acc=r.get("stitched_recalibrated_acc"), unidentifiable=r["model"].get("unidentifiable")))
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


def validation_result(module: StitchingModule, metrics: dict[str, float], k: int = 0) -> dict[str, Any]:
    """The final validation of layer ``k`` of a stitch (``val/…`` metrics of :func:`~symstitch.cli.fit_in_process`
    with ``validate``) as record keys: ``val_<key>`` of each key :func:`stitch_result` gives a test number."""
    result = {"val_source_acc": metrics["val/source/acc"], "val_target_acc": metrics["val/target/acc"]}
    for protocol, name in module.log_names[k].items():
        suffix = "" if protocol == "frozen" else f"_{protocol}"
        if f"val/{name}/acc" in metrics:
            result[f"val_penalty{suffix}_pts"] = metrics[f"val/{name}/penalty_pts"]
            result[f"val_stitched{suffix}_acc"] = metrics[f"val/{name}/acc"]
    return result


@EXPERIMENTS.register("stitch")
class StitchExperiment(PairExperiment):
    """Paper §4 stitching: pairs × stitch points × stitch layers × repeats, each cell ``symstitch fit`` with
    ``stitch_config`` (``{layer}`` replaced by the layer's name) plus ``fit_args``, seed = the repeat. The cells of
    one pair, point and repeat that train alike but for their layer run side by side in one fit (:meth:`groups`);
    each keeps its own record.

    The networks come from a model library (``zoo``, ``arch``, ``seeds``, ``pairs``) or are one explicit pair
    (``source``, ``target``: checkpoints or library entries), which is what ``symstitch stitch`` writes.

    A layer whose option lists candidate values, ``birkhoff:alpha=0.001|0.01|0.1|1|10``
    (:class:`~symstitch.stitch_layers.LayerChoice`), is chosen on the validation split: one cell per candidate
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
            # a point's cells one after the other: they share its prefix cache (see SharedPrefix)
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
        """The arguments of each layer parse (once per layer config: layers that differ only in their options share
        the parse); a choice has a held-out validation split to choose on."""
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
        # one source and point after another: their groups share the prefix cache (SharedPrefix holds one)
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
        SHARED_PREFIX.keep = True  # the next cells at this point reuse its prefix cache; after_run releases it
        cli = fit_in_process(args, validate=candidate)
        run_dir = str(cli.trainer.log_dir or folder)  # the fit's own log folder (…/fit/version_0); every rank asks
        if not cli.trainer.is_global_zero:
            return None
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
        return {cell.key: {**stitch_result(cli.model, metrics, k),
                           **(validation_result(cli.model, cli.metrics, k) if candidate else {}),
                           "run_dir": run_dir} for k, cell in enumerate(cells)}

    def after_run(self, out: Path, records: Sequence[CellRecord]) -> None:
        SHARED_PREFIX.keep = False
        SHARED_PREFIX.release()
        super().after_run(out, records)
