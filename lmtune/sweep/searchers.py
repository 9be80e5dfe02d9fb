"""The kinds of searcher a sweep may use, each in one place, registered under the name a sweep file gives.

A kind says when a sweep may have it (and which kind stands in for it, and why: ``tpe`` becomes ``nsga2`` for
several metrics and ``grid`` for a space of grid axes only), how many trials it runs, what the console counts them
against (``≤N`` for a planner that may stop early), the columns it adds to trials.csv and the rows it writes there
for points it decided without running them, whether it keeps an Optuna study (``optuna.db``), whether ASHA may stop
its trials and whether they need fresh processes, how its searcher is built, and whether a run ended before it
was done. The loader, the runner and the sweep's console lines ask the kind; nothing branches on a searcher's name.
What a searcher saves in Tune's snapshot and how it agrees with a resumed sweep are its Tune searcher's own
(:class:`lmtune.sweep.search.StudySearch`, :class:`lmtune.sweep.search.FrontierSearcher`).

A new searcher is one class here, registered with :func:`register` (one built on an Optuna sampler needs only its
:meth:`OptunaKind.sampler`). Importing this module imports neither ray nor optuna (a sweep file is checked before
either is loaded); building a searcher does.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, ClassVar

from lmtune.config import ConfigError
from lmtune.sweep.findings import PREDICTED_KEY
from lmtune.sweep.resolved import ResolvedSweep
from lmtune.sweep.spec import Frontier, Sweep


class SearcherKind:
    """What every kind says (the defaults are an Optuna study's)."""

    name: ClassVar[str]
    keeps_study: ClassVar[bool] = True
    """Its trials are asked and told in an Optuna study (``optuna.db``, which optuna-dashboard opens)."""
    early_stopping: ClassVar[bool] = True
    """ASHA may stop its trials early (a probe of a planner must run to its end)."""
    fresh_processes: ClassVar[bool] = False
    """Its trials measure memory, each in a fresh process (see :func:`lmtune.sweep.runner.measures_memory`)."""
    extra_columns: ClassVar[tuple[str, ...]] = ()
    """trials.csv columns it adds after the metrics."""
    warm_starts: ClassVar[bool] = False
    """It learns from finished trials, so earlier sweeps' trials can seed it (``--warm-start``)."""

    def check(self, sweep: Sweep, space: dict[str, Any], frontier: Frontier | None, where: str) -> None:
        """ConfigError when the sweep cannot have this kind."""

    def instead(self, sweep: Sweep, space: dict[str, Any], metrics: list[str]) -> tuple[str, str] | None:
        """(the kind that stands in for this one, why) for a sweep this one does not suit; None when it does."""
        return None

    def num_trials(self, grid_size: int, num_samples: int) -> int:
        """The trials it runs for a space of ``grid_size`` grid points (at most, for a planner)."""
        return grid_size * num_samples

    def total(self, num_trials: int) -> int | str:
        """What the console counts finished trials against."""
        return num_trials

    def build(self, rs: ResolvedSweep, results_dir: Path, *, ledger: Any, limit_gib: float | None) -> Any:
        """The Tune searcher (``results_dir`` holds the study; ``ledger``: the run's; ``limit_gib``: memory)."""
        raise NotImplementedError

    def planner(self, searcher: Any) -> Any:
        """What writes the rows of points it decided without running them into trials.csv, and the extra columns
        of a run's row (:class:`lmtune.sweep.callback.Planner`); None when it decides none."""
        return None

    def planned_more(self, searcher: Any, trials_made: int, num_trials: int) -> bool:
        """Whether a run that ended after ``trials_made`` trials left some of what it meant to run (Ctrl-C)."""
        return trials_made < num_trials


SEARCHERS: dict[str, SearcherKind] = {}
"""Every kind a sweep may name, by name, in the order they were registered."""


def register(cls: type[SearcherKind]) -> type[SearcherKind]:
    """Class decorator: a sweep may name this kind from now on."""
    SEARCHERS[cls.name] = cls()
    return cls


class OptunaKind(SearcherKind):
    """A searcher whose suggestions are an Optuna sampler's, in a study that records every trial
    (:class:`lmtune.sweep.search.StudySearch`); the sweep's defaults and grid points are enqueued first."""

    warm_starts = True
    learns_memory: ClassVar[bool] = True
    """Every trial's peak memory is a constraint of the study and an OOM is infeasible, not failed (False: an OOM
    is told as FAIL, which Optuna's samplers leave out of their model)."""

    def sampler(self, rs: ResolvedSweep) -> Any:
        raise NotImplementedError

    def enqueue(self, rs: ResolvedSweep) -> list[dict[str, Any]]:
        """Trials fixed ahead of the sampler."""
        from lmtune.sweep.search import enqueued_points

        return enqueued_points(rs)

    def build(self, rs: ResolvedSweep, results_dir: Path, *, ledger: Any, limit_gib: float | None) -> Any:
        import optuna

        from lmtune.sweep.search import study_search

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return study_search(rs, results_dir, self.sampler(rs), enqueue=self.enqueue(rs), ledger=ledger,
                            limit_gib=limit_gib, learns_memory=self.learns_memory)


def tpe_gamma(n: int) -> int:
    """How many of ``n`` finished trials TPE models as the good ones: a quarter, at most 25.

    Optuna's default is a tenth, which in a sweep of a few dozen trials is one to three trials; under a memory
    limit the best of those sit on the edge of what fits, and a model of "good" that narrow proposes configs
    across the edge about half the time (benchmarks/oom_aware_search.py). Optuna 5 marks the ``gamma`` option
    deprecated (removal planned for Optuna 6, hence the pin below 6)."""
    return min(math.ceil(0.25 * n), 25)


TPE_OPTIONS: dict[str, Any] = {"gamma": tpe_gamma}
"""Options of the TPE sampler lmtune builds (beside its seed)."""


@register
class TpeKind(OptunaKind):
    """Optuna's TPE (the default)."""

    name = "tpe"
    options: ClassVar[dict[str, Any]] = TPE_OPTIONS

    def instead(self, sweep: Sweep, space: dict[str, Any], metrics: list[str]) -> tuple[str, str] | None:
        if len(metrics) > 1:
            return "nsga2", f"{len(metrics)} metrics, a Pareto front"
        if all_grid(sweep, space):
            return "grid", "every axis is a grid"
        return None

    def sampler(self, rs: ResolvedSweep) -> Any:
        import optuna

        with warnings.catch_warnings():  # the deprecation of gamma, said once in tpe_gamma's docstring
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gamma.*")
            return optuna.samplers.TPESampler(seed=rs.sweep.seed, **self.options)


@register
class GridKind(OptunaKind):
    """Optuna's grid: every grid point once, the sweep's defaults first."""

    name = "grid"
    warm_starts = False  # every point runs anyway; the storage's finished ones are reused

    def check(self, sweep: Sweep, space: dict[str, Any], frontier: Frontier | None, where: str) -> None:
        if not all_grid(sweep, space):
            bad = [k for k, d in space.items() if not d.crossed] or ["define_by_run"]
            raise ConfigError(f"{where}: searcher='grid' needs grid axes only; {', '.join(bad)} "
                              f"is not a grid (use grid([...]), or searcher='tpe').")

    def num_trials(self, grid_size: int, num_samples: int) -> int:
        return grid_size

    def sampler(self, rs: ResolvedSweep) -> Any:
        from lmtune.sweep.search import OrderedGridSampler, ordered_grid

        return OrderedGridSampler(ordered_grid(rs), seed=rs.sweep.seed)

    def enqueue(self, rs: ResolvedSweep) -> list[dict[str, Any]]:
        return []


@register
class Nsga2Kind(OptunaKind):
    """Optuna's NSGA-II (several metrics: a Pareto front)."""

    name = "nsga2"

    def sampler(self, rs: ResolvedSweep) -> Any:
        import optuna

        return optuna.samplers.NSGAIISampler(seed=rs.sweep.seed)


@register
class FrontierKind(SearcherKind):
    """The memory-frontier planner (:mod:`lmtune.sweep.plan`): grid points along micro-batch lines, chosen by
    bisection and a fitted memory model; the points it rules out are rows of their own."""

    name = "frontier"
    warm_starts = True  # earlier sweeps' measured points settle theirs (FrontierPlan.know)
    keeps_study = False
    early_stopping = False
    fresh_processes = True
    extra_columns = (PREDICTED_KEY,)

    def check(self, sweep: Sweep, space: dict[str, Any], frontier: Frontier | None, where: str) -> None:
        from lmtune.sweep.spec import Frontier

        if not isinstance(frontier, Frontier):
            raise ConfigError(f"{where}: searcher='frontier' needs frontier=Frontier(x=..., budget=...).")
        if sweep.define_by_run is not None:
            raise ConfigError(f"{where}: searcher='frontier' does not take define_by_run.")

    def num_trials(self, grid_size: int, num_samples: int) -> int:
        return grid_size

    def total(self, num_trials: int) -> int | str:
        return f"≤{num_trials}"  # the planner skips the points it rules out

    def build(self, rs: ResolvedSweep, results_dir: Path, *, ledger: Any, limit_gib: float | None) -> Any:
        from lmtune.sweep.plan import FrontierPlan
        from lmtune.sweep.search import FrontierSearcher

        return FrontierSearcher(FrontierPlan.from_space(rs.space, rs.frontier, limit_gib=limit_gib),
                                metric=rs.metric, mode=rs.mode)

    def planner(self, searcher: Any) -> Any:
        return searcher

    def planned_more(self, searcher: Any, trials_made: int, num_trials: int) -> bool:
        return not searcher.plan.done  # it may rightly stop early: its plan says whether it is done


def kind_of(rs: ResolvedSweep) -> SearcherKind:
    """The kind of searcher a resolved sweep runs with."""
    return SEARCHERS[rs.searcher]


def make_searcher(rs: ResolvedSweep, results_dir: Path, *, ledger: Any = None, limit_gib: float | None = None) -> Any:
    """The Tune searcher of ``rs``'s kind; ``results_dir`` holds optuna.db; ``ledger``: the run's (a new one if
    none)."""
    from lmtune.sweep.ledger import Ledger

    return kind_of(rs).build(rs, results_dir, ledger=ledger or Ledger(), limit_gib=limit_gib)


def all_grid(sweep: Sweep, space: dict[str, Any]) -> bool:
    """Every axis is a grid (and no define-by-run function samples others)."""
    return bool(space) and all(d.crossed for d in space.values()) and sweep.define_by_run is None


def chosen(sweep: Sweep, space: dict[str, Any], frontier: Frontier | None, metrics: list[str],
           where: str) -> tuple[SearcherKind, str]:
    """The kind the sweep runs with, and why when it is not the one it named (``""`` when it is)."""
    kind = SEARCHERS.get(sweep.searcher) if isinstance(sweep.searcher, str) else None
    if kind is None:
        names = ", ".join(repr(n) for n in SEARCHERS)
        raise ConfigError(f"{where}: searcher={sweep.searcher!r} is not accepted: expected one of {names}.")
    kind.check(sweep, space, frontier, where)
    other = kind.instead(sweep, space, metrics)
    if other is None:
        return kind, ""
    name, why = other
    return SEARCHERS[name], f"instead of {kind.name}: {why}"
