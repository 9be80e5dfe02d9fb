"""Token shards in llm.c's / modded-nanogpt's format, a prepared dataset's index, and its splits as token sequences.

A shard is a header of 256 little-endian int32 (magic, version, token count, the rest zero) followed by the tokens:
uint16 under magic 20240520 version 1 (llm.c's GPT-2 format: the vocabulary fits in 16 bits) or uint32 under magic
20240801 version 7 (llm.c's Llama-3 format). So shards prepared by llm.c, modded-nanogpt or lmtune train anywhere.

A prepared dataset is a directory of shards and, when lmtune wrote it, ``index.json`` (tokenizer, source, each split's
shards with their token and document counts and sha256). A directory of llm.c shards has no index: the splits come
from the file names (``*_train_*.bin``, ``*_val_*.bin``) and the tokenizer from the header (GPT-2's).

:class:`ShardedTokens` reads a split as one sequence of tokens, memory-mapped shard by shard, so a trainer's memory
does not grow with the corpus: ``len()`` and indexing with an array of positions (a window across a shard boundary
is joined), which is all the sampler asks of a token array.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import ConfigError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
GPT2_FORMAT = (20240520, 1)
WIDE_FORMAT = (20240801, 7)
DTYPES = {GPT2_FORMAT: np.dtype("<u2"), WIDE_FORMAT: np.dtype("<u4")}
INDEX = "index.json"
INDEX_FORMAT = "lmtune-shards/1"


def format_for(vocab_size: int) -> tuple[int, int]:
    """(magic, version) of the narrowest shard format that holds every id of ``vocab_size``."""
    return GPT2_FORMAT if vocab_size <= 2**16 else WIDE_FORMAT


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> str:
    """``tokens`` as one shard at ``path`` (written aside, then renamed: a reader never sees half a shard);
    returns the file's sha256."""
    magic, version = format_for(vocab_size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    body = np.ascontiguousarray(tokens, dtype=DTYPES[(magic, version)])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for chunk in (header.tobytes(), body.tobytes()):
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def read_header(path: Path) -> tuple[np.dtype, int]:
    """A shard's token dtype and count; ConfigError naming the file when it is not a whole shard."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except OSError as e:
        raise ConfigError(f"cannot read token shard {path}: {e.strerror or e}.") from None
    if len(header) < HEADER_INTS:
        raise ConfigError(f"token shard {path} is truncated: {size} bytes, shorter than its {HEADER_BYTES}-byte header.")
    key = (int(header[0]), int(header[1]))
    if key not in DTYPES:
        raise ConfigError(f"{path} is not a token shard: header magic {key[0]} version {key[1]}; accepted: magic "
                          f"20240520 version 1 (uint16) or magic 20240801 version 7 (uint32), llm.c's formats.")
    dtype, n = DTYPES[key], int(header[2])
    if size != HEADER_BYTES + n * dtype.itemsize:
        raise ConfigError(f"token shard {path} is truncated or padded: its header says {n:,} tokens "
                          f"({HEADER_BYTES + n * dtype.itemsize:,} bytes), the file has {size:,} bytes.")
    return dtype, n


def open_shard(path: Path) -> np.memmap:
    dtype, n = read_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    file: str
    tokens: int
    documents: int
    sha256: str


@dataclass
class Index:
    """What ``index.json`` says of a prepared dataset."""

    tokenizer: str
    vocab_size: int
    source: dict[str, Any]
    """The dataset's identity (what was read: name, repo and config, or files with sizes and times)."""
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    complete: bool = False
    validation: str = ""
    """How the validation split was chosen."""
    format: str = INDEX_FORMAT

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits.get(split, []))

    def digest(self) -> str:
        """The prepared data's identity: a digest of its shards' digests and its tokenizer."""
        shards = {split: [s.sha256 for s in infos] for split, infos in sorted(self.splits.items())}
        return hashlib.sha256(json.dumps([self.tokenizer, shards], sort_keys=True).encode()).hexdigest()[:16]

    def write(self, directory: Path) -> None:
        tmp = directory / f".{INDEX}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, directory / INDEX)

    @classmethod
    def read(cls, directory: Path) -> Index | None:
        path = directory / INDEX
        return cls.read_text(path.read_text(), str(path)) if path.is_file() else None

    @classmethod
    def read_text(cls, text: str, where: str) -> Index:
        try:
            raw = json.loads(text)
            raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ConfigError(f"{where} is not a prepared dataset's index ({type(e).__name__}: {e}).") from None


def llmc_index(directory: Path) -> Index | None:
    """The index of a directory of llm.c shards without one: splits by file name, GPT-2 tokens by the header."""
    shards = sorted(directory.glob("*.bin"))
    splits: dict[str, list[ShardInfo]] = {}
    for path in shards:
        split = "val" if "_val_" in path.name or path.name.startswith("val") else "train"
        dtype, n = read_header(path)
        splits.setdefault(split, []).append(ShardInfo(path.name, n, -1, ""))
    if not splits:
        return None
    wide = any(read_header(directory / s.file)[0].itemsize == 4 for infos in splits.values() for s in infos)
    return Index(tokenizer="unknown-32bit" if wide else "gpt2", vocab_size=2**32 if wide else 50257,
                 source={"llm.c shards": str(directory.resolve())}, splits=splits, complete=True,
                 validation="the *_val_* shards")


class ShardedTokens:
    """A split's shards as one read-only token sequence, optionally limited to its first ``limit`` tokens."""

    def __init__(self, paths: list[Path], limit: int | None = None):
        self.shards = [open_shard(p) for p in paths]
        sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(self.starts[-1])
        self.length = total if limit is None else min(limit, total)
        self.dtype = self.shards[0].dtype if self.shards else np.dtype("<u2")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: Any) -> np.ndarray:
        """Tokens at the positions ``idx`` (an int, a slice or an array of any shape)."""
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(self.length))
        positions = np.asarray(idx, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.length):
            raise IndexError(f"token position out of range [0, {self.length})")
        flat = positions.reshape(-1)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][flat[sel] - self.starts[s]]
        return out.reshape(positions.shape)
