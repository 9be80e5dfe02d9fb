"""Tune's schedulers, taught lmtune's trial statuses: ASHA on ``tokens`` (Li et al. 2020, "A System for Massively
Parallel Hyperparameter Tuning") or FIFO, both recording their decisions in the run's ledger
(:mod:`lmtune.sweep.ledger`).

They also keep Tune's experiment snapshot in step with the trials (what ``--resume`` restores; see
:class:`_RecordsDecisions`) and, after a host-memory kill, run fewer trials at once. ASHA's rungs survive a
resume (:class:`ASHA`, :class:`RungsInSnapshot`).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from lmtune.contract import METRICS_JSONL, REPLAYED
from lmtune.results.layout import read_jsonl, trial_dir
from lmtune.sweep import compat
from lmtune.sweep.ledger import HoldsLedger, Ledger
from lmtune.sweep.oom import classify_trial_error, was_memory_monitor_kill
from lmtune.sweep.resolved import ResolvedSweep

logger = logging.getLogger("lmtune.sweep")


class _RecordsDecisions(HoldsLedger):
    """Mixin: note ASHA's stops and OOM failures in the run's ledger (:class:`lmtune.sweep.ledger.TrialDecisions`),
    keep OOM-killed trials from re-running, run fewer trials at once after a host-memory kill, and keep Tune's
    experiment snapshot in step with the trials (:class:`lmtune.sweep.ledger.SnapshotPacing`, at the start of each
    step of the controller that chooses a trial).

    Tune calls ``on_trial_error`` both when a failed trial is given up and when it is about to be retried.
    A trial killed by Ray's memory monitor is an OOM, which is a result and must not be retried: it is
    marked so that its restart reports ``status=oom`` at once instead of training again (see
    ``lmtune.sweep.trainable``).

    The ledger is the run's (the runner hands it over, again after a restore: it is not pickled with Tune's state).
    """

    max_running: int | None = None
    """Trials at once, lowered after a host-memory kill (None: what resources and --max-concurrent allow)."""

    def callbacks(self) -> list:
        """Tune callbacks that carry the scheduler's state in Tune's experiment snapshot (none: it keeps none)."""
        return []

    def on_trial_add(self, tune_controller, trial) -> None:
        self._note_added(tune_controller, trial)
        super().on_trial_add(tune_controller, trial)

    def _note_added(self, tune_controller, trial) -> None:
        self.ledger.pacing.trial_event()
        if self.ledger.reconciler is not None:  # a resume: Tune adds every trial it restored through here first
            self.ledger.reconciler.on_restored_trial(compat.controller(tune_controller), trial)

    def choose_trial_to_run(self, tune_controller):
        controller = compat.controller(tune_controller)
        self.ledger.pacing.take_if_due(lambda: compat.snapshot_experiment(controller))
        if self.max_running is not None:  # lowered after a host-memory kill: retried trials wait their turn too
            if len(compat.started_trials(controller)) >= self.max_running:
                return None
        return super().choose_trial_to_run(tune_controller)

    def on_trial_error(self, tune_controller, trial) -> None:
        kind, message = classify_trial_error(trial)
        controller = compat.controller(tune_controller)
        if kind == "oom" and was_memory_monitor_kill(trial):
            sharing = _trials_sharing_its_node(controller, trial)
            if sharing:
                # Host memory ran out while other trials ran on this node, and Ray's monitor kills the newest task:
                # no evidence about this config. Retry it (not marked as OOM-killed), with fewer trials at once.
                kind = "host_oom"
                lowered = self._lower_concurrency(controller, running=len(sharing) + 1)
                message = (f"host memory: Ray's memory monitor killed it while {len(sharing)} other trial(s) ran on "
                           f"its node ({message}); not evidence about its config"
                           + (f"; at most {lowered} trial(s) at once from now on" if lowered else ""))
        self.ledger.decisions.failed(trial.trial_id, kind, message)
        self.ledger.pacing.trial_event()
        if kind == "oom":
            from lmtune.sweep.trainable import OOM_KILLED_KEY

            trial.config[OOM_KILLED_KEY] = message or "killed by Ray's memory monitor"
        super().on_trial_error(tune_controller, trial)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self.ledger.pacing.trial_event()
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.ledger.pacing.trial_event()
        super().on_trial_remove(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self._decide(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get("status", "running") == "running":
            self.ledger.decisions.stopped(trial.trial_id, result.get("tokens"))
        return decision

    def _decide(self, tune_controller, trial, result: dict) -> str:
        """The scheduler's decision on a result (Tune's scheduler's own)."""
        return super().on_trial_result(tune_controller, trial, result)

    def _lower_concurrency(self, controller, running: int) -> int | None:
        """One trial fewer at once than the ``running`` ones (the killed trial included), at least one, for new and
        retried trials alike; the new limit, or None when it was one already."""
        from lmtune.sweep.resume import limiter

        current = min(self.max_running or running, running)
        if current <= 1:
            return None
        self.max_running = current - 1
        found = limiter(controller)
        if found is not None:
            found.max_concurrent = min(found.max_concurrent, self.max_running)
        return self.max_running


def _node(trial) -> str | None:
    return (getattr(trial, "last_result", None) or {}).get("node_ip")


def _trials_sharing_its_node(controller, trial) -> list:
    """Other trials with a process on the killed trial's node (a trial whose node is not known yet counts)."""
    node = _node(trial)
    others = [t for t in compat.started_trials(controller) if t is not trial]
    return [t for t in others if node is None or _node(t) in (None, node)]


TIME_ATTR = "tokens"
"""What ASHA's rungs are spaced in: tokens trained (a trial's budget, whatever its batch and length)."""


