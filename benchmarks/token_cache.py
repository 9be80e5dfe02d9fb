"""Token cache: first load (read + tokenize with GPT-2 + write) vs second load (cache hit), and GPT-2
tokenization throughput against tiktoken's single-thread ``encode_ordinary`` measured in the same run.

    python benchmarks/token_cache.py [--files A.txt B.txt ...] [--repeats 3]

Default text: WikiText-2 valid+test from ../shared/data (real English, ~2.4 MB); the builtin corpus
when those files are absent. Targets (issue 2): second load >= 50x faster than the first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tiktoken

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmtune import data  # noqa: E402
from lmtune.config import DataConfig  # noqa: E402
from lmtune.data import tokenizers  # noqa: E402

WIKITEXT = [REPO.parent / "shared" / "data" / "wikitext-2" / name for name in ("valid.txt", "test.txt")]


def machine() -> str:
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {model}, {tokenizers._cpu_count()} cores usable, {platform.system()} {platform.machine()}; "
            f"load average {load}\n"
            f"python {platform.python_version()}, numpy {np.__version__}, tiktoken {tiktoken.__version__}; "
            f"commit {rev or '?'}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", default=None, help="text files (default: WikiText-2 valid+test)")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of the throughput measurements (best of)")
    args = ap.parse_args()

    files = args.files if args.files is not None else [str(p) for p in WIKITEXT if p.is_file()]
    print(machine())
    if files:
        source = dict(dataset="files", files=files)
        print(f"text: {', '.join(files)}")
    else:
        source = dict(dataset="builtin")
        print(f"text: builtin corpus (WikiText-2 files not found at {WIKITEXT[0].parent})")

    t0 = time.perf_counter()
    tok = data.get_tokenizer("gpt2")
    print(f"GPT-2 encoding built offline in {time.perf_counter() - t0:.3f} s (once per process, not in the loads below)")

    with tempfile.TemporaryDirectory(prefix="lmtune-bench-cache-") as cache:
        cfg = DataConfig(**source, tokenizer="gpt2", seq_len=1024, cache_dir=cache)

        t0 = time.perf_counter()
        first = data.load_tokens(cfg)
        t_first = time.perf_counter() - t0
        assert not first.cache_hit

        t0 = time.perf_counter()
        second = data.load_tokens(cfg)
        t_second = time.perf_counter() - t0
        assert second.cache_hit

        # A hit returns memory maps; reading every token once is the cost a run pays later.
        t0 = time.perf_counter()
        third = data.load_tokens(cfg)
        checksum = int(np.asarray(third.train, dtype=np.int64).sum() + np.asarray(third.val, dtype=np.int64).sum())
        t_read = time.perf_counter() - t0
        hits = [best_of(lambda: data.load_tokens(cfg), 1) for _ in range(5)]
        n_tokens = len(first.train) + len(first.val)

    print(f"\ntokens: {len(first.train):,} train + {len(first.val):,} val = {n_tokens:,} (checksum {checksum})")
    print(f"first load  (read, tokenize, write cache): {t_first * 1e3:9.1f} ms")
    print(f"second load (cache hit, memory-mapped):    {t_second * 1e3:9.3f} ms   -> {t_first / t_second:,.0f}x faster (target >= 50x)")
    print(f"cache hit + read every token:              {t_read * 1e3:9.3f} ms   -> {t_first / t_read:,.0f}x faster")
    print(f"cache hit, median of 5 more:               {statistics.median(hits) * 1e3:9.3f} ms")

    # Throughput on the same documents the first load tokenized (the train/val split does not matter).
    documents = data.load_corpus(cfg)
    docs = documents.train + documents.val
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    enc = tok.encoding
    baseline = best_of(lambda: [enc.encode_ordinary(d) for d in docs], args.repeats)
    ours = best_of(lambda: data.tokenize_documents(tok, docs), args.repeats)
    threads, tokenizers._cpu_count = tokenizers._cpu_count(), lambda: 1  # the same pipeline on one thread
    ours_1 = best_of(lambda: data.tokenize_documents(tok, docs), args.repeats)
    tokenizers._cpu_count = lambda: threads
    same = data.tokenize_documents(tok, docs).tolist() == [
        t for i, d in enumerate(docs) for t in ([tok.eot] if i else []) + enc.encode_ordinary(d)]
    print(f"\nGPT-2 tokenization of {mb:.2f} MB (best of {args.repeats}):")
    print(f"  tiktoken encode_ordinary, 1 thread, whole documents: {mb / baseline:6.1f} MB/s   (baseline)")
    print(f"  lmtune tokenize_documents, 1 thread:                 {mb / ours_1:6.1f} MB/s   -> {baseline / ours_1:.2f}x the baseline")
    print(f"  lmtune tokenize_documents, {threads} threads:                {mb / ours:6.1f} MB/s   -> {baseline / ours:.2f}x the baseline"
          f"; ids identical to the baseline: {same}")
    print("  (threads only help with idle cores: compare the load average above)")


if __name__ == "__main__":
    main()
