"""Searchers: Optuna (TPE / grid / NSGA-II) through Tune's OptunaSearch, and the frontier planner, as Tune searchers.

* The sweep's kind of searcher (:mod:`lmtune.sweep.searchers`) builds one of them: :class:`StudySearch` (an
  ``OptunaSearch`` whose study lives in ``optuna.db`` next to the results, so ``optuna-dashboard
  sqlite:///…/optuna.db`` opens it) or :class:`FrontierSearcher` (the planner of :mod:`lmtune.sweep.plan`);
  :func:`make_searcher` asks it.
* Optuna is told the truth about every trial: ``ok`` → COMPLETE with the metric(s); stopped by ASHA →
  PRUNED (not COMPLETE with a truncated value); ``oom`` → COMPLETE with its memory constraint violated and a
  neutral value; ``diverged`` / ``error`` / ``host_oom`` → FAIL, the status as a user attribute.
* The trainer's current defaults (the locked defaults) are enqueued first where they lie in the space.
* Each agrees with what a resumed sweep restored in its own way (``restored_trial``, ``after_restore``, called by
  :class:`lmtune.sweep.resume.Reconciler`): the study maps restored trials and requeues orphans, the planner
  reconciles its plan.
"""

from __future__ import annotations

import logging
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from lmtune.contract import CHECKPOINT_REPORT, STUDY_DB
from lmtune.sweep import compat
from lmtune.sweep.domains import Grid, cross
from lmtune.sweep.ledger import HoldsLedger, Ledger
from lmtune.sweep.plan import FINISHED, FrontierPlan
from lmtune.sweep.resolved import ResolvedSweep
from lmtune.sweep.resume import map_restored, requeue_orphans

MEMORY_CONSTRAINT = "memory_gib"
"""The constraint every trial records in the study: peak memory above what the limit leaves (positive = infeasible)."""
logger = logging.getLogger("lmtune.sweep")


def optuna_distributions(rs: ResolvedSweep) -> dict[str, Any]:
    return {key: d.distribution() for key, d in rs.space.items()}


def _defaults_first(values: list, default: Any) -> list:
    """The axis with the default value moved to the front (grid points are tried in product order)."""
    hit = [v for v in values if type(v) is type(default) and v == default]
    return hit + [v for v in values if not hit or v is not hit[0]]


def ordered_grid(rs: ResolvedSweep) -> dict[str, list]:
    """Grid axes with the defaults first, so the first grid point is the current locked defaults."""
    defaults = rs.defaults_point()
    return {k: _defaults_first(v, defaults.get(k)) if k in defaults else v for k, v in rs.grid_axes.items()}


def enqueued_points(rs: ResolvedSweep) -> list[dict[str, Any]]:
    """Trials fixed ahead of the sampler for tpe/nsga2.

    With grid axes, every grid point is enqueued ``num_samples`` times (its other axes sampled), so
    each grid value is tried as the sweep file promises; the first one also carries the defaults of the
    sampled axes. Without grid axes, the defaults point alone (partial points are fine: the sampler fills
    the rest).
    """
    defaults = rs.defaults_point()
    sampled_defaults = {k: v for k, v in defaults.items() if k in rs.sampled_axes}
    grid = ordered_grid(rs)
    if not grid:
        return [sampled_defaults] if sampled_defaults else []
    points = cross(grid)
    repeats = rs.num_trials // len(points)
    out = [dict(p) for _ in range(repeats) for p in points]
    out[0].update(sampled_defaults)
    return out


def _define_by_run(rs: ResolvedSweep):
    """The sweep's define-by-run function, with the grid axes suggested (and enqueued) first."""
    user = rs.sweep.define_by_run
    axes = {**rs.space, **{k: Grid(tuple(v)) for k, v in ordered_grid(rs).items()}}  # the space's order, defaults first

    def space(trial):
        for key, domain in axes.items():
            domain.suggest(trial, key)
        return user(trial)

    return space


