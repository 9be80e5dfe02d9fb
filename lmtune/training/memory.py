"""Memory: the device's peak memory in a window after warmup, the emulated limit, and what counts as an OOM.

On CUDA the caching allocator's own statistics (:class:`CudaMemory`); on the CPU, which has no such counter,
the peak of live tensor-storage bytes of probed steps (:class:`TensorMemory`). Device-only logic goes through
a seam (:class:`CudaMemory` takes the ``torch.cuda`` module) so that the CPU test suite can drive it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

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
