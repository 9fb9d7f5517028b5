"""Loading trained networks safely.

Every checkpoint is read with ``torch.load(..., weights_only=True)``: torch's restricted unpickler, which
builds tensors and plain containers and refuses to import or call anything else, so a hostile file is
rejected before any of its code could run. Anything that is not a symstitch classifier checkpoint fails with
:class:`CheckpointError` saying what was wrong.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any, Union

import torch

from symstitch import models
from symstitch.models import StagedNet

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A file given as a checkpoint is missing, unreadable, unsafe, or not a symstitch checkpoint."""


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """The checkpoint's dictionary, read with the restricted (weights-only) unpickler. The last few files read
    are kept while unchanged (same size and modification time): a sweep reads each network many times. Read
    it, never change it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a file)")
    stat = path.stat()
    try:
        ckpt = _load(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} was refused by the weights-only loader: it is not a PyTorch checkpoint of tensors and "
            "plain containers (a corrupt file, another format, or one that asks to import code); nothing in "
            "it was run"
        ) from None
    except Exception as err:  # garbage bytes fail in many ways inside the unpickler (IndexError, EOFError, …)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    return ckpt


@functools.lru_cache(maxsize=4)
def _load(path: str, size: int, mtime_ns: int) -> Any:
    """``torch.load`` (weights only) of one version of a file: its size and modification time are in the key."""
    return torch.load(path, map_location="cpu", weights_only=True)


def classifier_spec(ckpt: dict[str, Any], path: PathLike = "<checkpoint>") -> dict[str, Any]:
    """``arch``, ``arch_kwargs`` and ``num_classes`` of a classifier checkpoint."""
    hp = ckpt.get("hyper_parameters")
    if "state_dict" not in ckpt or not isinstance(hp, dict) or "arch" not in hp:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a symstitch classifier checkpoint "
            f"(expected 'state_dict' and 'hyper_parameters' with an 'arch'; found keys {sorted(ckpt)[:8]})"
        )
    return {
        "arch": hp["arch"],
        "arch_kwargs": dict(hp.get("arch_kwargs") or {}),
        "num_classes": int(hp["num_classes"]),
    }


def load_classifier(path: PathLike) -> StagedNet:
    """The trained network of a :class:`~symstitch.training.ClassifierModule` checkpoint, in eval mode."""
    ckpt = read_checkpoint(path)
    spec = classifier_spec(ckpt, path)
    if spec["arch"] not in models.MODELS:
        raise CheckpointError(
            f"{path} was trained with architecture {spec['arch']!r}, unknown here; "
            f"available: {', '.join(models.available())}"
        )
    net = models.build(spec["arch"], num_classes=spec["num_classes"], **spec["arch_kwargs"])
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit architecture {spec['arch']!r}: {err}") from None
    return net.eval()