class OrderedGridSampler(optuna.samplers.GridSampler):
    """GridSampler that walks the grid in product order of the axes as given (defaults first, see
    :func:`ordered_grid`) instead of a shuffled order, and without its end-of-grid ``study.stop()``
    (valid only inside ``study.optimize``; Tune stops after ``num_samples`` = the grid size)."""

    def __init__(self, search_space, seed=None):
        super().__init__(search_space, seed=seed)
        # trial number i < grid size runs grid point i (GridSampler.before_trial), so the first
        # trial is the product's first point: every axis at its default where the default is a value.
        compat.grid_in_given_order(self)

    def after_trial(self, study, trial, state, values) -> None:
        pass


class StudySearch(HoldsLedger, OptunaSearch):
    """OptunaSearch that records lmtune's trial statuses in the study (see the module docstring).

    Memory is a constraint the samplers learn (Optuna 5 ``Trial.set_constraint``; TPE, NSGA-II and GP read the
    trials' constraints without further set-up): every trial that ran (ok, pruned) or ran out of memory records
    ``memory_gib`` = its peak_reserved_gib − (the limit in force − ``headroom_gib``), positive = infeasible. The
    limit is the trial's ``system.memory_limit_gib``, else the device memory it reported, else ``limit_gib``.
    """

    def __init__(self, *args, ledger: Ledger, enqueue: list[dict] | None = None, limit_gib: float | None = None,
                 headroom_gib: float = 0.0, learns_memory: bool = True, **kwargs):
        """``learns_memory=False``: no constraints, an OOM told as FAIL (what Optuna's samplers leave out of their
        model; :attr:`lmtune.sweep.searchers.OptunaKind.learns_memory`)."""
        self.ledger = ledger
        self.learns_memory = learns_memory
        self._limit_gib = limit_gib
        self._headroom_gib = headroom_gib
        self._feasible: list[list[float]] = []
        super().__init__(*args, **kwargs)  # sets up the study (the space is always given)
        for point in enqueue or []:  # partial points too (OptunaSearch's points_to_evaluate wants whole ones)
            self.study.enqueue_trial(point)

    @property
    def study(self) -> optuna.Study:
        return compat.study(self)

    def add_earlier(self, params: dict[str, Any], result: dict[str, Any], source: str) -> bool:
        """An earlier sweep's finished trial (its summary.json) in the study, as this searcher would have told it
        (``--warm-start``): ok with its metric values, oom as infeasible with its memory constraint. False for a
        trial it cannot tell (another status, no usable value, a parameter outside this space)."""
        space = compat.search_space(self)
        if not isinstance(space, dict) or set(params) != set(space):
            return False
        status = result.get("status")
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in metrics]
        constraint = self.memory_constraint(result, status)
        if status == "ok" and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            told = [float(v) for v in values]
            self._feasible.append(told)
        elif status == "oom" and constraint is not None:
            told = self._neutral_values(len(metrics))
        else:
            return False
        try:
            trial = optuna.trial.create_trial(
                params=params, distributions=space, values=told, user_attrs={"status": status, "warm_start": source},
                constraints={MEMORY_CONSTRAINT: constraint} if constraint is not None else None)
        except ValueError:  # a value its distribution does not hold
            return False
        self.study.add_trial(trial)
        return True

    def memory_constraint(self, result: dict, status: str) -> float | None:
        """peak − (limit − headroom) in GiB for a trial that ran; for an OOM, at least 5% of the limit above
        zero (its true peak is beyond what it could measure). None when no limit or peak is known."""
        if not self.learns_memory:
            return None
        config = result.get("config") if isinstance(result.get("config"), dict) else {}
        limit = (config.get("system.memory_limit_gib") or result.get("config/system.memory_limit_gib")
                 or result.get("device_memory_gib") or self._limit_gib)
        if not limit:
            return None
        room = float(limit) - self._headroom_gib
        peak = result.get("peak_reserved_gib")
        peak = float(peak) if isinstance(peak, (int, float)) and math.isfinite(peak) else None
        if status == "oom":
            return max(peak or 0.0, float(limit)) * 1.05 - room
        return None if peak is None else peak - room

    def _neutral_values(self, n: int) -> list[float]:
        if not self._feasible:
            return [0.0] * n
        modes = self.mode if isinstance(self.mode, list) else [self.mode] * n
        return [max(v[i] for v in self._feasible) if m == "min" else min(v[i] for v in self._feasible)
                for i, m in enumerate(modes)]

    def save(self, checkpoint_path: str) -> None:
        # Tune snapshots the searcher with the experiment; a define-by-run space is the sweep file's own
        # function (a closure, from a module that is not importable), which only cloudpickle can write.
        import ray.cloudpickle

        with open(checkpoint_path, "wb") as f:
            ray.cloudpickle.dump(self.__getstate__(), f)

    def suggest(self, trial_id: str):
        suggestion = super().suggest(trial_id)
        asked = compat.study_trials(self).get(trial_id)
        if asked is not None:
            # The Tune trial's id in the study, so that a resume can map restored trials to theirs (lmtune.sweep.resume).
            asked.set_user_attr("trial_id", trial_id)
        return suggestion

    def space_keys(self) -> list[str]:
        space = compat.search_space(self)
        return list(space) if isinstance(space, dict) else []

    # --- a resumed sweep (lmtune.sweep.resume.Reconciler) ---

    def restored_trial(self, trial_id: str, config: dict[str, Any], finished: bool) -> None:
        """A trial Tune restored: its study trial, found or made (:func:`lmtune.sweep.resume.map_restored`)."""
        map_restored(self, trial_id, {k: config[k] for k in self.space_keys() if k in config}, finished=finished)

    def after_restore(self, restored: dict[str, tuple[dict[str, Any], bool]], recorded: dict[str, dict[str, Any]]) -> None:
        """Every restored trial is in: close and requeue the study trials asked after the snapshot."""
        requeue_orphans(self, set(restored))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Intermediate values for optuna-dashboard's curves, at the tokens seen so far (metric reports only:
        # validation runs at eval intervals). Several metrics: Optuna has no intermediate values.
        asked = compat.study_trials(self).get(trial_id)
        if isinstance(self.metric, list) or self.metric not in result or asked is None:
            return
        value = result[self.metric]
        step = int(result.get("tokens", result.get("training_iteration", 0)))
        stored = compat.stored(self.study, asked)
        if stored.state.is_finished():
            # Told before an interruption: the restored Tune snapshot predates this trial's end, so Tune runs it
            # again, and the trainable replays its recorded result (lmtune.contract.REPLAYED).
            return
        if result.get(CHECKPOINT_REPORT) and step in stored.intermediate_values:
            return  # a resumed trial's checkpoint report, already heard before the interruption
        if isinstance(value, (int, float)) and math.isfinite(value):
            asked.report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = compat.study_trials(self).get(trial_id)
        if trial_id in compat.told(self) or ot_trial is None:
            return
        if compat.stored(self.study, ot_trial).state.is_finished():
            # Told before an interruption: Tune's last snapshot of this searcher predates it.
            compat.told(self).add(trial_id)
            return
        status = self.ledger.decisions.status_of(trial_id, result, error)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [(result or {}).get(m) for m in metrics]
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        ot_trial.set_user_attr("status", status)
        ot_trial.set_user_attr("trial_id", trial_id)
        constraint = self.memory_constraint(result or {}, status)
        if status == "ok" and finite:
            state, told = TrialState.COMPLETE, [float(v) for v in values]
            self._feasible.append(told)
        elif status == "oom" and constraint is not None:
            # Infeasible, and known to be: COMPLETE with the constraint violated, so that the samplers model the
            # region (Optuna's TPE, NSGA-II and GP leave FAIL trials out). The objective value is neutral, the
            # worst feasible one so far: constrained samplers rank infeasible trials by their violation alone.
            state, told = TrialState.COMPLETE, self._neutral_values(len(metrics))
            ot_trial.set_user_attr("objective", "neutral: the trial ran out of memory")
        elif status == "pruned":
            state, told = TrialState.PRUNED, None
        else:  # diverged, error, host_oom, or ok without a usable metric value
            state, told = TrialState.FAIL, None
        if constraint is not None and state != TrialState.FAIL:
            ot_trial.set_constraint(MEMORY_CONSTRAINT, constraint)
        compat.told(self).add(trial_id)
        try:
            self.study.tell(ot_trial, told if told is None or len(told) > 1 else told[0], state=state)
        except Exception as exc:
            logger.warning("optuna: could not record trial %s (%s) in %s: %s", trial_id, status, STUDY_DB, exc)
            print(f"warning: {STUDY_DB}: could not record trial {trial_id} ({status}): {exc}", file=sys.stderr)


