"""``--resume``: the protocol, end to end.

A resumed sweep is made of three records written at different moments:

* Tune's experiment state (``experiment_state-*.json``): the trials and their latest checkpoints;
* the search algorithm's state file, saved right after it by the same snapshot: the concurrency limiter's
  live trials and the Optuna searcher's map of Tune trial id → Optuna trial (and, in the callbacks' state file
  of the same snapshot, ASHA's rungs, which Tune does not save: :class:`lmtune.sweep.schedulers.RungsInSnapshot`);
* ``optuna.db``, written as trials are asked and told, not at snapshots.

A driver killed between two of those writes (during a snapshot, or a moment after a trial was asked) leaves
them disagreeing: the limiter counting a trial that the restored experiment does not have (with
``--max-concurrent 1`` the resumed sweep then waits forever for it to end), the searcher without the Optuna
trial of a trial it restores (whose results would go nowhere, or into a trial already finished), or Optuna
trials asked after the snapshot and never told. The protocol, in the order it runs:

1. **While a sweep runs**, every event that matters to a resume (a trial added, a checkpoint registered, a trial
   ended) is followed by a snapshot (:meth:`lmtune.sweep.ledger.SnapshotPacing.take_if_due`, called by the
   scheduler), and the runner keeps a copy of ``tuner.pkl`` (:func:`lmtune.sweep.snapshot.keep_tuner_file`).
2. **Before Tune restores** (:func:`restore`): files the kill cut short are put right or set aside
   (:mod:`lmtune.sweep.snapshot`), a watch is set on Tune's own restore (below), ``Tuner.restore`` runs, and
   the run's ledger is handed to the restored scheduler, searcher and results writer (it is never pickled).
3. **While Tune restores** (:meth:`Reconciler.on_restored_trial`, from the scheduler's ``on_trial_add``, once per
   trial Tune restores): the search generator's count of the trials it made is set to the trials restored (a
   saved count ahead of the restored experiment ends the sweep before its last points, one behind makes a trial
   too many); the limiter's live set is rebuilt from the restored unfinished trials; the searcher is told of each
   (``restored_trial``): the Optuna searcher maps it to its Optuna trial through the ``trial_id`` user attribute
   every asked trial carries (:func:`map_restored`); an unfinished trial without one gets a new Optuna trial at
   its own point.
4. **Before the first new suggestion** (:meth:`Reconciler.after_restore`, from the results writer's first
   ``on_step_begin``), the searcher agrees with them all (``after_restore``): for the Optuna searcher, study trials
   still RUNNING that belong to no restored trial were asked after the snapshot: they are closed as FAIL
   (``status=interrupted``) and their point enqueued, so that the sweep runs it next (:func:`requeue_orphans`). A
   frontier sweep's plan is made to agree with the restored trials and the rows the driver recorded in the same
   way (:meth:`lmtune.sweep.plan.FrontierPlan.reconcile`), so that no grid point runs twice and the plan waits for
   no trial that will never report.
5. **Trials** restarted by the resume: one the driver had recorded as finished replays its recorded result
   instead of training again (:func:`finished_before`, marked ``REPLAYED``); one restarted from a checkpoint
   sends the reports its checkpoint holds again, and what the earlier attempt recorded from there on is
   replaced (:func:`drop_reports_from`), so ``metrics.jsonl`` reads as one uninterrupted run.
6. **If Tune's own restore failed** (a snapshot file it could not read), Tune logs the error and starts the sweep
   over from nothing, which would rerun every trial, or, with the searcher not restored either, end at once and
   write an empty snapshot over the sweep's: the watch of step 2 (:func:`lmtune.sweep.compat.watch_restore`)
   turns that into an error at Tune's first step, and :meth:`Reconciler.finish` sets aside what Tune wrote and
   stops in one line (exit 2).

Tune's and Optuna's objects are reached through :mod:`lmtune.sweep.compat`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, TextIO

from lmtune.config import ConfigError
from lmtune.contract import LOG_DIR, STATUSES, SUMMARY_JSON, SWEEP_JSON, TRIALS_CSV, TUNE_DIR
from lmtune.results.layout import a_trial, keep_reports, order, read_trials_csv, runs_of, trial_dir
from lmtune.sweep import compat, snapshot
from lmtune.sweep.ledger import HoldsLedger, Ledger

logger = logging.getLogger("lmtune.sweep")

# --- 2. before Tune restores ------------------------------------------------------------------------


def find_resumable(local_root: Path, name: str, smoke: bool, remote: str | None) -> Path:
    """The latest run of sweep ``name`` (same ``--smoke``) under the local results root. With a remote storage
    the driver's files are still local (the trials' and Tune's state are in the storage, checked later)."""
    for run_dir in reversed(runs_of(local_root, name)):
        try:
            meta = json.loads((run_dir / SWEEP_JSON).read_text())
        except (OSError, ValueError):
            continue
        if bool(meta.get("smoke")) == smoke and (remote or (run_dir / TUNE_DIR).is_dir()):
            return run_dir
    flag = " --smoke" if smoke else ""
    raise ConfigError(f"--resume: no earlier{flag} run of sweep '{name}' in {local_root} to continue; "
                      f"run it without --resume first.")


