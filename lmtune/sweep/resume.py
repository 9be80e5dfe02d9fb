"""``--resume``: reconcile what Tune restores with the searcher's state and the Optuna study.

A resumed sweep is made of three records written at different moments:

* Tune's experiment state (``experiment_state-*.json``): the trials and their latest checkpoints;
* the search algorithm's state file, saved right after it by the same snapshot: the concurrency limiter's
  live trials and the Optuna searcher's map of Tune trial id → Optuna trial;
* ``optuna.db``, written as trials are asked and told, not at snapshots.

A driver killed between two of those writes (during a snapshot, or a moment after a trial was asked) leaves
them disagreeing: the limiter counting a trial that the restored experiment does not have (with
``--max-concurrent 1`` the resumed sweep then waits forever for it to end), the searcher without the Optuna
trial of a trial it restores (whose results would go nowhere, or into a trial already finished), or Optuna
trials asked after the snapshot and never told. Tune restores its part; here the rest is made to agree with it:

1. :func:`on_restored_trial` (from the scheduler's ``on_trial_add``, once per trial Tune restores): the
   search generator's count of the trials it made is set to the trials restored (a saved count ahead of the
   restored experiment ends the sweep before its last points, one behind makes a trial too many); the
   limiter's live set is rebuilt from the restored unfinished trials (the saved one is dropped), and each
   restored trial is mapped to its Optuna trial through the ``trial_id`` user attribute every asked trial
   carries (:func:`lmtune.sweep.search.StudySearch.suggest`); an unfinished trial without one gets a new Optuna
   trial at its own point.
2. :func:`after_restore` (from the results callback's first ``on_step_begin``, before the first new
   suggestion): Optuna trials still RUNNING that belong to no restored trial were asked after the snapshot:
   they are closed as FAIL (``status=interrupted``) and their point enqueued, so that the sweep runs it next.

Tune's own restore, when it fails (a snapshot file it cannot read), logs the error and starts the sweep over
from nothing, which would rerun every trial, or, with the searcher not restored either, end at once and
write an empty snapshot over the sweep's: :meth:`Reconciler.watch_tune_restore` turns that into an error that
stops the run before anything is written (the runner then says so in one line).

The scheduler's own state (ASHA's rungs) is restored by :mod:`lmtune.sweep.search` with the snapshot.
Tune's objects are reached through their private attributes here and in :mod:`lmtune.sweep.search`, each
said where it is used; Ray is pinned to the 2.60 line (pyproject.toml), where they were read.
"""

from __future__ import annotations

import logging
from typing import Any

from optuna.trial import Trial as OptunaTrial
from optuna.trial import TrialState

logger = logging.getLogger("lmtune.sweep")


def _chain(search_alg: Any):
    """The search algorithm and every searcher it wraps (SearchGenerator → ConcurrencyLimiter → StudySearch)."""
    alg = search_alg
    while alg is not None:
        yield alg
        alg = getattr(alg, "searcher", None)


def _generator(controller: Any):
    from ray.tune.search import SearchGenerator

    return next((a for a in _chain(getattr(controller, "_search_alg", None)) if isinstance(a, SearchGenerator)), None)


def _limiter(controller: Any):
    from ray.tune.search import ConcurrencyLimiter

    # TuneController._search_alg: the controller's search algorithm (no public accessor).
    return next((a for a in _chain(getattr(controller, "_search_alg", None)) if isinstance(a, ConcurrencyLimiter)), None)


def _study_search(controller: Any):
    from lmtune.sweep.search import StudySearch

    return next((a for a in _chain(getattr(controller, "_search_alg", None)) if isinstance(a, StudySearch)), None)


class RestoreFailed(RuntimeError):
    """Tune could not restore the sweep's snapshot (raised at its first step, before anything runs)."""


class Reconciler:
    """The state of one resume (created by the runner for ``--resume``)."""

    TUNE_LOGGER = "ray.tune.execution.tune_controller"
    TUNE_RESTORE_FAILED = "Failed to restore the run state."
    """What TuneController.__init__ logs (with the exception) before it starts the experiment over."""

    def __init__(self):
        self.controller: Any = None
        self.restored: list[Any] = []
        self.done = False
        self.restore_failed: str | None = None
        self._filter: logging.Filter | None = None

    def watch_tune_restore(self) -> None:
        """Note Tune's restore failure from its log record (no other signal leaves TuneController.__init__)."""
        reconciler = self

        class Watch(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                if record.getMessage() == Reconciler.TUNE_RESTORE_FAILED and reconciler.restore_failed is None:
                    exc = record.exc_info[1] if record.exc_info else None
                    reconciler.restore_failed = (f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                                                 if exc else "see logs/driver.log")
                return True

        self._filter = Watch()
        logging.getLogger(self.TUNE_LOGGER).addFilter(self._filter)

    def stop_watching(self) -> None:
        if self._filter is not None:
            logging.getLogger(self.TUNE_LOGGER).removeFilter(self._filter)
            self._filter = None

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
            # SearchGenerator._counter: the trials it has made, saved with the searcher's state, which a driver
            # killed while Tune copied its snapshot can leave newer or older than the experiment it restores;
            # at 'num_samples' Tune ends the sweep (no public setter).
            generator._counter = len(self.restored)
        limiter = _limiter(controller)
        if limiter is not None:
            if first:  # the saved live set may name trials the restored experiment does not have
                limiter.live_trials = set()
                limiter.num_unfinished_live_trials = 0
            if not trial.is_finished():
                limiter.live_trials.add(trial.trial_id)
                limiter.num_unfinished_live_trials += 1
        search = _study_search(controller)
        if search is not None:
            search.map_restored(trial.trial_id, _trial_point(trial, search), finished=trial.is_finished())

    def after_restore(self) -> None:
        """Once every restored trial is in: close and requeue the Optuna trials asked after the snapshot."""
        if self.done:
            return
        self.done = True
        if self.controller is None:
            return
        search = _study_search(self.controller)
        if search is not None:
            search.requeue_orphans({t.trial_id for t in self.restored})
        limiter = _limiter(self.controller)
        if limiter is not None:
            logger.info("resume: %d restored trial(s), %d unfinished (concurrency limiter reset to them)",
                        len(self.restored), len(limiter.live_trials))


def _trial_point(trial: Any, search: Any) -> dict[str, Any]:
    """The searched keys of a Tune trial's config (its point in the space)."""
    config = getattr(trial, "config", {}) or {}
    return {k: config[k] for k in search.space_keys() if k in config}


def optuna_trial(study: Any, frozen: Any) -> OptunaTrial:
    """A live handle on a stored Optuna trial (what ``study.ask`` returns for a new one)."""
    return OptunaTrial(study, frozen._trial_id)  # FrozenTrial._trial_id: the storage's id (no public accessor)


__all__ = ["Reconciler", "RestoreFailed", "optuna_trial", "TrialState"]
