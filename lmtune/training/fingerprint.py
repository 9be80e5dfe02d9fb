"""A run's fingerprint: a digest of everything that decides its result, so that a finished run can stand in for a new
one with the same fingerprint (a sweep reuses it instead of training it again).

What goes in: the fully resolved config (after locked defaults and overrides), the data's identity (the prepared
shards' index digest, or the token cache key, which hashes the source's identity, the tokenizer and the split), the
source of lmtune itself (every .py file of the package: a changed trainer is a different experiment, whatever its
version says), torch's version, and the device it runs on (memory and throughput are the device's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from lmtune.config import Config, DataConfig

PACKAGE = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of lmtune's source: every .py file of the package, by relative path, in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def data_identity(data: DataConfig) -> str:
    """The prepared shards' index digest, or the token cache entry's key (both hash what decides the tokens), from the
    config alone: a sweep's trial looks its fingerprint up before it loads anything."""
    from lmtune.data.cache import cache_key, cache_root

    if data.prepared:
        from lmtune.data.prepared import AUTO, auto_prepared, locate

        if data.prepared == AUTO:
            data = dataclasses.replace(data, prepared=str(auto_prepared(data, cache_root(data))))
        return f"prepared:{locate(data, cache_root(data))[1].digest()}"
    return f"cache:{cache_key(data)}"


def fingerprint(cfg: Config, device_name: str) -> dict[str, str]:
    """The run's fingerprint and what it is made of (summary.json keeps both)."""
    parts = {"config": json.dumps(cfg.flat(), sort_keys=True, default=str), "data": data_identity(cfg.data),
             "code": code_digest(), "torch": torch.__version__, "device": device_name}
    return {"fingerprint": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24],
            "fingerprint_code": parts["code"][:16], "fingerprint_data": parts["data"]}
