"""Reading a W&B run back from its files, as ``wandb sync`` would: the ``run-<id>.wandb`` log of W&B's own protobuf
``Record``s (wandb 0.31), in the leveldb log format W&B writes (a 7-byte header ``:W&B`` + magic + version, then
32 KiB blocks of chunks: checksum, length, type FULL/FIRST/MIDDLE/LAST)."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path | str) -> Iterator[pb.Record]:
    """Every Record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0:  # zero padding to the end of the block, or a chunk not yet written
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if len(chunk) < length:  # the writer is still at it
            return
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


@dataclass
class Run:
    """What a run holds: its identity, config, summary and the last value of every history key."""

    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)


def _items(items) -> dict[str, Any]:
    """Config, summary or history items as a dict; a nested key (W&B splits media and tables so) as nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        *parents, last = [*item.nested_key] or [item.key]
        target = out
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = json.loads(item.value_json)
    return out


def complete_log(run_dir: Path | str, timeout: float = 30.0) -> list[pb.Record]:
    """The Records of the run in ``run_dir``, once its log holds the ``exit`` record a finished run ends with (W&B's
    service may still be writing when ``finish()`` has returned)."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.time() + timeout
    while True:
        found = list(records(log))
        finished = any(r.WhichOneof("record_type") == "exit" for r in found)
        if finished or time.time() > deadline:
            assert finished, f"{log} was not finished"
            return found
        time.sleep(0.2)


def read_run(run_dir: Path | str) -> Run:
    """The run in ``run_dir`` (``…/wandb/offline-run-*``), read from its ``.wandb`` log."""
    run = Run()
    for record in complete_log(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.name, run.group, run.job_type = r.run_id, r.display_name, r.run_group, r.job_type
            run.config.update(_items(r.config.update))
            run.summary.update(_items(r.summary.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "history":
            run.history.update(_items(record.history.item))
    run.config = {k: v.get("value") if isinstance(v, dict) and "value" in v else v for k, v in run.config.items()}
    return run


def runs(folder: Path | str) -> list[Run]:
    """Every run W&B wrote under ``folder`` (``<folder>/wandb/*run-*``), by name."""
    return sorted((read_run(d) for d in Path(folder).glob("wandb/*run-*") if d.is_dir()), key=lambda r: r.name)
