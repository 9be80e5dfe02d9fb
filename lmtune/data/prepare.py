"""Prepare a corpus larger than memory once: stream its documents, tokenize them in worker processes, write token
shards (:mod:`lmtune.data.shards`) and an index that every trial then memory-maps.

    python -m lmtune.data prepare DATASET [--out DIR] [--tokens N] [--workers K]

The pipeline keeps a bounded amount of text and tokens in memory whatever the corpus size: documents are read in
chunks (hub datasets with ``datasets``' ``streaming=True``; parquet in record batches, jsonl by line), at most
``2·workers`` chunks are being tokenized at once, and each split fills one shard buffer at a time.

Each document becomes ``[end-of-text] + its tokens`` (llm.c's convention: the separator opens every document).
Validation is the dataset's validation split where it has one, else the documents whose hash falls in the first
``data.val_fraction`` of the hash space, until ``data.val_tokens`` are held out (later ones train): the same
documents for every run over the same source.

Resumable and safe to run twice: after every finished shard the position in the document stream and the unfinished
shards' tokens are saved under ``DIR/.prepare``; a prepare started again (after a kill) skips what is done and ends
with the same shards, byte for byte, as an uninterrupted run. A lock on ``DIR`` makes a second prepare of the same
directory wait for the first, then find it done.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import ConfigError
from lmtune.data.corpora import FILE_SUFFIXES
from lmtune.data.documents import Source, source
from lmtune.data.progress import Progress
from lmtune.data.shards import Index, ShardInfo, write_shard
from lmtune.data.tokenizers import get_tokenizer, gpt2_encoding

DEFAULT_SHARD_TOKENS = 100_000_000
"""Tokens per shard: llm.c's and modded-nanogpt's FineWeb shards hold 10^8."""
CHUNK_CHARS = 1 << 20
"""Text handed to a worker at a time."""
STATE_DIR = ".prepare"
HASH_BUCKETS = 1 << 32


# --- tokenizing, in worker processes ---------------------------------------------------------------------


_encode: Any = None


def _init_worker(tokenizer: str) -> None:
    global _encode
    if tokenizer == "gpt2":
        enc = gpt2_encoding()
        eot = np.array([enc.eot_token], dtype=np.uint32)
        _encode = lambda texts: [np.concatenate([eot, np.asarray(ids, dtype=np.uint32)])  # noqa: E731
                                 for ids in enc.encode_ordinary_batch(texts, num_threads=1)]
    else:
        tok = get_tokenizer(tokenizer)
        sep = np.frombuffer(b"\n\n", dtype=np.uint8).astype(np.uint32)
        _encode = lambda texts: [np.concatenate([sep, a.astype(np.uint32)]) for a in tok.encode_arrays(texts)]  # noqa: E731


def _held_out(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "little")
    return h < val_fraction * HASH_BUCKETS


def tokenize_chunk(texts: list[str], val_fraction: float) -> list[tuple[np.ndarray, bool]]:
    """Each text's tokens (the separator first) and whether its hash holds it out for validation."""
    return [(ids, _held_out(t, val_fraction)) for ids, t in zip(_encode(texts), texts)]


def _chunks(stream: Iterator[tuple[str | None, str]]) -> Iterator[tuple[list[str | None], list[str]]]:
    """Documents in chunks of about :data:`CHUNK_CHARS` characters, with their splits."""
    splits: list[str | None] = []
    texts: list[str] = []
    size = 0
    for split, text in stream:
        splits.append(split)
        texts.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield splits, texts
            splits, texts, size = [], [], 0
    if texts:
        yield splits, texts


def tokenized(stream: Iterator[tuple[str | None, str]], tokenizer: str, workers: int,
              val_fraction: float) -> Iterator[tuple[str | None, np.ndarray, bool, int]]:
    """``(split, tokens, held_out, characters)`` per document, in stream order, tokenized by ``workers`` processes
    with at most two chunks each in flight (the stream is never read further ahead than that)."""
    if workers <= 1:
        _init_worker(tokenizer)
        for splits, texts in _chunks(stream):
            for split, text, (ids, held) in zip(splits, texts, tokenize_chunk(texts, val_fraction)):
                yield split, ids, held, len(text)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        chunks = _chunks(stream)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * workers:
                try:
                    splits, texts = next(chunks)
                except StopIteration:
                    exhausted = True
                    break
                lengths = [len(t) for t in texts]
                pending.append((splits, lengths, pool.apply_async(tokenize_chunk, (texts, val_fraction))))
            if pending:
                splits, lengths, job = pending.popleft()
                for split, n, (ids, held) in zip(splits, lengths, job.get()):
                    yield split, ids, held, n


# --- shards, written as they fill --------------------------------------------------------------------------


