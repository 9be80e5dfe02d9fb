"""The trainer: a GPT trained autoregressively, with the seed's measurements, usable alone or in a trial.

    python -m lmtune.train [FILE.toml ...] [section.key=value ...] [--out DIR] [--resume DIR]

It reports through a plain callable ``report(metrics, checkpoint_dir)``; the sweep layer binds that
to Ray. This module never imports ray (a test checks it), so it runs the same on a laptop, inside a
Tune trial, or on every worker of a Ray Train data-parallel group (``torch.distributed`` initialized).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmtune import config as config_lib
from lmtune.cli import user_errors_exit_2
from lmtune.config import Config, ConfigError
from lmtune.data import Batches, eval_batches, get_tokenizer, load_tokens
from lmtune.measure import (
    EmulatedOOM,
    GradientNoise,
    MemoryMeter,
    StepTimer,
    flops_per_token,
    is_oom,
    layer_metrics,
    peak_flops,
)
from lmtune.model import GPT
from lmtune.parallelize import parallelize

Report = Callable[[dict[str, Any], "str | None"], None]

# The metrics every final summary carries (DESIGN.md names); trials.csv and the tables read these.
FINAL_METRICS = (
    "loss", "lr", "grad_norm", "step_time_ms", "val_loss", "val_ppl", "tokens", "tokens_per_s", "avg_step_time_ms", "wall_clock_s",
    "peak_reserved_gib", "peak_allocated_gib", "grad_norm_spread", "grad_coherence", "noise_scale", "mfu",
)
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_REPORT = "lmtune_checkpoint_report"
"""Set on the reports a resumed trainer sends again first: those made since the checkpoint before the
previous one, up to the checkpoint it resumes from (saved in the checkpoint). Whoever collects reports (the
sweep driver) may have lost the last of them when the run was interrupted (on Ray Train the checkpoint can
be persisted before its reports reach Tune); from the first of them on, they replace what it recorded."""
REPLAY_CHECKPOINTS = 2
"""How many checkpoint intervals of reports a checkpoint holds for that replay."""
FAULT_OOM_ENV = "LMTUNE_FAULT_OOM_MICRO_BATCH"
"""Fault injection for tests of the OOM path through Ray (trial processes inherit the driver's environment):
every step of a run whose micro_batch_size is at least this raises a real torch.OutOfMemoryError."""


class Diverged(Exception):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("system.device='cuda' but no CUDA device is available; accepted here: auto, cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def effective_lr(cfg: Config, batch_tokens: int) -> float:
    """Peak lr scaled from ``base_batch_tokens`` to this run's effective batch.

    linear: Goyal et al. 2017 ("Accurate, Large Minibatch SGD"); sqrt: the square-root rule that
    McCandlish et al. 2018 derive for Adam-like optimizers below the critical batch.
    """
    t = cfg.train
    base = t.base_batch_tokens or batch_tokens
    ratio = batch_tokens / base
    return t.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[t.lr_scaling]


def lr_at(step: int, peak: float, total: int, cfg: Config) -> float:
    """Linear warmup to ``peak`` over warmup_steps, then constant or cosine down to min_lr_ratio·peak."""
    t = cfg.train
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    if t.schedule == "constant" or total <= t.warmup_steps:
        return peak
    progress = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
    floor = t.min_lr_ratio * peak
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: GPT, cfg: Config, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    groups = model.optim_groups(t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(t.beta1, t.beta2))
    if t.optimizer == "adam":  # weight decay as an L2 penalty in the gradient (the non-decoupled form)
        return torch.optim.Adam(groups, lr=lr, betas=(t.beta1, t.beta2))
    return torch.optim.SGD(groups, lr=lr, momentum=t.momentum)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def wandb_mode() -> str:
    """online when an API key is configured, else offline: never a prompt, never a network failure."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Trainer:
    """Train one configuration; see docs/CONTRACTS.md for the report/checkpoint contract."""

    def __init__(
        self,
        cfg: Config,
        *,
        out_dir: str | Path | None = None,
        report: Report | None = None,
        resume_from: str | Path | None = None,
        wandb: dict | None = None,
        progress: bool = False,
    ):
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self._report = report
        self.resume_from = Path(resume_from) if resume_from else None
        self.wandb_kwargs = wandb
        self.progress = progress
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0
        self.history: list[dict[str, Any]] = []
        self._wandb_run = None
        self._tmp_ckpt: str | None = None

    # --- setup ------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device = resolve_device(cfg.system.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and the caching allocator work on the current device
        if cfg.system.threads:
            torch.set_num_threads(cfg.system.threads)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)

        # Rank 0 tokenizes (or finds the cache) first; the others then hit the cache.
        if self.is_main:
            self.tokens = load_tokens(cfg.data)
        if self.world > 1:
            dist.barrier()
        if not self.is_main:
            self.tokens = load_tokens(cfg.data)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)

        self.raw_model = GPT(cfg.model, self.tokens.vocab_size).to(self.device)
        self.model: nn.Module = parallelize(self.raw_model, t)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        self.batch_tokens = t.micro_batch_size * t.accumulation_steps * self.world * cfg.data.seq_len
        self.peak_lr = effective_lr(cfg, self.batch_tokens)
        self.optimizer = build_optimizer(self.raw_model, cfg, self.peak_lr)
        self.batches = Batches(self.tokens.train, cfg.data.seq_len, t.micro_batch_size, t.seed,
                               rank=self.rank, world_size=self.world)
        windows_per_step = t.micro_batch_size * t.accumulation_steps * self.world
        n_windows = (len(self.tokens.train) - 1) // cfg.data.seq_len
        self.total_steps = max(1, math.ceil(t.epochs * n_windows / windows_per_step)) if t.epochs else t.steps

        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if t.dtype == "bfloat16"
            else contextlib.nullcontext()
        )
        self.memory = MemoryMeter(self.device, cfg.system.memory_limit_gib)
        self.noise = GradientNoise([p for p in self.raw_model.parameters() if p.requires_grad])
        m = cfg.model
        self.flops_per_token = flops_per_token(self.raw_model.num_params(), m.n_layer, m.n_head,
                                               m.n_embd // m.n_head, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.step = 0
        self.first_loss: float | None = None
        self.last: dict[str, Any] = {}
        self.measured: dict[str, float] = {}
        self._replay: list[dict[str, Any]] = []
        self._checkpoint_marks: list[int] = []
        """Indices in ``history`` of the reports that went with a checkpoint."""
        if self.resume_from:
            self._load_checkpoint(self.resume_from)
        if self.is_main and self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main and self.wandb_kwargs is not None:
            self._init_wandb()

    def _init_wandb(self) -> None:
        import wandb

        kwargs = dict(self.wandb_kwargs)
        kwargs.setdefault("project", "lmtune")
        if kwargs.get("dir"):
            Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self._wandb_run = wandb.init(
            config=self.cfg.flat(), mode=wandb_mode(), reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True), **kwargs,
        )

    # --- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to an OOM / divergence); returns the summary."""
        self._setup()
        try:
            return self._fit()
        finally:  # a trial stopped by its scheduler still leaves a complete W&B run behind
            if self._wandb_run is not None:
                self._wandb_run.finish()
                self._wandb_run = None

    def _fit(self) -> dict[str, Any]:
        status = "ok"
        try:
            self._train()
        except Diverged:
            status = "diverged"
        except Exception as exc:  # noqa: BLE001 — classify, re-raise what is not an OOM
            if not is_oom(exc):
                raise
            status = "oom"
            self.last["oom_reason"] = str(exc).splitlines()[0][:200]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if status == "ok":
            self.last.update(self._evaluate())
            self._sample()
        return self._finish(status)

    def _train(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self._report is not None:
            for report in self._replay:
                self._report({**report, CHECKPOINT_REPORT: True}, None)
        k = t.accumulation_steps
        self.model.train()
        self.timer = StepTimer(self.device, t.compile_warmup_steps)
        if self.step >= t.compile_warmup_steps:
            self.memory.reset()
        bar = self._progress_bar()
        window_loss = torch.zeros((), device=self.device)
        window_n = 0
        while self.step < self.total_steps:
            lr = lr_at(self.step, self.peak_lr, self.total_steps, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            measuring = t.measure_interval and (self.step + 1) % t.measure_interval == 0
            loss = self._forward_backward(k, measuring)
            grad_metrics = {}
            if measuring:
                grad_metrics = self.noise.finish(self._micro_sequences(k), self.world)
            log_now = (self.step + 1) % t.log_interval == 0 or self.step + 1 == self.total_steps
            if log_now:  # per-layer norms before clipping, like the seed's W&B panels
                grad_metrics.update(layer_metrics(self.raw_model.transformer.h))
            clip = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.memory.check_limit()
            window_loss += loss
            window_n += 1
            if self.timer.step(self.step):
                self.memory.reset()
            self.measured.update(grad_metrics)
            if log_now:
                metrics = self._train_metrics(window_loss / window_n, grad_norm, lr)
                window_loss.zero_()
                window_n = 0
                self._check_divergence(metrics["loss"])
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
                    bar.update(self.step - bar.n)
                if self.step < self.total_steps:
                    self._emit(metrics)
                else:  # the final report comes from fit(), with the end status
                    self.last.update(metrics)
            if self.step % t.eval_interval == 0 and self.step < self.total_steps:
                paused = self.timer.pause()
                self._emit(self._evaluate(), checkpoint=True)
                self.timer.resume(paused)
            if t.sample_interval and self.step % t.sample_interval == 0 and self.step < self.total_steps:
                paused = self.timer.pause()
                self._sample()
                self.timer.resume(paused)
        if bar is not None:
            bar.close()

    def _split_for_measure(self, k: int) -> bool:
        """A lone micro-batch on a lone worker is measured as two halves (two gradient samples)."""
        return k == 1 and self.world == 1 and self.cfg.train.micro_batch_size >= 2

    def _micro_sequences(self, k: int) -> int:
        """Sequences per gradient sample on a measurement step."""
        mb = self.cfg.train.micro_batch_size
        return mb // 2 if self._split_for_measure(k) else mb

    def _forward_backward(self, k: int, measuring: bool) -> torch.Tensor:
        """k micro-batches, gradients accumulated in p.grad; returns the step's mean loss (a tensor).

        On a measurement step with a single micro-batch on a single worker, the micro-batch is run as two
        halves so that there are two gradient samples (same mean gradient, same tokens). Under DDP, gradient sync is
        skipped on all but the last micro-batch; on measurement steps every micro-batch runs without sync
        and the gradients are averaged explicitly afterwards, so the per-micro-batch gradients are local.
        """
        fault = int(os.environ.get(FAULT_OOM_ENV) or 0)
        if fault and self.cfg.train.micro_batch_size >= fault:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {FAULT_OOM_ENV}={fault})")
        chunks = [self.batches.next() for _ in range(k)]
        if measuring and self._split_for_measure(k):
            x, y = chunks[0]  # interleaved halves: exactly what two data-parallel ranks would each get
            half = x.shape[0] // 2
            chunks = [(x[0:2 * half:2], y[0:2 * half:2]), (x[1:2 * half:2], y[1:2 * half:2])]
        if measuring:
            self.noise.begin()
        n = len(chunks)
        total = torch.zeros((), device=self.device)
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        for i, (x, y) in enumerate(chunks):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = ddp and not measuring and i == n - 1
            ctx = self.model.no_sync() if ddp and not sync else contextlib.nullcontext()
            with ctx:
                with self.autocast:
                    _, loss = self.model(x, y)
                (loss / n).backward()
            total += loss.detach()
            if measuring:
                self.noise.observe(n)
        if measuring and ddp:
            for p in self.raw_model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        return total / n

    def _train_metrics(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict[str, Any]:
        t = self.cfg.train
        if self.world > 1:
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.world
        timing = self.timer.read(self.step)
        metrics: dict[str, Any] = {
            **self.measured,  # the latest gradient measurements (coherence and noise only every measure_interval)
            "loss": float(loss),
            "lr": lr,
            "grad_norm": float(grad_norm),
            **timing,
        }
        step_ms = timing.get("avg_step_time_ms") or timing.get("step_time_ms")
        if step_ms:
            metrics["tokens_per_s"] = self.batch_tokens / (step_ms / 1000)
            if self.peak_flops:
                metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / (self.peak_flops * self.world)
        if self.step >= t.compile_warmup_steps:
            metrics.update(self.memory.peak())
        return metrics

    def _check_divergence(self, loss: float) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        if not math.isfinite(loss) or loss > self.cfg.train.divergence_factor * self.first_loss:
            self.last["loss"] = loss
            raise Diverged

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Mean loss over fixed validation windows: eval_batches micro-batches per rank, the ranks striding
        over one global list, so N workers at micro-batch m see the same windows as one worker at N·m."""
        cfg = self.cfg
        self.model.eval()
        batches = eval_batches(self.tokens.val, cfg.data.seq_len, cfg.train.micro_batch_size,
                               cfg.train.eval_batches * self.world)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(batches):
            if i % self.world != self.rank:
                continue
            with self.autocast:
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total[0] += loss.double()
            total[1] += 1
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train()
        val_loss = float(total[0] / total[1])
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # --- reporting --------------------------------------------------------------------------------

    def _common(self, status: str) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.step * self.batch_tokens,
            "epoch": self.batches.epoch,
            "wall_clock_s": self.timer.wall_clock_s() if hasattr(self, "timer") else 0.0,
            "status": status,
        }

    def _emit(self, metrics: dict[str, Any], *, checkpoint: bool = False, status: str = "running") -> None:
        """Record and report ``metrics``; with ``checkpoint``, a checkpoint holding this report is saved first
        and goes with it."""
        metrics = {**metrics, **self._common(status)}
        self.history.append(metrics)
        checkpoint_dir = None
        if checkpoint:
            self._checkpoint_marks.append(len(self.history) - 1)
            marks = self._checkpoint_marks
            start = marks[-1 - REPLAY_CHECKPOINTS] + 1 if len(marks) > REPLAY_CHECKPOINTS else 0
            checkpoint_dir = self._save_checkpoint(self.history[start:])
        self.last.update(metrics)
        if self.is_main:
            if self.out_dir:
                with open(self.out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if self._wandb_run is not None:
                self._wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.step)
        if self._report is not None:
            self._report(metrics, checkpoint_dir if self.is_main else None)

    def _finish(self, status: str) -> dict[str, Any]:
        final = {k: self.last[k] for k in FINAL_METRICS if k in self.last}
        final.update({k: v for k, v in self.last.items() if k.startswith("grad_norm/layer_")})
        if "oom_reason" in self.last:
            final["oom_reason"] = self.last["oom_reason"]
        if status == "oom":  # the last measured memory, even if the OOM came before the warmup reset
            final.update(self.memory.peak())
        final.update(self.memory.device_info())
        self._emit(final, checkpoint=status == "ok", status=status)
        summary = {**self.last, "config": self.cfg.flat()}
        if self.is_main and self.out_dir:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: v for k, v in self.last.items() if isinstance(v, (int, float, str))})
        if self._tmp_ckpt:
            shutil.rmtree(self._tmp_ckpt, ignore_errors=True)
        return summary

    # --- samples ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _sample(self, max_new_tokens: int = 64) -> str | None:
        if not self.is_main:
            return None
        tok = self.tokenizer
        start = [tok.eot] if getattr(tok, "eot", None) is not None else tok.encode("\n")
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        idx = torch.tensor([start], dtype=torch.long, device=self.device)
        self.raw_model.eval()
        with self.autocast:
            out = self.raw_model.generate(idx, max_new_tokens, temperature=1.0, top_k=50, generator=gen)
        self.raw_model.train()
        text = tok.decode(out[0, len(start):].tolist())
        if self.out_dir:
            with open(self.out_dir / "samples.txt", "a") as f:
                f.write(f"--- step {self.step} ---\n{text}\n")
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({"samples": wandb.Html(f"<pre>step {self.step}\n{text}</pre>")}, step=self.step)
        return text

    # --- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, reports: list[dict[str, Any]]) -> str | None:
        """Model, optimizer, step, RNG, data position and the reports that end with its own (see
        :data:`CHECKPOINT_REPORT`), written atomically; returns its directory."""
        if not (self.is_main and self.cfg.train.checkpoint):
            return None
        if self.out_dir:
            final = self.out_dir / "checkpoint"
        else:
            self._tmp_ckpt = self._tmp_ckpt or tempfile.mkdtemp(prefix="lmtune-ckpt-")
            final = Path(self._tmp_ckpt) / "checkpoint"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(
            {
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "first_loss": self.first_loss,
                "rng": _rng_state(),
                "data": self.batches.state_dict(),
                "noise": self.noise.state_dict(),
                "vocab_size": self.tokens.vocab_size,
                "reports": reports,
            },
            tmp / CHECKPOINT_FILE,
        )
        (tmp / "config.json").write_text(json.dumps(self.cfg.flat(), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return str(final)

    def _load_checkpoint(self, path: Path) -> None:
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no checkpoint at {path} (expected a directory holding {CHECKPOINT_FILE}).")
        state = torch.load(file, map_location=self.device, weights_only=False)
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.first_loss = state["first_loss"]
        self.batches.load_state_dict(state["data"])
        self.noise.load_state_dict(state["noise"])
        _set_rng_state(state["rng"])
        self._replay = list(state.get("reports") or [])
        self.history = list(self._replay)  # the next checkpoint's replay window reaches back before the resume
        self._checkpoint_marks = [len(self.history) - 1] if self.history else []

    def _progress_bar(self):
        if not (self.progress and self.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                    dynamic_ncols=True)


# --- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmtune.train",
        description="Train a GPT with lmtune's defaults (built-in < locked defaults < files < key=value).",
    )
    p.add_argument("args", nargs="*", metavar="FILE.toml | section.key=value")
    p.add_argument("--out", help="output directory (default: runs/train-<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint directory (e.g. OUT/checkpoint)")
    p.add_argument("--locked", metavar="FILE", help="locked-defaults TOML to use (default: ./lmtune.locked.toml "
                   "if present, over the shipped phase-0 defaults)")
    p.add_argument("--no-wandb", action="store_true", help="do not log a W&B run")
    p.add_argument("--describe", action="store_true", help="list every config key with its default and doc")
    return p


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.describe:
        print(config_lib.describe())
        return 0
    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    cfg = config_lib.load(files, overrides, locked=args.locked)
    out = Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "summary.json").exists() or (out / "checkpoint").exists():
        if not args.resume:
            raise ConfigError(f"--out {out} already holds a run; pass --resume {out / 'checkpoint'} "
                              "to continue it, or choose a new --out.")
    print(f"lmtune.train: locked defaults {', '.join(str(p) for p in config_lib.locked_files(args.locked))}",
          file=sys.stderr)
    trainer = Trainer(
        cfg, out_dir=out, resume_from=args.resume, progress=True,
        wandb=None if args.no_wandb else {"project": "lmtune", "name": out.name, "dir": str(out)},
    )
    summary = trainer.fit()
    shown = {k: summary[k] for k in ("status", "step", "tokens", "loss", "val_loss", "val_ppl", "tokens_per_s",
                                     "peak_reserved_gib") if k in summary}
    print(json.dumps(shown, indent=2))
    print(f"results: {out / 'summary.json'}")
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