class ASHA(_RecordsDecisions, AsyncHyperBandScheduler):
    """ASHA whose rungs survive ``--resume``: it saves and restores them itself (:meth:`get_state`,
    :meth:`set_state`), carried in Tune's experiment snapshot by a callback of its own (:class:`RungsInSnapshot`).

    A trial that starts again from a checkpoint (a resumed sweep, a retry) sends again the reports its checkpoint
    holds and then the ones after it, which the previous attempt may have sent too. ASHA finds such a trial recorded
    at the rung and lets it pass, whatever it had decided there (seen: a trial stopped at a rung, the driver killed
    before the stop took effect, ran on after the resume). So each decision that recorded a rung is kept with the
    tokens of its report, and the same report sent again gets the same decision: the sweep goes as the uninterrupted
    one did. A trial that had ended is restarted by a resume only to replay its final result, which records just the
    highest rung it reached: its rungs are recorded from all of its reports (:meth:`_record_history`), or the rungs
    below would stay without its value and a later trial would pass them unjudged (seen: a trial the uninterrupted
    sweep stopped at the 4,096-token rung ran on to the next one).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metric_name: str | None = kwargs.get("metric")
        self._decided: dict[str, dict[Any, str]] = {}  # trial → tokens of a report that recorded a rung → decision
        self._histories: set[str] = set()  # replayed trials whose reports were recorded (read once: a replayed
        # result reaches both on_trial_result and on_trial_complete)

    def callbacks(self) -> list:
        return [RungsInSnapshot(self)]

    def get_state(self) -> dict:
        """Its rungs (every trial's recorded value per rung, and the decision each recording report got), its
        trial → bracket map and its counters."""
        return {**compat.asha_state(self), "decided": {t: dict(d) for t, d in self._decided.items()}}

    def set_state(self, state: dict) -> None:
        compat.set_asha_state(self, state)
        self._decided = {t: dict(d) for t, d in state.get("decided", {}).items()}
        logger.info("asha: rungs restored (%d trial(s) recorded)", len(state["trial_info"]))

    def _decide(self, tune_controller, trial, result: dict) -> str:
        tid, tokens = trial.trial_id, result.get(TIME_ATTR)
        if result.get(REPLAYED):
            self._record_history(tid)
        earlier = self._decided.get(tid, {}).get(tokens)
        if earlier is not None:  # this report again: the decision it got
            return earlier
        before = compat.asha_rungs_of(self, tid)
        decision = super()._decide(tune_controller, trial, result)
        if compat.asha_rungs_of(self, tid) - before:
            self._decided.setdefault(tid, {})[tokens] = decision
        return decision

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        if result.get(REPLAYED):  # should Tune hand the replayed result over only as the trial's last
            self._record_history(trial.trial_id)
        super().on_trial_complete(tune_controller, trial, result)

    def _record_history(self, tid: str) -> None:
        """Record a replayed trial's rungs from every report the driver recorded of it (its metrics.jsonl), as the
        uninterrupted run recorded them; rungs already recorded stay as they are."""
        if self.ledger is None or self.ledger.results_dir is None or tid in self._histories:
            return
        self._histories.add(tid)
        for report in read_jsonl(trial_dir(self.ledger.results_dir, tid) / METRICS_JSONL):
            if report.get(TIME_ATTR) is not None and report.get(self.metric_name) is not None:
                compat.asha_record(self, tid, report[TIME_ATTR], float(report[self.metric_name]))

    def on_trial_add(self, tune_controller, trial) -> None:
        if compat.asha_knows(self, trial.trial_id):  # restored with its bracket: keep its place, as uninterrupted
            self._note_added(tune_controller, trial)
            return
        super().on_trial_add(tune_controller, trial)


class RungsInSnapshot(Callback):
    """Carries ASHA's state in Tune's experiment snapshot. Tune saves no scheduler state with its experiment
    (ray#30838), but it saves every callback's ``get_state()`` at each snapshot, beside the searcher's state and with
    the same session's files, and hands it back to ``set_state`` when it restores, before it adds the restored
    trials (which ASHA then knows, with their rungs)."""

    def __init__(self, scheduler: ASHA):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"asha": self.scheduler.get_state()}

    def set_state(self, state: dict) -> None:
        self.scheduler.set_state(state["asha"])


class FIFO(_RecordsDecisions, FIFOScheduler):
    pass


def make_scheduler(rs: ResolvedSweep, ledger: Ledger) -> ASHA | FIFO:
    """The sweep's scheduler, recording into ``ledger`` (its :meth:`callbacks` go to Tune's run config)."""
    scheduler = _make_scheduler(rs)
    scheduler.ledger = ledger
    return scheduler


def _make_scheduler(rs: ResolvedSweep) -> ASHA | FIFO:
    if rs.sweep.scheduler != "asha":
        return FIFO()
    budget = max_tokens(rs)
    grace = rs.sweep.grace_tokens or max(1, budget // 10)
    grace = min(grace, budget)
    # stop_last_trials=False: reaching the budget is the trainer's own end (status ok), never a prune.
    return ASHA(time_attr=TIME_ATTR, metric=rs.metric, mode=rs.mode, max_t=budget, grace_period=grace,
                reduction_factor=rs.sweep.reduction_factor, stop_last_trials=False)


def max_tokens(rs: ResolvedSweep) -> int:
    """The largest token budget of any trial: steps × micro-batch × accumulation × workers × seq_len.

    Axes sampled from ranges count at their upper bound. With ``train.epochs`` the budget depends on the
    corpus; one epoch is then estimated from ``steps`` (ASHA only needs rung spacing, not the exact end).
    """

    def top(key: str) -> Any:
        return rs.space[key].largest() if key in rs.space else rs.base[key]

    return int(top("train.steps") * top("train.micro_batch_size") * top("train.accumulation_steps")
               * rs.sweep.workers * top("data.seq_len"))


