"""Memory in the training loop: a run's meter, which steps it counts, the emulated limit, and what counts as an OOM.

The meters themselves are the device layer's (:mod:`lmtune.device.memory`: the CUDA allocator's statistics, or on
the CPU the peak of live tensor bytes of probed steps). Under DDP the ranks agree on the worst rank's peak and on
crossing the emulated limit (:func:`agreed_peaks`, :func:`check_limit`), so that none is left waiting in a
collective.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from lmtune.device import Accelerator, CudaMemory, TensorMemory, storage_bytes


class EmulatedOOM(MemoryError):
    """A probed step crossed ``system.memory_limit_gib`` on CPU: treated exactly like a device OOM."""


# torch's own allocator failures that surface as a RuntimeError rather than torch.OutOfMemoryError: the CPU
# allocator ("[enforce fail at alloc_cpu.cpp] ... DefaultCPUAllocator: can't allocate memory") and CUDA
# errors raised from a kernel launch or cuBLAS workspace allocation. Matched against the exception's own
# message only, never against paths or names elsewhere.
ALLOCATOR_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory",
                       "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM, CPU allocator failure, or the emulated limit (by exception type; torch's exact allocator
    messages for the failures it raises as RuntimeError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in ALLOCATOR_FAILURES)


def ends_run_as_oom(exc: BaseException, world: int) -> bool:
    """Whether ``exc`` ends a run as an OOM result (``status="oom"``) rather than propagating.

    Under DDP only the emulated limit does (:func:`check_limit`: the ranks agree). A real OOM strikes one rank
    mid-step, while the others wait in a collective it will never join: no agreement is possible there. Raising
    ends this worker, Ray Train ends the group, and the trial records the OOM from the worker's error
    (lmtune.sweep.trainable).
    """
    return is_oom(exc) and (world <= 1 or isinstance(exc, EmulatedOOM))


# --- in the training loop: a run's meter, its steady steps, and what the ranks agree on ------------


def live_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """What is alive at a step's start: parameters, buffers, gradients and optimizer state."""
    yield from model.parameters()
    yield from model.buffers()
    yield from (p.grad for p in model.parameters() if p.grad is not None)
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def training_meter(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, accel: Accelerator,
                   world: int) -> TensorMemory | CudaMemory:
    """The meter of a training run on ``accel`` (``system.memory_limit_gib``; on the CPU, a probe every
    ``train.eval_interval`` steps). Under DDP its gradient buckets are one gradient's worth of storage allocated
    outside Python (the gradients are views into them), which the CPU meter cannot see being allocated."""
    params = [p for p in model.parameters() if p.requires_grad]
    ddp_buckets = storage_bytes(params) if world > 1 else 0
    return accel.memory_meter(lambda: live_tensors(model, optimizer), limit_gib=cfg.system.memory_limit_gib,
                              probe_interval=cfg.train.eval_interval, extra_bytes=ddp_buckets)


def agreed_peaks(memory: TensorMemory | CudaMemory, world: int, device: torch.device) -> dict[str, float]:
    """This rank's peak memory, or under DDP the largest over ranks (a frontier needs the worst rank); ``device``:
    where the collective's tensor lives (the run's device)."""
    peaks = memory.peak()
    if world > 1 and peaks:
        keys = sorted(peaks)
        values = torch.tensor([peaks[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        peaks = dict(zip(keys, values.tolist()))
    return peaks


def check_limit(memory: TensorMemory | CudaMemory, world: int, device: torch.device) -> None:
    """After a probed step: end it as an OOM when it crossed the emulated limit, on every rank at once
    (the ranks agree on the largest peak, so none is left waiting in a collective)."""
    over = memory.over_limit()
    peak = memory.peak().get("peak_allocated_gib", 0.0)
    if world > 1:
        flags = torch.tensor([float(over), peak], dtype=torch.float64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        over, peak = bool(flags[0]), float(flags[1])
    if over:
        raise EmulatedOOM(memory.limit_message(peak))


class SteadySteps:
    """Which optimizer steps the step timer and the memory meter count: those of the steady state.

    Left out of the step times: measurement steps (two passes, a gradient copy), memory probes (profiled), and
    on CUDA the step that refills the cache emptied after a measurement or at the start of the memory window
    (:meth:`window_began`; it pays to reserve the whole pool again, which would bias a short window's MFU low). A
    measurement step is never probed (:meth:`excluded` for the meter); a probe that falls due on one waits for the next step. After a probed
    step the run ends as an OOM when it crossed the emulated limit (:func:`check_limit`, agreed over ranks).
    ``timer`` is a :class:`lmtune.training.measure.StepTimer`.
    """

    def __init__(self, memory: TensorMemory | CudaMemory, timer: Any, *, world: int, device: torch.device):
        self.memory, self.timer = memory, timer
        self.world, self.device = world, device
        self._probe_pending = False
        self._refill = False

    @contextlib.contextmanager
    def step(self, measuring: bool) -> Iterator[None]:
        """Around one optimizer step; ``measuring``: it measures the gradient noise."""
        self._probe_pending = self._probe_pending or self.memory.probe_due(self.timer.process_steps)
        probing = self._probe_pending and not measuring
        timed = not (measuring or probing or self._refill)
        memory_ctx = (self.memory.probe() if probing else self.memory.excluded() if measuring
                      else contextlib.nullcontext())
        with self.timer.excluded() if not timed else contextlib.nullcontext(), memory_ctx:
            yield
        self._refill = measuring and self.memory.refills_after_reset
        if probing:
            self._probe_pending = False
            check_limit(self.memory, self.world, self.device)

    def window_began(self) -> None:
        """The memory window has just begun (its meter emptied the allocator's cache where it has one)."""
        self._refill = self.memory.refills_after_reset
