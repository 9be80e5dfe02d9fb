"""Searchers and schedulers: Optuna (TPE / grid / NSGA-II) and ASHA, taught lmtune's trial statuses.

* :func:`make_searcher` builds the Tune searcher for a resolved sweep: :class:`StudySearch` (an
  ``OptunaSearch`` whose study lives in ``optuna.db`` next to the results, so ``optuna-dashboard
  sqlite:///…/optuna.db`` opens it) or the frontier planner's ``FrontierSearcher``.
* Optuna is told the truth about every trial: ``ok`` → COMPLETE with the metric(s); stopped by ASHA →
  PRUNED (not COMPLETE with a truncated value); ``oom`` / ``diverged`` / ``error`` → FAIL with the status
  as a user attribute, so the sampler treats the region as infeasible instead of learning a made-up value.
* The trainer's current defaults (the locked defaults) are enqueued first where they lie in the space.
* :func:`make_scheduler` builds ASHA on ``tokens`` (Li et al. 2020, "A System for Massively Parallel
  Hyperparameter Tuning") or FIFO, both recording their decisions in :data:`lmtune.sweep.oom.LEDGER`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from lmtune.contract import CHECKPOINT_REPORT
from lmtune.sweep.load import ResolvedSweep
from lmtune.sweep.oom import LEDGER, classify_trial_error, was_memory_monitor_kill
from lmtune.sweep.spec import Choice, Grid, IntRange, LogUniform, Uniform

STUDY_FILE = "optuna.db"
MEMORY_CONSTRAINT = "memory_gib"
"""The constraint every trial records in the study: peak memory above what the limit leaves (positive = infeasible)."""
SNAPSHOT_SHARE = 0.05
"""At most this share of the driver's time goes to the experiment snapshots taken for --resume."""
logger = logging.getLogger("lmtune.sweep")


def optuna_distributions(rs: ResolvedSweep) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, d in rs.space.items():
        if isinstance(d, (Grid, Choice)):
            out[key] = CategoricalDistribution(list(d.values))
        elif isinstance(d, Uniform):
            out[key] = FloatDistribution(d.low, d.high)
        elif isinstance(d, LogUniform):
            out[key] = FloatDistribution(d.low, d.high, log=True)
        elif isinstance(d, IntRange):
            out[key] = IntDistribution(d.low, d.high, log=d.log)
    return out


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
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    repeats = rs.num_samples // len(points)
    out = [dict(p) for _ in range(repeats) for p in points]
    out[0].update(sampled_defaults)
    return out