def restore(tune_path: str, *, trainable: Any, param_space: dict, ledger: Ledger, results_dir: Path, out: TextIO):
    """(the restored Tuner, the resume's :class:`Reconciler`) for the experiment at ``tune_path``."""
    from ray import tune

    if not tune.Tuner.can_restore(tune_path):
        raise ConfigError(f"--resume: {tune_path} holds no Tune experiment to continue.")
    reconciler = ledger.reconciler = Reconciler(tune_path, results_dir)
    snapshot.repair_tuner_file(tune_path, out)
    snapshot.repair_snapshot(tune_path, out)
    reconciler.files_before = snapshot.files(tune_path)
    reconciler.watch_tune_restore()
    tuner = tune.Tuner.restore(tune_path, trainable=trainable, param_space=param_space,
                               resume_unfinished=True, resume_errored=False, restart_errored=False)
    reconciler.searcher = innermost(compat.tuner_search_alg(tuner))
    for part in [compat.tuner_scheduler(tuner), *_chain(compat.tuner_search_alg(tuner)), *compat.tuner_callbacks(tuner)]:
        if isinstance(part, HoldsLedger):  # lmtune's scheduler, Optuna searcher and results writer
            part.ledger = ledger
    return tuner, reconciler


# --- 3., 4. and 6.: what Tune restored, made to agree ----------------------------------------------


class RestoreFailed(RuntimeError):
    """Tune could not restore the sweep's snapshot (raised at its first step, before anything runs)."""


