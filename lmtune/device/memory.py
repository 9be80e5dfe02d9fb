"""A device's peak memory in a window after warmup: the CUDA caching allocator's own statistics
(:class:`CudaMemory`), or on the CPU, which has no such counter, the peak of live tensor-storage bytes of probed
steps (:class:`TensorMemory`). Which one a run uses is its accelerator's choice (``Accelerator.memory_meter``)."""

from __future__ import annotations

import contextlib
import gc
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

GIB = 1024**3

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
    refills_after_reset = False

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

    ``cuda`` is the accelerator's backend (``torch.cuda``, or the CPU tests' validating fake) and ``index`` the
    device's index: every call names the device, as the allocator's statistics are per device.

    At the start of the window (:meth:`begin_window`): synchronize, collect Python garbage, give the
    blocks cached during compile and warmup back to the driver (``empty_cache``: otherwise they stay in
    ``reserved`` and the phase-0 study's "compile bleed" remains, since ``reset_peak_memory_stats`` only resets the
    peaks to the current values), then reset the peaks. The next step refills the emptied pool, so the step timer
    leaves it out (:attr:`refills_after_reset`). ``num_alloc_retries`` (cudaMalloc retried after freeing cached
    blocks: fragmentation near the limit) is cumulative and not reset by it, so the window's value is the
    difference from its start. Steps excluded from the window (gradient-noise measurements, whose extra gradient
    copy is not the steady state) carry the peak so far, then free their cached blocks and reset again.

    The emulated limit (``system.memory_limit_gib``) is not this meter's: the accelerator's session sets the
    allocator's memory fraction, and the allocator raises a real ``torch.OutOfMemoryError`` beyond it.
    """

    name = "cuda-allocator"
    refills_after_reset = True
    """The step after an ``empty_cache`` re-reserves the pool from the driver: not a steady-state step."""

    def __init__(self, cuda: Any, index: int):
        self.cuda = cuda
        self.index = index
        self._retries_at_start = 0
        self._carried = {"peak_reserved_gib": 0.0, "peak_allocated_gib": 0.0}
        self._window = False

    def _reset(self) -> None:
        self.cuda.synchronize(self.index)
        gc.collect()
        self.cuda.empty_cache()
        self.cuda.reset_peak_memory_stats(self.index)

    def begin_window(self, step: int) -> None:
        self._reset()
        self._retries_at_start = self.cuda.memory_stats(self.index).get("num_alloc_retries", 0)
        self._carried = {"peak_reserved_gib": 0.0, "peak_allocated_gib": 0.0}
        self._window = True

    def probe_due(self, step: int) -> bool:
        return False  # the allocator counts every step

    def probe(self):
        return contextlib.nullcontext()

    def _current(self) -> dict[str, float]:
        stats = self.cuda.memory_stats(self.index)
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
