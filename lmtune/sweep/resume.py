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
   limiter's live set is rebuilt from the restored unfinished trials (the saved one is dropped), and each
   restored trial is mapped to its Optuna trial through the ``trial_id`` user attribute every asked trial
   carries (:func:`lmtune.sweep.search.StudySearch.suggest`); an unfinished trial without one gets a new Optuna
   trial at its own point.
2. :func:`after_restore` (from the results callback's first ``on_step_begin``, before the first new
   suggestion): Optuna trials still RUNNING that belong to no restored trial were asked after the snapshot:
   they are closed as FAIL (``status=interrupted``) and their point enqueued, so that the sweep runs it next.

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


def _limiter(controller: Any):
    from ray.tune.search import ConcurrencyLimiter

    # TuneController._search_alg: the controller's search algorithm (no public accessor).
    return next((a for a in _chain(getattr(controller, "_search_alg", None)) if isinstance(a, ConcurrencyLimiter)), None)


def _study_search(controller: Any):
    from lmtune.sweep.search import StudySearch

    return next((a for a in _chain(getattr(controller, "_search_alg", None)) if isinstance(a, StudySearch)), None)


class Reconciler:
    """The state of one resume (created by the runner for ``--resume``)."""

    def __init__(self):
        self.controller: Any = None
        self.restored: list[Any] = []
        self.done = False

    def on_restored_trial(self, controller: Any, trial: Any) -> None:
        if self.done:
            return
        first = self.controller is None
        self.controller = controller
        self.restored.append(trial)
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


__all__ = ["Reconciler", "optuna_trial", "TrialState"]
