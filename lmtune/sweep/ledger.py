"""The run's ledger: what the parts of one Tune run tell each other in the driver, one record per concern.

* :class:`TrialDecisions`: how each trial ended where its own last report does not say (stopped by ASHA, failed,
  and with what kind of failure). Written by the scheduler, which makes those decisions (a new attempt of a
  trial clears its failure: the results writer, which sees attempts start); read by the Optuna searcher and the
  results writer, so that the study, ``trials.csv`` and the console agree on every trial's status.
* :class:`SnapshotPacing`: when Tune's experiment snapshot is due (step 1 of :mod:`lmtune.sweep.resume`). The
  scheduler and the results writer note the events a resume needs (a trial added, checkpointed, ended); the
  scheduler takes the snapshot when it is due, at the start of the controller's step.
* the resume's wiring: on ``--resume``, the :class:`lmtune.sweep.resume.Reconciler` that :func:`lmtune.sweep.resume.
  restore` makes, which the scheduler tells of every trial Tune restores and the results writer calls before the
  first new suggestion.

The runner makes one :class:`Ledger` per sweep run and hands it to the scheduler, the searcher and the results
writer (all in the driver). None of them pickles it (:class:`HoldsLedger`): after ``Tuner.restore`` the resume
hands it to the restored ones again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmtune.contract import SETTLED

SNAPSHOT_SHARE = 0.05
"""At most this share of the driver's time goes to the experiment snapshots taken for --resume."""


@dataclass
class TrialDecisions:
    """The driver's decisions about trials that a trial's own last report does not carry."""

    pruned: dict[str, Any] = field(default_factory=dict)
    """trial_id → the ``tokens`` at which ASHA stopped it."""
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    """trial_id → (``oom`` | ``host_oom`` | ``error``, one-line message) for a trial whose attempt failed."""

    def stopped(self, trial_id: str, tokens: Any) -> None:
        self.pruned[trial_id] = tokens

    def failed(self, trial_id: str, kind: str, message: str) -> None:
        self.errors[trial_id] = (kind, message)

    def new_attempt(self, trial_id: str) -> None:
        """The trial starts again: its last attempt's failure does not decide how it ends."""
        self.errors.pop(trial_id, None)

    def status_of(self, trial_id: str, result: dict | None, error: bool = False) -> str:
        """The trial's final status from everything known in the driver."""
        if trial_id in self.pruned:
            return "pruned"
        if trial_id in self.errors:
            return self.errors[trial_id][0]
        status = (result or {}).get("status")
        if error:
            return "oom" if status == "oom" else "error"
        if status in SETTLED:  # pruned: replayed from an earlier session
            return status
        return "error"  # ended without the trainer's final report


@dataclass
class SnapshotPacing:
    """When the next experiment snapshot is due, and what the snapshots so far took."""

    due: bool = False
    """A trial was added, checkpointed or ended since the last snapshot."""
    checkpoint_due: bool = False
    """A checkpoint was registered since the last snapshot: the next one does not wait for ``next_at``. Tune keeps a
    trial's two latest checkpoints, so the checkpoint a snapshot names is deleted when the second one after it
    registers; a snapshot after every registration keeps it restorable."""
    took: list[float] = field(default_factory=list)
    """Seconds each snapshot took (the runner logs their count and total)."""
    next_at: float = 0.0
    """``time.monotonic()`` before which a due snapshot waits (keeps snapshots under 5% of the driver's time)."""

    def trial_event(self) -> None:
        """A trial was added, ended or removed: a snapshot is due."""
        self.due = True

    def checkpoint_registered(self) -> None:
        self.due = self.checkpoint_due = True

    def take_if_due(self, snapshot: Callable[[], None]) -> None:
        """Call ``snapshot`` when something a resume needs happened since the last one.

        Tune saves the experiment (trials, their latest checkpoints, the searcher) every ``TUNE_GLOBAL_CHECKPOINT_S``
        at most, so a driver killed a moment after a trial started or checkpointed left a snapshot without that trial
        or checkpoint, and ``--resume`` ran it again from scratch under a new id. Called at the start of a step of the
        controller (in a small sweep the next one: before a new trial's process starts and before the trial's next
        result is processed).

        A snapshot holds every trial's state (~50 KB per trial with lmtune's metrics), so its cost grows with the
        sweep: after a snapshot that took ``t`` seconds the next one waits ``19·t`` (the same 5% share of the driver's
        time that Tune's own "auto" period allows): a fraction of a second in a sweep of a few dozen trials, ~2 s at
        100. A registered checkpoint does not wait (:attr:`checkpoint_due`).
        """
        if self.due and (self.checkpoint_due or time.monotonic() >= self.next_at):
            self.due = self.checkpoint_due = False
            t0 = time.monotonic()
            snapshot()
            took = time.monotonic() - t0
            self.took.append(took)
            self.next_at = t0 + took * (1 / SNAPSHOT_SHARE)


@dataclass
class Ledger:
    """One sweep run's records, by concern (see the module docstring)."""

    decisions: TrialDecisions = field(default_factory=TrialDecisions)
    pacing: SnapshotPacing = field(default_factory=SnapshotPacing)
    reconciler: Any = None
    """On ``--resume``: the :class:`lmtune.sweep.resume.Reconciler` of what Tune restores (None otherwise)."""
    results_dir: Path | None = None
    """The run's results directory (the driver's): its trials' reports, as the results writer recorded them."""


class HoldsLedger:
    """A part of the Tune run that records into the run's :class:`Ledger`: the scheduler, the Optuna searcher, the
    results writer. Tune pickles them (tuner.pkl, the searcher's snapshot); the ledger is never pickled with them,
    and after ``Tuner.restore`` the resume hands it over again (:func:`lmtune.sweep.resume.restore`)."""

    ledger: Ledger | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "ledger"}
