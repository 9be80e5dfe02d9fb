"""A run's tokens from prepared shards (``data.prepared=DIR|URI``): checked before anything starts, fetched once per
node from an object store, memory-mapped, never tokenized again.

Every problem is one ConfigError naming the file or key and what to do: no prepared dataset there (the prepare
command to run), an unfinished prepare, a missing or truncated shard, a header that is not a shard's, a tokenizer
that is not the config's, a ``data.limit_tokens`` above what was prepared.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from lmtune.config import ConfigError, DataConfig
from lmtune.data.corpora import source_identity
from lmtune.data.shards import INDEX, Index, ShardedTokens, file_sha256, llmc_index, read_header

AUTO = "auto"
"""``data.prepared=auto``: data.dataset prepared once into ``<root>/prepared/`` (the cache, or a sweep's storage), then
read from there."""


def prepare_command(cfg: DataConfig, where: str) -> str:
    files = " --files " + " ".join(cfg.files) if cfg.dataset == "files" and cfg.files else ""
    return f"python -m lmtune.data prepare {cfg.dataset}{files} --tokenizer {cfg.tokenizer} --out {where}"


def auto_prepared(cfg: DataConfig, root: Path, *, out: TextIO | None = None) -> Path:
    """The directory of ``data.dataset``'s shards under ``root/prepared``, prepared first where they are not (by this
    process, once: a second one waits on the prepare's lock and then finds them). The directory's name holds a digest
    of what decides the shards (the source's identity, the tokenizer, the validation rule)."""
    from lmtune.data.prepare import Settings, prepare, source

    out = out or sys.stderr
    identity = {"source": source_identity(cfg), "tokenizer": cfg.tokenizer, "val_fraction": cfg.val_fraction,
                "val_tokens": cfg.val_tokens}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.dataset.rstrip("/").split("/")[-1])
    directory = root / "prepared" / f"{slug}-{cfg.tokenizer}-{digest}"
    index = Index.read(directory)
    if index is None or not index.complete:
        print(f"data.prepared=auto: preparing {cfg.dataset} once into {directory}", file=out, flush=True)
        settings = Settings(tokenizer=cfg.tokenizer, workers=max(1, min(8, os.cpu_count() or 1)),
                            val_fraction=cfg.val_fraction, val_tokens=cfg.val_tokens)
        prepare(source(cfg.dataset, cfg.files), directory, settings, progress=out.isatty())
    return directory


def upload(local: Path, uri: str) -> None:
    """A prepared directory's shards, then its index, to an object store (a reader sees the index only once every
    shard is there)."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(root, recursive=True)
    for path in [*sorted(local.glob("*.bin")), local / INDEX]:
        pyarrow.fs.copy_files(str(path), f"{root}/{path.name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)


def local_copy(uri: str, cache: Path) -> Path:
    """A prepared dataset on an object store (``s3://…``), copied once into this node's cache (under a lock: the
    trials of a node share one copy, and each shard is checked against the index's digest) and read from there."""
    import pyarrow.fs

    local = cache / "prepared-remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    with open(local.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = Index.read(local)
        if index is not None and index.complete:
            return local
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        try:
            with fs.open_input_stream(f"{root}/{INDEX}") as f:
                (local / f".{INDEX}.remote").write_bytes(f.read())
        except (OSError, pyarrow.lib.ArrowException) as e:
            raise ConfigError(f"data.prepared={uri!r}: no {INDEX} there ({e}).") from None
        remote = Index.read_text((local / f".{INDEX}.remote").read_text(), uri)
        for infos in remote.splits.values():
            for s in infos:
                if (local / s.file).is_file() and file_sha256(local / s.file) == s.sha256:
                    continue
                pyarrow.fs.copy_files(f"{root}/{s.file}", str(local / s.file), source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
                if s.sha256 and file_sha256(local / s.file) != s.sha256:
                    raise ConfigError(f"data.prepared={uri!r}: {s.file} does not match its digest in {INDEX}.")
        remote.write(local)
    return local


def locate(cfg: DataConfig, cache: Path) -> tuple[Path, Index]:
    """The directory and index of ``data.prepared``, checked: complete, every shard whole, the config's tokenizer,
    ``data.limit_tokens`` within what was prepared."""
    where = cfg.prepared
    directory = local_copy(where, cache) if "://" in where else Path(where).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"data.prepared={where!r}: no such directory; prepare it first: "
                          f"{prepare_command(cfg, where)}")
    index = Index.read(directory) or llmc_index(directory)
    if index is None:
        raise ConfigError(f"data.prepared={where!r} holds no prepared dataset (no {INDEX}, no .bin shards); "
                          f"prepare it first: {prepare_command(cfg, where)}")
    if not index.complete:
        raise ConfigError(f"data.prepared={where!r} is unfinished (a prepare was stopped?); run it again to finish: "
                          f"{prepare_command(cfg, where)}")
    if index.tokenizer != cfg.tokenizer:
        raise ConfigError(f"data.prepared={where!r} holds {index.tokenizer} tokens, but data.tokenizer="
                          f"{cfg.tokenizer!r}; set data.tokenizer={index.tokenizer} or prepare with --tokenizer "
                          f"{cfg.tokenizer}.")
    for split in ("train", "val"):
        if not index.splits.get(split):
            raise ConfigError(f"data.prepared={where!r} has no {split} shards.")
        for s in index.splits[split]:
            path = directory / s.file
            if not path.is_file():
                raise ConfigError(f"data.prepared={where!r}: shard {s.file} is missing (listed in {INDEX}).")
            _, n = read_header(path)
            if n != s.tokens:
                raise ConfigError(f"data.prepared={where!r}: shard {s.file} holds {n:,} tokens, {INDEX} says "
                                  f"{s.tokens:,}.")
    available = index.tokens("train")
    if cfg.limit_tokens > available:
        raise ConfigError(f"data.limit_tokens={cfg.limit_tokens:,} is more than data.prepared={where!r} holds "
                          f"({available:,} training tokens); accepted: 0 (all) up to {available:,}.")
    return directory, index


def check_prepared(cfg: DataConfig, cache: Path) -> None:
    """What :func:`locate` checks, without copying an object store's shards here (a sweep's driver checks before any
    trial; the trials' nodes copy them): for a URI, its index only."""
    if cfg.prepared == AUTO or not cfg.prepared:
        return
    if "://" not in cfg.prepared:
        locate(cfg, cache)
        return
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(cfg.prepared)
        with fs.open_input_stream(f"{root}/{INDEX}") as f:
            index = Index.read_text(f.read().decode(), cfg.prepared)
    except (OSError, pyarrow.lib.ArrowException) as e:
        raise ConfigError(f"data.prepared={cfg.prepared!r}: no {INDEX} there ({str(e).splitlines()[0][:120]}); "
                          f"prepare it first: {prepare_command(cfg, cfg.prepared)}") from None
    problem = ("is unfinished (a prepare was stopped?); run it again to finish" if not index.complete else
               f"holds {index.tokenizer} tokens, but data.tokenizer={cfg.tokenizer!r}" if index.tokenizer != cfg.tokenizer
               else f"holds {index.tokens('train'):,} training tokens, fewer than data.limit_tokens="
                    f"{cfg.limit_tokens:,}" if cfg.limit_tokens > index.tokens("train") else "")
    if problem:
        raise ConfigError(f"data.prepared={cfg.prepared!r} {problem}: {prepare_command(cfg, cfg.prepared)}")


def open_splits(directory: Path, index: Index, limit_tokens: int) -> tuple[ShardedTokens, ShardedTokens]:
    train = ShardedTokens([directory / s.file for s in index.splits["train"]], limit=limit_tokens or None)
    val = ShardedTokens([directory / s.file for s in index.splits["val"]])
    return train, val
