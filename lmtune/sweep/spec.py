"""What a sweep file declares: ``sweep = Sweep(...)``.

A sweep file reads like the experiment's design (its space's axes are :mod:`lmtune.sweep.domains`). Everything
mechanical (Ray, Optuna, OOM handling, tables) lives in lmtune. This module does not import ray or optuna, so a sweep file can be loaded and
validated (and rejected with exit code 2) before any cluster resources are used.

Example::

    from lmtune.sweep import Sweep, Smoke, grid, loguniform

    sweep = Sweep(
        name="optimizer",
        base={"model.n_layer": 6, "train.steps": 2000},
        space={"train.optimizer": grid(["adamw", "adam", "sgd"]), "train.lr": loguniform(1e-4, 3e-3)},
        metric="val_loss", mode="min", num_samples=12,
        export=["train.optimizer", "train.lr"],
        smoke=Smoke(base={"model.n_layer": 2, "train.steps": 20}, num_samples=3),
    )
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from lmtune.sweep.domains import (
    Choice,
    Domain,
    Grid,
    IntRange,
    LogUniform,
    Uniform,
    choice,
    grid,
    loguniform,
    randint,
    uniform,
)

# --- the sweep declaration ------------------------------------------------------------------------


@dataclass
class Frontier:
    """A memory frontier: ``x`` (micro-batch) against peak memory, measured separately per ``budget`` value.

    Memory is monotone in ``x`` at a fixed budget, so once a point is OOM every larger ``x`` at that budget
    is recorded as OOM by implication and never launched.
    """

    x: str = "train.micro_batch_size"
    budget: str = "train.ac_budget"
    headroom_gib: float = 6.0
    """The recommended operating point keeps at least this much memory free (the phase-0 study kept 6 GiB on 40)."""
    margin_gib: float | None = None
    """Points predicted above the limit by more than this are skipped (recorded as predicted OOM);
    None = 5% of the limit (near capacity reserved memory levels off, so a linear fit overshoots)."""
    verify_predicted: bool = True
    """Run the smallest point of a budget's OOM boundary once when only a prediction put it there (False: it
    stays ``OOM (predicted)``, and the frontier says so and by how much margin)."""


@dataclass
class Smoke:
    """Overrides applied with ``--smoke``: shrink the sweep to a CPU-sized run of a few minutes."""

    base: dict[str, Any] = field(default_factory=dict)
    """Config keys overriding Sweep.base."""
    space: dict[str, Domain] = field(default_factory=dict)
    """Axes replacing those of Sweep.space with the same key (an axis not named here is kept)."""
    num_samples: int | None = None
    """Replaces Sweep.num_samples."""
    frontier: "Frontier | None" = None
    """Replaces Sweep.frontier (e.g. a headroom that fits the smoke run's emulated memory limit)."""


@dataclass
class Sweep:
    name: str
    """Short kebab-case name; results go to {n}-{name}-{timestamp}, the W&B group is the same."""
    space: dict[str, Domain] = field(default_factory=dict)
    """Config key → domain (grid, choice, uniform, loguniform, randint)."""
    base: dict[str, Any] = field(default_factory=dict)
    """Config keys fixed for every trial (on top of the trainer's defaults and locked defaults)."""
    define_by_run: Callable[[Any], dict[str, Any] | None] | None = None
    """Optional Optuna define-by-run function ``f(trial) -> constants``, used instead of ``space``'s
    non-grid axes (it may branch: e.g. momentum only when optimizer is sgd)."""
    metric: str | list[str] = "val_loss"
    """A metric the trainer reports (DESIGN.md names), or several for a Pareto front."""
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = "min"
    searcher: str = "tpe"
    """A kind of :mod:`lmtune.sweep.searchers`: ``tpe`` (Optuna TPE), ``grid`` (Optuna's grid: every grid point
    once), ``nsga2`` (NSGA-II, several metrics) or ``frontier`` (the frontier planner)."""
    num_samples: int = 16
    """Trials for tpe/nsga2; ignored by grid and frontier (the grid size decides)."""
    scheduler: Literal["asha", "none"] = "none"
    """ASHA early stopping on `tokens` (Li et al. 2020)."""
    grace_tokens: int = 0
    """ASHA: tokens every trial gets before it can be stopped (0 = a tenth of the budget)."""
    reduction_factor: int = 3
    workers: int = 1
    """Data-parallel workers per trial (Ray Train, DDP); effective batch = micro_batch_size × accumulation_steps ×
    workers sequences."""
    gpus: float | Literal["auto"] = "auto"
    """GPUs per worker: ``"auto"`` = 1 when the cluster has GPUs and the trials do not train on the CPU
    (``system.device='cpu'``, as every smoke variant), else 0; a number asks for exactly that. The sweep says what
    it resolved to when it starts; ``--gpus`` overrides it."""
    cpus: float = 1
    """CPUs per worker (``--cpus`` overrides it)."""
    max_failures: int = 1
    """Retries of a trial that fails with a genuine error (an OOM is a result and is never retried)."""
    frontier: Frontier | None = None
    """Frontier axes; required for searcher="frontier" and used by the frontier tables and plots."""
    export: list[str] = field(default_factory=list)
    """Config keys of the winning trial that `lmtune.export` writes as locked defaults."""
    smoke: Smoke = field(default_factory=Smoke)
    """Applied with ``--smoke``. Left out (or ``Smoke()``), ``--smoke`` applies lmtune's default instead
    (:func:`lmtune.sweep.load.default_smoke`: base ``TINY_CPU``, at most 2 samples per grid point), never the
    full-size sweep."""
    seed: int = 0
    """Seed of the searcher."""
    description: str = ""


__all__ = ["Choice", "Domain", "Frontier", "Grid", "IntRange", "LogUniform", "Smoke", "Sweep", "Uniform", "choice",
           "grid", "loguniform", "randint", "uniform"]
