"""Sweeps: ``from lmtune.sweep import Sweep, Smoke, Frontier, grid, choice, uniform, loguniform, randint``.

Run one with ``python -m lmtune.sweep SWEEP.py``. Importing this package does not import ray.
"""

from lmtune.sweep.domains import choice, grid, loguniform, randint, uniform
from lmtune.sweep.presets import TINY_CPU
from lmtune.sweep.spec import Frontier, Smoke, Sweep

__all__ = ["Sweep", "Smoke", "Frontier", "grid", "choice", "uniform", "loguniform", "randint", "TINY_CPU"]
