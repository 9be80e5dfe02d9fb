"""The trainer: a GPT trained autoregressively, with the phase-0 study's measurements, usable alone or in a trial.

    python -m lmtune.train [FILE.toml ...] [section.key=value ...] [--out DIR] [--resume DIR/checkpoint]

It reports through a plain callable ``report(metrics, checkpoint_dir)``; the sweep layer binds that
to Ray. This module never imports ray (a test checks it), so it runs the same on a laptop, inside a
Tune trial, or on every worker of a Ray Train data-parallel group (``torch.distributed`` initialized).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmtune import config as config_lib
from lmtune.cli import check_output_dir, user_errors_exit_2
from lmtune.config import Config, ConfigError
from lmtune.contract import (
    CHECKPOINT_CONFIG, CHECKPOINT_DIR, CHECKPOINT_FILE, CHECKPOINT_REPORT, METRICS_JSONL, SAMPLES_TXT, SUMMARY_JSON,
    SUMMARY_METRICS, layer_keys,
)
from lmtune.data import IGNORE_INDEX, Batches, eval_batches, get_tokenizer, load_tokens
from lmtune.model import GPT
from lmtune.reports import keep_reports, order
from lmtune.training.measure import GradientNoise, StepTimer, flops_per_token, layer_metrics, peak_flops
from lmtune.training.memory import EmulatedOOM, device_info, is_oom, memory_meter, storage_bytes
from lmtune.training.parallelize import parallelize

Report = Callable[[dict[str, Any], "str | None"], None]

REPLAY_CHECKPOINTS = 2
"""How many checkpoint intervals of reports a checkpoint holds, sent again on resume (:data:`CHECKPOINT_REPORT`)."""
FAULT_OOM_ENV = "LMTUNE_FAULT_OOM_MICRO_BATCH"
"""Fault injection for tests of the OOM path through Ray (trial processes inherit the driver's environment):
every step of a run whose micro_batch_size is at least this raises a real torch.OutOfMemoryError. Read once,
when the trainer is set up."""
RESUMABLE_KEYS = (
    "train.steps", "train.epochs", "train.eval_interval", "train.eval_batches", "train.eval_sequences",
    "train.log_interval", "train.measure_interval", "train.sample_interval", "train.checkpoint", "train.compile",
    "train.compile_mode", "train.compile_warmup_steps", "train.ac_budget", "train.divergence_factor",
    "system.device", "system.memory_limit_gib", "system.threads",
)
"""Keys ``--resume`` may change: how long and how the run goes on, never what its checkpoint holds (model,
data order, optimizer and its schedule)."""


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
    """The lr of optimizer step ``step`` (0-based) of ``total``: linear warmup to ``peak`` over warmup_steps,
    then constant, or cosine down to exactly min_lr_ratio·peak at the last step (total - 1)."""
    t = cfg.train
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    last = total - 1
    if t.schedule == "constant" or last <= t.warmup_steps:
        return peak
    progress = min(1.0, (step - t.warmup_steps) / (last - t.warmup_steps))
    floor = t.min_lr_ratio * peak
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


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
    """Restore RNG states saved by :func:`_rng_state`. The setters take CPU ByteTensors only, whatever device
    the model trains on (a checkpoint read with ``map_location=<cuda device>`` would hold CUDA ones)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state, read onto the CPU (``load_state_dict`` then copies each tensor to where its
    parameter lives); a file that cannot be read is one ConfigError naming it."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no checkpoint at {path} (expected a directory holding {CHECKPOINT_FILE}, "
                          f"e.g. OUT/checkpoint).")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"cannot read checkpoint {file}: {reason} (a truncated or foreign file?)") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise ConfigError(f"{file} is not an lmtune checkpoint (no model/optimizer/step state).")
    return state


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
    """Train one configuration; see docs/CONTRACTS.md for the report/checkpoint contract.

    ``device`` overrides ``system.device`` (the Ray Train worker passes the GPU Ray assigned it);
    ``clock`` is the step timer's clock (a seam for tests); ``stage_checkpoints`` writes checkpoints to a private
    temporary directory instead of ``out_dir/checkpoint`` (a trial hands each one to Ray, which copies it to the
    sweep's storage, and ``out_dir`` lies in Tune's trial directory, which Tune uploads while the trainer writes).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        out_dir: str | Path | None = None,
        report: Report | None = None,
        resume_from: str | Path | None = None,
        wandb: dict | None = None,
        progress: bool = False,
        device: torch.device | str | None = None,
        clock: Callable[[], float] = time.perf_counter,
        stage_checkpoints: bool = False,
    ):
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self.stage_checkpoints = stage_checkpoints
        self._report = report
        self.resume_from = Path(resume_from) if resume_from else None
        self.wandb_kwargs = wandb
        self.progress = progress
        self._device = device
        self.clock = clock
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0
        self.history: list[dict[str, Any]] = []
        self._wandb_run = None
        self._tmp_ckpt: str | None = None

    # --- setup ------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device = torch.device(self._device) if self._device is not None else resolve_device(cfg.system.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and the caching allocator work on the current device
        if cfg.system.threads:
            torch.set_num_threads(cfg.system.threads)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        self._fault_oom_at = int(os.environ.get(FAULT_OOM_ENV) or 0)

        # Rank 0 tokenizes (or finds the cache) first; the others then hit the cache.
        if self.is_main:
            self.tokens = load_tokens(cfg.data)
        if self.world > 1:
            dist.barrier()
        if not self.is_main:
            self.tokens = load_tokens(cfg.data)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)

        self.raw_model = GPT(cfg.model, self.tokens.vocab_size).to(self.device)
        self.model: nn.Module = parallelize(self.raw_model, t, device=self.device, world_size=self.world)

        self.batch_tokens = t.micro_batch_size * t.accumulation_steps * self.world * cfg.data.seq_len
        self.peak_lr = effective_lr(cfg, self.batch_tokens)
        self.optimizer = build_optimizer(self.raw_model, cfg, self.peak_lr)
        self.batches = Batches(self.tokens.train, cfg.data.seq_len, t.micro_batch_size, t.seed,
                               rank=self.rank, world_size=self.world)
        windows_per_step = t.micro_batch_size * t.accumulation_steps * self.world
        n_windows = (len(self.tokens.train) - 1) // cfg.data.seq_len
        self.total_steps = max(1, math.ceil(t.epochs * n_windows / windows_per_step)) if t.epochs else t.steps
        self.eval_sequences = t.eval_sequences or t.eval_batches * t.micro_batch_size * self.world

        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if t.dtype == "bfloat16"
            else contextlib.nullcontext()
        )
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        # DDP's gradient buckets are one gradient's worth of storage allocated outside Python.
        ddp_buckets = storage_bytes(params) if self.world > 1 else 0
        self.memory = memory_meter(self.device, self._live_tensors, limit_gib=cfg.system.memory_limit_gib,
                                   probe_interval=t.eval_interval, extra_bytes=ddp_buckets)
        self.noise = GradientNoise(params)
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
        self._probe_pending = False
        self._refill_after_excluded = False
        self._graphs_at_window: int | None = None
        if self.resume_from:
            self._load_checkpoint(self.resume_from)
        self._resumed_from_step = self.step  # 0 for a fresh start
        if self.is_main and self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_from and self._replay:  # a stream that went on past the checkpoint: from there on again
                last = order(self._replay[-1])
                keep_reports(self.out_dir / METRICS_JSONL, lambda at: at <= last)
        if self.is_main and self.wandb_kwargs is not None:
            self._init_wandb()

    def _live_tensors(self):
        """What is alive at a step's start: parameters, buffers, gradients and optimizer state."""
        yield from self.raw_model.parameters()
        yield from self.raw_model.buffers()
        yield from (p.grad for p in self.raw_model.parameters() if p.grad is not None)
        for state in self.optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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
            if self.world > 1 and not isinstance(exc, EmulatedOOM):
                # A real OOM strikes one rank mid-step, while the others wait in a collective it will never
                # join: no agreement is possible here. Raising ends this worker, Ray Train ends the group, and
                # the trial records the OOM from the worker's error (lmtune.sweep.trainable).
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
        self.timer = StepTimer(t.compile_warmup_steps, sync=self._sync, clock=self.clock)
        if t.compile_warmup_steps == 0:
            self._begin_memory_window()
        bar = self._progress_bar()
        window_loss = torch.zeros((), device=self.device)
        window_n = 0
        while self.step < self.total_steps:
            lr = lr_at(self.step, self.peak_lr, self.total_steps, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            measuring = bool(t.measure_interval) and (self.step + 1) % t.measure_interval == 0
            log_now = (self.step + 1) % t.log_interval == 0 or self.step + 1 == self.total_steps
            self._probe_pending = self._probe_pending or self.memory.probe_due(self.timer.process_steps)
            probing = self._probe_pending and not measuring
            # Not the steady state, so not timed: measurements (two passes, a gradient copy), memory probes
            # (profiled), and on CUDA the step that refills the cache emptied after a measurement.
            timed = not (measuring or probing or self._refill_after_excluded)
            memory_ctx = self.memory.probe() if probing else self.memory.excluded() if measuring else contextlib.nullcontext()
            with self.timer.excluded() if not timed else contextlib.nullcontext(), memory_ctx:
                loss, grad_metrics, grad_norm = self._optimizer_step(k, measuring, log_now)
            self._refill_after_excluded = measuring and self.device.type == "cuda"
            self.step += 1
            if probing:
                self._probe_pending = False
                self._check_memory_limit()
            window_loss += loss
            window_n += 1
            if self.timer.step():
                paused = self.timer.pause()  # compiling the eval graphs is not a training step
                self._begin_memory_window()
                self.timer.resume(paused)
            if measuring:  # a measurement that found no signal must not leave the previous one standing
                self.measured.pop("noise_scale", None)
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
            # Nothing of this step stays alive into the next: a memory probe counts only what it sees allocated
            # (and torch's CPU allocator warns about frees of blocks allocated before profiling).
            del loss, grad_norm
        if bar is not None:
            bar.close()

    def _begin_memory_window(self) -> None:
        """Warmup is over: compile what is still uncompiled (the eval graphs), then open the memory window."""
        if self.cfg.train.compile:
            self._evaluate(limit=1)  # eval-mode graphs compile here, not in the first eval of the window
            self._graphs_at_window = _compiled_graphs()
        self.memory.begin_window(self.timer.process_steps)

    def _check_memory_limit(self) -> None:
        """After a probed step: end it as an OOM when it crossed the emulated limit, on every rank at once
        (the ranks agree on the largest peak, so none is left waiting in a collective)."""
        over = self.memory.over_limit()
        peak = self.memory.peak().get("peak_allocated_gib", 0.0)
        if self.world > 1:
            flags = torch.tensor([float(over), peak], dtype=torch.float64, device=self._collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            over, peak = bool(flags[0]), float(flags[1])
        if over:
            raise EmulatedOOM(self.memory.limit_message(peak))

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _peaks(self) -> dict[str, float]:
        """This rank's peak memory, or under DDP the largest over ranks (a frontier needs the worst rank)."""
        peaks = self.memory.peak()
        if self.world > 1 and peaks:
            keys = sorted(peaks)
            values = torch.tensor([peaks[k] for k in keys], dtype=torch.float64, device=self._collective_device())
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
            peaks = dict(zip(keys, values.tolist()))
        return peaks

    def _optimizer_step(self, k: int, measuring: bool, log_now: bool) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Forward/backward of k micro-batches, the step's measurements, clipping and the update."""
        loss = self._forward_backward(k, measuring)
        grad_metrics: dict[str, float] = {}
        if measuring:
            grad_metrics = self.noise.finish(self._sample_sequences(k), self.world)
        if log_now:  # per-layer norms before clipping, like the phase-0 study's W&B panels
            grad_metrics.update(layer_metrics(self.raw_model.transformer.h))
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_metrics, grad_norm

    def _split_for_measure(self, k: int) -> bool:
        """A lone micro-batch on a lone worker is measured as two halves (two gradient samples)."""
        return k == 1 and self.world == 1 and self.cfg.train.micro_batch_size >= 2

    def _sample_sequences(self, k: int) -> float:
        """Sequences per gradient sample on a measurement step (B_small)."""
        mb = self.cfg.train.micro_batch_size
        return mb / 2 if self._split_for_measure(k) else mb

    def _forward_backward(self, k: int, measuring: bool) -> torch.Tensor:
        """k micro-batches, gradients accumulated in p.grad; returns the step's mean loss (a tensor).

        On a measurement step with a single micro-batch on a single worker, the micro-batch is run twice
        with half of its sequences' targets ignored each time (interleaved halves: what two data-parallel
        ranks would each get). The shapes are the training step's, so a compiled model does not recompile,
        and the two half-gradients, weighted by their share of the sequences, sum to the full one.

        Under DDP, gradient sync is skipped on all but the last micro-batch; on measurement steps every
        micro-batch runs without sync and the gradients are averaged explicitly afterwards, so the
        per-micro-batch gradients are local.
        """
        if self._fault_oom_at and self.cfg.train.micro_batch_size >= self._fault_oom_at:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {FAULT_OOM_ENV}={self._fault_oom_at})")
        chunks = [self.batches.next() for _ in range(k)]
        weights = [1.0 / k] * k
        if measuring and self._split_for_measure(k):
            x, y = chunks[0]
            odd = torch.arange(x.shape[0]) % 2 == 1
            halves = [y.masked_fill(odd[:, None], IGNORE_INDEX), y.masked_fill(~odd[:, None], IGNORE_INDEX)]
            chunks = [(x, h) for h in halves]
            weights = [float((~odd).sum()) / len(odd), float(odd.sum()) / len(odd)]
        if measuring:
            self.noise.begin()
        n = len(chunks)
        total = torch.zeros((), device=self.device)
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        for i, ((x, y), w) in enumerate(zip(chunks, weights)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = ddp and not measuring and i == n - 1
            ctx = self.model.no_sync() if ddp and not sync else contextlib.nullcontext()
            with ctx:
                with self.autocast:
                    _, loss = self.model(x, y)
                (loss * w).backward()
            total += loss.detach() * w
            if measuring:
                self.noise.observe(w)
        if measuring and ddp:
            for p in self.raw_model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        return total

    def _train_metrics(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict[str, Any]:
        if self.world > 1:
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.world
        timing = self.timer.read()
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
        if self.timer.warm:
            metrics.update(self._peaks())
        return metrics

    def _check_divergence(self, loss: float) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        if not math.isfinite(loss) or loss > self.cfg.train.divergence_factor * self.first_loss:
            self.last["loss"] = loss
            raise Diverged

    @torch.no_grad()
    def _evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Mean loss over the validation set: the first ``eval_sequences`` windows of the split, in
        micro-batches that the ranks stride over, so N workers at micro-batch m and one worker at N·m (or
        any micro-batch) are scored on the same text. ``limit``: only that many micro-batches (compiling)."""
        cfg = self.cfg
        self.model.eval()
        batches = eval_batches(self.tokens.val, cfg.data.seq_len, cfg.train.micro_batch_size, self.eval_sequences)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, (x, y, valid) in enumerate(batches):
            if limit is not None:  # every rank compiles: no striding, no reduction
                if i >= limit:
                    break
            elif i % self.world != self.rank:
                continue
            with self.autocast:
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total[0] += loss.double() * valid  # the loss is the mean over the valid rows' tokens
            total[1] += valid
        if limit is not None:
            self.model.train()
            return {}
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train()
        val_loss = float(total[0] / total[1])
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # --- reporting --------------------------------------------------------------------------------

    def _common(self, status: str) -> dict[str, Any]:
        wall = self.timer.wall_clock_s() if hasattr(self, "timer") else 0.0
        return {
            "step": self.step,
            "tokens": self.step * self.batch_tokens,
            "epoch": self.batches.epoch,
            "wall_clock_s": wall,
            "device_hours": wall * self._devices() / 3600,
            "status": status,
        }

    def _devices(self) -> int:
        """What this run occupies, for ``device_hours``: a GPU per rank on CUDA, else each rank's CPU threads."""
        device = getattr(self, "device", None)
        return getattr(self, "world", 1) * (1 if device is not None and device.type == "cuda" else torch.get_num_threads())

    def _emit(self, metrics: dict[str, Any], *, checkpoint: bool = False, status: str = "running") -> None:
        """Record and report ``metrics``; with ``checkpoint``, a checkpoint holding this report is saved first
        and goes with it."""
        metrics = {**metrics, **self._common(status)}
        if "loss" in metrics and "noise_scale" not in metrics:  # its latest measurement found no signal
            self.last.pop("noise_scale", None)
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
                with open(self.out_dir / METRICS_JSONL, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if self._wandb_run is not None:
                self._wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.step)
        if self._report is not None:
            self._report(metrics, checkpoint_dir if self.is_main else None)

    def _finish(self, status: str) -> dict[str, Any]:
        final = {k: self.last[k] for k in SUMMARY_METRICS if k in self.last}
        final.update({k: self.last[k] for k in layer_keys(self.last)})
        if "oom_reason" in self.last:
            final["oom_reason"] = self.last["oom_reason"]
        final.update(self._peaks())  # the last measured memory, also for a run that ended before a report
        final.update(device_info(self.device))
        final.update(self.memory.summary())
        final["ac_mode"] = self.cfg.train.ac_mode
        final["resumed_from_step"] = getattr(self, "_resumed_from_step", 0)  # this process's start: a checkpoint's step
        if self._graphs_at_window is not None:  # a compile after warmup lands in the timings and peaks
            final["compiles_after_warmup"] = _compiled_graphs() - self._graphs_at_window
        self._emit(final, checkpoint=status == "ok", status=status)
        summary = {**self.last, "config": self.cfg.flat()}
        if self.is_main and self.out_dir:
            (self.out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=str))
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: v for k, v in self.last.items() if isinstance(v, (int, float, str))})
        if not self.stage_checkpoints:  # staged: the last one goes out with the held-back final report
            self.cleanup()
        return summary

    def cleanup(self) -> None:
        """Remove the temporary checkpoint directory (see ``stage_checkpoints``), once its last checkpoint is
        no longer needed."""
        if self._tmp_ckpt:
            shutil.rmtree(self._tmp_ckpt, ignore_errors=True)
            self._tmp_ckpt = None

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
        # The length grows every token: compiled regions would recompile for each; sampling is not the hot path.
        with torch.compiler.set_stance("force_eager"), self.autocast:
            out = self.raw_model.generate(idx, max_new_tokens, temperature=1.0, top_k=50, generator=gen)
        self.raw_model.train()
        text = tok.decode(out[0, len(start):].tolist())
        if self.out_dir:
            with open(self.out_dir / SAMPLES_TXT, "a") as f:
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
        if self.out_dir and not self.stage_checkpoints:
            final = self.out_dir / CHECKPOINT_DIR
        else:
            self._tmp_ckpt = self._tmp_ckpt or tempfile.mkdtemp(prefix="lmtune-ckpt-")
            final = Path(self._tmp_ckpt) / CHECKPOINT_DIR
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
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(self.cfg.flat(), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return str(final)

    def _load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path)
        try:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.batches.load_state_dict(state["data"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"checkpoint {path} does not fit this config ({str(e).splitlines()[0][:160]}); "
                              f"resume with the config it was saved with (its config.json).") from None
        self.step = state["step"]
        self.first_loss = state["first_loss"]
        self.noise.load_state_dict(state["noise"])
        _set_rng_state(state["rng"])
        self._replay = list(state.get("reports") or [])
        self.history = list(self._replay)  # the next checkpoint's replay window reaches back before the resume
        self._checkpoint_marks = [len(self.history) - 1] if self.history else []

    def _progress_bar(self):
        if not (self.progress and self.is_main):
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # a machine with torch, numpy and tiktoken only (the GPU check): no bar
            return None

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                    dynamic_ncols=True)


