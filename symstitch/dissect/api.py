"""``dissect(network, point, concepts)``: network dissection of the units at one point (docs/method.md §6).

Two passes over the concept images, the network in eval mode and no gradients:

1. the activations a_u(x) at the point (at the feature map's own resolution) stream into :class:`TopQuantile`,
   which gives T_u, the (1 − q) quantile of each unit (exact, or an estimate with its error beyond the memory
   budget), and into each unit's top images (largest max activation);
2. the same activations, upsampled bilinearly to the mask size and compared with T_u, give the unit masks
   M_u(x), which :class:`IoUTally` sums against the concept labels.

The activations of pass 1 are kept for pass 2 where they fit in ``cache_budget`` numbers; otherwise the network
runs again. A (C, H, W) point is dissected as it is; a token point (L, C) where L is a square number g² is read
as a g×g grid of patches (the patch grid of ViT-like models without extra tokens), and other token counts are
refused unless ``grid`` says how to lay them out. ``transform`` (U×U) dissects M·a instead of a: the rotation
experiment's Q^α.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from symstitch.data import IMAGE_SIZE
from symstitch.dissect.concepts import Concept, ConceptSource
from symstitch.dissect.quantile import BUDGET, QuantileInfo, TopQuantile
from symstitch.dissect.rotation import rotate
from symstitch.dissect.tally import IoUTally, unit_masks
from symstitch.inputs import Normalization
from symstitch.io import write_atomic, write_json
from symstitch.library import ModelRef, datamodule_for, load_model, ref_text, trained_on
from symstitch.network import PointNetwork

Tensor = torch.Tensor

#: NetDissect-Lite's IoU of an interpretable unit (its q, 0.005, is each concept source's default_q)
IOU_THRESHOLD = 0.04
#: how many top images are kept per unit
TOP_IMAGES = 8

TALLY_COLUMNS = ["unit", "category", "label", "score"]


@dataclass
class Dissection:
    """The dissection of one point: thresholds, every IoU, and what follows from them.

    ``iou``: (U, C + 1), column c the concept numbered c (column 0 unused); ``top_images``/``top_scores``: (U,
    k) each unit's images with the largest max activation, best first; ``top_maps``: (U, k, h, w) the unit's
    activation maps on them (at the feature map's resolution); ``coverage``: (C + 1,) the fraction of the
    labelled pixels each concept covers."""

    network: str
    point: str
    source: str
    q: float
    iou_threshold: float
    concepts: list[Concept]
    categories: list[str]
    thresholds: Tensor
    iou: Tensor
    quantile: QuantileInfo
    top_images: Tensor
    top_scores: Tensor
    top_maps: Tensor
    coverage: Tensor
    feature_size: tuple[int, int]
    mask_size: tuple[int, int]
    images: int
    transform: str = ""
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def units(self) -> int:
        return self.iou.shape[0]

    def best(self) -> tuple[Tensor, Tensor]:
        """Each unit's best concept (numbers, (U,)) and its IoU: the unit's label."""
        score, label = self.iou[:, 1:].max(dim=1)
        return label + 1, score

    def best_in(self, category: str) -> tuple[Tensor, Tensor]:
        """Each unit's best concept among those whose primary category is ``category``, and its IoU."""
        in_cat = torch.tensor([False] + [c.category == category for c in self.concepts])
        if not in_cat.any():
            return torch.zeros(self.units, dtype=torch.long), torch.zeros(self.units, dtype=self.iou.dtype)
        masked = torch.where(in_cat, self.iou, torch.full_like(self.iou, -1.0))
        score, label = masked.max(dim=1)
        return label, score

    def ceilings(self) -> Tensor:
        """(C + 1,): the largest IoU any unit can reach with each concept. A unit's mask covers about a fraction q
        of the pixels and concept c a fraction cov_c, so IoU ≤ min(q, cov_c) / max(q, cov_c) (0 where c is
        absent): a concept whose ceiling is below the threshold cannot label an interpretable unit at this q."""
        q = torch.full_like(self.coverage, self.q)
        ceiling = torch.minimum(q, self.coverage) / torch.maximum(q, self.coverage)
        ceiling[self.coverage == 0] = 0.0
        return ceiling

    def unreachable(self) -> list[str]:
        """The concepts present in the data whose :meth:`ceilings` lie below the IoU threshold."""
        ceiling = self.ceilings()
        return [c.name for c in self.concepts if self.coverage[c.number] > 0 and ceiling[c.number] < self.iou_threshold]

    def interpretable(self) -> Tensor:
        """bool (U,): the units whose best IoU reaches the threshold."""
        return self.best()[1] >= self.iou_threshold

    def summary(self) -> dict[str, Any]:
        """The headline numbers: interpretable units, unique concepts among their labels (overall and per
        category), the concepts with how many units each."""
        label, _ = self.best()
        good = self.interpretable()
        labels = label[good].tolist()
        by_number = {c.number: c for c in self.concepts}
        per_category = {cat: len({n for n in labels if by_number[n].category == cat}) for cat in self.categories}
        counts: dict[str, int] = {}
        for n in labels:
            counts[by_number[n].name] = counts.get(by_number[n].name, 0) + 1
        return {"units": self.units, "interpretable": int(good.sum()), "unique_concepts": len(set(labels)),
                "unique_per_category": per_category,
                "units_per_concept": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}

    def headline(self) -> str:
        s = self.summary()
        return (f"{s['interpretable']} of {s['units']} units cover {s['unique_concepts']} concepts at IoU ≥ "
                f"{self.iou_threshold:g}")

    def rows(self) -> list[dict[str, Any]]:
        """``tally.csv``: per unit its label (best concept overall), category and score, then per category the
        best concept and its IoU (``<category>-label``, ``<category>-iou``)."""
        label, score = self.best()
        per_cat = {cat: self.best_in(cat) for cat in self.categories}
        name = {c.number: c for c in self.concepts}
        rows = []
        for u in range(self.units):
            concept = name[int(label[u])]
            row = {"unit": u, "category": concept.category, "label": concept.name, "score": float(score[u])}
            for cat, (lab, sc) in per_cat.items():
                row[f"{cat}-label"] = name[int(lab[u])].name if int(lab[u]) else ""
                row[f"{cat}-iou"] = float(sc[u]) if int(lab[u]) else 0.0
            rows.append(row)
        order = sorted(range(self.units), key=lambda u: (-rows[u]["score"], u))
        return [rows[u] for u in order]

    def unit_pictures(self, concepts: ConceptSource, units: int = 12, images: int = 4
                      ) -> list[tuple[str, Tensor, Tensor]]:
        """The best ``units`` units by IoU, each as (title, its top ``images`` images (k, 3, H, W), the unit's
        masks M_u on them at the images' size (k, H, W)): what a reader looks at to trust a label."""
        label, score = self.best()
        name = {c.number: c.name for c in self.concepts}
        pictures = []
        for u in sorted(range(self.units), key=lambda u: (-float(score[u]), u))[:units]:
            batch = concepts.get(self.top_images[u, :images].tolist())
            size = tuple(batch.images.shape[-2:])
            masks = unit_masks(self.top_maps[u, :images].unsqueeze(1), self.thresholds[u : u + 1], size)[:, 0]
            pictures.append((f"unit {u}: {name[int(label[u])]} (IoU {float(score[u]):.2f})", batch.images, masks))
        return pictures

    def columns(self) -> list[str]:
        return TALLY_COLUMNS + [f"{cat}-{what}" for cat in self.categories for what in ("label", "iou")]

    def record(self) -> dict[str, Any]:
        """The JSON record of a dissection (a sweep cell's result): settings, summary, thresholds, each unit's
        label and score, and how the quantile was found."""
        label, score = self.best()
        name = {c.number: c.name for c in self.concepts}
        return {"network": self.network, "point": self.point, "source": self.source, "q": self.q,
                "iou_threshold": self.iou_threshold, "transform": self.transform, "images": self.images,
                "feature_size": list(self.feature_size), "mask_size": list(self.mask_size),
                "quantile": {"exact": self.quantile.exact, "values": self.quantile.values,
                             "sampled": self.quantile.sampled, "level_error": self.quantile.level_error,
                             "method": self.quantile.describe()},
                **self.summary(), "headline": self.headline(), "unreachable": self.unreachable(),
                "absent": [c.name for c in self.concepts if self.coverage[c.number] == 0],
                "labels": [name[int(n)] for n in label], "scores": [float(s) for s in score],
                "thresholds": [float(t) for t in self.thresholds], "seconds": self.seconds, **self.settings}

    def write(self, out: Union[str, Path]) -> dict[str, Path]:
        """``tally.csv`` and ``dissection.json`` in ``out``; returns their paths."""
        import csv
        import io

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        tally = out / "tally.csv"
        write_atomic(tally, text.getvalue())
        record = out / "dissection.json"
        write_json(record, self.record())
        return {"tally": tally, "record": record}


def grid_of(activations: Tensor, grid: Optional[tuple[int, int]] = None, point: str = "") -> Tensor:
    """(B, U, h, w) from a point's output: as it is when 4-d; tokens (B, L, C) laid out as a ``grid`` (default:
    √L × √L where L is a square number); anything else refused with the reason."""
    if activations.dim() == 4:
        return activations
    if activations.dim() == 3:
        b, length, channels = activations.shape
        if grid is None:
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(f"point {point!r} has {length} tokens, not a square grid of patches: dissection "
                                 "needs each token's place in the image; pass grid=(rows, columns) where the "
                                 "model's patch grid is known (and drop extra tokens such as a class token first)")
            grid = (side, side)
        if grid[0] * grid[1] != length:
            raise ValueError(f"grid {grid[0]}×{grid[1]} does not hold the {length} tokens at point {point!r}")
        return activations.transpose(1, 2).reshape(b, channels, grid[0], grid[1])
    raise ValueError(f"point {point!r} gives activations of shape {tuple(activations.shape[1:])}: dissection "
                     "needs a (C, H, W) feature map or (L, C) tokens on a patch grid")


def activations_at(net: PointNetwork, point: str) -> Any:
    """A function x ↦ the output at ``point`` (feature points through :meth:`features`, the other split points
    through :meth:`forward_to`); a clear error naming the valid points where ``point`` is neither."""
    if point in net.feature_points:
        return lambda x: net.features(x, [point])[point]
    if point in net.split_points:
        return lambda x: net.forward_to(x, point)
    valid = list(dict.fromkeys([*net.feature_points, *net.split_points]))
    raise ValueError(f"unknown point {point!r} of {net.label}; valid points: {', '.join(valid)}")


def default_normalization(network: ModelRef) -> Normalization:
    """How the network's training data was normalised (its checkpoint's data settings; the digits otherwise)."""
    return datamodule_for(network).normalization


def dissect(network: ModelRef, point: str, concepts: ConceptSource, *, q: Optional[float] = None,
            iou_threshold: float = IOU_THRESHOLD, batch_size: int = 64, limit: Optional[int] = None,
            transform: Optional[Tensor] = None, transform_name: str = "",
            normalization: Optional[Normalization] = None, grid: Optional[tuple[int, int]] = None,
            device: Union[str, torch.device] = "cpu", top: int = TOP_IMAGES, budget: int = BUDGET,
            cache_budget: int = BUDGET, progress: bool = False) -> Dissection:
    """Dissect the units of ``network`` at ``point`` on ``concepts`` (see the module).

    ``network``: any model reference (a zoo checkpoint, ``<library>:<arch>/seed<k>``, a class path, an
    ``nn.Module``); ``limit``: the first images only; ``normalization``: how images become inputs (default: the
    network's training data's); ``transform``: a U×U matrix applied to the units first; ``q``: default the
    source's (:attr:`ConceptSource.default_q`)."""
    q = concepts.default_q if q is None else float(q)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q is a fraction in (0, 1), got {q}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"the IoU threshold is in [0, 1], got {iou_threshold}")
    concepts.check()
    start = time.perf_counter()
    net = load_model(network).to(device).eval()
    norm = normalization or default_normalization(network)
    mean = torch.tensor(norm.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, -1, 1, 1)
    forward = activations_at(net, point)
    n_images = len(concepts) if limit is None else min(limit, len(concepts))
    if n_images < 1:
        raise ValueError(f"{concepts.name} holds no images")

    trained = None if isinstance(network, torch.nn.Module) else trained_on(network)

    def units(batch) -> Tensor:
        size = tuple(batch.images.shape[-2:])
        if trained is not None and size != IMAGE_SIZE:
            raise ValueError(f"{ref_text(network)} was trained on {trained}'s {IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} images but "
                             f"{concepts.name} serves {size[0]}×{size[1]}: resize the concept images to the "
                             f"network's (image_size={IMAGE_SIZE[0]}, --image-size {IMAGE_SIZE[0]})")
        x = (batch.images.to(device) - mean) / std
        try:
            out = forward(x)
        except RuntimeError as err:
            raise ValueError(f"{ref_text(network)} cannot run on {concepts.name}'s {size[0]}×{size[1]} images ("
                             f"{str(err).splitlines()[0]}): resize them to the network's input size "
                             "(image_size=, --image-size)") from err
        a = grid_of(out, grid, point).float()
        return rotate(a, transform) if transform is not None else a

    batches = concepts.batches(batch_size, limit)
    if progress:
        from rich.progress import track

        batches = track(batches, description=f"dissect {point}: thresholds",
                        total=math.ceil(n_images / batch_size), transient=True)
    quantile, cache, best = None, [], None
    with torch.inference_mode():
        for batch in batches:
            a = units(batch)
            if quantile is None:
                u, fh, fw = a.shape[1:]
                quantile = TopQuantile(u, q, n_images * fh * fw, budget)
                keep = n_images * u * fh * fw <= cache_budget
                best = (torch.full((u, 0), -math.inf), torch.zeros((u, 0), dtype=torch.long))
            quantile.update(a)
            scores = a.amax(dim=(2, 3)).T.cpu()  # (U, B)
            merged = torch.cat([best[0], scores], 1), torch.cat([best[1], batch.index.view(1, -1).expand_as(scores)], 1)
            kept_scores, pos = merged[0].topk(min(top, merged[0].shape[1]), dim=1)
            best = (kept_scores, merged[1].gather(1, pos))
            if keep:
                cache.append(a.cpu())
        thresholds, info = quantile.compute()
        tally = IoUTally(quantile.units, concepts.primary(), concepts.image_level(), len(concepts.categories))
        second = concepts.batches(batch_size, limit)
        if progress:
            from rich.progress import track

            second = track(second, description=f"dissect {point}: IoU",
                           total=math.ceil(n_images / batch_size), transient=True)
        top_maps = torch.zeros(*best[1].shape, fh, fw)
        for i, batch in enumerate(second):
            a = cache[i] if keep else units(batch).cpu()
            tally.update(unit_masks(a, thresholds, concepts.mask_size), batch)
            unit, slot, image = (best[1].unsqueeze(-1) == batch.index.cpu().view(1, 1, -1)).nonzero(as_tuple=True)
            top_maps[unit, slot] = a[image, unit]
    return Dissection(
        network=ref_text(network), point=point, source=concepts.name, q=q, iou_threshold=iou_threshold,
        concepts=list(concepts.concepts), categories=list(concepts.categories), thresholds=thresholds,
        iou=tally.compute(), quantile=info, top_images=best[1], top_scores=best[0], top_maps=top_maps,
        coverage=tally.coverage(),
        feature_size=(fh, fw),
        mask_size=tuple(concepts.mask_size), images=n_images, transform=transform_name,
        seconds=time.perf_counter() - start)


__all__ = ["Dissection", "IOU_THRESHOLD", "dissect", "grid_of"]
