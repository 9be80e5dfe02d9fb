"""The accelerators a run trains on (CPU, one CUDA device), their backends, and how a process picks one.

Every CUDA-only decision is a method of :class:`CUDAAccelerator`, and every call into CUDA goes to its backend: the
``torch.cuda`` module through :class:`TorchCuda`, or the CPU tests' :class:`~lmtune.device.fake_cuda.FakeCuda`. The
only lines that a CPU cannot run are :class:`TorchCuda`'s own (``benchmarks/cuda_coverage.py`` lists them).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import shutil
import sysconfig
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.cuda._utils import _get_device_index  # torch's own validator of a CUDA device argument

from lmtune.config import ConfigError
from lmtune.device.memory import GIB, CudaMemory, TensorMemory
from lmtune.device.specs import peak_flops_for

FAKE_CUDA_ENV = "LMTUNE_FAKE_CUDA"
"""A test seam, like lmtune.training.faults: set (e.g. ``devices=2,memory_gib=8``) in a process's environment, it makes
that process's CUDA backend the validating fake (:class:`~lmtune.device.fake_cuda.FakeCuda`); Ray trial processes
inherit it from the driver. Never set in a real run."""

CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that capture CUDA graphs: each training or eval step must be marked as a new one
(``torch.compiler.cudagraph_mark_step_begin``), or a replay overwrites outputs a later step still reads."""