# --- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmtune.train",
        description="Train a GPT with lmtune's defaults (built-in < locked defaults < files < key=value).",
    )
    p.add_argument("args", nargs="*", metavar="FILE.toml | section.key=value")
    p.add_argument("--out", help="output directory (default: runs/train-<timestamp>; with --resume, the run's own)")
    p.add_argument("--resume", metavar="DIR/checkpoint",
                   help="continue a run from its checkpoint, with the config saved next to it; only keys that "
                        "do not change what the checkpoint holds may be given (steps, intervals, …)")
    p.add_argument("--locked", metavar="FILE", help="locked-defaults TOML to use (default: ./lmtune.locked.toml "
                   "if present, over the shipped phase-0 defaults)")
    p.add_argument("--no-wandb", action="store_true", help="do not log a W&B run")
    p.add_argument("--describe", action="store_true",
                   help="list every config key with the value this command would use, where it comes from, and its doc")
    return p


def resume_config(checkpoint: str | Path, overrides: list[str], files: list[str]) -> Config:
    """The config a checkpoint was saved with (its config.json), with ``overrides`` of :data:`RESUMABLE_KEYS`
    only; anything else would not fit what the checkpoint holds."""
    path = Path(checkpoint)
    if files:
        raise ConfigError(f"--resume takes the config saved with the checkpoint; config files ({', '.join(files)}) "
                          f"are not accepted. Give only keys such as train.steps=N.")
    saved = path / CHECKPOINT_CONFIG if path.is_dir() else path.parent / CHECKPOINT_CONFIG
    read_checkpoint(path)  # a missing or unreadable checkpoint is named before its config
    try:
        flat = json.loads(saved.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume {path}: no readable config.json next to the checkpoint "
                          f"(the trainer writes both into OUT/checkpoint).") from None
    changes = config_lib.parse_overrides(overrides)
    refused = [k for k in changes if k not in RESUMABLE_KEYS]
    if refused:
        key = refused[0]
        raise ConfigError(f"{key} cannot change on --resume: the checkpoint holds a run with {key}={flat.get(key)!r}. "
                          f"Keys --resume accepts: {', '.join(RESUMABLE_KEYS)}.")
    return config_lib.apply(config_lib.from_flat(flat), changes)