class Reconciler:
    """The state of one resume (made by :func:`restore`).

    The run's searcher agrees with what Tune restored in its own way: every lmtune searcher has
    ``restored_trial(trial_id, config, finished)``, called as Tune restores each trial, and
    ``after_restore(restored, recorded)`` (trial id → (config, finished) of the restored trials; trial id → the
    trials.csv row of those the driver recorded as ended), called once before the first new suggestion
    (:class:`lmtune.sweep.search.StudySearch`, :class:`lmtune.sweep.search.FrontierSearcher`)."""

    def __init__(self, tune_path: str = "", results_dir: Path | None = None, searcher: Any = None):
        self.tune_path = tune_path
        self.results_dir = results_dir
        self.searcher = searcher
        """The run's searcher (without Tune's wrappers); None: the one of the controller's search algorithm."""
        self.controller: Any = None
        self.restored: list[Any] = []
        self.done = False
        self.restore_failed: str | None = None
        self.files_before: set[str] = set()
        self._stop_watch: Callable[[], None] | None = None

    def watch_tune_restore(self) -> None:
        """Note Tune's restore failure (:func:`lmtune.sweep.compat.watch_restore`)."""
        def failed(reason: str) -> None:
            if self.restore_failed is None:
                self.restore_failed = reason

        self._stop_watch = compat.watch_restore(failed)

    def stop_watching(self) -> None:
        if self._stop_watch is not None:
            self._stop_watch()
            self._stop_watch = None

    def check_tune_restored(self) -> None:
        if self.restore_failed:
            raise RestoreFailed(self.restore_failed)

    def on_restored_trial(self, controller: Any, trial: Any) -> None:
        if self.done:
            return
        first = self.controller is None
        self.controller = controller
        self.restored.append(trial)
        generator = _generator(controller)
        if generator is not None:
            compat.set_trials_made(generator, len(self.restored))
        found = limiter(controller)
        if found is not None:
            live = set() if first else set(found.live_trials)  # the saved set may name trials not restored
            compat.reset_live_trials(found, live | ({trial.trial_id} if not trial.is_finished() else set()))
        if self.searcher is None:
            self.searcher = innermost(compat.search_alg(controller))
        self.searcher.restored_trial(trial.trial_id, getattr(trial, "config", None) or {}, trial.is_finished())

    def after_restore(self) -> None:
        """Once every restored trial is in (even none: a plan may wait for one): the searcher agrees with them."""
        if self.done:
            return
        self.done = True
        if self.searcher is not None:
            restored = {t.trial_id: (getattr(t, "config", None) or {}, t.is_finished()) for t in self.restored}
            self.searcher.after_restore(restored, recorded_trials(self.results_dir))
        found = limiter(self.controller) if self.controller is not None else None
        if found is not None:
            logger.info("resume: %d restored trial(s), %d unfinished (concurrency limiter reset to them)",
                        len(self.restored), len(found.live_trials))

    def finish(self, results_dir: Path) -> None:
        """After Tuner.fit: stop watching; if Tune could not restore, set aside what it wrote and stop (exit 2)."""
        self.stop_watching()
        if not self.restore_failed:
            return
        # Tune started the sweep over instead: stopped at its first step, or (nothing left to suggest) ended with
        # an empty snapshot of its own, which is set aside so that the sweep's own stays the newest.
        snapshot.set_aside(self.tune_path, snapshot.files(self.tune_path) - self.files_before, snapshot.FAILED_RESUME)
        raise ConfigError(f"--resume: Tune could not restore the sweep's saved state ({self.restore_failed}"
                          f"; the traceback is in {results_dir / LOG_DIR / 'driver.log'}); nothing ran and the saved "
                          f"state is as it was. Start the sweep again without --resume to run it anew (its finished "
                          f"trials stay in {results_dir.name}/trials.csv).")


def _chain(search_alg: Any):
    """The search algorithm and every searcher it wraps (SearchGenerator → ConcurrencyLimiter → searcher)."""
    alg = search_alg
    while alg is not None:
        yield alg
        alg = getattr(alg, "searcher", None)


def innermost(search_alg: Any) -> Any:
    """The searcher inside a search algorithm's wrappers."""
    return list(_chain(search_alg))[-1] if search_alg is not None else None


def _generator(controller: Any):
    from ray.tune.search import SearchGenerator

    return next((a for a in _chain(compat.search_alg(controller)) if isinstance(a, SearchGenerator)), None)


def limiter(controller: Any):
    """The controller's ConcurrencyLimiter (None without one)."""
    from ray.tune.search import ConcurrencyLimiter

    return next((a for a in _chain(compat.search_alg(controller)) if isinstance(a, ConcurrencyLimiter)), None)


def recorded_trials(results_dir: Path | None) -> dict[str, dict[str, Any]]:
    """trial id → trials.csv row (typed) of every trial the driver recorded as ended; host_oom is retried, not ended
    (as :func:`finished_before` reads it), and planner rows are no trials."""
    if results_dir is None:
        return {}
    return {r["trial_id"]: r for r in read_trials_csv(Path(results_dir) / TRIALS_CSV)
            if a_trial(r) and r.get("status") in STATUSES and r["status"] != "host_oom"}