class SplitWriter:
    """One split's shards: a buffer of ``shard_tokens`` filled in order and written when full."""

    def __init__(self, out: Path, prefix: str, split: str, shard_tokens: int, vocab_size: int, eot: int | None):
        self.out, self.prefix, self.split = out, prefix, split
        self.shard_tokens, self.vocab_size, self.eot = shard_tokens, vocab_size, eot
        self.dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        self.shards: list[ShardInfo] = []
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.filled = 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards) + self.filled

    def add(self, ids: np.ndarray) -> bool:
        """Append a document's tokens; True when a shard was written."""
        wrote = False
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + take] = ids[:take]
            self.filled += take
            ids = ids[take:]
            if self.filled == self.shard_tokens:
                self.flush()
                wrote = True
        return wrote

    def flush(self) -> None:
        """Write what the buffer holds as the next shard (the last one of a split may be short)."""
        if not self.filled:
            return
        tokens = self.buffer[:self.filled]
        name = f"{self.prefix}_{self.split}_{len(self.shards):06d}.bin"
        digest = write_shard(self.out / name, tokens, self.vocab_size)
        documents = int(np.count_nonzero(tokens == self.eot)) if self.eot is not None else -1
        self.shards.append(ShardInfo(name, int(self.filled), documents, digest))
        self.filled = 0

    def state(self, directory: Path, tag: int) -> dict[str, Any]:
        """The split's state after document ``tag``: its shards, and its unwritten tokens in a file of that tag's own
        (the state file names it: a kill while these are written leaves the previous state and its files whole)."""
        name = f"{self.split}.partial.{tag}.npy"
        with open(directory / f".{name}.tmp", "wb") as f:
            np.save(f, self.buffer[:self.filled])
        os.replace(directory / f".{name}.tmp", directory / name)
        return {"shards": [vars(s) for s in self.shards], "partial": name}

    def restore(self, directory: Path, state: dict[str, Any]) -> None:
        self.shards = [ShardInfo(**s) for s in state["shards"]]
        partial = np.load(directory / state["partial"])
        self.buffer[:len(partial)] = partial
        self.filled = len(partial)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One prepare of ``out`` at a time: a second one waits here (and then finds the first one's work done)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".prepare.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"prepare: another prepare holds {out}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@dataclass
class Settings:
    tokenizer: str = "gpt2"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    max_tokens: int = 0
    """Stop once the train split holds this many tokens (0: the whole corpus)."""
    workers: int = 1
    val_fraction: float = 0.1
    val_tokens: int = 10_000_000

    def fingerprint(self, identity: dict[str, Any]) -> str:
        fields = {**vars(self), "workers": None, "identity": identity}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(src: Source, out: Path, settings: Settings, *, progress: bool = True) -> Index:
    """Prepare ``src`` into ``out`` (see the module docstring); returns the complete index."""
    with _locked(out):
        index = Index.read(out)
        if index is not None and index.complete:
            return index
        return _prepare(src, out, settings, progress)


def _prepare(src: Source, out: Path, settings: Settings, progress: bool) -> Index:
    tok = get_tokenizer(settings.tokenizer)
    state_dir = out / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    for leftover in out.glob(".*.tmp"):  # a shard or index being written when a prepare was killed
        leftover.unlink()
    fingerprint = settings.fingerprint(src.identity)
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", src.name.split("/")[-1]).strip("-").lower() or "data"
    writers = {split: SplitWriter(out, prefix, split, settings.shard_tokens, tok.vocab_size, tok.eot)
               for split in ("train", "val")}
    done_docs = _restore(out, writers, fingerprint)
    bar = Progress(settings.max_tokens, writers["train"].tokens) if progress else None
    stream = src.stream()
    for _ in range(done_docs):  # what the saved state already holds
        next(stream)
    budget = settings.max_tokens or None
    for split, ids, held, chars in tokenized(stream, settings.tokenizer, settings.workers, settings.val_fraction):
        if split is None:  # no validation split: held out by hash, until val_tokens are
            split = "val" if held and writers["val"].tokens < settings.val_tokens else "train"
        w = writers[split]
        if split == "val":
            ids = ids[:max(0, settings.val_tokens - w.tokens)]
        elif budget is not None:
            ids = ids[:max(0, budget - w.tokens)]
        wrote = w.add(ids)
        done_docs += 1
        if bar is not None:
            bar.update(len(ids) if split == "train" else 0, chars)
        if wrote:
            _save(state_dir, writers, fingerprint, done_docs)
        if budget is not None and writers["train"].tokens >= budget:
            break
    for w in writers.values():
        w.flush()
    if bar is not None:
        bar.close()
    return _finish(src, out, tok, writers, settings)


def _restore(out: Path, writers: dict[str, SplitWriter], fingerprint: str) -> int:
    """The documents an unfinished prepare of the same dataset and settings already holds (its writers restored
    to where its state was saved); 0 without one."""
    state_dir = out / STATE_DIR
    state_file = state_dir / "state.json"
    if not state_file.is_file():
        return 0
    saved = json.loads(state_file.read_text())
    if saved["fingerprint"] != fingerprint:  # another dataset or other settings: what is there is not ours to continue
        raise ConfigError(f"{out} holds an unfinished prepare of another dataset or with other settings; "
                          f"choose another --out or remove {out}.")
    for split, w in writers.items():
        w.restore(state_dir, saved["splits"][split])
    return saved["documents"]


def _save(state_dir: Path, writers: dict[str, SplitWriter], fingerprint: str, done_docs: int) -> None:
    splits = {s: w.state(state_dir, done_docs) for s, w in writers.items()}
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "documents": done_docs, "splits": splits}))
    os.replace(tmp, state_dir / "state.json")  # the one step that moves the saved state forward
    kept = {v["partial"] for v in splits.values()}
    for old in state_dir.glob("*.partial.*.npy"):
        if old.name not in kept:
            old.unlink()


def _finish(src: Source, out: Path, tok: Any, writers: dict[str, SplitWriter], settings: Settings) -> Index:
    """The complete index written (the saved state removed)."""
    if not writers["train"].shards:
        raise ConfigError(f"DATASET={src.name!r}: no training text.")
    how = ("its validation split" if src.has_validation
           else f"documents held out by hash (data.val_fraction={settings.val_fraction:g})")
    index = Index(tokenizer=tok.name, vocab_size=tok.vocab_size, source={"dataset": src.name, **src.identity},
                  splits={s: w.shards for s, w in writers.items() if w.shards}, complete=True,
                  validation=f"{how}, at most {settings.val_tokens:,} tokens")
    index.write(out)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return index


__all__ = ["DEFAULT_SHARD_TOKENS", "FILE_SUFFIXES", "Settings", "Source", "prepare", "source"]
