"""A run's fingerprint: a digest of everything that decides its result, so that a finished run can stand in for a new
one with the same fingerprint (a sweep reuses it instead of training it again).

What goes in: the fully resolved config (after locked defaults and overrides), the data's identity (the prepared
shards' index digest, or the token cache key, which hashes the source's identity, the tokenizer and the split), the
source of lmtune itself (every .py file of the package: a changed trainer is a different experiment, whatever its
version says), torch's version, and the device it runs on (memory and throughput are the device's).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lmtune.config import Config

PACKAGE = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of lmtune's source: every .py file of the package, by relative path, in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def data_identity(cfg: Config, tokens: Any) -> str:
    """The prepared shards' index digest, or the token cache entry's key (both hash what decides the tokens)."""
    from lmtune.data.shards import Index

    if getattr(tokens, "streamed", False):
        index = Index.read(Path(tokens.cache_path))
        if index is not None:
            return f"prepared:{index.digest()}"
    return f"cache:{Path(tokens.cache_path).name}"


def fingerprint(cfg: Config, tokens: Any, device_name: str) -> dict[str, str]:
    """The run's fingerprint and what it is made of (summary.json keeps both)."""
    parts = {"config": json.dumps(cfg.flat(), sort_keys=True, default=str), "data": data_identity(cfg, tokens),
             "code": code_digest(), "torch": torch.__version__, "device": device_name}
    return {"fingerprint": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24],
            "fingerprint_code": parts["code"][:16], "fingerprint_data": parts["data"]}
