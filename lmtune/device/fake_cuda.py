"""A CUDA backend for machines without one: what ``torch.cuda`` would do, on CPU tensors, for the tests.

:class:`FakeCuda` answers the subset of the ``torch.cuda`` API that lmtune's device layer calls, with torch's own
argument checks (``torch.cuda._utils._get_device_index``, the fraction's type and range, a CPU ByteTensor for an
RNG state), so that a call the real module would refuse is refused here too; for example
``set_device(torch.device("cuda"))`` raises the ValueError torch raises. It keeps a caching allocator's counters of
the real bytes of the tensors a run allocates (a dispatch mode sees each new storage and a finalizer its release):
``allocated`` and ``reserved`` in 2 MiB segments, peaks, ``num_alloc_retries`` when a full pool frees its cache and
retries, and at the memory fraction's limit a real ``torch.OutOfMemoryError`` with the allocator's message. Every
call is recorded in :attr:`FakeCuda.calls`.

It is made from :data:`lmtune.device.FAKE_CUDA_ENV` (``devices=2,memory_gib=8,name=NVIDIA H100 80GB HBM3``) in any
process that has it in its environment, a Ray trial included; ``CUDA_VISIBLE_DEVICES`` narrows the devices it shows,
as it does for the real driver.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.cuda._utils import _get_device_index
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SEGMENT = 2 * 1024**2
"""The caching allocator reserves from the driver in segments; 2 MiB is its small-pool segment size."""
BLOCK = 512
"""Every allocation is rounded up to a multiple of 512 bytes."""


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _format(n: float) -> str:
    """Bytes the way the caching allocator's messages print them."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


@dataclass(frozen=True)
class Properties:
    """What ``torch.cuda.get_device_properties`` tells of a device (the fields lmtune reads)."""

    name: str
    total_memory: int
    major: int = 9
    minor: int = 0


class _Allocations(TorchDispatchMode):
    """Every op's new output storages count as allocated on the fake device until they are freed."""

    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.fake._allocate(t.untyped_storage())
        return out


