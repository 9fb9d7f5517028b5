"""Model references and model libraries: which trained network a name means, and what it was trained on.

A *model reference* is a classifier checkpoint path or a library entry ``<library folder>:<arch>/seed<k>``.
A *model library* (``symstitch zoo``) is a folder of independently seeded networks with a manifest,
``<library>/manifest.json``::

    {"models": {"<arch>/seed<k>": {"checkpoint": "<arch>/seed<k>/model.ckpt", "config_hash": …, "test_acc": …}}}

Paths in the manifest are relative to it. The manifest is replaced atomically under a lock
(:class:`symstitch.io.Lock`), so concurrent writers queue and a reader never sees half of it.

The data a network was trained on travels in its checkpoint (the DataModule's saved hyper-parameters):
:func:`datamodule_settings` reads it back, :func:`check_same_data` refuses to evaluate networks on other data.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from symstitch.checkpoints import CheckpointError, classifier_spec, load_classifier, read_checkpoint
from symstitch.data import DataModule
from symstitch.io import Lock, read_json, write_json
from symstitch.models import StagedNet

MANIFEST = "manifest.json"
ModelRef = Union[str, Path]


def key_of(arch: str, seed: int) -> str:
    """The library key of one seed: ``resnet20/seed3``."""
    return f"{arch}/seed{seed}"


class Manifest:
    """``<library>/manifest.json``: library key → entry."""

    def __init__(self, root: Union[Path, str]):
        self.root = Path(root)
        self.path = self.root / MANIFEST

    def lock(self) -> Lock:
        """Held while the manifest is read-modified-written (a second writer waits)."""
        return Lock(self.root / ".manifest.lock", what=str(self.path))

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            return read_json(self.path)["models"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path} is not a symstitch model-library manifest: {err}") from None

    def add(self, key: str, entry: dict, replace: bool = False) -> bool:
        """Record ``entry``; False (nothing written) when ``key`` is there already, unless ``replace``."""
        with self.lock():
            models = self.load()
            if key in models and not replace:
                return False
            models[key] = entry
            write_json(self.path, {"models": dict(sorted(models.items()))})
            return True

    def checkpoint(self, entry: dict) -> Path:
        return self.root / entry["checkpoint"]


def resolve_model(ref: ModelRef) -> Path:
    """A checkpoint path, or a library entry ``<library>:<arch>/seed<k>`` → its checkpoint path."""
    ref = str(ref)
    path = Path(ref)
    if path.is_file():
        return path
    if ":" in ref:
        root, key = ref.rsplit(":", 1)
        manifest = Manifest(root)
        models = manifest.load()
        if key not in models:
            raise CheckpointError(f"{manifest.path} has no model {key!r}; it has: {', '.join(models) or '(none)'}")
        return manifest.checkpoint(models[key])
    raise CheckpointError(f"{ref!r} is neither a checkpoint file nor a model-library entry '<library>:<arch>/seed<k>'")


def load_model(ref: ModelRef) -> StagedNet:
    """The trained network a reference names, in eval mode."""
    return load_classifier(resolve_model(ref))


def architecture(ref: ModelRef) -> str:
    """The architecture name saved in a reference's checkpoint (without building the network)."""
    path = resolve_model(ref)
    return str(classifier_spec(read_checkpoint(path), path)["arch"])


def load_pair(source: ModelRef, target: ModelRef, point: str) -> tuple[StagedNet, StagedNet]:
    """Source and target networks, checked to be stitchable at ``point`` (before anything trains)."""
    paths = resolve_model(source), resolve_model(target)
    specs = [classifier_spec(read_checkpoint(p), p) for p in paths]
    if specs[0] != specs[1]:
        raise ValueError(f"source and target must share an architecture to be stitched: {paths[0]} is {specs[0]}, "
                         f"{paths[1]} is {specs[1]}")
    check_same_data([source, target])
    nets = load_classifier(paths[0]), load_classifier(paths[1])
    nets[0].check_split_point(point)  # unknown point → the list of valid ones
    shapes = [n.feature_shapes()[point] for n in nets]
    if shapes[0] != shapes[1]:
        raise ValueError(f"representations at {point!r} differ in shape: source {shapes[0]}, target {shapes[1]}")
    return nets


def datamodule_settings(ref: ModelRef) -> dict[str, Any]:
    """The :class:`~symstitch.data.DataModule` arguments a network was trained with (its checkpoint's saved
    data hyper-parameters, without extras); empty when it saved none."""
    path = resolve_model(ref).resolve()
    stat = path.stat()
    return dict(_saved_data_settings(path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=64)
def _saved_data_settings(path: Path, mtime_ns: int, size: int) -> tuple[tuple[str, Any], ...]:
    """The data settings in the checkpoint at ``path`` as it is now (a checkpoint is read once, not at every check
    of a cell; a rewritten file has another mtime or size and is read again)."""
    saved = read_checkpoint(path).get("datamodule_hyper_parameters") or {}
    return tuple((k, v) for k, v in saved.items() if k in inspect.signature(DataModule).parameters)


def datamodule_for(ref: ModelRef, **overrides: Any) -> DataModule:
    """The DataModule a network was trained with (digits when its checkpoint says nothing), with overrides."""
    return DataModule(**{**datamodule_settings(ref), **overrides})


def trained_on(ref: ModelRef) -> Optional[str]:
    """The dataset name in a reference's checkpoint, None when it saved no data settings."""
    return datamodule_settings(ref).get("dataset")


def check_same_data(refs: Sequence[ModelRef], datamodule: Optional[Any] = None) -> None:
    """Refuse networks trained on different datasets, or data other than theirs (``datamodule``): a stitch or a
    similarity on other images than the networks' own is a silent wrong result."""
    seen = {str(r): trained_on(r) for r in refs}
    known = {r: d for r, d in seen.items() if d is not None}
    if len(set(known.values())) > 1:
        raise ValueError("the networks were trained on different datasets: "
                         + ", ".join(f"{r} on {d}" for r, d in known.items()))
    given = getattr(datamodule, "dataset", None)
    if known and given is not None:
        ref, theirs = next(iter(known.items()))
        if given != theirs:
            raise ValueError(f"the data is {given!r} but {ref} was trained on {theirs!r}: evaluate networks on their "
                             f"own data (--data.dataset {theirs}, or leave the data out to use the networks' own)")


def library_models(library: Union[str, Path], arch: str, seeds: Sequence[int]) -> dict[int, str]:
    """``seed → '<library>:<arch>/seed<k>'`` for seeds the library holds; a clear error naming the missing ones."""
    have = Manifest(library).load()
    missing = [s for s in seeds if key_of(arch, s) not in have]
    if missing:
        raise ValueError(f"the model library {library} lacks {arch} seeds {missing}; train them first, e.g. "
                         f"`symstitch sweep --config experiments/zoo_<dataset>.yaml` or `symstitch zoo --arch "
                         f"{arch} --seeds {','.join(map(str, missing))} --out {library} --config …`")
    return {s: f"{library}:{key_of(arch, s)}" for s in seeds}
