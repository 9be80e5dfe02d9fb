"""A sweep file resolved: after --smoke and overrides, everything the runner needs, checked
(:func:`lmtune.sweep.load.resolve` makes it; the kind of searcher it names is
:func:`lmtune.sweep.searchers.kind_of`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.sweep.domains import Domain, cross
from lmtune.sweep.spec import Frontier, Sweep


@dataclass(frozen=True)
class ResolvedSweep:
    """A sweep file after --smoke and overrides: everything the runner needs, checked. Frozen: what changes later
    (the GPUs "auto" resolves to, the prepared data's place) is a new one (``dataclasses.replace``)."""

    sweep: Sweep
    file: Path
    smoke: bool
    base: dict[str, Any]
    """The flat resolved config every trial starts from (all keys; locked defaults included)."""
    base_overrides: dict[str, Any]
    """The keys the sweep (base, smoke.base) and the command line set, before defaults: what `load` got."""
    space: dict[str, Domain]
    metrics: list[str]
    modes: list[str]
    searcher: str
    """The kind of searcher it runs with (:mod:`lmtune.sweep.searchers`), which may stand in for the one the file
    names: ``grid`` for tpe when every axis is a grid, ``nsga2`` for tpe with several metrics."""
    num_trials: int
    """Trials to run: the grid size for a grid, × the sweep file's ``num_samples`` (per grid point) for tpe/nsga2."""
    searcher_note: str = ""
    """Why ``searcher`` is not the one the file names (``instead of tpe: every axis is a grid``); "" when it is."""
    export: list[str] = field(default_factory=list)
    frontier: Frontier | None = None
    """The frontier axes in force (Smoke.frontier under --smoke, else Sweep.frontier)."""
    define_by_run_keys: list[str] = field(default_factory=list)
    """Config keys the define-by-run function sets (found by dry runs at validation)."""
    gpus: float | str = "auto"
    """GPUs per worker asked for ("auto" until the runner sees the cluster: :func:`resolve_gpus`)."""
    cpus: float = 1
    """CPUs per worker."""
    smoke_default: bool = False
    """``--smoke`` on a file without a smoke variant: :func:`default_smoke` was applied."""

    @property
    def name(self) -> str:
        return self.sweep.name

    @property
    def searcher_text(self) -> str:
        """The searcher as the sweep's first line says it: ``grid (instead of tpe: every axis is a grid)``."""
        return f"{self.searcher} ({self.searcher_note})" if self.searcher_note else self.searcher

    @property
    def metric(self) -> str | list[str]:
        return self.metrics[0] if len(self.metrics) == 1 else list(self.metrics)

    @property
    def mode(self) -> str | list[str]:
        return self.modes[0] if len(self.modes) == 1 else list(self.modes)

    @property
    def grid_axes(self) -> dict[str, list]:
        return grid_axes(self.space)

    @property
    def sampled_axes(self) -> dict[str, Domain]:
        return {k: d for k, d in self.space.items() if not d.crossed}

    def grid_points(self) -> list[dict[str, Any]]:
        return cross(self.grid_axes)

    def defaults_point(self) -> dict[str, Any]:
        """The base config's values of the space's keys where they lie in the space (evaluated first)."""
        out = {}
        for key, dom in self.space.items():
            v = self.base.get(key)
            if dom.contains(v):
                out[key] = v
        return out

    def space_json(self) -> dict[str, dict[str, Any]]:
        return {k: d.to_json() for k, d in self.space.items()}


def grid_axes(space: dict[str, Domain]) -> dict[str, list]:
    """The space's grid axes (crossed into every combination) with their values."""
    return {k: list(d.listed()) for k, d in space.items() if d.crossed}
