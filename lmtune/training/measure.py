"""The phase-0 study's measurements: per-layer gradient norms, gradient coherence and noise scale, step timing, MFU.

Everything here is cheap enough to run inside the training loop at the configured intervals, and
none of it changes the training trajectory. The device's part (syncs, peak FLOP/s) is the accelerator's
(:mod:`lmtune.device`); :class:`StepTimer` takes a ``sync`` and a ``clock`` so that tests can drive it. Memory
(the meters, the emulated limit, OOM detection) is :mod:`lmtune.training.memory`.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lmtune.contract import layer_metric
from lmtune.data import IGNORE_INDEX
from lmtune.device import Accelerator

# --- gradient norms -------------------------------------------------------------------------------


def layer_grad_norms(blocks: nn.ModuleList) -> list[float]:
    """L2 norm of the gradient of each transformer block (all its parameters together), with one
    device-to-host copy for all blocks."""
    norms = []
    for block in blocks:
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        if not grads:
            norms.append(torch.zeros((), dtype=torch.float32))
            continue
        norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()))
    return torch.stack([n.to(norms[0].device) for n in norms]).tolist() if norms else []


def grad_norm_spread(norms: Iterable[float]) -> float:
    """log10(max/min) over layers: the phase-0 study saw ~10 orders of magnitude for post-LN without warmup.
    Zero and non-finite norms are left out; fewer than two usable norms give 0."""
    positive = [n for n in norms if n > 0 and math.isfinite(n)]
    if len(positive) < 2:
        return 0.0
    return math.log10(max(positive) / min(positive))


def layer_metrics(blocks: nn.ModuleList) -> dict[str, float]:
    norms = layer_grad_norms(blocks)
    out = {layer_metric(i): n for i, n in enumerate(norms)}
    out["grad_norm_spread"] = grad_norm_spread(norms)
    return out


# --- gradient coherence and noise scale -----------------------------------------------------------


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ|t|² over ``tensors`` as a 0-d float64 tensor on their device (no host sync)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(tensors)).double().pow(2).sum()


def grad_coherence(sum_sq: float, n: int, big: float) -> float:
    """Mean pairwise g_i·g_j over mean |g_i|², from Σ|g_i|² and |G|² = |mean g_i|² of n ≥ 2 samples:
    Σ_{i≠j} g_i·g_j = n²|G|² − Σ|g_i|², over n(n−1) pairs, divided by Σ|g_i|²/n."""
    return (n * n * big - sum_sq) / ((n - 1) * sum_sq) if sum_sq > 0 else 0.0


def noise_estimates(sum_sq: float, n: int, big: float, b_small: float) -> tuple[float, float]:
    """Unbiased (|G|², tr(Σ)) from n gradient samples of b_small sequences each (McCandlish et al. 2018,
    App. A.1): |G_small|² is the mean of the samples' squared norms, |G_big|² that of their mean, with
    E|G_B|² = |G|² + tr(Σ)/B."""
    small = sum_sq / n
    b_big = n * b_small
    g2 = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    return g2, trace


def split_in_halves(x: torch.Tensor, y: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """One micro-batch as two gradient samples: run twice, with half of its sequences' targets ignored each time
    (interleaved halves: what two data-parallel ranks would each get). The shapes are the training step's, so a
    compiled model does not recompile; weighted by their share of the sequences, the two gradients sum to the
    full one. Returns the two (x, y) and their weights."""
    odd = torch.arange(x.shape[0]) % 2 == 1
    halves = [y.masked_fill(odd[:, None], IGNORE_INDEX), y.masked_fill(~odd[:, None], IGNORE_INDEX)]
    return [(x, h) for h in halves], [float((~odd).sum()) / len(odd), float(odd.sum()) / len(odd)]


class GradientNoise:
    """Gradient coherence across micro-batches and the simple noise scale B_simple.

    On a measurement step the trainer calls :meth:`begin`, then :meth:`observe` after every gradient
    sample's backward (gradients accumulate in ``p.grad`` as the sum of ``w_i · loss_i``), then
    :meth:`finish` once all samples are in (and, under DDP, averaged across ranks).

    With n gradient samples g_i of B_small sequences each and their mean G (B_big = n·B_small):

    * ``grad_coherence`` = mean pairwise g_i·g_j / mean |g_i|² = (n²|G|² − Σ|g_i|²) / ((n−1) Σ|g_i|²):
      1 when all micro-batches agree, ~0 when their gradients are orthogonal (pure noise).
    * McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A.1: unbiased estimates
      |G|² ≈ (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small) and
      tr(Σ) ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big); ``noise_scale`` = B_simple = tr(Σ)/|G|²
      in sequences, with both estimates smoothed by an EMA before the ratio (as the paper recommends).

    Sums stay on the device until :meth:`finish` (one host sync per measurement, not one per parameter).
    """

    def __init__(self, params: list[nn.Parameter], ema: float = 0.9):
        self.params = params
        self.ema = ema
        self.g2_ema: float | None = None
        self.s_ema: float | None = None
        self._prev: list[torch.Tensor] | None = None
        self._sum_sq: torch.Tensor | None = None
        self._n = 0

    def begin(self) -> None:
        self._prev = [torch.zeros_like(p) for p in self.params]
        self._sum_sq = None
        self._n = 0

    @torch.no_grad()
    def observe(self, weight: float) -> None:
        """Record the latest sample's gradient; its loss entered ``p.grad`` scaled by ``weight``, so
        g_i = Δgrad / weight (weight = 1/k for k equal micro-batches)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        delta = torch._foreach_sub(grads, self._prev)
        sq = _sq_norm(delta) / weight**2
        self._sum_sq = sq if self._sum_sq is None else self._sum_sq + sq
        self._prev = [g.detach().clone() for g in grads]
        self._n += 1

    @torch.no_grad()
    def finish(self, b_small: float, world_size: int = 1) -> dict[str, float]:
        """Call after grads hold the global mean gradient; returns grad_coherence and, when the signal is
        measurable, noise_scale."""
        self._prev = None
        device = self.params[0].device if self.params else torch.device("cpu")
        sums = torch.stack([
            (self._sum_sq if self._sum_sq is not None else torch.zeros((), dtype=torch.float64)).to(device),
            torch.tensor(float(self._n), dtype=torch.float64, device=device),
        ])
        if world_size > 1:  # on the grads' device: NCCL reduces CUDA tensors only
            dist.all_reduce(sums)
        big_t = _sq_norm([p.grad for p in self.params if p.grad is not None]).to(device)
        sum_sq, n, big = (float(v) for v in torch.stack([sums[0], sums[1], big_t]).tolist())
        n = int(round(n))
        if n < 2:
            return {}
        return self.estimate(sum_sq, n, big, b_small)

    def estimate(self, sum_sq: float, n: int, big: float, b_small: float) -> dict[str, float]:
        """Coherence and B_simple from Σ|g_i|² over n samples of b_small sequences and |G|² of their mean."""
        coherence = grad_coherence(sum_sq, n, big)
        g2, s = noise_estimates(sum_sq, n, big, b_small)
        self.g2_ema = g2 if self.g2_ema is None else self.ema * self.g2_ema + (1 - self.ema) * g2
        self.s_ema = s if self.s_ema is None else self.ema * self.s_ema + (1 - self.ema) * s
        out = {"grad_coherence": coherence}
        # A non-positive |G|² estimate means the noise swamps the signal at these batch sizes: B_simple
        # is not measurable yet (not infinite), so it is left out rather than reported as inf.
        if self.g2_ema > 0 and self.s_ema > 0:
            out["noise_scale"] = self.s_ema / self.g2_ema
        return out

    def state_dict(self) -> dict:
        return {"g2_ema": self.g2_ema, "s_ema": self.s_ema}

    def load_state_dict(self, state: dict) -> None:
        self.g2_ema, self.s_ema = state["g2_ema"], state["s_ema"]


