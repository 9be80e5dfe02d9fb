"""Phase-1 data: ``python -m lmtune.data prepare`` against tiktoken, its memory at 1× and 4× the corpus, the trainer's
memory on shards of each, and the shard sampler against what the trainer consumes.

The corpus is real text built here: WikiText-2's validation and test articles (``../shared/data/wikitext-2``) and
CPython's reference documentation, their paragraphs shuffled anew for every copy (so no two copies are alike) into
documents of 20 paragraphs, written as a hub-style mirror of FineWeb-Edu's ``sample/10BT`` parquet layout and
prepared through the real path (``datasets`` streaming a local mirror, ``$LMTUNE_HUB_ROOT``).

1. throughput, on the 4× corpus: prepare with K worker processes against tiktoken's ``encode_ordinary_batch`` with
   K threads on the same documents, read from the same parquet files (the baseline holds them all in memory and
   writes nothing); both timed as whole processes (start, imports, reading, tokenizing); target ≥ 0.9×.
2. memory: the peak total RSS of the prepare process and its workers at 1× and 4× the corpus; target growth ≤ 10%,
   ≤ 2 GiB with 2 workers. Shards of ``--shard-tokens`` (10^7 here, so that both corpora fill whole shards: a
   shard's buffer, 2 bytes a token, is the one thing that grows until the first shard is written).
3. the trainer (smoke model) on the 4× shards against the 1× shards: peak RSS within 5%.
4. the sampler: windows per second drawn from the 4× shards (Feistel order, memory-mapped) against the windows per
   second the trainer consumes at the smoke model; target ≥ 100×.

    python benchmarks/prepare.py [--size-mb 50] [--workers 2] [--shard-tokens 10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
README = """---
configs:
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
"""
SMOKE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128", "data.seq_len=128",
         "train.micro_batch_size=16", "train.compile=false", "train.dtype=float32", "train.checkpoint=false",
         "train.eval_interval=50", "train.eval_sequences=32", "system.threads=1"]


def paragraphs() -> list[str]:
    from lmtune.data.corpora import builtin_documents

    text = "".join((WIKITEXT / f).read_text() for f in ("valid.txt", "test.txt"))
    paras = [p.strip("\n") + "\n" for p in re.split(r"\n \n", text) if len(p.strip()) > 40]
    for doc in builtin_documents():
        paras += [p + "\n" for p in doc.split("\n\n") if len(p.strip()) > 40]
    return paras


def build_mirror(root: Path, size_mb: float, paras: list[str]) -> int:
    """A fineweb-edu mirror of about ``size_mb`` MB of text; returns its bytes."""
    repo = root / "HuggingFaceFW" / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "README.md").write_text(README)
    total, copy, part = 0, 0, 0
    while total < size_mb * 1e6:
        order = random.Random(copy).sample(paras, len(paras))
        docs = ["".join(order[i:i + 20]) for i in range(0, len(order), 20)]
        pq.write_table(pa.table({"text": docs}), repo / "sample" / "10BT" / f"{part:03d}_00000.parquet")
        total += sum(len(d.encode()) for d in docs)
        copy += 1
        part += 1
    return total


def peak_tree_rss(proc: subprocess.Popen) -> float:
    """Run ``proc`` to the end, sampling the total RSS of it and its children every 20 ms; returns the peak in GiB."""
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        time.sleep(0.02)
    return peak / 2**30


def run_prepare(mirror: Path, out: Path, workers: int, shard_tokens: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LMTUNE_HUB_ROOT": str(mirror), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(out.parent / "hf")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lmtune.data", "prepare", "fineweb-edu", "--out", str(out),
                             "--workers", str(workers), "--shard-tokens", str(shard_tokens)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = peak_tree_rss(proc)
    seconds = time.perf_counter() - t0
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{output}")
    return seconds, peak


def run_tiktoken(mirror: Path, threads: int) -> float:
    """The baseline in a fresh process timed whole, as the prepare is: read the same parquet files, then
    encode_ordinary_batch with ``threads``."""
    code = f"""
