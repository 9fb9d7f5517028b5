"""Model references and model libraries: which trained network a name means, and what it was trained on.

A *model reference* (:data:`ModelRef`) is one of

* a classifier checkpoint of the zoo, or a library entry ``<library folder>:<arch>/seed<k>``;
* any network by class path, LightningCLI style, with a plain ``state_dict`` file (``torch.save(model.state_dict(),
  path)``; read weights-only), as a mapping or the same mapping written as a YAML string::

      {class_path: torchvision.models.resnet18, init_args: {num_classes: 10}, state_dict: a.pt}

  (``state_dict`` optional: without it the network keeps its initialisation; ``graph``: options of
  :class:`~symstitch.graph.GraphNet`, e.g. ``{input_shape: [1, 3, 224, 224], class_token: dropped}``);
* a timm model, ``timm:vit_tiny_patch16_224`` or ``{timm: vit_tiny_patch16_224, init_args: {img_size: 32},
  state_dict: v.pt}`` (random initialisation unless a state dict is given; timm is an optional extra:
  ``pip install symstitch[timm]``);
* an ``nn.Module`` in memory (from Python). :func:`memory_ref` gives it a name, ``memory:<n>``, that this
  process resolves, so that it can travel through the LightningCLI path like any other reference; every load
  is a deep copy (stitching freezes its copies, never the caller's module).

Networks outside the zoo are wrapped in a :class:`~symstitch.graph.GraphNet` (:func:`load_model`).
A *model library* (``symstitch zoo``) is a folder of independently seeded networks with a manifest,
``<library>/manifest.json``::

    {"models": {"<arch>/seed<k>": {"checkpoint": "<arch>/seed<k>/model.ckpt", "config_hash": …, "test_acc": …}}}

Paths in the manifest are relative to it. The manifest is replaced atomically under a lock
(:class:`symstitch.io.Lock`), so concurrent writers queue and a reader never sees half of it.

The data a network was trained on travels in its checkpoint (the DataModule's saved hyper-parameters):
:func:`datamodule_settings` reads it back, :func:`check_same_data` refuses to evaluate networks on other data.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import itertools
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import yaml
from torch import nn

from symstitch.checkpoints import CheckpointError, classifier_spec, load_classifier, read_checkpoint
from symstitch.data import DataModule
from symstitch.graph import as_network
from symstitch.io import Lock, read_json, write_json
from symstitch.network import PointNetwork, is_network

MANIFEST = "manifest.json"
ModelRef = Union[str, Path, Mapping[str, Any], nn.Module]

#: in-memory networks by their ``memory:<n>`` name (weakly held: a name lives as long as its module)
_MEMORY: "weakref.WeakValueDictionary[str, nn.Module]" = weakref.WeakValueDictionary()
_MEMORY_COUNTER = itertools.count()


def memory_ref(model: nn.Module) -> str:
    """A name, ``memory:<n>``, for an in-memory network that :func:`load_model` resolves in this process."""
    for name, held in _MEMORY.items():
        if held is model:
            return name
    name = f"memory:{next(_MEMORY_COUNTER)}"
    _MEMORY[name] = model
    return name


@dataclass(frozen=True)
class ModelSpec:
    """A reference outside the zoo, parsed: ``kind`` is ``class``, ``timm`` or ``memory``."""

    kind: str
    target: str  # the class path, timm name or memory name
    init_args: dict = field(default_factory=dict)
    state_dict: Optional[str] = None
    graph: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.target if self.kind != "timm" else f"timm:{self.target}"


SPEC_KEYS = ("class_path", "timm", "init_args", "state_dict", "graph")


def model_spec(ref: ModelRef) -> Optional[ModelSpec]:
    """The parsed reference when it names a network outside the zoo; None for a checkpoint or library entry."""
    if isinstance(ref, nn.Module):
        return ModelSpec("memory", memory_ref(ref))
    if isinstance(ref, (str, Path)):
        text = str(ref).strip()
        if text.startswith("memory:"):
            return ModelSpec("memory", text)
        if text.startswith("timm:"):
            return ModelSpec("timm", text[len("timm:"):])
        if not text.startswith("{"):
            return None
        try:
            ref = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"model reference {text!r} is not a YAML mapping: {err}") from None
    if not isinstance(ref, Mapping):
        raise TypeError(f"a model reference is a path, a mapping or an nn.Module; got {type(ref).__name__}")
    unknown = sorted(set(ref) - set(SPEC_KEYS))
    if unknown or ("class_path" in ref) == ("timm" in ref):
        raise ValueError(f"a model mapping has class_path (or timm), and optionally init_args, state_dict and graph; "
                         f"got keys {sorted(ref)}")
    kind = "class" if "class_path" in ref else "timm"
    return ModelSpec(kind, str(ref["class_path"] if kind == "class" else ref["timm"]), dict(ref.get("init_args") or {}),
                     str(ref["state_dict"]) if ref.get("state_dict") else None, dict(ref.get("graph") or {}))


def ref_text(ref: ModelRef) -> str:
    """A reference as one line of text (for command lines, record keys and messages)."""
    if isinstance(ref, nn.Module):
        return memory_ref(ref)
    if isinstance(ref, Mapping):
        return json.dumps(dict(ref), sort_keys=True)
    return str(ref)


def _construct(spec: ModelSpec) -> nn.Module:
    if spec.kind == "memory":
        model = _MEMORY.get(spec.target)
        if model is None:
            raise ValueError(f"{spec.target} names no network of this process (in-memory networks are passed from "
                             "Python in the same process)")
        return copy.deepcopy(model)
    if spec.kind == "timm":
        try:
            import timm
        except ImportError:
            raise ImportError("timm models need the optional dependency timm: pip install 'symstitch[timm]'") from None
        if not timm.is_model(spec.target):
            near = difflib.get_close_matches(spec.target, timm.list_models(), n=5)
            raise ValueError(f"timm has no model {spec.target!r}" + (f"; nearest: {', '.join(near)}" if near else ""))
        return timm.create_model(spec.target, pretrained=False, **spec.init_args)
    module_name, _, attr = spec.target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"class_path {spec.target!r} does not name an importable class or function") from None
    try:
        model = factory(**spec.init_args)
    except TypeError as err:
        raise ValueError(f"{spec.target}(**{spec.init_args}) failed: {err}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec.target} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_state(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """A plain state dict file, read weights-only (also a Lightning checkpoint's ``state_dict``)."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt.get("state_dict"), dict) else ckpt
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


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


def load_model(ref: ModelRef) -> PointNetwork:
    """The trained network a reference names, in eval mode: a zoo network, or any other in a
    :class:`~symstitch.graph.GraphNet` (a copy: never the caller's module itself)."""
    spec = model_spec(ref)
    if spec is None:
        return load_classifier(resolve_model(ref))
    # built from the current random state, which is then restored: loading a network by class path draws no
    # random numbers from the run's stream, as an in-memory network does not (same seed, same stitch)
    with torch.random.fork_rng(devices=[]):
        model = _construct(spec)
    if spec.state_dict:
        try:
            model.load_state_dict(load_state(spec.state_dict), strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{spec.state_dict}: the weights do not fit {spec.label}: {err}") from None
    return as_network(model, **spec.graph).eval()


def architecture(ref: ModelRef) -> str:
    """The architecture name saved in a reference's checkpoint (without building the network); the class path or
    ``timm:<name>`` outside the zoo, the class name of an in-memory network."""
    spec = model_spec(ref)
    if spec is not None:
        if spec.kind == "memory":
            model = _MEMORY.get(spec.target)
            if model is None:
                return spec.target
            return model.label if is_network(model) else type(model).__name__
        return spec.label
    path = resolve_model(ref)
    return str(classifier_spec(read_checkpoint(path), path)["arch"])


def check_point(nets: Sequence[PointNetwork], point: str) -> None:
    """``point`` exists in every network (else the nearest names) and has the same shape in all (else both)."""
    for net in nets:
        net.check_split_point(point)
    shapes = [n.point_shape(point) for n in nets]
    if len(set(shapes)) > 1:
        raise ValueError(f"representations at {point!r} differ in shape: source {shapes[0]}, target {shapes[1]}; "
                         "stitching needs the same width (channels) and size at the point")


def load_pair(source: ModelRef, target: ModelRef, point: str) -> tuple[PointNetwork, PointNetwork]:
    """Source and target networks, checked to be stitchable at ``point`` (before anything trains)."""
    if model_spec(source) is not None or model_spec(target) is not None:
        check_same_data([source, target])
        nets = load_model(source), load_model(target)
        check_point(nets, point)
        return nets
    paths = resolve_model(source), resolve_model(target)
    specs = [classifier_spec(read_checkpoint(p), p) for p in paths]
    if specs[0] != specs[1]:
        raise ValueError(f"source and target must share an architecture to be stitched: {paths[0]} is {specs[0]}, "
                         f"{paths[1]} is {specs[1]}")
    check_same_data([source, target])
    nets = load_classifier(paths[0]), load_classifier(paths[1])
    check_point(nets, point)  # unknown point → the list of valid ones; shapes must agree
    return nets


def ref_identity(ref: ModelRef) -> tuple:
    """What a reference's weights are now, for caches: its text, and the size and modification time of the file
    holding them (a checkpoint, or a state dict; an in-memory network: its memory name and the module's id)."""
    spec = model_spec(ref)
    if spec is not None and spec.kind == "memory":
        return (spec.target, id(_MEMORY.get(spec.target)))
    path = resolve_model(ref).resolve() if spec is None else (Path(spec.state_dict).resolve() if spec.state_dict else None)
    stat = path.stat() if path is not None else None
    return (ref_text(ref), str(path), stat.st_size if stat else None, stat.st_mtime_ns if stat else None)


def datamodule_settings(ref: ModelRef) -> dict[str, Any]:
    """The :class:`~symstitch.data.DataModule` arguments a network was trained with (its checkpoint's saved
    data hyper-parameters, without extras); empty when it saved none, and for networks outside the zoo."""
    if model_spec(ref) is not None:
        return {}
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
    seen = {ref_text(r): trained_on(r) for r in refs}
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


class MissingModels(ValueError):
    """A model library lacks networks that a grid names (they are to be trained first)."""


def library_missing(library: Union[str, Path], arch: str, seeds: Sequence[int]) -> list[int]:
    """The ``seeds`` of ``arch`` that the library does not hold (yet)."""
    have = Manifest(library).load()
    return [s for s in seeds if key_of(arch, s) not in have]


def library_refs(library: Union[str, Path], arch: str, seeds: Sequence[int]) -> dict[int, str]:
    """``seed → '<library>:<arch>/seed<k>'``, whether the library holds them yet or not."""
    return {s: f"{library}:{key_of(arch, s)}" for s in seeds}


def library_models(library: Union[str, Path], arch: str, seeds: Sequence[int]) -> dict[int, str]:
    """:func:`library_refs` of seeds the library holds; a clear error (:class:`MissingModels`) naming the missing
    ones."""
    missing = library_missing(library, arch, seeds)
    if missing:
        raise MissingModels(f"the model library {library} lacks {arch} seeds {missing}; train them first, e.g. "
                         f"`symstitch sweep --config experiments/zoo_<dataset>.yaml` or `symstitch zoo --arch "
                         f"{arch} --seeds {','.join(map(str, missing))} --out {library} --config …`")
    return library_refs(library, arch, seeds)
