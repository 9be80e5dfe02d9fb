"""Memory: the device's peak memory in a window after warmup, the emulated limit, and what counts as an OOM.

On CUDA the caching allocator's own statistics (:class:`CudaMemory`); on the CPU, which has no such counter,
the peak of live tensor-storage bytes of probed steps (:class:`TensorMemory`). Device-only logic goes through
a seam (:class:`CudaMemory` takes the ``torch.cuda`` module) so that the CPU test suite can drive it. Under
DDP the ranks agree on the worst rank's peak and on crossing the emulated limit (:func:`agreed_peaks`,
:func:`check_limit`), so that none is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

GIB = 1024**3


class EmulatedOOM(MemoryError):
    """A probed step crossed ``system.memory_limit_gib`` on CPU: treated exactly like a device OOM."""


# torch's own allocator failures that surface as a RuntimeError rather than torch.OutOfMemoryError: the CPU
# allocator ("[enforce fail at alloc_cpu.cpp] ... DefaultCPUAllocator: can't allocate memory") and CUDA
# errors raised from a kernel launch or cuBLAS workspace allocation. Matched against the exception's own
# message only, never against paths or names elsewhere.
_ALLOCATOR_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory",
                       "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM, CPU allocator failure, or the emulated limit (by exception type; torch's exact allocator
    messages for the failures it raises as RuntimeError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _ALLOCATOR_FAILURES)


def ends_run_as_oom(exc: BaseException, world: int) -> bool:
    """Whether ``exc`` ends a run as an OOM result (``status="oom"``) rather than propagating.

    Under DDP only the emulated limit does (:func:`check_limit`: the ranks agree). A real OOM strikes one rank
    mid-step, while the others wait in a collective it will never join: no agreement is possible there. Raising
    ends this worker, Ray Train ends the group, and the trial records the OOM from the worker's error
    (lmtune.sweep.trainable).
    """
    return is_oom(exc) and (world <= 1 or isinstance(exc, EmulatedOOM))


_STATUS = Path("/proc/self/status")


def _status_kib(field_name: str, status: Path = _STATUS) -> int | None:
    try:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", status.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


class TensorMemory:
    """The CPU stand-in for a device allocator's statistics: the peak of live tensor-storage bytes.

    ``torch.cuda.max_memory_allocated`` counts the bytes of live tensor storage on the device:
    parameters, gradients, optimizer state, activations saved for backward and temporaries. The CPU has
    no such counter, and the process RSS is the wrong stand-in (Python, torch's libraries and the
    compiler's heap are most of it on a small model, and it barely moves with activation checkpointing).

    Mechanism, chosen by measuring (docs in BENCHMARKS.md, "CPU memory model"): a *probe step* runs under
    ``torch.autograd.profiler.profile(profile_memory=True)``, which records every allocation and free of
    torch's CPU allocator, for eager ops and for the buffers of torch.compile's generated kernels alike (a
    dispatch-mode tracker does not see the latter). The peak of the step is the live bytes at its start
    (the storages of parameters, buffers, gradients and optimizer state, counted once each) plus the
    highest running sum of the recorded allocations minus frees. Steady-state training steps allocate the
    same way, so a probe of one step stands for all of them: the first step after warmup, then one every
    ``probe_interval`` (the trainer's eval_interval). The profiler's cost is per op, so it depends on the
    model: probing every step left the smoke frontier's model (4×128, few large ops) at 1.015× its
    wall-clock tokens/s but cut the test suite's 2×32 model (many small ops) to 0.26×; probing once per
    interval is 1.005× and ~1.0× (benchmarks/memory_model.py, BENCHMARKS.md).

    Reserved memory: the CPU has no caching allocator, so ``peak_reserved_gib`` equals
    ``peak_allocated_gib`` here (said in the summary as ``memory_model``). The process's own peak RSS
    is reported under its own name, ``peak_rss_gib``.
    """

    name = "cpu-tensor-bytes"

    def __init__(self, live: Callable[[], Iterable[torch.Tensor]], *, limit_gib: float = 0.0,
                 probe_interval: int = 100, extra_bytes: int = 0, status: Path = _STATUS,
                 clear_refs: Path = Path("/proc/self/clear_refs")):
        """``live``: the tensors alive at a step's start (parameters, buffers, gradients, optimizer state);
        ``extra_bytes``: storage held outside Python that the profiler cannot see being allocated (DDP's
        gradient buckets, one gradient's worth of bytes)."""
        # kineto prints a line on stderr at every profiler start and stop unless its level is raised.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self.live = live
        self.extra_bytes = extra_bytes
        self.limit_gib = limit_gib
        self.probe_interval = max(1, probe_interval)
        self._status, self._clear_refs = status, clear_refs
        self.peak_bytes = 0
        self.probes = 0
        self.rss_scope = "process"
        """``window`` once /proc/self/clear_refs reset the RSS high-water mark, else ``process``."""
        self._window_step: int | None = None

    def begin_window(self, step: int) -> None:
        """Warmup is over: the window of peaks starts now (at ``step`` of this process)."""
        self._window_step = step
        try:
            self._clear_refs.write_text("5")  # Linux: resets VmHWM to the current RSS
            self.rss_scope = "window"
        except OSError:
            self.rss_scope = "process"  # said in the summary: the RSS peak then covers the whole process

    def probe_due(self, step: int) -> bool:
        """Whether the step about to run (``step`` steps of this process done) is probed."""
        return self._window_step is not None and (step - self._window_step) % self.probe_interval == 0

    @contextlib.contextmanager
    def probe(self) -> Iterator[None]:
        from torch.autograd.profiler import profile

        start = storage_bytes(self.live()) + self.extra_bytes
        with profile(profile_memory=True, record_shapes=False, with_flops=False, use_kineto=True) as prof:
            yield
        running = highest = 0
        # kineto_results: the raw event list (what torch.profiler's own memory profiler reads); building
        # FunctionEvents with prof.events() would cost ~20x more for the same allocation records.
        for event in prof.kineto_results.events():
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
                running += event.nbytes()
                highest = max(highest, running)
        self.peak_bytes = max(self.peak_bytes, start + highest)
        self.probes += 1

    def peak(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.probes:
            gib = self.peak_bytes / GIB
            out.update(peak_allocated_gib=gib, peak_reserved_gib=gib)
        hwm = _status_kib("VmHWM", self._status)
        if hwm is not None:
            out["peak_rss_gib"] = hwm / 1024**2
        return out

    def over_limit(self) -> bool:
        return self.limit_gib > 0 and self.peak_bytes / GIB > self.limit_gib

    def limit_message(self, peak_gib: float) -> str:
        return f"peak allocated {peak_gib:.3f} GiB crossed system.memory_limit_gib={self.limit_gib:g}"

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """A step whose memory is not the steady state's (a gradient-noise measurement): never probed."""
        yield

    def summary(self) -> dict[str, Any]:
        return {"memory_model": "cpu: peak live tensor bytes of probed steps (reserved = allocated)",
                "peak_rss_scope": self.rss_scope}


class CudaMemory:
    """The CUDA caching allocator's own statistics, in a window that starts after warmup.

    ``cuda`` is the ``torch.cuda`` module (a seam: the CPU tests pass a recording stand-in).

    At the start of the window (:meth:`begin_window`): synchronize, collect Python garbage, give the
    blocks cached during compile and warmup back to the driver (``empty_cache``: otherwise they stay in
    ``reserved`` and the phase-0 study's "compile bleed" remains, since ``reset_peak_memory_stats`` only resets the
    peaks to the current values), then reset the peaks. ``num_alloc_retries`` (cudaMalloc retried after
    freeing cached blocks: fragmentation near the limit) is cumulative and not reset by it, so the window's
    value is the difference from its start. Steps excluded from the window (gradient-noise measurements,
    whose extra gradient copy is not the steady state) carry the peak so far, then free their cached
    blocks and reset again.
    """

    name = "cuda-allocator"

    def __init__(self, device: torch.device, *, limit_gib: float = 0.0, cuda: Any = None):
        self.device = device
        self.cuda = cuda if cuda is not None else torch.cuda
        self.limit_gib = limit_gib
        self._retries_at_start = 0
        self._carried = {"peak_reserved_gib": 0.0, "peak_allocated_gib": 0.0}
        self._window = False
        if limit_gib > 0:
            total = self.cuda.get_device_properties(device).total_memory
            # The allocator then raises a real torch.OutOfMemoryError beyond the limit.
            self.cuda.set_per_process_memory_fraction(min(1.0, limit_gib * GIB / total), device)

    def _reset(self) -> None:
        self.cuda.synchronize(self.device)
        gc.collect()
        self.cuda.empty_cache()
        self.cuda.reset_peak_memory_stats(self.device)

    def begin_window(self, step: int) -> None:
        self._reset()
        self._retries_at_start = self.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        self._carried = {"peak_reserved_gib": 0.0, "peak_allocated_gib": 0.0}
        self._window = True

    def probe_due(self, step: int) -> bool:
        return False  # the allocator counts every step

    def probe(self):
        return contextlib.nullcontext()

    def _current(self) -> dict[str, float]:
        stats = self.cuda.memory_stats(self.device)
        return {
            "peak_reserved_gib": max(self._carried["peak_reserved_gib"], stats.get("reserved_bytes.all.peak", 0) / GIB),
            "peak_allocated_gib": max(self._carried["peak_allocated_gib"],
                                      stats.get("allocated_bytes.all.peak", 0) / GIB),
            "alloc_retries": float(stats.get("num_alloc_retries", 0) - self._retries_at_start),
        }

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        if not self._window:
            yield
            return
        current = self._current()
        self._carried = {k: current[k] for k in self._carried}
        try:
            yield
        finally:
            self._reset()

    def peak(self) -> dict[str, Any]:
        return self._current()

    def over_limit(self) -> bool:
        return False  # the allocator enforces the fraction itself (a real OOM)

    def summary(self) -> dict[str, Any]:
        return {"memory_model": "cuda: caching allocator peaks after the warmup reset"}


def memory_meter(device: torch.device, live: Callable[[], Iterable[torch.Tensor]], *, limit_gib: float = 0.0,
                 probe_interval: int = 100, extra_bytes: int = 0) -> TensorMemory | CudaMemory:
    if device.type == "cuda":
        return CudaMemory(device, limit_gib=limit_gib)
    return TensorMemory(live, limit_gib=limit_gib, probe_interval=probe_interval, extra_bytes=extra_bytes)


def device_info(device: torch.device) -> dict[str, float | str]:
    """The memory of the device trained on (the frontier's limit when no emulated limit is set)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device_memory_gib": props.total_memory / GIB, "device_name": props.name}
    total = 0
    try:
        total = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))
    except (OSError, AttributeError):
        pass
    return {"device_memory_gib": total / 1024**2, "device_name": "cpu"}


# --- in the training loop: a run's meter, its steady steps, and what the ranks agree on ------------


def live_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """What is alive at a step's start: parameters, buffers, gradients and optimizer state."""
    yield from model.parameters()
    yield from model.buffers()
    yield from (p.grad for p in model.parameters() if p.grad is not None)
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def training_meter(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, device: torch.device,
                   world: int) -> TensorMemory | CudaMemory:
    """The meter of a training run on ``device`` (``system.memory_limit_gib``; on the CPU, a probe every
    ``train.eval_interval`` steps). Under DDP its gradient buckets are one gradient's worth of storage allocated
    outside Python, which the CPU meter cannot see being allocated."""
    params = [p for p in model.parameters() if p.requires_grad]
    ddp_buckets = storage_bytes(params) if world > 1 else 0
    return memory_meter(device, lambda: live_tensors(model, optimizer), limit_gib=cfg.system.memory_limit_gib,
                        probe_interval=cfg.train.eval_interval, extra_bytes=ddp_buckets)


def _collective_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def agreed_peaks(memory: TensorMemory | CudaMemory, world: int, device: torch.device) -> dict[str, float]:
    """This rank's peak memory, or under DDP the largest over ranks (a frontier needs the worst rank)."""
    peaks = memory.peak()
    if world > 1 and peaks:
        keys = sorted(peaks)
        values = torch.tensor([peaks[k] for k in keys], dtype=torch.float64, device=_collective_device(device))
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        peaks = dict(zip(keys, values.tolist()))
    return peaks


def check_limit(memory: TensorMemory | CudaMemory, world: int, device: torch.device) -> None:
    """After a probed step: end it as an OOM when it crossed the emulated limit, on every rank at once
    (the ranks agree on the largest peak, so none is left waiting in a collective)."""
    over = memory.over_limit()
    peak = memory.peak().get("peak_allocated_gib", 0.0)
    if world > 1:
        flags = torch.tensor([float(over), peak], dtype=torch.float64, device=_collective_device(device))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        over, peak = bool(flags[0]), float(flags[1])
    if over:
        raise EmulatedOOM(memory.limit_message(peak))


class SteadySteps:
    """Which optimizer steps the step timer and the memory meter count: those of the steady state.

    Left out of the step times: measurement steps (two passes, a gradient copy), memory probes (profiled), and
    on CUDA the step that refills the cache emptied after a measurement. A measurement step is never probed
    (:meth:`excluded` for the meter); a probe that falls due on one waits for the next step. After a probed
    step the run ends as an OOM when it crossed the emulated limit (:func:`check_limit`, agreed over ranks).
    ``timer`` is a :class:`lmtune.training.measure.StepTimer`.
    """

    def __init__(self, memory: TensorMemory | CudaMemory, timer: Any, *, world: int, device: torch.device):
        self.memory, self.timer = memory, timer
        self.world, self.device = world, device
        self._probe_pending = False
        self._refill_after_excluded = False

    @contextlib.contextmanager
    def step(self, measuring: bool) -> Iterator[None]:
        """Around one optimizer step; ``measuring``: it measures the gradient noise."""
        self._probe_pending = self._probe_pending or self.memory.probe_due(self.timer.process_steps)
        probing = self._probe_pending and not measuring
        timed = not (measuring or probing or self._refill_after_excluded)
        memory_ctx = (self.memory.probe() if probing else self.memory.excluded() if measuring
                      else contextlib.nullcontext())
        with self.timer.excluded() if not timed else contextlib.nullcontext(), memory_ctx:
            yield
        self._refill_after_excluded = measuring and self.device.type == "cuda"
        if probing:
            self._probe_pending = False
            check_limit(self.memory, self.world, self.device)
