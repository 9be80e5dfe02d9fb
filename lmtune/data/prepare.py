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
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import ConfigError
from lmtune.data.corpora import (
    FILE_SUFFIXES,
    LINE_REPOS,
    builtin_documents,
    expand_files,
    files_identity,
    hub_failure,
    hub_reachable,
    resolve_hub,
)
from lmtune.data.shards import Index, ShardInfo, write_shard
from lmtune.data.tokenizers import get_tokenizer, gpt2_encoding

DEFAULT_SHARD_TOKENS = 100_000_000
"""Tokens per shard: llm.c's and modded-nanogpt's FineWeb shards hold 10^8."""
CHUNK_CHARS = 1 << 20
"""Text handed to a worker at a time."""
STATE_DIR = ".prepare"
HASH_BUCKETS = 1 << 32


# --- documents, streamed -----------------------------------------------------------------------------


@dataclass
class Source:
    """A dataset's documents as a stream: ``(split, text)`` with split ``val``, ``train``, or None (held out by
    hash), in one order that is the same on every run."""

    name: str
    identity: dict[str, Any]
    has_validation: bool
    stream: Any = field(repr=False)
    """A callable returning a fresh iterator of (split, text)."""


def _iter_files(paths: list[Path], split: str | None) -> Iterator[tuple[str | None, str]]:
    for path in paths:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            if text:
                yield split, text
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError):
                            raise ConfigError(f"{path} line {lineno}: not a JSON object with a \"text\" string.") from None
                        if text:
                            yield split, text
        else:
            import pyarrow.parquet as pq

            reader = pq.ParquetFile(path)
            if "text" not in reader.schema_arrow.names:
                raise ConfigError(f"{path} has no \"text\" column (columns: {', '.join(reader.schema_arrow.names)}).")
            for batch in reader.iter_batches(batch_size=1024, columns=["text"]):
                for text in batch.column("text").to_pylist():
                    if text:
                        yield split, text


_ARTICLE = re.compile(r"^ = [^=].* = \n$")


def _articles(rows: Iterator[str]) -> Iterator[str]:
    """Rows that are the lines of one text (WikiText) → its articles, each opening with its ``= Title =`` line."""
    lines: list[str] = []
    for row in rows:
        line = row or "\n"
        if _ARTICLE.match(line) and any(ln.strip() for ln in lines):
            yield "".join(lines)
            lines = []
        lines.append(line)
    if any(ln.strip() for ln in lines):
        yield "".join(lines)


