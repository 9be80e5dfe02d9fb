"""Read an offline W&B run back (its ``run-<id>.wandb`` file), so that tests can check what was logged.

The file is W&B's transaction log: a 7-byte header (``:W&B``, a magic number, a version) then LevelDB's
log format (32 KiB blocks of records, each a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST),
every record a ``wandb_internal_pb2.Record`` protobuf. Nothing here talks to a server.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind == FULL:
            yield pb.Record.FromString(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pb.Record.FromString(pending + chunk)
        elif kind == 0 and length == 0:  # zero padding to the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0


@dataclass
class OfflineRun:
    run_id: str
    resume: bool = False
    """The run was started to continue a run of the same id where one exists (``wandb.init(resume="allow")``):
    what ``wandb sync`` of an offline run, and an online run at once, does with it."""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _items(items) -> dict[str, Any]:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def read_run(run_dir: Path) -> OfflineRun:
    """The run id, config, history rows and summary of an offline run directory (``offline-run-*``).

    W&B's service writes the log after ``run.finish()`` returns; this process's service is torn down
    first (what happens at exit), so that everything logged is on disk."""
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    (log,) = Path(run_dir).glob("*.wandb")
    run = OfflineRun(run_id="")
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id = rec.run.run_id
            run.resume = rec.run.resume
            run.config.update(_items(rec.run.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
    run.config = {k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in run.config.items()}
    return run