class FakeCuda:
    """A validating, recording, memory-counting stand-in for ``torch.cuda`` (module docstring)."""

    autocast_device_type = "cpu"  # where the tensors really are

    def __init__(self, devices: int = 1, memory_gib: float = 80.0, name: str = "NVIDIA H100 80GB HBM3"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.physical = [str(i) for i in range(devices)] if visible is None else [d for d in visible.split(",") if d]
        self.properties = Properties(name=name, total_memory=int(memory_gib * 1024**3))
        self.current = 0
        self.calls: list[tuple[str, tuple]] = []
        self.fraction = 1.0
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.retries = self.ooms = 0
        self._live: dict[int, int] = {}
        self._lock = threading.Lock()
        self._rng = {i: torch.Generator().manual_seed(i).get_state() for i in range(len(self.physical))}

    @classmethod
    def from_spec(cls, spec: str) -> FakeCuda:
        """From ``key=value,…`` (devices, memory_gib, name); ``1`` alone: the defaults."""
        kwargs: dict[str, Any] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                continue
            key = key.strip()
            kwargs[key] = {"devices": int, "memory_gib": float, "name": str}[key](value.strip())
        return cls(**kwargs)

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def called(self, name: str) -> list[tuple]:
        """The arguments of every call of ``name``, in order."""
        return [args for n, args in self.calls if n == name]

    def _index(self, device: Any, optional: bool = True) -> int:
        """``device`` as torch resolves it: an int, a ``cuda:i``; None or a bare ``cuda`` is the current device
        where torch allows it (``optional``), else torch's own ValueError."""
        if device is None or (not isinstance(device, int) and torch.device(device).type == "cuda"
                              and torch.device(device).index is None):
            if not optional:
                _get_device_index(device)  # raises, as torch.cuda does
            return self.current
        return _get_device_index(device, optional=optional)

    def _ordinal(self, index: int) -> int:
        if not 0 <= index < self.device_count():
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    # --- devices ---------------------------------------------------------------------------------------

    def is_available(self) -> bool:
        return self.device_count() > 0

    def device_count(self) -> int:
        return len(self.physical)

    def current_device(self) -> int:
        self._record("current_device")
        return self.current

    def set_device(self, device: Any) -> None:
        index = self._index(device, optional=False)
        self._record("set_device", device)
        if index >= 0:
            self.current = self._ordinal(index)

    def get_device_properties(self, device: Any = None) -> Properties:
        index = self._index(device)
        if index < 0 or index >= self.device_count():
            raise AssertionError("Invalid device id")
        return self.properties

    def get_device_name(self, device: Any = None) -> str:
        return self.get_device_properties(device).name

    def synchronize(self, device: Any = None) -> None:
        self._record("synchronize", self._ordinal(self._index(device)))

    def tensor_device(self, index: int) -> torch.device:
        self._ordinal(_get_device_index(index))
        return torch.device("cpu")

    def to_device(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"cannot pin '{x.device}' memory: only dense CPU tensors can be pinned")
        self._record("to_device")
        return x.to(device)

    def ddp_device_ids(self, index: int) -> None:
        self._record("ddp_device_ids", self._ordinal(_get_device_index(index)))
        return None  # DDP over CPU tensors takes no device ids

    def cudagraph_mark_step_begin(self) -> None:
        self._record("cudagraph_mark_step_begin")

    # --- the caching allocator -------------------------------------------------------------------------

    def set_per_process_memory_fraction(self, fraction: float, device: Any = None) -> None:
        index = self._ordinal(self._index(device, optional=False) if device is not None else self.current)
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self._record("set_per_process_memory_fraction", fraction, index)
        self.fraction = fraction

    def get_per_process_memory_fraction(self, device: Any = None) -> float:
        self._ordinal(self._index(device))
        return self.fraction

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Count the allocations of this thread's ops (the trainer's, inside its session)."""
        with _Allocations(self):
            yield

    def _allocate(self, storage: torch.UntypedStorage) -> None:
        key, n = storage.data_ptr(), _round_up(storage.nbytes(), BLOCK)
        if n == 0:
            return
        with self._lock:
            if key in self._live:
                return
            self._grow(n)
            self._live[key] = n
        weakref.finalize(storage, self._free, key)

    def _grow(self, n: int) -> None:
        """Allocate ``n`` bytes: from the pool's free bytes, else a new segment from the driver (after freeing the
        cache and retrying, as the allocator does, where the cap is reached), else a real OOM."""
        need = self.allocated + n
        cap = int(self.fraction * self.properties.total_memory)
        if need > self.reserved:
            grow = _round_up(need - self.reserved, SEGMENT)
            if self.reserved + grow > cap and self.reserved > _round_up(self.allocated, SEGMENT):
                self.retries += 1
                self.reserved = _round_up(self.allocated, SEGMENT)
                grow = _round_up(need - self.reserved, SEGMENT)
            if self.reserved + grow > cap:
                self.ooms += 1
                raise torch.OutOfMemoryError(self._oom_message(n, cap))
            self.reserved += grow
        self.allocated = need
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _free(self, key: int) -> None:
        with self._lock:
            self.allocated -= self._live.pop(key, 0)

    def _oom_message(self, n: int, cap: int) -> str:
        total = self.properties.total_memory
        return (f"CUDA out of memory. Tried to allocate {_format(n)}. GPU {self.current} has a total capacity of "
                f"{_format(total)} of which {_format(total - self.reserved)} is free. Of the allocated memory "
                f"{_format(self.allocated)} is allocated by PyTorch, and {_format(self.reserved - self.allocated)} "
                f"is reserved by PyTorch but unallocated. This process is limited to {_format(cap)} "
                f"(set_per_process_memory_fraction({self.fraction:.4f})).")

    def empty_cache(self) -> None:
        self._record("empty_cache", self.allocated)
        self.reserved = _round_up(self.allocated, SEGMENT)

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self._record("reset_peak_memory_stats", self._ordinal(self._index(device)))
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        self._ordinal(self._index(device))
        return {"allocated_bytes.all.current": self.allocated, "allocated_bytes.all.peak": self.peak_allocated,
                "reserved_bytes.all.current": self.reserved, "reserved_bytes.all.peak": self.peak_reserved,
                "num_alloc_retries": self.retries, "num_ooms": self.ooms}

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        """(free, total) bytes of the device, as the driver sees it: what this process has not reserved."""
        self._ordinal(self._index(device))
        return self.properties.total_memory - self.reserved, self.properties.total_memory

    def max_memory_reserved(self, device: Any = None) -> int:
        return self.memory_stats(device)["reserved_bytes.all.peak"]

    def max_memory_allocated(self, device: Any = None) -> int:
        return self.memory_stats(device)["allocated_bytes.all.peak"]

    # --- random numbers --------------------------------------------------------------------------------

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        index = self._ordinal(self._index(device))
        return self._rng[index].clone()

    def set_rng_state(self, new_state: torch.Tensor, device: Any = "cuda") -> None:
        index = self._ordinal(self._index(device))
        if not (isinstance(new_state, torch.Tensor) and new_state.dtype == torch.uint8
                and new_state.device.type == "cpu"):
            raise TypeError(f"expected a torch.ByteTensor, but got {type(new_state).__name__}")
        self._record("set_rng_state", index)
        self._rng[index] = new_state.clone()