# --- throughput, MFU and step times --------------------------------------------------------------

def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B).

    6N: forward (2 per weight) and backward (4) of every matmul weight N (``GPT.num_params()``: every block's, each
    architecture variant's own (GQA's narrower key/value projection, SwiGLU's three matrices), and the LM head's,
    tied or not; the token and position embeddings are lookups and cost nothing). 12·L·H·Q·T: the attention matmuls
    q·kᵀ and scores·v, 2·2·T·(H·Q) a token forward, ×3 with backward, per layer (GQA shares keys, not this work).
    Element-wise work (norms, activations, RoPE, ALiBi's bias, softmax) is left out, as PaLM and Chinchilla do."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def model_size(cfg: Any) -> tuple[int, float]:
    """(N, FLOPs per training token) of the GPT that ``cfg`` (a resolved Config) trains, counted on the meta device
    (no memory, no data): what the trainer counts, before anything runs (a sweep's compute budgets are checked and an
    export for a budget picks its width with it)."""
    from lmtune.data.tokenizers import get_tokenizer
    from lmtune.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model, get_tokenizer(cfg.data.tokenizer).vocab_size)
    return model.num_params(), Throughput.flops_of(model, cfg)


class Throughput:
    """``tokens_per_s`` and ``mfu`` from a report's step times: ``batch_tokens`` per optimizer step (all ranks),
    ``flops_per_token`` of the model, and each of the ``world`` devices' peak FLOP/s (None: no MFU)."""

    def __init__(self, batch_tokens: int, flops_per_token: float, peak_flops: float | None, world: int = 1):
        self.batch_tokens = batch_tokens
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world = world

    @staticmethod
    def flops_of(model: nn.Module, cfg: Any) -> float:
        """FLOPs per training token of a GPT (``num_params()``) with ``cfg``'s model and sequence length."""
        m = cfg.model
        return flops_per_token(model.num_params(), m.n_layer, m.n_head, m.n_embd // m.n_head, cfg.data.seq_len)

    @classmethod
    def of(cls, model: nn.Module, cfg: Any, accel: Accelerator, batch_tokens: int, world: int = 1) -> Throughput:
        """For a GPT with ``cfg``'s model and sequence length, trained on ``accel``."""
        return cls(batch_tokens, cls.flops_of(model, cfg), accel.peak_flops(), world)

    def metrics(self, timing: dict[str, float]) -> dict[str, float]:
        """From the steady state's average step time, else this window's (none before the first window)."""
        out: dict[str, float] = {}
        step_ms = timing.get("avg_step_time_ms") or timing.get("step_time_ms")
        if step_ms:
            out["tokens_per_s"] = self.batch_tokens / (step_ms / 1000)
            if self.peak_flops:
                out["mfu"] = out["tokens_per_s"] * self.flops_per_token / (self.peak_flops * self.world)
        return out


class StepTimer:
    """Step times without a device sync per step: syncs only when a window is read or a step is excluded.

    ``avg_step_time_ms`` leaves out the first ``warmup`` steps *of this process* (compile/JIT, allocator
    warm-up; a resumed run compiles again), which the phase-0 study found make step averages 2–4× off otherwise,
    and the steps run under :meth:`excluded` (gradient-noise measurements, memory probes).

    ``sync`` waits for the device (the accelerator's ``synchronize``); ``clock`` is ``time.perf_counter``:
    both are seams for tests.
    """

    def __init__(self, warmup: int, *, sync: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter):
        self.warmup = warmup
        self._sync = sync
        self.clock = clock
        self.start = clock()
        self.window_start = self.start
        self.window_steps = 0
        self.process_steps = 0
        """Optimizer steps run by this process (the warmup counts these, not the run's global step)."""
        self.measured_s = 0.0
        self.measured_steps = 0
        self.paused_s = 0.0
        self._skip = False

    @property
    def warm(self) -> bool:
        return self.process_steps >= self.warmup

    def step(self) -> bool:
        """Count one optimizer step; returns True exactly when this process's warmup has just ended."""
        self.process_steps += 1
        if self._skip:
            self._skip = False
        else:
            self.window_steps += 1
        if self.process_steps == self.warmup:
            self._sync()
            self.window_start = self.clock()
            self.window_steps = 0
            return True
        return False

    def read(self) -> dict[str, float]:
        """Close the window: step_time_ms of this window, avg_step_time_ms over the warm steps so far."""
        self._sync()
        now = self.clock()
        out: dict[str, float] = {}
        if self.window_steps:
            window = now - self.window_start
            out["step_time_ms"] = 1000 * window / self.window_steps
            if self.warm and self.process_steps > self.warmup:
                self.measured_s += window
                self.measured_steps += self.window_steps
        if self.measured_steps:
            out["avg_step_time_ms"] = 1000 * self.measured_s / self.measured_steps
        self.window_start = now
        self.window_steps = 0
        return out

    def pause(self) -> float:
        """Start of non-training work (eval, checkpoint, sampling): excluded from step times."""
        self._sync()
        return self.clock()

    def resume(self, paused_at: float) -> None:
        delta = self.clock() - paused_at
        self.window_start += delta
        self.paused_s += delta

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Non-training work between steps (eval, checkpoint, sampling, compiling the eval graphs)."""
        paused = self.pause()
        try:
            yield
        finally:
            self.resume(paused)

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """One optimizer step that is not timed (the following :meth:`step` call does not count it)."""
        try:
            with self.paused():
                yield
        finally:
            self._skip = True

    def wall_clock_s(self) -> float:
        return self.clock() - self.start
