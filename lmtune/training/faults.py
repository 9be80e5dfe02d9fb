"""Fault injection for tests: a seam the trainer holds, a no-op unless a test asks for a fault.

The tests of the OOM path through Ray cannot reach into a trial process, but trial processes inherit the
driver's environment: :data:`FAULT_OOM_ENV` set there makes every step of each run whose micro_batch_size is
at least its value raise a real ``torch.OutOfMemoryError``. The environment is read once, when the trainer is
made (:meth:`Faults.from_env`); a test in the same process may pass ``Trainer(..., faults=InjectedOOM(n))``.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

FAULT_OOM_ENV = "LMTUNE_FAULT_OOM_MICRO_BATCH"
"""Every step of a run whose micro_batch_size is at least this raises a real torch.OutOfMemoryError."""


class Faults:
    """No fault: the trainer calls :meth:`before_step` at the start of every optimizer step."""

    def before_step(self) -> None:
        pass

    @staticmethod
    def from_env(micro_batch_size: int, environ: Mapping[str, str] = os.environ) -> Faults:
        """The faults :data:`FAULT_OOM_ENV` sets for a run of ``micro_batch_size``."""
        at = int(environ.get(FAULT_OOM_ENV) or 0)
        return InjectedOOM(at) if at and micro_batch_size >= at else Faults()


class InjectedOOM(Faults):
    """Every step raises a real torch.OutOfMemoryError, as CUDA's allocator does."""

    def __init__(self, at: int):
        self.at = at

    def before_step(self) -> None:
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {FAULT_OOM_ENV}={self.at})")
