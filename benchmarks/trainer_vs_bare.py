"""lmtune's Trainer against a bare PyTorch loop: same model, same data, same process.

Targets (issue 2): tokens/s ratio ≥ 0.97 with the default measurement intervals, and on the
"done when" run (byte-level real text, 4 layers × 128 wide, seq 128, micro-batch 16, 300 steps,
lr 1e-3, float32, no compile) a val loss within 5% of the bare loop's at ≥ 0.9× its tokens/s.

    python benchmarks/trainer_vs_bare.py [--files ../shared/data/wikitext-2/valid.txt ...] [--steps 300]

Both sides are timed the same way, by the wall clock over the whole run: model and optimizer set-up, every
step (the trainer's measurement steps and memory probes included), the same evaluations at the same steps.
(The trainer's own ``tokens_per_s`` leaves warmup, measured and probed steps out; this does not.) The runs
alternate (bare, trainer, bare, trainer) and the best of each is kept, to damp machine noise.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtune import config as config_lib
from lmtune.data import Batches, eval_batches, load_tokens
from lmtune.model import GPT
from lmtune.training import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
WARMUP = 3


def done_when_config(files: list[str], steps: int) -> config_lib.Config:
    data = ["data.dataset=files", "data.files=" + ",".join(files)] if files else ["data.dataset=builtin"]
    return config_lib.load(overrides=[
        *data, "data.tokenizer=byte", "data.seq_len=128", "data.val_fraction=0.1",
        "model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.block_size=128", "model.dropout=0.0",
        "train.micro_batch_size=16", f"train.steps={steps}", "train.lr=1e-3", "train.dtype=float32",
        "train.compile=false", "train.ac_budget=1.0", "train.optimizer=adamw", "train.weight_decay=0.0",
        "train.warmup_steps=0", "train.accumulation_steps=1", f"train.compile_warmup_steps={WARMUP}",
        "train.checkpoint=false",
    ], locked=False)  # every key the comparison depends on is explicit


def bare_loop(cfg: config_lib.Config) -> dict[str, float]:
    """What a researcher would write by hand: sample, forward, backward, clip, step. Evals at the same points."""
    t = cfg.train
    began = time.perf_counter()
    torch.manual_seed(t.seed)
    tokens = load_tokens(cfg.data)
    model = GPT(cfg.model, tokens.vocab_size)
    opt = torch.optim.AdamW(model.optim_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    batches = Batches(tokens.train, cfg.data.seq_len, t.micro_batch_size, t.seed)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = count = 0.0
        for x, y, valid in eval_batches(tokens.val, cfg.data.seq_len, t.micro_batch_size,
                                        t.eval_batches * t.micro_batch_size):
            total += model(x, y)[1].item() * valid
            count += valid
        model.train()
        return total / count

    for step in range(1, t.steps + 1):
        x, y = batches.next()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % t.eval_interval == 0 and step < t.steps:
            evaluate()
    val_loss = evaluate()
    took = time.perf_counter() - began
    return {"tokens_per_s": t.steps * t.micro_batch_size * cfg.data.seq_len / took, "val_loss": val_loss}


def trainer_run(cfg: config_lib.Config) -> dict[str, float]:
    began = time.perf_counter()
    summary = Trainer(cfg).fit()
    took = time.perf_counter() - began
    return {"tokens_per_s": summary["tokens"] / took, "val_loss": summary["val_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", nargs="*", default=None, help="text files (default: the shared WikiText-2 split)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    files = a.files if a.files is not None else [str(f) for f in (SHARED / "valid.txt", SHARED / "test.txt")
                                                 if f.is_file()]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    cfg = done_when_config(files, a.steps)
    print(f"data: {files or 'builtin corpus'}; threads: {torch.get_num_threads()}; steps: {a.steps}")
    load_tokens(cfg.data)  # tokenize once so neither side pays for it
    bare, ours = [], []
    for _ in range(a.repeats):
        bare.append(bare_loop(cfg))
        ours.append(trainer_run(cfg))
        print(f"  bare {bare[-1]['tokens_per_s']:9.0f} tok/s val {bare[-1]['val_loss']:.4f} | "
              f"trainer {ours[-1]['tokens_per_s']:9.0f} tok/s val {ours[-1]['val_loss']:.4f}")
    b = max(bare, key=lambda r: r["tokens_per_s"])
    o = max(ours, key=lambda r: r["tokens_per_s"])
    speed = o["tokens_per_s"] / b["tokens_per_s"]
    loss_gap = abs(o["val_loss"] - b["val_loss"]) / b["val_loss"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"commit {commit}; {time.strftime('%Y-%m-%d')}")
    print(f"tokens/s ratio trainer/bare: {speed:.3f} (target >= 0.97; done-when >= 0.9)")
    print(f"val loss: trainer {o['val_loss']:.4f} vs bare {b['val_loss']:.4f}: gap {100 * loss_gap:.2f}% (target <= 5%)")
    ok = speed >= 0.97 and loss_gap <= 0.05 and math.isfinite(o["val_loss"])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
