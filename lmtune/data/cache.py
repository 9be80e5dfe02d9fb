"""The on-disk token cache and :func:`load_tokens`: a config's train and validation tokens.

Tokens are cached as .npy under ``cache_root(cfg)/tokens/<cache_key(cfg)>`` and memory-mapped on the
next run; the key hashes everything that decides them, found without reading the text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import ConfigError, DataConfig
from lmtune.data.corpora import load_corpus, source_identity, split_at, total_chars
from lmtune.data.prepared import AUTO, auto_prepared, locate, open_splits
from lmtune.data.tokenizers import TOKENIZERS, get_tokenizer, tokenize_documents

CACHE_ENV = "LMTUNE_CACHE"
CACHE_FORMAT = 1
"""Bump when tokenization or the file layout changes: old entries are then ignored."""


@dataclass
class TokenSplits:
    train: np.ndarray
    """Training tokens (a read-only np.memmap of the cached .npy)."""
    val: np.ndarray
    """Validation tokens (same)."""
    vocab_size: int
    tokenizer_name: str
    source: str
    """Where the text came from and how validation was chosen."""
    cache_hit: bool
    """True when the tokens were read from the cache (or prepared shards) without tokenizing."""
    cache_path: Path
    streamed: bool = False
    """The splits are prepared shards (:class:`~lmtune.data.shards.ShardedTokens`): the sampler then draws its order in
    constant memory."""


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else $LMTUNE_CACHE, else ~/.cache/lmtune."""
    return Path(cfg.cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmtune").expanduser()


def cache_key(cfg: DataConfig) -> str:
    """Directory name of ``cfg``'s tokens: readable prefix + hash of everything that decides them."""
    if cfg.tokenizer not in TOKENIZERS:
        get_tokenizer(cfg.tokenizer)  # raises the ConfigError
    inputs = {
        "format": CACHE_FORMAT,
        "source": source_identity(cfg),
        "tokenizer": cfg.tokenizer,
        "fraction": cfg.fraction,
        "val_fraction": cfg.val_fraction,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.dataset)[-40:]
    return f"{slug}-{cfg.tokenizer}-{digest}"


def too_few_tokens(split: str, n: int, seq_len: int) -> ConfigError:
    return ConfigError(f"the {split} split has {n} tokens; data.seq_len={seq_len} needs at least {seq_len + 1} "
                       f"(one window of seq_len+1). Use more text (data.fraction, data.val_fraction, data.files) "
                       f"or a smaller data.seq_len.")


def _write_cache(final: Path, train: np.ndarray, val: np.ndarray, meta: dict[str, Any]) -> None:
    """Write into a private directory, then rename it into place: the rename is atomic, so a reader
    sees either no entry or a complete one. When two runs race, the first rename wins and the other
    run's copy (identical) is discarded."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_prepared(cfg: DataConfig) -> TokenSplits:
    """The splits of ``data.prepared``'s shards, memory-mapped (:mod:`lmtune.data.prepared`); ``auto``: data.dataset
    prepared once into the cache first."""
    if cfg.prepared == AUTO:
        cfg = dataclasses.replace(cfg, prepared=str(auto_prepared(cfg, cache_root(cfg))))
    directory, index = locate(cfg, cache_root(cfg))
    train, val = open_splits(directory, index, cfg.limit_tokens)
    limit = f" (its first {len(train):,}: data.limit_tokens)" if cfg.limit_tokens else ""
    shards = len(index.splits["train"])
    source = (f"prepared {cfg.prepared}: {index.tokens('train'):,} training tokens in {shards} shard(s){limit}, "
              f"prepared from {json.dumps(index.source)[:160]}; validation: {index.validation}")
    splits = TokenSplits(train=train, val=val, vocab_size=get_tokenizer(index.tokenizer).vocab_size,
                         tokenizer_name=index.tokenizer, source=source, cache_hit=True, cache_path=directory,
                         streamed=True)
    for split, tokens in (("train", splits.train), ("validation", splits.val)):
        if len(tokens) < cfg.seq_len + 1:
            raise too_few_tokens(split, len(tokens), cfg.seq_len)
    return splits


def load_tokens(cfg: DataConfig) -> TokenSplits:
    """Tokenized train and validation splits for ``cfg``: prepared shards (``data.prepared``), else from the token
    cache when possible."""
    if cfg.prepared:
        return load_prepared(cfg)
    key = cache_key(cfg)
    path = cache_root(cfg) / "tokens" / key
    hit = (path / "meta.json").is_file()
    if not hit:
        t0 = time.perf_counter()
        corpus = load_corpus(cfg)
        train_docs = corpus.train
        if cfg.fraction < 1.0:
            train_docs = split_at(train_docs, round(total_chars(train_docs) * cfg.fraction))[0]
        tok = get_tokenizer(cfg.tokenizer)
        train = tokenize_documents(tok, train_docs, f"tokenizing train ({tok.name})")
        val = tokenize_documents(tok, corpus.val, f"tokenizing val ({tok.name})")
        source = corpus.source + (f"; first {cfg.fraction:g} of train" if cfg.fraction < 1.0 else "")
        meta = {"key": key, "source": source, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                "train_tokens": len(train), "val_tokens": len(val),
                "train_chars": total_chars(train_docs), "val_chars": total_chars(corpus.val),
                "seconds": round(time.perf_counter() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_cache(path, train, val, meta)
    meta = json.loads((path / "meta.json").read_text())
    splits = TokenSplits(
        train=np.load(path / "train.npy", mmap_mode="r"),
        val=np.load(path / "val.npy", mmap_mode="r"),
        vocab_size=meta["vocab_size"],
        tokenizer_name=meta["tokenizer"],
        source=meta["source"],
        cache_hit=hit,
        cache_path=path,
    )
    for split, tokens in (("train", splits.train), ("validation", splits.val)):
        if len(tokens) < cfg.seq_len + 1:
            raise too_few_tokens(split, len(tokens), cfg.seq_len)
    return splits