def _wandb_id(out: Path) -> str:
    """A run directory's W&B id, so that a resumed run continues its W&B run."""
    return f"{out.name[:40]}-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:10]}"


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if args.resume:
        cfg = resume_config(args.resume, overrides, files)
        config_lib.validate(cfg)
        sources = None
        checkpoint = Path(args.resume)
        default_out = (checkpoint if checkpoint.is_dir() else checkpoint.parent).parent
    else:
        cfg, sources = config_lib.resolve(files, overrides, locked=args.locked)
        default_out = Path(f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.describe:
        print(config_lib.describe(cfg, sources or {k: "the checkpoint's config.json" for k in cfg.flat()}))
        return 0
    out = Path(args.out) if args.out else default_out
    if not args.resume and ((out / SUMMARY_JSON).exists() or (out / CHECKPOINT_DIR).exists()):
        raise ConfigError(f"--out {out} already holds a run; pass --resume {out / CHECKPOINT_DIR} "
                          "to continue it, or choose a new --out.")
    check_output_dir(out, "--out")
    if not args.resume:
        print(f"lmtune.train: locked defaults {', '.join(str(p) for p in config_lib.locked_files(args.locked))}")
    else:
        print(f"lmtune.train: resuming {args.resume} into {out}")
    trainer = Trainer(
        cfg, out_dir=out, resume_from=args.resume, progress=True,
        wandb=None if args.no_wandb else {"project": "lmtune", "name": out.name, "dir": str(out),
                                          "id": _wandb_id(out), "resume": "allow"},
    )
    summary = trainer.fit()
    shown = {k: summary[k] for k in ("status", "step", "tokens", "loss", "val_loss", "val_ppl", "tokens_per_s",
                                     "peak_reserved_gib") if k in summary}
    print(json.dumps(shown, indent=2))
    print(f"results: {out / SUMMARY_JSON}")
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