def source(dataset: str, files: list[str] | None = None) -> Source:
    """The document stream of ``dataset``: ``builtin``, ``files`` (with ``files``), or a hub dataset (an alias, a
    repo ``org/name[:config]``, or a local directory laid out like the hub repository, read through ``datasets``
    with ``streaming=True``)."""
    if dataset == "builtin":
        docs = builtin_documents()
        return Source("builtin", {"builtin": sys.version}, False, lambda: ((None, d) for d in docs))
    if dataset == "files":
        paths = expand_files(files or [], "data.files")
        return Source("files", {"files": files_identity(paths)}, False, lambda: _iter_files(paths, None))
    if dataset not in ("builtin", "files") and files:
        raise ConfigError(f"--files is for DATASET=files, not {dataset!r}.")
    src = resolve_hub(dataset)
    import datasets

    if not src.local and not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise hub_failure(src, "the hub is not reachable (no network?)")
    try:
        splits = datasets.load_dataset(src.repo, src.config, streaming=True)
    except Exception as e:
        raise hub_failure(src, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from None
    if "train" not in splits:
        raise ConfigError(f"DATASET={dataset!r} has no 'train' split (splits: {', '.join(splits)}).")
    lines = src.repo in LINE_REPOS or any(Path(src.repo).parts[-2:] == tuple(r.split("/")) for r in LINE_REPOS)

    def rows(split: str) -> Iterator[str]:
        for batch in splits[split].iter(batch_size=1024):
            if "text" not in batch:
                raise ConfigError(f"DATASET={dataset!r}: split {split!r} has no \"text\" column "
                                  f"(columns: {', '.join(batch)}).")
            yield from batch["text"]

    def stream() -> Iterator[tuple[str | None, str]]:
        for split, label in (("validation", "val"), ("train", "train")):
            if split == "validation" and "validation" not in splits:
                continue
            texts = _articles(rows(split)) if lines else (t for t in rows(split) if t)
            held = label if "validation" in splits else None
            yield from ((held, t) for t in texts)

    identity: dict[str, Any] = {"hub": src.repo, "config": src.config}
    if src.local:
        identity["files"] = files_identity(sorted(p for p in Path(src.repo).rglob("*") if p.is_file()))
    return Source(dataset, identity, "validation" in splits, stream)


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


class Progress:
    """Tokens, MB/s and, with a token budget, an ETA: a bar on a terminal, a line every 30 s in a log."""

    def __init__(self, total: int, done: int, stream=sys.stderr):
        self.total, self.stream, self.t0 = total, stream, time.monotonic()
        self.bytes = 0
        self.tokens = done
        self.last = self.t0
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, initial=done, unit="tok", unit_scale=True, desc="prepare",
                            file=stream, dynamic_ncols=True)

    def update(self, tokens: int, nbytes: int) -> None:
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        mb_s = self.bytes / 1e6 / max(now - self.t0, 1e-9)  # characters of text: bytes for most of it
        if self.bar is not None:
            self.bar.update(tokens)
            self.bar.set_postfix_str(f"{mb_s:.1f} MB/s of text", refresh=False)
        elif now - self.last >= 30:
            self.last = now
            eta = ""
            if self.total:
                rate = (self.tokens) / max(now - self.t0, 1e-9)
                eta = f", ETA {max(0, self.total - self.tokens) / max(rate, 1e-9):.0f} s"
            print(f"prepare: {self.tokens:,} training tokens, {mb_s:.1f} M characters/s{eta}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare(src: Source, out: Path, settings: Settings, *, progress: bool = True) -> Index:
    """Prepare ``src`` into ``out`` (see the module docstring); returns the complete index."""
    with _locked(out):
        index = Index.read(out)
        if index is not None and index.complete:
            return index
        return _prepare(src, out, settings, progress)


def _prepare(src: Source, out: Path, settings: Settings, progress: bool) -> Index:
    tok = get_tokenizer(settings.tokenizer)
    eot = tok.eot
    state_dir = out / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    for leftover in out.glob(".*.tmp"):  # a shard or index being written when a prepare was killed
        leftover.unlink()
    fingerprint = settings.fingerprint(src.identity)
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", src.name.split("/")[-1]).strip("-").lower() or "data"
    writers = {split: SplitWriter(out, prefix, split, settings.shard_tokens, tok.vocab_size, eot)
               for split in ("train", "val")}
    done_docs = 0
    state_file = state_dir / "state.json"
    if state_file.is_file():
        saved = json.loads(state_file.read_text())
        if saved["fingerprint"] == fingerprint:
            done_docs = saved["documents"]
            for split, w in writers.items():
                w.restore(state_dir, saved["splits"][split])
        else:  # another dataset or other settings: what is there is not ours to continue
            raise ConfigError(f"{out} holds an unfinished prepare of another dataset or with other settings; "
                              f"choose another --out or remove {out}.")
    bar = Progress(settings.max_tokens, writers["train"].tokens) if progress else None
    stream = src.stream()
    for _ in range(done_docs):  # what the saved state already holds
        next(stream)
    budget = settings.max_tokens or None

    def save() -> None:
        splits = {s: w.state(state_dir, done_docs) for s, w in writers.items()}
        tmp = state_dir / "state.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "documents": done_docs, "splits": splits}))
        os.replace(tmp, state_file)  # the one step that moves the saved state forward
        kept = {v["partial"] for v in splits.values()}
        for old in state_dir.glob("*.partial.*.npy"):
            if old.name not in kept:
                old.unlink()

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
            save()
        if budget is not None and writers["train"].tokens >= budget:
            break
    for w in writers.values():
        w.flush()
    if bar is not None:
        bar.close()
    if not writers["train"].shards:
        raise ConfigError(f"DATASET={src.name!r}: no training text.")
    how = ("its validation split" if src.has_validation
           else f"documents held out by hash (data.val_fraction={settings.val_fraction:g})")
    index = Index(tokenizer=tok.name, vocab_size=tok.vocab_size, source={"dataset": src.name, **src.identity},
                  splits={s: w.shards for s, w in writers.items() if w.shards}, complete=True,
                  validation=f"{how}, at most {settings.val_tokens:,} tokens")
    index.write(out)
    shutil.rmtree(state_dir, ignore_errors=True)
    return index


__all__ = ["DEFAULT_SHARD_TOKENS", "FILE_SUFFIXES", "Settings", "Source", "prepare", "source"]
