"""The stitching LightningModule: S(x) = B_{>p}(T(A_{≤p}(x))), only T trains (docs/method.md §2).

A (source) and B (target) are frozen: no gradients, eval mode throughout (BatchNorm running statistics never
change), parameters AND buffers bit-identical before and after stitching. G_σ stitches (``birkhoff``,
``softsort``) train in phases: relaxed for ``relaxed_epochs`` epochs, then
:meth:`~symstitch.stitch_layers.StitchLayer.harden` (Hungarian rounding: T becomes a true P·D), and the remaining
epochs tune only the scales and bias; evaluation always uses the hardened form (during the relaxed phase a hardened
copy of T is evaluated). The projection onto the constraint set runs in
:meth:`StitchingModule.on_after_optimizer_step`, called exactly once after every real optimizer step by a torch
optimizer step post-hook registered at fit start — so steps skipped by a mixed-precision GradScaler and
micro-batches of gradient accumulation do not count.

Evaluation under both protocols (:mod:`symstitch.stitching.record`): ``frozen`` uses B's own statistics;
``recalibrated`` (the paper's) first gives a deep copy of B (and of T's own BatchNorm, if any) the statistics of
every BatchNorm after the stitch, re-estimated in one no-grad pass of the stitched network over the
un-augmented training images (reset, ``momentum=None``: an exact average). The stored networks never change.

Several layers at one point train side by side (``layer`` a list): their outputs T_1(h) … T_K(h) stacked along
the batch pass through B's frozen suffix once, the loss is the sum of their losses (no parameter is shared, so each
layer gets exactly its own gradient), and each is hardened, recalibrated and evaluated on its own. Each layer draws
its start from the run's seed apart from the random stream that orders the batches, so it trains as it would alone.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from torchmetrics.classification import MulticlassAccuracy

from symstitch.batchnorm import reestimating
from symstitch.data import DataModule, LoaderData, TensorImageDataset, normalize_batch
from symstitch.library import check_same_data, load_pair, ref_identity, ref_text
from symstitch.lightning_adapters import find_unused_parameters
from symstitch.network import PointNetwork
from symstitch.stitch_layers import (STITCH_LAYERS, ChannelMatch, MonomialStitch, StitchLayer, build_stitch_layer,
                                     channels_last)
from symstitch.stitching.grammar import LayerSpec
from symstitch.stitching.prefix import PrefixCache
from symstitch.stitching.record import PROTOCOLS
from symstitch.symmetry import intertwiner_group
from symstitch.training import configure_schedule

#: training batches on which the data start and the trained relaxed form are compared before hardening
KEEP_START_BATCHES = 4


#: how much lower (relative) the loss of the relaxed phase's permutation must be to replace the data start's
KEEP_START_MARGIN = 0.01


#: source channels whose |cosine| over the training images is at least 1 − this are equal up to scale
DUPLICATE_TOLERANCE = 1e-4


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
            (also with options, ``lowrank:rank=4``: :class:`~symstitch.stitching.grammar.LayerSpec`); or a list of
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
            find_unused_parameters(strategy)
        # before configure_optimizers, which may already ask the fit loop for its train loader (step counts)
        if stage == "fit" and self.hparams.prefix_cache and self._uncached_train_set is None:
            self.source_net.to(self.trainer.strategy.root_device)
            self._cache_prefix(getattr(torch, self.hparams.prefix_cache))

    def teardown(self, stage: str) -> None:
        if self._uncached_train_set is not None:  # the DataModule gets its images back, also after an error
            self.trainer.datamodule.train_set, self._uncached_train_set = self._uncached_train_set, None

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
        # the sweep's cache (its next cells at this point reuse the entry), else one of this fit's own
        cache = PrefixCache.scoped() or PrefixCache()
        (layout, tuple_carry), rows = cache.get(key, lambda: self._compute_prefix(dm, dtype))
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
        suffix, layer = copy.deepcopy(self.target_net), copy.deepcopy(layer)
        with reestimating(suffix, layer) as norms:
            if norms:
                for h, carry in self._training_prefix():
                    suffix.forward_from(layer(h), self.point, carry)
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