def _define_by_run(rs: ResolvedSweep):
    """The sweep's define-by-run function, with the grid axes suggested (and enqueued) first."""
    user = rs.sweep.define_by_run
    grid = ordered_grid(rs)
    sampled = optuna_distributions(rs)

    def space(trial):
        for key, dist in sampled.items():
            if isinstance(dist, CategoricalDistribution):
                trial.suggest_categorical(key, list(grid.get(key, dist.choices)))
            elif isinstance(dist, IntDistribution):
                trial.suggest_int(key, dist.low, dist.high, log=dist.log)
            else:
                trial.suggest_float(key, dist.low, dist.high, log=dist.log)
        return user(trial)

    return space


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler that walks the grid in product order of the axes as given (defaults first, see
    :func:`ordered_grid`) instead of a shuffled order, and without its end-of-grid ``study.stop()``
    (valid only inside ``study.optimize``; Tune stops after ``num_samples`` = the grid size)."""

    def __init__(self, search_space, seed=None):
        super().__init__(search_space, seed=seed)
        # trial number i < grid size runs grid point i (GridSampler.before_trial), so the first
        # trial is the product's first point: every axis at its default where the default is a value.
        self._all_grids = list(itertools.product(*self._search_space.values()))

    def after_trial(self, study, trial, state, values) -> None:
        pass


class StudySearch(OptunaSearch):
    """OptunaSearch that records lmtune's trial statuses in the study (see the module docstring).

    Memory is a constraint the samplers learn (Optuna 5 ``Trial.set_constraint``; TPE, NSGA-II and GP read the
    trials' constraints without further set-up): every trial that ran (ok, pruned) or ran out of memory records
    ``memory_gib`` = its peak_reserved_gib − (the limit in force − ``headroom_gib``), positive = infeasible. The
    limit is the trial's ``system.memory_limit_gib``, else the device memory it reported, else ``limit_gib``.
    """

    learns_memory: bool = True
    """False: no constraints, an OOM told as FAIL (what Optuna's samplers leave out of their model). Only the
    baseline of ``benchmarks/oom_aware_search.py`` sets it."""

    def __init__(self, *args, enqueue: list[dict] | None = None, limit_gib: float | None = None,
                 headroom_gib: float = 0.0, **kwargs):
        self._enqueue = list(enqueue or [])
        self._limit_gib = limit_gib
        self._headroom_gib = headroom_gib
        self._feasible: list[list[float]] = []
        super().__init__(*args, **kwargs)

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

    def _setup_study(self, mode):
        super()._setup_study(mode)
        for point in self._enqueue:
            self._ot_study.enqueue_trial(point)
        self._enqueue = []

    def save(self, checkpoint_path: str) -> None:
        # Tune snapshots the searcher with the experiment; a define-by-run space is the sweep file's own
        # function (a closure, from a module that is not importable), which only cloudpickle can write.
        import ray.cloudpickle

        state = self.__dict__.copy()
        if LEDGER.scheduler is not None:  # ASHA's rungs, saved with this snapshot (see ASHA)
            state["_lmtune_scheduler_state"] = LEDGER.scheduler.snapshot_state()
        with open(checkpoint_path, "wb") as f:
            ray.cloudpickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        LEDGER.scheduler_state = self.__dict__.pop("_lmtune_scheduler_state", None)

    def suggest(self, trial_id: str):
        suggestion = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            # The Tune trial's id in the study, so that a resume can map restored trials to theirs (lmtune.sweep.resume).
            self._ot_trials[trial_id].set_user_attr("trial_id", trial_id)
        return suggestion

    def space_keys(self) -> list[str]:
        return list(self._space) if isinstance(self._space, dict) else []

    def _stored(self, states=None) -> list:
        # OptunaSearch._ot_study is its optuna.Study; Study._storage/_study_id: its storage (no public accessor).
        return self._ot_study._storage.get_all_trials(self._ot_study._study_id, deepcopy=False, states=states)

    def map_restored(self, trial_id: str, point: dict[str, Any], *, finished: bool) -> None:
        """A trial Tune restored: map it to its Optuna trial (by the ``trial_id`` user attribute) if the restored
        searcher state lacks it; an unfinished one without any gets a new RUNNING Optuna trial at its point."""
        from lmtune.sweep.resume import optuna_trial

        if trial_id in self._ot_trials:
            return
        mine = [t for t in self._stored() if t.user_attrs.get("trial_id") == trial_id]
        if mine:
            self._ot_trials[trial_id] = optuna_trial(self._ot_study, max(mine, key=lambda t: t.number))
            return
        if finished:
            return
        distributions = {k: d for k, d in (self._space if isinstance(self._space, dict) else {}).items() if k in point}
        frozen = optuna.trial.create_trial(state=TrialState.RUNNING, params={k: point[k] for k in distributions},
                                           distributions=distributions, user_attrs={"trial_id": trial_id,
                                                                                    "restored": True})
        self._ot_study.add_trial(frozen)
        added = max((t for t in self._stored() if t.user_attrs.get("trial_id") == trial_id), key=lambda t: t.number)
        self._ot_trials[trial_id] = optuna_trial(self._ot_study, added)
        logger.info("optuna: restored trial %s had no study trial; added one at its point", trial_id)

    def requeue_orphans(self, restored: set[str]) -> None:
        """Optuna trials asked after the Tune snapshot being restored was taken: still RUNNING in optuna.db and
        belonging to no restored trial. Each is closed as FAIL (``status=interrupted``) and its point enqueued,
        so the resumed sweep runs that point next instead of losing it (a grid would count it as taken) or
        leaving it RUNNING forever."""
        mapped = {t._trial_id for t in self._ot_trials.values()}  # optuna.Trial._trial_id: its storage id
        storage = self._ot_study._storage
        for t in self._stored(states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("trial_id")
            if (owner in restored) if owner else (t._trial_id in mapped):
                continue
            storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            self._ot_study.enqueue_trial(self._point_of(t), user_attrs={"requeued_from": t.number})
            logger.info("optuna: trial %d was asked after the restored snapshot; closed as interrupted, "
                        "its point enqueued again", t.number)

    def _point_of(self, t) -> dict[str, Any]:
        """The point an asked trial was given. A driver killed inside ``Study.ask`` leaves a RUNNING trial whose
        params are not all written yet: its point is then the one it was enqueued with (system attribute
        ``fixed_params``) or its grid point (``grid_id``, which GridSampler sets before any param), the params
        written so far on top. A grid trial enqueued with fewer params than the grid's is refused by Optuna."""
        point = dict(t.system_attrs.get("fixed_params") or {})
        sampler = self._ot_study.sampler
        if isinstance(sampler, optuna.samplers.GridSampler) and "grid_id" in t.system_attrs:
            # GridSampler's own grid and its (sorted) names: no public accessor.
            point.update(zip(sampler._param_names, sampler._all_grids[t.system_attrs["grid_id"]]))
        point.update(t.params)
        return point

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Intermediate values for optuna-dashboard's curves, at the tokens seen so far (metric reports only:
        # validation runs at eval intervals). Several metrics: Optuna has no intermediate values.
        if isinstance(self.metric, list) or self.metric not in result or trial_id not in self._ot_trials:
            return
        value = result[self.metric]
        step = int(result.get("tokens", result.get("training_iteration", 0)))
        ot_trial = self._ot_trials[trial_id]
        stored = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if stored.state.is_finished():
            # Told before an interruption: the restored Tune snapshot predates this trial's end, so Tune runs it
            # again, and the trainable replays its recorded result (lmtune.contract.REPLAYED).
            return
        if result.get(CHECKPOINT_REPORT) and step in stored.intermediate_values:
            return  # a resumed trial's checkpoint report, already heard before the interruption
        if isinstance(value, (int, float)) and math.isfinite(value):
            ot_trial.report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            # Told before an interruption: Tune's last snapshot of this searcher predates it.
            self._completed_trials.add(trial_id)
            return
        status = LEDGER.status_of(trial_id, result, error)
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
        self._completed_trials.add(trial_id)
        try:
            self._ot_study.tell(ot_trial, told if told is None or len(told) > 1 else told[0], state=state)
        except Exception as exc:  # noqa: BLE001 — the study is a record; a failed write must not fail the trial
            logger.warning("optuna: could not record trial %s (%s) in %s: %s", trial_id, status, STUDY_FILE, exc)
            print(f"warning: optuna.db: could not record trial {trial_id} ({status}): {exc}", file=sys.stderr)


def tpe_gamma(n: int) -> int:
    """How many of ``n`` finished trials TPE models as the good ones: a quarter, at most 25.

    Optuna's default is a tenth, which in a sweep of a few dozen trials is one to three trials; under a memory
    limit the best of those sit on the edge of what fits, and a model of "good" that narrow proposes configs
    across the edge about half the time (benchmarks/oom_aware_search.py). Optuna 5 marks the ``gamma`` option
    deprecated (removal planned for Optuna 6, hence the pin below 6)."""
    return min(math.ceil(0.25 * n), 25)


TPE_OPTIONS: dict[str, Any] = {"gamma": tpe_gamma}
"""Options of the TPE sampler lmtune builds (the benchmark's baseline empties them: Optuna's defaults)."""


def study_storage(results_dir: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{Path(results_dir).resolve() / STUDY_FILE}")


def make_searcher(rs: ResolvedSweep, results_dir: Path, *, limit_gib: float | None = None):
    """The Tune searcher for ``rs``; ``results_dir`` holds optuna.db."""
    if rs.searcher == "frontier":
        from lmtune.sweep.plan import FrontierPlan, FrontierSearcher

        plan = FrontierPlan.from_space(rs.space, rs.frontier, limit_gib=limit_gib)
        return FrontierSearcher(plan, metric=rs.metric, mode=rs.mode)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if rs.searcher == "grid":
        sampler = _GridSampler(ordered_grid(rs), seed=rs.sweep.seed)
    elif rs.searcher == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=rs.sweep.seed)
    else:
        with warnings.catch_warnings():  # the deprecation of gamma, said once in tpe_gamma's docstring
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gamma.*")
            sampler = optuna.samplers.TPESampler(seed=rs.sweep.seed, **TPE_OPTIONS)
    space = _define_by_run(rs) if rs.sweep.define_by_run is not None else optuna_distributions(rs)
    enqueue = [] if rs.searcher == "grid" else enqueued_points(rs)
    return StudySearch(
        space=space, metric=rs.metric, mode=rs.mode, sampler=sampler, study_name=rs.name,
        storage=study_storage(results_dir), enqueue=enqueue, limit_gib=limit_gib,
        headroom_gib=rs.frontier.headroom_gib if rs.frontier is not None else 0.0,
    )


# --- schedulers -------------------------------------------------------------------------------------


class _RecordsDecisions:
    """Mixin: note ASHA's stops and OOM failures in the ledger, keep OOM-killed trials from re-running, and
    keep Tune's experiment snapshot in step with the trials.

    Tune calls ``on_trial_error`` both when a failed trial is given up and when it is about to be retried.
    A trial killed by Ray's memory monitor is an OOM, which is a result and must not be retried: it is
    marked so that its restart reports ``status=oom`` at once instead of training again (see
    ``lmtune.sweep.trainable``).

    Snapshots: Tune saves the experiment (trials, their latest checkpoints, the searcher) every
    ``TUNE_GLOBAL_CHECKPOINT_S`` at most, so a driver killed a moment after a trial started or
    checkpointed left a snapshot without that trial or checkpoint, and ``--resume`` ran it again from
    scratch under a new id. Here every event that matters to a resume (trial added, checkpoint
    registered, trial ended: :data:`LEDGER` ``.snapshot_due``) is followed by a synchronous snapshot at the
    start of a following step of the controller (``choose_trial_to_run``; in a small sweep the next one,
    before a new trial's process starts and before the trial's next result is processed).

    A snapshot holds every trial's state (~50 KB per trial with lmtune's metrics), so its cost grows with
    the sweep: after a snapshot that took ``t`` seconds the next one waits ``19·t`` (the same 5% share of
    the driver's time that Tune's own "auto" period allows). In a sweep of a few dozen trials that is a
    fraction of a second; at 100 trials ~2 s. What a driver killed in that window loses is the work
    since the trials' previous snapshotted checkpoints; a trial started in it is run again from the
    start (its study trial is requeued, see :meth:`StudySearch.restore`). A registered checkpoint does not
    wait (``LEDGER.checkpoint_due``): Tune keeps two checkpoints per trial, and a snapshot that fell two
    checkpoints behind would name one already deleted, which no resume can restore (a snapshot costs less
    than the checkpoint that triggers it).
    """

    def on_trial_add(self, tune_controller, trial) -> None:
        LEDGER.snapshot_due = True
        if LEDGER.reconciler is not None:  # a resume: Tune adds every trial it restored through here first
            LEDGER.reconciler.on_restored_trial(getattr(tune_controller, "_tune_controller", tune_controller), trial)
        super().on_trial_add(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        if LEDGER.snapshot_due and (LEDGER.checkpoint_due or time.monotonic() >= LEDGER.next_snapshot):
            LEDGER.snapshot_due = LEDGER.checkpoint_due = False
            # Schedulers get a wrapper that logs a warning for attributes outside its whitelist.
            controller = getattr(tune_controller, "_tune_controller", tune_controller)
            t0 = time.monotonic()
            controller.checkpoint(force=True, wait=True)
            took = time.monotonic() - t0
            LEDGER.snapshots.append(took)
            LEDGER.next_snapshot = t0 + took * (1 / SNAPSHOT_SHARE)
        if LEDGER.max_running is not None:  # lowered after a host-memory kill: retried trials wait their turn too
            controller = getattr(tune_controller, "_tune_controller", tune_controller)
            if len(_started(controller)) >= LEDGER.max_running:
                return None
        return super().choose_trial_to_run(tune_controller)

    def on_trial_error(self, tune_controller, trial) -> None:
        kind, message = classify_trial_error(trial)
        controller = getattr(tune_controller, "_tune_controller", tune_controller)
        if kind == "oom" and was_memory_monitor_kill(trial):
            sharing = _trials_sharing_its_node(controller, trial)
            if sharing:
                # Host memory ran out while other trials ran on this node, and Ray's monitor kills the newest task:
                # no evidence about this config. Retry it (not marked as OOM-killed), with fewer trials at once.
                kind = "host_oom"
                lowered = _lower_concurrency(controller, running=len(sharing) + 1)
                message = (f"host memory: Ray's memory monitor killed it while {len(sharing)} other trial(s) ran on "
                           f"its node ({message}); not evidence about its config"
                           + (f"; at most {lowered} trial(s) at once from now on" if lowered else ""))
        LEDGER.errors[trial.trial_id] = (kind, message)
        LEDGER.snapshot_due = True
        if kind == "oom":
            from lmtune.sweep.trainable import OOM_KILLED_KEY

            trial.config[OOM_KILLED_KEY] = message or "killed by Ray's memory monitor"
        super().on_trial_error(tune_controller, trial)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        LEDGER.snapshot_due = True
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        LEDGER.snapshot_due = True
        super().on_trial_remove(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get("status", "running") == "running":
            LEDGER.pruned[trial.trial_id] = result.get("tokens")
        return decision


def _node(trial) -> str | None:
    return (getattr(trial, "last_result", None) or {}).get("node_ip")


def _started(controller) -> list:
    """Trials whose process exists: running, or pending with an actor being started (Tune marks a trial RUNNING
    only once its actor is up). TuneController._trial_to_actor: trial → its actor (no public accessor)."""
    return [t for t in getattr(controller, "_trial_to_actor", {}) if not t.is_finished()]


def _trials_sharing_its_node(controller, trial) -> list:
    """Other trials with a process on the killed trial's node (a trial whose node is not known yet counts)."""
    node = _node(trial)
    others = [t for t in _started(controller) if t is not trial]
    return [t for t in others if node is None or _node(t) in (None, node)]


def _lower_concurrency(controller, running: int) -> int | None:
    """One trial fewer at once than the ``running`` ones (the killed trial included), at least one, for new and
    retried trials alike; the new limit, or None when it was one already."""
    from lmtune.sweep.resume import _limiter

    current = min(LEDGER.max_running or running, running)
    if current <= 1:
        return None
    LEDGER.max_running = current - 1
    limiter = _limiter(controller)
    if limiter is not None:
        limiter.max_concurrent = min(limiter.max_concurrent, LEDGER.max_running)
    return LEDGER.max_running


class ASHA(_RecordsDecisions, AsyncHyperBandScheduler):
    """ASHA whose rungs survive ``--resume``: Tune saves no scheduler state with its experiment (ray#30838), so
    :class:`StudySearch` carries it in its own snapshot (:meth:`snapshot_state`) and the live scheduler takes it
    back at its first call after a restore (:data:`LEDGER` ``.scheduler_state``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        LEDGER.scheduler = self

    def __setstate__(self, state):  # the instance a restored tuner runs with
        self.__dict__.update(state)
        LEDGER.scheduler = self

    def snapshot_state(self) -> dict:
        brackets = list(self._brackets)
        return {"brackets": copy.deepcopy(brackets), "counter": self._counter, "num_stopped": self._num_stopped,
                "trial_info": {tid: brackets.index(b) for tid, b in self._trial_info.items() if b in brackets}}

    def _take_restored_state(self) -> None:
        state, LEDGER.scheduler_state = LEDGER.scheduler_state, None
        if not state:
            return
        # AsyncHyperBandScheduler's own attributes: its brackets (rungs with each trial's recorded value),
        # the trial → bracket map and its counters (no public API to set them).
        self._brackets = state["brackets"]
        self._trial_info = {tid: self._brackets[i] for tid, i in state["trial_info"].items()}
        self._counter, self._num_stopped = state["counter"], state["num_stopped"]
        logger.info("asha: rungs restored (%d trial(s) recorded)", len(self._trial_info))

    def on_trial_add(self, tune_controller, trial) -> None:
        self._take_restored_state()
        if trial.trial_id in self._trial_info:  # restored with its bracket: keep its place, as uninterrupted
            LEDGER.snapshot_due = True
            if LEDGER.reconciler is not None:
                LEDGER.reconciler.on_restored_trial(getattr(tune_controller, "_tune_controller", tune_controller),
                                                    trial)
            return
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._take_restored_state()
        return super().on_trial_result(tune_controller, trial, result)


class FIFO(_RecordsDecisions, FIFOScheduler):
    pass


def make_scheduler(rs: ResolvedSweep):
    if rs.sweep.scheduler != "asha":
        return FIFO()
    budget = max_tokens(rs)
    grace = rs.sweep.grace_tokens or max(1, budget // 10)
    grace = min(grace, budget)
    # stop_last_trials=False: reaching the budget is the trainer's own end (status ok), never a prune.
    return ASHA(time_attr="tokens", metric=rs.metric, mode=rs.mode, max_t=budget, grace_period=grace,
                reduction_factor=rs.sweep.reduction_factor, stop_last_trials=False)


def max_tokens(rs: ResolvedSweep) -> int:
    """The largest token budget of any trial: steps × micro-batch × accumulation × workers × seq_len.

    Axes sampled from ranges count at their upper bound. With ``train.epochs`` the budget depends on the
    corpus; one epoch is then estimated from ``steps`` (ASHA only needs rung spacing, not the exact end).
    """

    def top(key: str) -> Any:
        d = rs.space.get(key)
        if isinstance(d, (Grid, Choice)):
            return max(d.values)
        if isinstance(d, (Uniform, LogUniform, IntRange)):
            return d.high
        return rs.base[key]

    return int(top("train.steps") * top("train.micro_batch_size") * top("train.accumulation_steps")
               * rs.sweep.workers * top("data.seq_len"))
