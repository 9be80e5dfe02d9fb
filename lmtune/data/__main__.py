"""The data command: prepare a corpus larger than memory once, as token shards every run memory-maps.

    python -m lmtune.data prepare DATASET [--files PATH …] [--out DIR|URI] [--tokens N] [--workers K]
                                          [--tokenizer gpt2|byte] [--shard-tokens N]

DATASET: ``builtin``, ``files`` (with ``--files``: .txt/.jsonl/.parquet paths or globs), a hub alias (``fineweb-edu``,
``openwebtext``, ``wikitext-103-raw-v1``), a hub repo ``org/name[:config]``, or a local directory laid out like a hub
repository (``$LMTUNE_HUB_ROOT/<org>/<name>`` is used for a repo where it exists). Then train with
``data.prepared=DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from lmtune.cli import check_output_dir, parse_command_line, user_errors_exit_2
from lmtune.config import ConfigError, DataConfig
from lmtune.data.cache import cache_root
from lmtune.data.prepare import DEFAULT_SHARD_TOKENS, Settings, prepare, source
from lmtune.data.prepared import upload
from lmtune.data.tokenizers import TOKENIZERS

COMMANDS = ("prepare",)


def _parser() -> argparse.ArgumentParser:
    q = argparse.ArgumentParser(prog="python -m lmtune.data prepare",
                                description="Stream DATASET's documents, tokenize them in worker processes and write "
                                            "token shards (llm.c's format) and an index; a killed prepare started "
                                            "again resumes.")
    q.add_argument("dataset", metavar="DATASET")
    q.add_argument("--files", nargs="+", default=[], help="for DATASET=files: paths or globs of .txt/.jsonl/.parquet")
    q.add_argument("--out", help="a directory, or an object-store URI (s3://…) the shards are uploaded to "
                                 "(default: <cache>/prepared/<dataset>-<tokenizer>)")
    q.add_argument("--tokens", type=int, default=0, help="stop after N training tokens (default: the whole corpus)")
    q.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes "
                                                                                       "(default: %(default)s)")
    q.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2")
    q.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard "
                                                                                    "(default: %(default)s)")
    q.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                   help="without a validation split: the share of documents held out by hash (default: %(default)s)")
    q.add_argument("--val-tokens", type=int, default=DataConfig.val_tokens,
                   help="validation tokens at most (default: %(default)s)")
    return q


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        given = f"{argv[0]!r} is not a command" if argv else "no command given"
        raise ConfigError(f"{given}; accepted: {', '.join(COMMANDS)} (python -m lmtune.data prepare --help).")
    a = parse_command_line(_parser(), argv[1:])
    for name, value, low in (("--tokens", a.tokens, 0), ("--workers", a.workers, 1), ("--shard-tokens", a.shard_tokens, 1),
                             ("--val-tokens", a.val_tokens, 1)):
        if value < low:
            raise ConfigError(f"{name}={value} is not accepted: expected an integer >= {low}.")
    if not 0 < a.val_fraction <= 0.5:
        raise ConfigError(f"--val-fraction={a.val_fraction} is not accepted: expected a number in (0, 0.5].")
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in a.dataset.rstrip("/").split("/")[-1])
    default = cache_root(DataConfig()) / "prepared" / (f"{slug}-{a.tokenizer}" + (f"-{a.tokens}" if a.tokens else ""))
    uri = a.out if a.out and "://" in a.out else None
    if uri:  # prepared here, then uploaded: every node of a cluster then copies it once (data.prepared=URI)
        out = Path(tempfile.gettempdir()) / f"lmtune-prepare-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
    else:
        out = Path(a.out).expanduser() if a.out else default
        check_output_dir(out, "--out")
    src = source(a.dataset, a.files)  # a dataset that cannot be read is named here, before any work
    settings = Settings(tokenizer=a.tokenizer, shard_tokens=a.shard_tokens, max_tokens=a.tokens, workers=a.workers,
                        val_fraction=a.val_fraction, val_tokens=a.val_tokens)
    t0 = time.monotonic()
    print(f"prepare: {a.dataset} → {uri or out} ({a.tokenizer} tokens, {a.workers} worker(s), shards of "
          f"{a.shard_tokens:,} tokens)", flush=True)
    index = prepare(src, out, settings)
    if uri:
        upload(out, uri)
    where = uri or out
    shards = {s: len(v) for s, v in index.splits.items()}
    print(f"prepared {where}: {index.tokens('train'):,} training tokens in {shards.get('train', 0)} shard(s), "
          f"{index.tokens('val'):,} validation tokens ({index.validation}); {time.monotonic() - t0:.1f} s.\n"
          f"train on it with data.prepared={where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