def map_restored(search: Any, trial_id: str, point: dict[str, Any], *, finished: bool) -> None:
    """A trial Tune restored: map it to its Optuna trial (by the ``trial_id`` user attribute) if the restored
    searcher state lacks it; an unfinished one without any gets a new RUNNING Optuna trial at its point."""
    import optuna
    from optuna.trial import TrialState

    asked = compat.study_trials(search)
    if trial_id in asked:
        return
    study = search.study

    def mine():
        return [t for t in compat.stored_trials(study) if t.user_attrs.get("trial_id") == trial_id]

    if mine():
        asked[trial_id] = compat.live_trial(study, max(mine(), key=lambda t: t.number))
        return
    if finished:
        return
    space = compat.search_space(search)
    distributions = {k: d for k, d in (space if isinstance(space, dict) else {}).items() if k in point}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.RUNNING, params={k: point[k] for k in distributions}, distributions=distributions,
        user_attrs={"trial_id": trial_id, "restored": True}))
    asked[trial_id] = compat.live_trial(study, max(mine(), key=lambda t: t.number))
    logger.info("optuna: restored trial %s had no study trial; added one at its point", trial_id)


def requeue_orphans(search: Any, restored: set[str]) -> None:
    """Optuna trials asked after the Tune snapshot being restored was taken: still RUNNING in optuna.db and
    belonging to no restored trial. Each is closed as FAIL (``status=interrupted``) and its point enqueued, so the
    resumed sweep runs that point next instead of losing it (a grid would count it as taken) or leaving it
    RUNNING forever. One killed inside ``Study.ask`` before its sampler gave it a point is only closed: enqueued
    empty, a grid sampler would refuse it ("All parameters must be specified …") and the resume would die."""
    from optuna.trial import TrialState

    study = search.study
    mapped = {compat.storage_id(t) for t in compat.study_trials(search).values()}
    for t in compat.stored_trials(study, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("trial_id")
        if (owner in restored) if owner else (compat.storage_id(t) in mapped):
            continue
        compat.close_interrupted(study, t)
        point = _point_of(study, t)
        if not point:  # killed inside Study.ask before the sampler gave it a point: it took none from the sweep
            logger.info("optuna: trial %d was being asked when the driver stopped, before it had a point; "
                        "closed as interrupted", t.number)
            continue
        study.enqueue_trial(point, user_attrs={"requeued_from": t.number})
        logger.info("optuna: trial %d was asked after the restored snapshot; closed as interrupted, "
                    "its point enqueued again", t.number)


def _point_of(study: Any, t: Any) -> dict[str, Any]:
    """The point an asked trial was given. A driver killed inside ``Study.ask`` leaves a RUNNING trial whose params
    are not all written yet: its point is then the one it was enqueued with (system attribute ``fixed_params``) or
    its grid point (``grid_id``, which GridSampler sets before any param), the params written so far on top. A grid
    trial enqueued with fewer params than the grid's is refused by Optuna."""
    import optuna

    point = dict(t.system_attrs.get("fixed_params") or {})
    if isinstance(study.sampler, optuna.samplers.GridSampler) and "grid_id" in t.system_attrs:
        point.update(compat.grid_point(study.sampler, t.system_attrs["grid_id"]))
    point.update(t.params)
    return point


# --- 5. trials restarted by a resume ----------------------------------------------------------------


def finished_before(results_dir: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The final metrics the driver recorded for this trial, if it ended before (None otherwise, or when the
    results directory is not visible from this node). Runs in the trial's process."""
    try:
        summary = json.loads((trial_dir(results_dir, trial_id) / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") not in STATUSES or summary["status"] == "host_oom":  # host_oom: retried, not ended
        return None
    return {k: v for k, v in summary.items() if k != "config" and isinstance(v, (int, float, str, bool))}


def drop_reports_from(path: Path, first: dict[str, Any]) -> None:
    """A trial restarted from a checkpoint (a retry, a resumed sweep) reports again from there: first the
    reports its checkpoint holds (``lmtune.contract.CHECKPOINT_REPORT``: up to two checkpoint intervals ending
    with the checkpoint's own), then the steps after it. What the earlier attempt recorded from the first of
    them on is dropped, so that metrics.jsonl holds each report once, as one uninterrupted run would have
    written it (including reports that never reached the driver before the interruption)."""
    if isinstance(first.get("step"), int):
        keep_reports(path, lambda at: at < order(first))