class TorchCuda:
    """The real backend: the ``torch.cuda`` module (every attribute not defined here is its own), plus the CUDA-only
    calls torch keeps elsewhere. Only a machine with a CUDA device runs these lines."""

    autocast_device_type = "cuda"

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    def tensor_device(self, index: int) -> torch.device:
        return torch.device("cuda", index)

    def to_device(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        # non_blocking overlaps the copy with compute only from page-locked memory; from pageable memory it is a
        # synchronous copy that merely looks asynchronous.
        return x.pin_memory().to(device, non_blocking=True)

    def ddp_device_ids(self, index: int) -> list[int]:
        return [index]

    def get_per_process_memory_fraction(self, index: int) -> float:
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.8
        return float(getter(index)) if getter is not None else 1.0

    def cudagraph_mark_step_begin(self) -> None:
        torch.compiler.cudagraph_mark_step_begin()

    def tracking(self) -> ContextManager:
        return contextlib.nullcontext()  # the allocator counts by itself


_backend: Any = None


def cuda_backend() -> Any:
    """This process's CUDA backend: the validating fake where :data:`FAKE_CUDA_ENV` is set, else ``torch.cuda``."""
    global _backend
    if _backend is None:
        spec = os.environ.get(FAKE_CUDA_ENV)
        if spec:
            from lmtune.device.fake_cuda import FakeCuda

            _backend = FakeCuda.from_spec(spec)
        else:
            _backend = TorchCuda()
    return _backend


@contextlib.contextmanager
def use_backend(backend: Any) -> Iterator[Any]:
    """This process's CUDA backend is ``backend`` inside the block (a test's fake), the previous one after."""
    global _backend
    previous, _backend = _backend, backend
    try:
        yield backend
    finally:
        _backend = previous


def cuda_available() -> bool:
    return bool(cuda_backend().is_available())


class Accelerator:
    """Where one process trains, and everything that differs between devices. ``device`` is where the run's tensors
    live; ``kind`` is ``cpu`` or ``cuda`` (the word in summaries and in ``system.device``)."""

    kind: str
    device: torch.device
    fused_optimizer: bool
    """Whether the optimizers run their fused kernels (one kernel for all parameters on CUDA)."""

    def session(self, memory_limit_gib: float = 0.0) -> ContextManager:
        """Around a whole run: the device made current, an emulated smaller device set up and, at the end, undone."""
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def release_memory(self) -> None:
        """Give back what a finished run, an OOM or an earlier trial in this process left."""
        raise NotImplementedError

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host batch onto the device."""
        raise NotImplementedError

    def autocast(self, dtype: torch.dtype) -> ContextManager:
        raise NotImplementedError

    def mark_step_begin(self) -> None:
        """Before each forward when a CUDA-graph compile mode runs (:data:`CUDAGRAPH_COMPILE_MODES`)."""
        raise NotImplementedError

    def memory_meter(self, live: Callable[[], Iterable[torch.Tensor]], *, limit_gib: float = 0.0,
                     probe_interval: int = 100, extra_bytes: int = 0) -> TensorMemory | CudaMemory:
        raise NotImplementedError

    def info(self) -> dict[str, float | str]:
        """The memory and name of the device trained on (the frontier's limit when no emulated limit is set)."""
        raise NotImplementedError

    def free_memory_gib(self) -> float:
        """Memory free on the device now (for a preflight: other processes use it too)."""
        raise NotImplementedError

    def peak_flops(self) -> float | None:
        raise NotImplementedError

    def devices_held(self, world: int) -> int:
        """What ``world`` ranks occupy, for ``device_hours``."""
        raise NotImplementedError

    def ddp_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def rng_state(self) -> torch.Tensor | None:
        """This device's RNG state (None where the CPU generator is the only one)."""
        raise NotImplementedError

    def set_rng_state(self, state: Any) -> None:
        raise NotImplementedError

    def compile_missing(self) -> str | None:
        """What torch.compile needs on this device that the machine lacks, in words; None when nothing is missing."""
        raise NotImplementedError


def _gradient_buckets() -> dict[str, Any]:
    # Gradients as views into DDP's all-reduce buckets: no second copy of every gradient (which the memory frontier
    # would otherwise count as needed memory), one copy fewer per backward.
    return {"gradient_as_bucket_view": True}


class CPUAccelerator(Accelerator):
    kind = "cpu"
    fused_optimizer = False  # the foreach kernels: the CPU's losses stay those of every earlier run

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def session(self, memory_limit_gib: float = 0.0) -> ContextManager:
        return contextlib.nullcontext()  # the emulated limit is the TensorMemory meter's, checked after probes

    def synchronize(self) -> None:
        pass

    def release_memory(self) -> None:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages mapped otherwise

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def autocast(self, dtype: torch.dtype) -> ContextManager:
        return torch.autocast("cpu", dtype=dtype)

    def mark_step_begin(self) -> None:
        pass  # inductor's CPU kernels capture no graphs

    def memory_meter(self, live, *, limit_gib=0.0, probe_interval=100, extra_bytes=0) -> TensorMemory:
        return TensorMemory(live, limit_gib=limit_gib, probe_interval=probe_interval, extra_bytes=extra_bytes)

    def info(self) -> dict[str, float | str]:
        return {"device_memory_gib": _meminfo_gib("MemTotal"), "device_name": "cpu"}

    def free_memory_gib(self) -> float:
        return _meminfo_gib("MemAvailable")

    def peak_flops(self) -> float | None:
        return None

    def devices_held(self, world: int) -> int:
        return world * torch.get_num_threads()

    def ddp_kwargs(self) -> dict[str, Any]:
        return _gradient_buckets()

    def rng_state(self) -> None:
        return None

    def set_rng_state(self, state: Any) -> None:
        pass

    def compile_missing(self) -> str | None:
        return None if has_cpp_compiler() else "a C++ compiler for inductor's CPU kernels (install g++ or set CXX)"


class CUDAAccelerator(Accelerator):
    """One CUDA device, by index. ``index`` None: ``LOCAL_RANK`` in a data-parallel group (torchrun and Ray Train set
    it), else the backend's current device. The index is validated as torch validates it and is passed to every
    call: ``torch.cuda.set_device(torch.device("cuda"))`` raises ("Expected a torch.device with a specified index").
    """

    kind = "cuda"
    fused_optimizer = True

    def __init__(self, backend: Any, index: int | None = None):
        self.backend = backend
        if index is None:
            in_group = dist.is_available() and dist.is_initialized()
            index = int(os.environ.get("LOCAL_RANK", 0)) if in_group else backend.current_device()
        self.index = _get_device_index(torch.device("cuda", index))
        count = backend.device_count()
        if not 0 <= self.index < count:
            raise ConfigError(f"CUDA device {self.index} was asked for, but this process sees {count} "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}).")
        self.device = backend.tensor_device(self.index)

    @contextlib.contextmanager
    def session(self, memory_limit_gib: float = 0.0) -> Iterator[None]:
        """The device made current (NCCL and the caching allocator work on the current device); the allocator's
        memory fraction set for ``memory_limit_gib`` (a real torch.OutOfMemoryError beyond it), or to the whole
        device, and the fraction this process had before restored at the end, so that a later trial in a reused
        process does not inherit it."""
        cuda = self.backend
        cuda.set_device(self.index)
        total = cuda.get_device_properties(self.index).total_memory
        previous = cuda.get_per_process_memory_fraction(self.index)
        fraction = min(1.0, memory_limit_gib * GIB / total) if memory_limit_gib > 0 else 1.0
        cuda.set_per_process_memory_fraction(float(fraction), self.index)
        try:
            with cuda.tracking():
                yield
        finally:
            cuda.set_per_process_memory_fraction(float(previous), self.index)

    def synchronize(self) -> None:
        self.backend.synchronize(self.index)

    def release_memory(self) -> None:
        CPUAccelerator.release_memory(self)  # first: garbage, whose tensors still hold blocks, and the host's heap
        self.backend.empty_cache()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.to_device(x, self.device)

    def autocast(self, dtype: torch.dtype) -> ContextManager:
        return torch.autocast(self.backend.autocast_device_type, dtype=dtype)

    def mark_step_begin(self) -> None:
        self.backend.cudagraph_mark_step_begin()

    def memory_meter(self, live, *, limit_gib=0.0, probe_interval=100, extra_bytes=0) -> CudaMemory:
        return CudaMemory(self.backend, self.index)  # the allocator counts everything, the fraction is its limit

    def info(self) -> dict[str, float | str]:
        props = self.backend.get_device_properties(self.index)
        return {"device_memory_gib": props.total_memory / GIB, "device_name": props.name}

    def free_memory_gib(self) -> float:
        free, _total = self.backend.mem_get_info(self.index)
        return free / GIB

    def peak_flops(self) -> float | None:
        return peak_flops_for(self.backend.get_device_name(self.index))

    def devices_held(self, world: int) -> int:
        return world  # a GPU per rank

    def ddp_kwargs(self) -> dict[str, Any]:
        return {"device_ids": self.backend.ddp_device_ids(self.index), **_gradient_buckets()}

    def rng_state(self) -> torch.Tensor:
        # This device's only: the states of every visible device (get_rng_state_all) cannot be restored where fewer
        # are visible, and a process trains on one.
        return self.backend.get_rng_state(self.index)

    def set_rng_state(self, state: Any) -> None:
        if isinstance(state, (list, tuple)):  # a checkpoint from before: every visible device's, this one first
            state = state[0]
        self.backend.set_rng_state(state.cpu(), self.index)

    def compile_missing(self) -> str | None:
        # Triton builds each kernel's launcher with a C compiler against Python's headers, at run time: without
        # them the first compiled step dies deep inside inductor.
        missing = []
        if not any(shutil.which(c) for c in (os.environ.get("CC") or "", "cc", "gcc", "clang") if c):
            missing.append("a C compiler (install gcc or set CC)")
        if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
            missing.append("Python's headers (Python.h; on Debian/Ubuntu: apt install python3-dev)")
        return " and ".join(missing) + " for Triton's kernels" if missing else None


def _meminfo_gib(field: str) -> float:
    """A /proc/meminfo field in GiB (0 where there is none)."""
    try:
        return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)) / 1024**2
    except (OSError, AttributeError):
        return 0.0


def has_cpp_compiler() -> bool:
    """Whether inductor finds a C++ compiler (it needs one for CPU kernels)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return bool(get_cpp_compiler())
    except ImportError:  # a torch without this helper: the usual names
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    except Exception:  # inductor's search raises when it finds none
        return False


def accelerator(name: str = "auto", device: torch.device | str | None = None) -> Accelerator:
    """The accelerator for ``system.device`` = ``name`` (``auto``: CUDA where a device is visible), or for an explicit
    ``device`` (a Ray Train worker's ``get_device()``). A CUDA device where none is visible is a ConfigError."""
    index = None
    if device is not None:
        device = torch.device(device)
        name, index = device.type, device.index
    backend = cuda_backend()
    if name == "auto":
        name = "cuda" if backend.is_available() else "cpu"
    if name == "cpu":
        return CPUAccelerator()
    if name != "cuda":
        raise ConfigError(f"device {name!r} is not accepted: expected auto, cpu or cuda.")
    if not backend.is_available():
        raise ConfigError("system.device='cuda' but no CUDA device is available; accepted here: auto, cpu.")
    return CUDAAccelerator(backend, index)