def study_storage(results_dir: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{Path(results_dir).resolve() / STUDY_DB}")


def study_search(rs: ResolvedSweep, results_dir: Path, sampler: optuna.samplers.BaseSampler, *,
                 enqueue: list[dict[str, Any]], ledger: Ledger, limit_gib: float | None,
                 learns_memory: bool = True) -> StudySearch:
    """A :class:`StudySearch` over ``rs``'s space (or its define-by-run function) with ``sampler``."""
    space = _define_by_run(rs) if rs.sweep.define_by_run is not None else optuna_distributions(rs)
    return StudySearch(
        space=space, metric=rs.metric, mode=rs.mode, sampler=sampler, study_name=rs.name,
        storage=study_storage(results_dir), ledger=ledger, enqueue=enqueue, limit_gib=limit_gib,
        headroom_gib=rs.frontier.headroom_gib if rs.frontier is not None else 0.0, learns_memory=learns_memory,
    )


class FrontierSearcher(Searcher):
    """Ray Tune searcher for ``Sweep(searcher="frontier")``; the decisions are :class:`FrontierPlan`'s.

    The sweep runner::

        plan = FrontierPlan.from_space(space, sweep.frontier, limit_gib=limit)
        searcher = FrontierSearcher(plan, metric=metric, mode=mode)
        tune.TuneConfig(search_alg=searcher, num_samples=plan.grid_size, max_concurrent_trials=N)
        ...
        writer.planner = searcher   # trials.csv: implied_rows() after the trials, launch_predictions() per trial

    Tune's ``param_space`` must not hold the frontier's grid axes (the searcher suggests them as flat
    dotted keys, merged into the param_space by Tune). A trial's final result must carry ``status``
    (``oom`` for an OOM) and ``peak_reserved_gib``/``tokens_per_s``.
    """

    def __init__(self, plan: FrontierPlan, metric: str | None = None, mode: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self.plan = plan

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # its metric and mode are given when it is made; the sweep's TuneConfig names none

    def suggest(self, trial_id: str) -> dict | str | None:
        out = self.plan.suggest(trial_id)
        return Searcher.FINISHED if out == FINISHED else out

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.plan.complete(trial_id, result, error)

    def restored_trial(self, trial_id: str, config: dict[str, Any], finished: bool) -> None:
        pass  # the plan takes the restored trials all at once, below

    def after_restore(self, restored: dict[str, tuple[dict[str, Any], bool]], recorded: dict[str, dict[str, Any]]) -> None:
        """Make the plan agree with the trials Tune restored and the rows the driver recorded
        (:meth:`lmtune.sweep.plan.FrontierPlan.reconcile`)."""
        for change in self.plan.reconcile(restored, recorded):
            logger.info("resume: frontier plan: %s", change)

    def implied_rows(self) -> list[dict[str, Any]]:
        return self.plan.implied_rows()

    def add_earlier(self, params: dict[str, Any], result: dict[str, Any], source: str) -> bool:
        """An earlier sweep's measured point as the plan's evidence (``--warm-start``; see FrontierPlan.know)."""
        return self.plan.know(params, result, source)

    def launch_predictions(self) -> dict[str, float | None]:
        return self.plan.launch_predictions()

    def launch_cells(self, trial_id: str) -> dict[str, Any]:
        return self.plan.launch_cells(trial_id)

    def prediction_errors(self) -> list[dict[str, Any]]:
        return self.plan.prediction_errors()

    def get_state(self) -> dict:
        return {"plan": self.plan}

    def set_state(self, state: dict) -> None:
        self.plan = state["plan"]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
