"""A dataset's documents for ``prepare`` (:mod:`lmtune.data.prepare`), streamed in one order that is the same on every
run: the built-in corpus, local files (.txt/.jsonl/.parquet, read in chunks) or a hub dataset (``datasets``'
``streaming=True``), with its validation split where it has one.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.config import ConfigError
from lmtune.data.corpora import (
    LINE_REPOS,
    builtin_documents,
    expand_files,
    files_identity,
    hub_failure,
    hub_reachable,
    resolve_hub,
)


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
