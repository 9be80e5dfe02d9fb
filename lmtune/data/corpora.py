"""Corpora: documents (list[str]) for the train and validation splits, and their readers.

``data.dataset`` is ``builtin`` (CPython's reference documentation, so that a run needs no download),
``files`` (.txt/.jsonl/.parquet) or a Hugging Face hub dataset (``datasets.load_dataset``, imported only
when one is read); a hub dataset can be served from a local mirror laid out like the hub repository.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmtune.config import ConfigError, DataConfig

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")

HUB_ALIASES: dict[str, tuple[str, str | None]] = {
    "wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-103-raw-v1": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "openwebtext": ("Skylion007/openwebtext", None),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
"""Short names for hub datasets: ``data.dataset=NAME`` → (repo id, config)."""

LINE_REPOS = {"Salesforce/wikitext"}
"""Hub datasets whose rows are the lines of the original text file (each ending in "\\n"; a blank
line is an empty row), not documents: rows are concatenated with blank lines restored, without
end-of-text ids, which rebuilds the text as distributed."""

HUB_ROOT_ENV = "LMTUNE_HUB_ROOT"
"""A local mirror of the hub: ``$LMTUNE_HUB_ROOT/<org>/<name>`` is used instead of the repo ``org/name``
when that directory exists (same files as the hub repo: README.md with its configs, parquet shards)."""


@dataclass
class Corpus:
    train: list[str]
    val: list[str]
    source: str
    """Human description of where the text came from."""


def split_at(documents: list[str], at: int) -> tuple[list[str], list[str]]:
    """Documents before and after character offset ``at`` of their concatenation (one document may
    be cut in two)."""
    head: list[str] = []
    seen = 0
    for i, doc in enumerate(documents):
        if seen + len(doc) >= at:
            k = at - seen
            head.append(doc[:k])
            tail = [doc[k:], *documents[i + 1:]]
            return [d for d in head if d], [d for d in tail if d]
        head.append(doc)
        seen += len(doc)
    return head, []


def total_chars(documents: Sequence[str]) -> int:
    return sum(len(d) for d in documents)


def _hold_out(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last ``val_fraction`` of the text becomes validation (the text's end, so that the training
    prefix used by ``fraction`` never overlaps it)."""
    return split_at(documents, round(total_chars(documents) * (1.0 - val_fraction)))


def builtin_documents() -> list[str]:
    """CPython's reference documentation (pydoc_data, ~465 KB of English), one topic per document,
    in sorted order so that every machine with the same Python builds the same corpus."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def expand_files(patterns: Sequence[str], key: str) -> list[Path]:
    """Paths and globs → existing files with an accepted suffix, in a stable order."""
    if not patterns and key == "data.files":
        raise ConfigError("data.dataset='files' needs data.files (paths or globs of .txt/.jsonl/.parquet files).")
    paths: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True)) if not os.path.isdir(m)]
            if not matches:
                raise ConfigError(f"{key}: {pattern!r} matched no files; give paths or globs of "
                                  f"{'/'.join(FILE_SUFFIXES)} files.")
            paths += matches
        else:
            p = Path(expanded)
            if not p.exists():
                raise ConfigError(f"{key}: file not found: {pattern!r}; give paths or globs of "
                                  f"{'/'.join(FILE_SUFFIXES)} files.")
            if p.is_dir():
                raise ConfigError(f"{key}: {pattern!r} is a directory; give files or a glob such as "
                                  f"'{pattern.rstrip('/')}/*.txt'.")
            paths.append(p)
    for p in paths:
        if p.suffix.lower() not in FILE_SUFFIXES:
            raise ConfigError(f"{key}: {str(p)!r} has an unsupported extension; accepted: "
                              f".txt (whole file = one document), .jsonl (a \"text\" field per line), "
                              f".parquet (a \"text\" column).")
    return paths


def _read_txt(path: Path) -> list[str]:
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.files: {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}).") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{str(path)!r} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.files: {where} is not JSON ({e.msg}); .jsonl files need one "
                                  f"JSON object with a \"text\" string per line.") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                got = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
                raise ConfigError(f"data.files: {where} has no \"text\" string ({got}); .jsonl files need "
                                  f"one JSON object with a \"text\" string per line.")
            docs.append(record["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"data.files: cannot read {str(path)!r} as parquet ({e}).") from None
    column_type = schema.field("text").type if "text" in schema.names else None
    if column_type is None or not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ConfigError(f"data.files: {str(path)!r} has no string column \"text\" (columns: "
                          f"{', '.join(schema.names)}); .parquet files need a \"text\" column.")
    column = pq.read_table(path, columns=["text"]).column("text")
    return [t for t in column.to_pylist() if t]


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _read_files(paths: list[Path], key: str) -> list[str]:
    docs = [d for p in paths for d in _READERS[p.suffix.lower()](p) if d]
    if not docs:
        raise ConfigError(f"{key}: the corpus is empty: no text in {', '.join(map(str, paths))}.")
    return docs


def files_identity(paths: list[Path]) -> list[list[Any]]:
    """What decides the content of files without reading them: resolved path, size, mtime."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _describe_files(paths: list[Path]) -> str:
    size = sum(p.stat().st_size for p in paths)
    names = ", ".join(str(p) for p in paths[:3]) + (f", … ({len(paths)} files)" if len(paths) > 3 else "")
    return f"{names} ({size / 1e6:.2f} MB)"


