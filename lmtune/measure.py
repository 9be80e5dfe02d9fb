"""The seed's measurements: per-layer gradient norms, gradient coherence and noise scale, memory, MFU.

Everything here is cheap enough to run inside the training loop at the configured intervals, and
none of it changes the training trajectory.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

GIB = 1024**3


# --- gradient norms -------------------------------------------------------------------------------


def layer_grad_norms(blocks: nn.ModuleList) -> list[float]:
    """L2 norm of the gradient of each transformer block (all its parameters together)."""
    norms = []
    for block in blocks:
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        if not grads:
            norms.append(0.0)
            continue
        per_param = torch._foreach_norm(grads)
        norms.append(torch.linalg.vector_norm(torch.stack(per_param)).item())
    return norms


def grad_norm_spread(norms: list[float]) -> float:
    """log10(max/min) over layers: the seed saw ~10 orders of magnitude for post-LN without warmup."""
    positive = [n for n in norms if n > 0 and math.isfinite(n)]
    if len(positive) < 2:
        return 0.0
    return math.log10(max(positive) / min(positive))


def layer_metrics(blocks: nn.ModuleList) -> dict[str, float]:
    norms = layer_grad_norms(blocks)
    out = {f"grad_norm/layer_{i}": n for i, n in enumerate(norms)}
    out["grad_norm_spread"] = grad_norm_spread(norms)
    return out


# --- gradient coherence and noise scale -----------------------------------------------------------


class GradientNoise:
    """Gradient coherence across micro-batches and the simple noise scale B_simple.

    On a measurement step the trainer calls :meth:`begin`, then :meth:`observe` after every
    micro-batch backward (gradients accumulate in ``p.grad`` as the sum of ``loss / k``), then
    :meth:`finish` once all micro-batches are in (and, under DDP, averaged across ranks).

    With n micro-batch gradients g_i of B_small sequences each and their mean G (B_big = n·B_small):

    * ``grad_coherence`` = mean pairwise g_i·g_j / mean |g_i|² = (n²|G|² − Σ|g_i|²) / ((n−1) Σ|g_i|²):
      1 when all micro-batches agree, ~0 when their gradients are orthogonal (pure noise).
    * McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A.1: unbiased estimates
      |G|² ≈ (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small) and
      tr(Σ) ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big); ``noise_scale`` = B_simple = tr(Σ)/|G|²
      in sequences, with both estimates smoothed by an EMA before the ratio (as the paper recommends).
    """

    def __init__(self, params: list[nn.Parameter], ema: float = 0.9):
        self.params = params
        self.ema = ema
        self.g2_ema: float | None = None
        self.s_ema: float | None = None
        self._prev: list[torch.Tensor] | None = None
        self._sum_sq = 0.0
        self._n = 0

    def begin(self) -> None:
        self._prev = [torch.zeros_like(p) for p in self.params]
        self._sum_sq = 0.0
        self._n = 0

    @torch.no_grad()
    def observe(self, k: int) -> None:
        """Record the latest micro-batch's gradient (k = micro-batches in the step, so g_i = k·Δgrad)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        delta = torch._foreach_sub(grads, self._prev)
        self._sum_sq += (k**2) * sum(float(d.float().pow(2).sum()) for d in delta)
        self._prev = [g.detach().clone() for g in grads]
        self._n += 1

    @torch.no_grad()
    def finish(self, b_small: int, world_size: int = 1) -> dict[str, float]:
        """Call after grads hold the global mean gradient; returns grad_coherence and noise_scale."""
        self._prev = None
        sum_sq, n = self._sum_sq, self._n
        if world_size > 1:
            t = torch.tensor([sum_sq, float(n)], dtype=torch.float64)
            dist.all_reduce(t)
            sum_sq, n = float(t[0]), int(t[1])
        if n < 2:
            return {}
        big = sum(float(p.grad.float().pow(2).sum()) for p in self.params if p.grad is not None)
        small = sum_sq / n
        coherence = (n * n * big - sum_sq) / ((n - 1) * sum_sq) if sum_sq > 0 else 0.0
        b_big = n * b_small
        g2 = (b_big * big - b_small * small) / (b_big - b_small)
        s = (small - big) / (1 / b_small - 1 / b_big)
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


