"""lmtune's one device layer: every call into ``torch.cuda``, and every decision that differs on a GPU, is made here.

The trainer, the sweep's trials and the tools hold an :class:`Accelerator` (the idea of Lightning's
``CUDAAccelerator`` / ``CPUAccelerator``) and never say ``torch.cuda`` themselves: which device a process trains on
and how it is made current, the memory fraction of an emulated smaller device (set, then restored), the caching
allocator's statistics (:class:`CudaMemory`), host-to-device copies, autocast, DDP's device ids, fused optimizers,
CUDA-graph step markers, the CUDA RNG in checkpoints, peak FLOP/s for MFU.

A :class:`CUDAAccelerator` talks to a *backend*: ``torch.cuda`` itself (:class:`TorchCuda`) on a GPU, or
:class:`~lmtune.device.fake_cuda.FakeCuda` in the CPU tests, which validates every call's arguments with torch's own
validators, keeps allocator counters of the real tensors' bytes, raises a real ``torch.OutOfMemoryError`` at its
limit and records what was called. So the CUDA control flow runs, line for line, on a machine without a GPU
(``LMTUNE_FAKE_CUDA``, :data:`FAKE_CUDA_ENV`; ``benchmarks/cuda_coverage.py`` measures how much of it the tests run).
"""

from lmtune.device.accelerators import (
    CUDAGRAPH_COMPILE_MODES,
    FAKE_CUDA_ENV,
    Accelerator,
    CPUAccelerator,
    CUDAAccelerator,
    TorchCuda,
    accelerator,
    cuda_available,
    cuda_backend,
    use_backend,
)
from lmtune.device.memory import GIB, CudaMemory, TensorMemory, storage_bytes
from lmtune.device.specs import PEAK_BF16_FLOPS, peak_flops_for

__all__ = [
    "Accelerator", "CPUAccelerator", "CUDAAccelerator", "CUDAGRAPH_COMPILE_MODES", "CudaMemory", "FAKE_CUDA_ENV", "GIB",
    "PEAK_BF16_FLOPS", "TensorMemory", "TorchCuda", "accelerator", "cuda_available", "cuda_backend", "peak_flops_for",
    "storage_bytes", "use_backend",
]