@dataclass
class HubSource:
    name: str
    """``data.dataset`` as given."""
    repo: str
    """Hub repo id, or a local directory laid out like the hub repo."""
    config: str | None
    lines: bool
    """Rows are lines (concatenate) rather than documents (join with end-of-text)."""

    @property
    def local(self) -> bool:
        return os.path.isdir(self.repo)


def _accepted_datasets() -> str:
    return ("'builtin', 'files', a hub alias (" + ", ".join(HUB_ALIASES) + "), a hub repo 'org/name' or "
            "'org/name:config', or a local directory laid out like a hub repo")


def resolve_hub(name: str) -> HubSource:
    """``data.dataset`` → repo (or local mirror) and config; ConfigError for names that are neither."""
    if name in HUB_ALIASES:
        repo, config = HUB_ALIASES[name]
    else:
        repo, colon, config = name.rpartition(":")
        if not colon or "/" in config:  # no ':config' suffix (a ':' inside a path is not one)
            repo, config = name, None
        config = config or None
        if "/" not in repo:
            raise ConfigError(f"data.dataset={name!r} is not accepted: expected {_accepted_datasets()}.")
    # A local path such as /mirror/Salesforce/wikitext keeps the semantics of the repo it mirrors.
    lines = any(repo == r or Path(repo).parts[-2:] == tuple(r.split("/")) for r in LINE_REPOS)
    local = os.path.expanduser(repo)
    root = os.environ.get(HUB_ROOT_ENV)
    if not os.path.isdir(local) and root and os.path.isdir(os.path.join(root, repo)):
        local = os.path.join(root, repo)
    return HubSource(name, os.path.abspath(local) if os.path.isdir(local) else repo, config, lines)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint. Without it, `datasets` retries an unreachable hub for
    ~25 s before failing; with HF_HUB_OFFLINE=1 it uses its local cache and fails at once.
    Behind a proxy a direct connect proves nothing, so we leave the verdict to `datasets`."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_failure(src: HubSource, why: str) -> ConfigError:
    where = f"{src.repo!r}" + (f" (config {src.config!r})" if src.config else "")
    return ConfigError(
        f"data.dataset={src.name!r}: cannot load hub dataset {where}: {why}. Without a network: set "
        f"HF_HUB_OFFLINE=1 to use the Hugging Face cache, or mirror the repo's files under "
        f"${HUB_ROOT_ENV}/{src.repo if not src.local else '<org>/<name>'}, or use data.dataset=builtin "
        f"or data.dataset=files.")