# --- memory ---------------------------------------------------------------------------------------


class EmulatedOOM(MemoryError):
    """The step crossed ``system.memory_limit_gib`` on CPU: treated exactly like a device OOM."""


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM, CPU allocator failure, or the emulated limit."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()
    )


_STATUS = Path("/proc/self/status")


def _status_kib(field_name: str) -> int | None:
    try:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


@dataclass
class MemoryMeter:
    """Peak memory in a window that starts at :meth:`reset` (after compile warmup, as the seed learned).

    CUDA: ``max_memory_reserved`` (the number to compare with the device: the caching allocator holds
    it) and ``max_memory_allocated``, plus ``num_alloc_retries`` (cudaMalloc retries after freeing cached
    blocks: a sign of fragmentation near the limit). CPU: the process's peak RSS (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM), reported as both reserved and allocated.
    """

    device: torch.device
    limit_gib: float = 0.0
    _can_reset_rss: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if self.device.type == "cuda" and self.limit_gib > 0:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.limit_gib * GIB / total), self.device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._can_reset_rss = False  # peak then covers the whole process life: still an upper bound

    def peak(self) -> dict[str, float]:
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            return {
                "peak_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / GIB,
                "peak_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / GIB,
                "alloc_retries": float(stats.get("num_alloc_retries", 0)),
            }
        hwm = _status_kib("VmHWM")
        gib = (hwm or 0) / 1024**2
        return {"peak_reserved_gib": gib, "peak_allocated_gib": gib}

    def device_info(self) -> dict[str, float | str]:
        """The memory of the device trained on (the frontier's limit when no emulated limit is set)."""
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            return {"device_memory_gib": props.total_memory / GIB, "device_name": props.name}
        total = 0
        try:
            total = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))
        except (OSError, AttributeError):
            pass
        return {"device_memory_gib": total / 1024**2, "device_name": "cpu"}

    def check_limit(self) -> None:
        """CPU emulation of a smaller device: end the step whose peak RSS crossed the limit."""
        if self.limit_gib <= 0 or self.device.type == "cuda":
            return  # on CUDA the allocator itself enforces the fraction and raises a real OOM
        hwm = _status_kib("VmHWM")
        if hwm is not None and hwm / 1024**2 > self.limit_gib:
            raise EmulatedOOM(
                f"peak RSS {hwm / 1024**2:.2f} GiB crossed system.memory_limit_gib={self.limit_gib:g}"
            )


# --- throughput and MFU ---------------------------------------------------------------------------

# Dense bf16 tensor-core peak FLOP/s by device name (vendor datasheets; no sparsity).
PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
    "T4": 65e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # ordered: more specific names first
        if key in name:
            return flops
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B)."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


class StepTimer:
    """Step times without a device sync per step: syncs only when a window is read.

    ``avg_step_time_ms`` excludes the first ``warmup`` steps (compile/JIT, allocator warm-up), which the
    seed found make step averages 2–4× off otherwise.
    """

    def __init__(self, device: torch.device, warmup: int):
        self.device = device
        self.warmup = warmup
        self.start = time.perf_counter()
        self.window_start = self.start
        self.window_steps = 0
        self.measured_s = 0.0
        self.measured_steps = 0
        self.paused_s = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, step: int) -> bool:
        """Count one optimizer step; returns True exactly when warmup has just ended."""
        self.window_steps += 1
        if step == self.warmup:
            self._sync()
            self.window_start = time.perf_counter()
            self.window_steps = 0
            return True
        return False

    def read(self, step: int) -> dict[str, float]:
        """Close the window: step_time_ms of this window, avg_step_time_ms since warmup."""
        self._sync()
        now = time.perf_counter()
        out: dict[str, float] = {}
        if self.window_steps:
            window = now - self.window_start
            out["step_time_ms"] = 1000 * window / self.window_steps
            if step > self.warmup:
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
        return time.perf_counter()

    def resume(self, paused_at: float) -> None:
        delta = time.perf_counter() - paused_at
        self.window_start += delta
        self.paused_s += delta

    def wall_clock_s(self) -> float:
        return time.perf_counter() - self.start