import glob, pyarrow.parquet as pq
from lmtune.data.tokenizers import gpt2_encoding
enc = gpt2_encoding()
docs = [t for f in sorted(glob.glob({str(mirror / 'HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet')!r}))
        for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
n = sum(len(ids) for ids in enc.encode_ordinary_batch(docs, num_threads={threads}))
"""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return time.perf_counter() - t0


def run_trainer(prepared: Path, steps: int) -> tuple[float, float]:
    """(peak RSS GiB, tokens/s) of a smoke-model run on ``prepared`` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "lmtune.train", *SMOKE, f"data.prepared={prepared}",
                                 f"train.steps={steps}", "--out", f"{tmp}/run", "--no-wandb"],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        peak = peak_tree_rss(proc)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.read()[-2000:])
        return peak, json.loads(Path(tmp, "run", "summary.json").read_text())["tokens_per_s"]


def sampler_windows_per_s(prepared: Path, seconds: float = 3.0) -> float:
    from lmtune.data import Batches
    from lmtune.data.shards import Index, ShardedTokens

    index = Index.read(prepared)
    tokens = ShardedTokens([prepared / s.file for s in index.splits["train"]])
    batches = Batches(tokens, 128, 16, seed=0, order="feistel")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batches.next()
        n += 16
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--shard-tokens", type=int, default=10_000_000)
    args = ap.parse_args()
    paras = paragraphs()
    results = {}
    with tempfile.TemporaryDirectory(prefix="lmtune-prepare-bench-") as tmp:
        for scale in (1, 4):
            mirror = Path(tmp) / f"mirror-{scale}x"
            size = build_mirror(mirror, args.size_mb * scale, paras)
            seconds, peak = run_prepare(mirror, Path(tmp) / f"prepared-{scale}x", args.workers, args.shard_tokens)
            index = json.loads((Path(tmp) / f"prepared-{scale}x" / "index.json").read_text())
            tokens = sum(s["tokens"] for v in index["splits"].values() for s in v)
            results[scale] = {"mb": size / 1e6, "seconds": seconds, "peak_gib": peak, "tokens": tokens}
            print(f"{scale}x: {size / 1e6:.0f} MB of text → {tokens:,} tokens in {seconds:.1f} s "
                  f"({size / 1e6 / seconds:.1f} MB/s), peak RSS {peak:.3f} GiB (prepare + {args.workers} workers)",
                  flush=True)
        base = run_tiktoken(Path(tmp) / "mirror-4x", args.workers)
        mb = results[4]["mb"]
        ratio = base / results[4]["seconds"]
        growth = results[4]["peak_gib"] / results[1]["peak_gib"] - 1
        print(f"\n1. throughput at 4x ({mb:.0f} MB): prepare {mb / results[4]['seconds']:.1f} MB/s (read, tokenize, "
              f"write shards; {args.workers} worker processes) vs tiktoken encode_ordinary_batch {mb / base:.1f} MB/s "
              f"(read, tokenize; {args.workers} threads), whole processes: {ratio:.2f}x (target >= 0.9x)")
        print(f"2. memory: peak RSS {results[1]['peak_gib']:.3f} GiB at 1x, {results[4]['peak_gib']:.3f} GiB at 4x: "
              f"growth {growth:+.1%} (target <= 10%, <= 2 GiB)")
        rss = {s: run_trainer(Path(tmp) / f"prepared-{s}x", args.steps) for s in (1, 4)}
        trainer_growth = rss[4][0] / rss[1][0] - 1
        print(f"3. trainer on the shards (smoke model, {args.steps} steps): peak RSS {rss[1][0]:.3f} GiB at 1x, "
              f"{rss[4][0]:.3f} GiB at 4x: {trainer_growth:+.1%} (target within 5%)")
        drawn = sampler_windows_per_s(Path(tmp) / "prepared-4x")
        consumed = rss[1][1] / 128
        print(f"4. sampler: {drawn:,.0f} windows/s drawn from the 4x shards vs {consumed:,.0f} windows/s the trainer "
              f"consumes at the smoke model: {drawn / consumed:,.0f}x (target >= 100x)")
        ok = ratio >= 0.9 and growth <= 0.10 and results[4]["peak_gib"] <= 2 and abs(trainer_growth) <= 0.05 \
            and drawn / consumed >= 100
        print("PASS" if ok else "MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