def _load_hub(src: HubSource, val_fraction: float) -> Corpus:
    """Train and validation documents of a hub dataset through ``datasets.load_dataset``.

    A local mirror goes through the same call as the hub, ``load_dataset(<dir>, config)``, which
    reads the configs from the mirror's README.md. `datasets` resolves the files of every config in
    that README, so a partial mirror (one config downloaded) or one without a README fails there; when
    the config has its own folder (``<dir>/<config>/train-*.parquet``, as in Salesforce/wikitext) we
    then read that folder with ``data_dir=config`` (splits named by the files, like the hub does).
    """
    import datasets  # slow to import; only hub runs pay for it

    if not src.local and not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise hub_failure(src, "the hub is not reachable (no network?)")
    try:
        splits = datasets.load_dataset(src.repo, src.config)
    except Exception as e:
        config_dir = os.path.join(src.repo, src.config or "")
        try:
            if not (src.local and src.config and os.path.isdir(config_dir)):
                raise
            splits = datasets.load_dataset(src.repo, data_dir=src.config)
        except Exception:
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise hub_failure(src, f"{type(e).__name__}: {first_line}") from None

    def texts(split: str) -> list[str]:
        ds = splits[split]
        if "text" not in ds.column_names:
            raise ConfigError(f"data.dataset={src.name!r}: split {split!r} has no \"text\" column "
                              f"(columns: {', '.join(ds.column_names)}).")
        rows = [t or "" for batch in ds.with_format("arrow").iter(batch_size=65536)
                for t in batch.column("text").to_pylist()]
        if src.lines:
            text = "".join(row or "\n" for row in rows)
            return [text] if text.strip() else []
        return [row for row in rows if row]

    if "train" not in splits:
        raise ConfigError(f"data.dataset={src.name!r} has no 'train' split (splits: {', '.join(splits)}).")
    train = texts("train")
    if not train:
        raise ConfigError(f"data.dataset={src.name!r}: the train split is empty.")
    if "validation" in splits:
        val, how = texts("validation"), "its validation split"
    else:
        train, val = _hold_out(train, val_fraction)
        how = f"last {val_fraction:g} of train"
    where = src.repo + (f":{src.config}" if src.config else "")
    return Corpus(train, val, f"hub {where}; validation: {how}")


def load_corpus(cfg: DataConfig) -> Corpus:
    """Train and validation documents for ``cfg`` (before ``fraction`` is applied)."""
    if cfg.dataset == "builtin":
        train, val = _hold_out(builtin_documents(), cfg.val_fraction)
        return Corpus(train, val, f"builtin: CPython {sys.version.split()[0]} reference docs (pydoc_data); "
                                  f"validation: last {cfg.val_fraction:g}")
    if cfg.dataset == "files":
        paths = expand_files(cfg.files, "data.files")
        train = _read_files(paths, "data.files")
        if cfg.val_files:
            val_paths = expand_files(cfg.val_files, "data.val_files")
            return Corpus(train, _read_files(val_paths, "data.val_files"),
                          f"files: {_describe_files(paths)}; validation: {_describe_files(val_paths)}")
        train, val = _hold_out(train, cfg.val_fraction)
        return Corpus(train, val, f"files: {_describe_files(paths)}; validation: last {cfg.val_fraction:g}")
    return _load_hub(resolve_hub(cfg.dataset), cfg.val_fraction)


def source_identity(cfg: DataConfig) -> dict[str, Any]:
    """What decides the text of a dataset, found without reading it (so a cache hit reads nothing)."""
    if cfg.dataset == "builtin":
        return {"builtin": sys.version}  # pydoc_data changes with every CPython release
    if cfg.dataset == "files":
        ident: dict[str, Any] = {"files": files_identity(expand_files(cfg.files, "data.files"))}
        if cfg.val_files:
            ident["val_files"] = files_identity(expand_files(cfg.val_files, "data.val_files"))
        return ident
    src = resolve_hub(cfg.dataset)
    ident = {"hub": src.repo, "config": src.config}
    if src.local:  # a mirror can change under the same name: key on its files too
        ident["files"] = files_identity(sorted(p for p in Path(src.repo).rglob("*") if p.is_file()))
    return ident
