"""The Trainer: a GPT trained autoregressively, with the phase-0 study's measurements, usable alone or in a trial.

The loop reads top to bottom: set-up, fit, the optimizer step, eval, the end of the run. What it hands to
others lives next to it: :mod:`~lmtune.training.reporting` (history, metrics.jsonl, W&B, the report callable),
:mod:`~lmtune.training.checkpoint` (save, load, the replay window), :mod:`~lmtune.training.measure` and
:mod:`~lmtune.training.memory` (the measurements), :mod:`~lmtune.training.parallelize` (AC, compile, DDP),
:mod:`~lmtune.training.optim` (device, optimizer, schedule) and :mod:`~lmtune.training.faults` (a test seam).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from lmtune.config import Config
from lmtune.data import Batches, Tokenizer, TokenSplits, get_tokenizer, load_tokens
from lmtune.device import CUDAGRAPH_COMPILE_MODES, CudaMemory, TensorMemory
from lmtune.model import GPT
from lmtune.training import parallelize as par
from lmtune.training.checkpoint import Checkpoints, rng_state
from lmtune.training.evaluate import sample_text, validation_loss
from lmtune.training.faults import Faults
from lmtune.training.fingerprint import fingerprint
from lmtune.training.measure import GradientNoise, StepTimer, Throughput, layer_metrics, split_in_halves
from lmtune.training.memory import SteadySteps, agreed_peaks, ends_run_as_oom, training_meter
from lmtune.training.optim import Plan, build_optimizer, lr_at, seed_everything, set_lr, set_up_device
from lmtune.training.reporting import Progress, Report, Reporter


class Diverged(Exception):
    """The loss went non-finite or above ``train.divergence_factor`` × the first one (the run ends ``diverged``)."""


class Trainer:
    """Train one configuration; see docs/CONTRACTS.md for the report/checkpoint contract.

    ``device`` overrides ``system.device`` (the Ray Train worker passes the GPU Ray assigned it): every device
    question goes to the run's accelerator (:mod:`lmtune.device`), never to ``torch.cuda``; ``clock`` is the
    step timer's clock and ``faults`` the faults to inject (seams for tests; by default those the environment
    sets, :mod:`lmtune.training.faults`); ``stage_checkpoints``: see :class:`~lmtune.training.checkpoint.Checkpoints`.
    The expensive set-up runs at the start of :meth:`fit`; until then what it builds is None.
    """

    def __init__(self, cfg: Config, *, out_dir: str | Path | None = None, report: Report | None = None,
                 resume_from: str | Path | None = None, wandb: dict | None = None, progress: bool = False,
                 device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter,
                 stage_checkpoints: bool = False, faults: Faults | None = None):
        self.cfg = cfg
        self.resume_from = Path(resume_from) if resume_from else None
        self.progress = progress
        self.clock = clock
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.is_main = self.rank == 0
        self.faults = faults if faults is not None else Faults.from_env(cfg.train.micro_batch_size)
        out = Path(out_dir) if out_dir else None
        self.reporter = Reporter(cfg, out, report, wandb, is_main=self.is_main)
        self.checkpoints = Checkpoints(cfg, out, enabled=self.is_main and cfg.train.checkpoint, stage=stage_checkpoints)
        self.accel = set_up_device(cfg, device)
        self.device = self.accel.device  # where the run's tensors live
        self.cudagraphs = cfg.train.compile and cfg.train.compile_mode in CUDAGRAPH_COMPILE_MODES
        # Built by _setup():
        self.tokens: TokenSplits | None = None
        self.tokenizer: Tokenizer | None = None
        self.raw_model: GPT | None = None
        self.model: nn.Module | None = None  # raw_model as it runs: itself, or its DDP wrapper
        self.plan: Plan | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.batches: Batches | None = None
        self.autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
        self.memory: TensorMemory | CudaMemory | None = None
        self.noise: GradientNoise | None = None
        self.throughput: Throughput | None = None
        self.timer: StepTimer | None = None  # made when training starts: this process's warmup and wall clock
        self.steady: SteadySteps | None = None
        # Where the run is:
        self.step = 0
        self.first_loss: float | None = None
        self.resumed_from_step = 0
        self.finished_before = False
        """Resumed from a checkpoint at or past the run's last step: nothing to train, and nothing is rewritten."""
        self.measured: dict[str, float] = {}  # the latest gradient measurements, in every report until measured again
        self._graphs_at_window: int | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.reporter.history

    # --- set-up -----------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        seed_everything(t.seed)
        self.tokens = par.rank_zero_first(lambda: load_tokens(cfg.data), is_main=self.is_main, world_size=self.world)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)
        self.raw_model = GPT(cfg.model, self.tokens.vocab_size).to(self.device)
        if self.world > 1:  # the same weights on every rank (DDP broadcasts rank 0's), a dropout stream of its own
            seed_everything(t.seed + self.rank)
        self.model = par.parallelize(self.raw_model, t, accel=self.accel, world_size=self.world)
        fpt = Throughput.flops_of(self.raw_model, cfg)
        self.plan = Plan.of(cfg, len(self.tokens.train), self.world, flops_per_token=fpt)
        self.optimizer = build_optimizer(self.raw_model, cfg, self.plan.peak_lr, fused=self.accel.fused_optimizer)
        self.batches = Batches(self.tokens.train, cfg.data.seq_len, t.micro_batch_size, t.seed,
                               rank=self.rank, world_size=self.world,
                               order="feistel" if self.tokens.streamed else "permutation")
        if t.dtype == "bfloat16":
            self.autocast = self.accel.autocast(torch.bfloat16)
        self.memory = training_meter(self.raw_model, self.optimizer, cfg, self.accel, self.world)
        self.noise = GradientNoise([p for p in self.raw_model.parameters() if p.requires_grad])
        self.throughput = Throughput.of(self.raw_model, cfg, self.accel, self.plan.batch_tokens, self.world)
        if self.resume_from:
            state = self.checkpoints.load(self.resume_from, model=self.raw_model, optimizer=self.optimizer,
                                          batches=self.batches, noise=self.noise, accel=self.accel, rank=self.rank,
                                          world=self.world)
            self.step, self.first_loss = state["step"], state["first_loss"]
        self.resumed_from_step = self.step  # 0 for a fresh start
        self.finished_before = bool(self.resume_from) and self.step >= self.plan.total_steps

    # --- the run ----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to an OOM / divergence); returns the summary. The whole run is one session of its
        accelerator (the device made current, an emulated limit set and undone at the end)."""
        with self.accel.session(self.cfg.system.memory_limit_gib):
            self._setup()
            if self.finished_before:
                return self._summary_of_finished_run()
            self.reporter.start(self.checkpoints.replay)
            try:
                return self._fit()
            finally:  # a trial stopped by its scheduler still leaves a complete W&B run behind
                self.reporter.close()

    def _summary_of_finished_run(self) -> dict[str, Any]:
        """A resume of a run that already reached its steps: its reports are sent again (a Ray trial's result), its
        files and its W&B run are left as they are, and its summary is its final report's."""
        self.reporter.resend(self.checkpoints.replayed())
        reports = self.checkpoints.replay
        final = next((r for r in reversed(reports) if r.get("status", "running") != "running"), None)
        return {**(final or (reports[-1] if reports else {"step": self.step})), "config": self.cfg.flat()}

    def _fit(self) -> dict[str, Any]:
        status = "ok"
        try:
            self._train()
        except Diverged:
            status = "diverged"
        except Exception as exc:  # classify, re-raise what does not end the run as an OOM
            if not ends_run_as_oom(exc, self.world):
                raise
            status = "oom"
            self.reporter.last["oom_reason"] = str(exc).splitlines()[0][:200]
        if status == "oom":
            # Only here, after the except clause: the exception's traceback held the failed step's frames, and with
            # them its activations, which the allocator could not have given back.
            self.accel.release_memory()
        if status == "ok":
            self.reporter.last.update(self._evaluate())
            self._sample()
        return self._finish(status)

    def _train(self) -> None:
        t, total_steps = self.cfg.train, self.plan.total_steps
        self.reporter.resend(self.checkpoints.replayed())
        self.model.train()
        self.timer = StepTimer(t.compile_warmup_steps, sync=self.accel.synchronize, clock=self.clock)
        self.steady = steady = SteadySteps(self.memory, self.timer, world=self.world, device=self.device)
        if t.compile_warmup_steps == 0:
            self._begin_memory_window()
        bar = Progress(self.progress and self.is_main, total_steps, self.step)
        window_loss, window_n = torch.zeros((), device=self.device), 0
        while self.step < total_steps:
            lr = lr_at(self.step, self.plan.peak_lr, total_steps, self.cfg)
            set_lr(self.optimizer, lr)
            measuring = bool(t.measure_interval) and (self.step + 1) % t.measure_interval == 0
            log_now = (self.step + 1) % t.log_interval == 0 or self.step + 1 == total_steps
            with steady.step(measuring):
                loss, grad_metrics, grad_norm = self._optimizer_step(t.accumulation_steps, measuring, log_now)
                self.step += 1
            window_loss += loss
            window_n += 1
            if self.timer.step():
                with self.timer.paused():  # compiling the eval graphs is not a training step
                    self._begin_memory_window()
            if measuring:  # a measurement that found no signal must not leave the previous one standing
                self.measured.pop("noise_scale", None)
            self.measured.update(grad_metrics)
            if log_now:
                metrics = self._train_metrics(window_loss / window_n, grad_norm, lr)
                window_loss.zero_()
                window_n = 0
                self._check_divergence(metrics["loss"])
                bar.update(self.step, metrics)
                if self.step < total_steps:
                    self._emit(metrics)
                else:  # the final report comes from fit(), with the end status
                    self.reporter.last.update(metrics)
            if self.step < total_steps and self.step % t.eval_interval == 0:
                with self.timer.paused():
                    self._emit(self._evaluate(), checkpoint=True)
            if self.step < total_steps and t.sample_interval and self.step % t.sample_interval == 0:
                with self.timer.paused():
                    self._sample()
            # Nothing of this step stays alive into the next: a memory probe counts only what it sees allocated
            # (and torch's CPU allocator warns about frees of blocks allocated before profiling).
            del loss, grad_norm
        bar.close()

    def _begin_memory_window(self) -> None:
        """Warmup is over: compile what is still uncompiled (the eval graphs), then open the memory window."""
        if self.cfg.train.compile:
            self._evaluate(limit=1)  # eval-mode graphs compile here, not in the first eval of the window
            self._graphs_at_window = par.compiled_graphs()
        self.memory.begin_window(self.timer.process_steps)
        self.steady.window_began()

    # --- the optimizer step -----------------------------------------------------------------------

    def _optimizer_step(self, k: int, measuring: bool, log_now: bool) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Forward/backward of k micro-batches, the step's measurements, clipping and the update."""
        loss = self._forward_backward(k, measuring)
        grad_metrics: dict[str, float] = {}
        if measuring:  # B_small: the sequences of one gradient sample
            mb = self.cfg.train.micro_batch_size
            grad_metrics = self.noise.finish(mb / 2 if self._split_for_measure(k) else mb, self.world)
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

    def _forward_backward(self, k: int, measuring: bool) -> torch.Tensor:
        """k micro-batches, gradients accumulated in p.grad; returns the step's mean loss (a tensor).

        On a measurement step each micro-batch is a gradient sample (a lone one: its two halves,
        :func:`~lmtune.training.measure.split_in_halves`). Under DDP, gradient sync is skipped on all but the last
        micro-batch; on measurement steps every micro-batch runs without sync and the gradients are averaged
        explicitly afterwards, so the per-micro-batch gradients are local.
        """
        self.faults.before_step()
        chunks = [self.batches.next() for _ in range(k)]
        weights = [1.0 / k] * k
        if measuring and self._split_for_measure(k):
            chunks, weights = split_in_halves(*chunks[0])
        if measuring:
            self.noise.begin()
        total = torch.zeros((), device=self.device)
        for i, ((x, y), w) in enumerate(zip(chunks, weights)):
            x, y = self.accel.to_device(x), self.accel.to_device(y)
            with par.grad_sync(self.model, sync=not measuring and i == len(chunks) - 1):
                self._mark_step_begin()
                with self.autocast:
                    _, loss = self.model(x, y)
                (loss * w).backward()
            total += loss.detach() * w
            if measuring:
                self.noise.observe(w)
        if measuring and par.is_ddp(self.model):
            par.average_gradients(self.raw_model.parameters(), self.world)
        return total

    def _mark_step_begin(self) -> None:
        """A new CUDA-graph step before each forward in a graph-capturing compile mode: a replay then may overwrite
        the previous step's outputs, which nothing still reads."""
        if self.cudagraphs:
            self.accel.mark_step_begin()

    def _train_metrics(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict[str, Any]:
        loss = par.mean_over_ranks(loss, self.world)  # before the timer reads: the all-reduce is the step's
        timing = self.timer.read()
        metrics: dict[str, Any] = {**self.measured, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
                                   **timing, **self.throughput.metrics(timing)}
        if self.timer.warm:
            metrics.update(agreed_peaks(self.memory, self.world, self.device))
        return metrics

    def _check_divergence(self, loss: float) -> None:
        if self.first_loss is None:
            self.first_loss = loss
        if not math.isfinite(loss) or loss > self.cfg.train.divergence_factor * self.first_loss:
            self.reporter.last["loss"] = loss
            raise Diverged

    # --- eval and samples -------------------------------------------------------------------------

    def _evaluate(self, limit: int | None = None) -> dict[str, float]:
        """val_loss and val_ppl (:func:`~lmtune.training.evaluate.validation_loss`); ``limit``: compiling only."""
        return validation_loss(self.model, self.tokens.val, self.cfg, self.plan.eval_sequences, device=self.device,
                               autocast=self.autocast, rank=self.rank, world=self.world, limit=limit,
                               before_forward=self._mark_step_begin)

    def _sample(self) -> None:
        if self.is_main:
            self.reporter.sample(sample_text(self.raw_model, self.tokenizer, device=self.device,
                                             seed=self.cfg.train.seed, autocast=self.autocast), self.step)

    # --- reports, checkpoints and the end of the run ----------------------------------------------

    def _emit(self, metrics: dict[str, Any], *, checkpoint: bool = False, status: str = "running") -> None:
        """Report ``metrics`` with the run's position; with ``checkpoint``, a checkpoint holding it goes with it."""
        wall = self.timer.wall_clock_s() if self.timer is not None else 0.0
        position = {"step": self.step, "total_steps": self.plan.total_steps,
                    "tokens": self.step * self.plan.batch_tokens, "epoch": self.batches.epoch,
                    "wall_clock_s": wall, "device_hours": wall * self.accel.devices_held(self.world) / 3600,
                    "status": status}
        self.reporter.emit({**metrics, **position}, self.step, self._save_checkpoint if checkpoint else None)

    def _save_checkpoint(self, history: list[dict[str, Any]]) -> str | None:
        return self.checkpoints.save(model=self.raw_model, optimizer=self.optimizer, step=self.step,
                                     first_loss=self.first_loss, batches=self.batches, noise=self.noise,
                                     vocab_size=self.tokens.vocab_size, reports=self.checkpoints.window(history),
                                     rng=par.gather_objects(rng_state(self.accel), self.world))

    def _finish(self, status: str) -> dict[str, Any]:
        final = self.reporter.final_metrics()
        final.update(agreed_peaks(self.memory, self.world, self.device))  # also for a run that ended before a report
        final.update({**self.accel.info(), **self.memory.summary(), "ac_mode": self.cfg.train.ac_mode,
                      "data_source": self.tokens.source,
                      **fingerprint(self.cfg, str(self.accel.info()["device_name"])),
                      # the run's compute: the trainer's own count per token (measure.flops_per_token) × tokens trained
                      "flops_per_token": self.throughput.flops_per_token,
                      "params": self.raw_model.num_params(),  # N: the non-embedding parameters 6N counts
                      "flops": self.throughput.flops_per_token * self.step * self.plan.batch_tokens,
                      "resumed_from_step": self.resumed_from_step})  # this process's start: a checkpoint's step
        if self._graphs_at_window is not None:  # a compile after warmup lands in the timings and peaks
            final["compiles_after_warmup"] = par.compiled_graphs() - self._graphs_at_window
        self._emit(final, checkpoint=status == "ok", status=status)
        summary = self.reporter.summary()
        if not self.checkpoints.stage:  # staged: the last one goes out with the held-back final report
            self.cleanup()
        return summary

    def cleanup(self) -> None:
        """Remove the temporary checkpoint directory (``stage_checkpoints``) once its last one is not needed."""
        self.checkpoints.cleanup()
