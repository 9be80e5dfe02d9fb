"""The driver's Tune callback: per-trial files, trials.csv and one console line per trial event.

Tune calls it in the driver for every trial event; it writes ``trials/{id}/metrics.jsonl`` (every report),
``trials/{id}/summary.json`` (all reported metrics, last value of each, + status + the trial's flat config)
and rewrites ``trials.csv`` whenever a trial ends, so an interrupted sweep leaves a complete table of what
finished. A frontier sweep's rows for the points its planner decided without running them are the planner's alone,
written from what it knows at each write and never read back as trials (a resume that did wrote them twice).
Statuses come from the run's :class:`lmtune.sweep.ledger.TrialDecisions` and the trial's own final report.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Protocol, TextIO

from ray.tune import Callback

from lmtune.contract import (
    ATTEMPTS_JSONL,
    CHECKPOINT_REPORT,
    FAILED,
    METRICS_JSONL,
    PLACEMENT,
    REUSED_FROM,
    SUMMARY_JSON,
    TIME_IN_TRAINER,
    TRIAL_METRICS,
    TRIALS_CSV,
    TRIALS_DIR,
)
from lmtune.reporting.console import request_text
from lmtune.results.format import fmt
from lmtune.results.layout import a_trial, csv_columns, read_trials_csv, trial_dir, write_json, write_trials_csv
from lmtune.sweep import compat, reuse
from lmtune.sweep.ledger import HoldsLedger, Ledger
from lmtune.sweep.progress import Progress
from lmtune.sweep.resume import drop_reports_from
from lmtune.sweep.trainable import OOM_KILLED_KEY, trial_config

# Keys Tune adds to every result that are not the trainer's metrics (its node_ip is kept: where each report was made).
_TUNE_KEYS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "time_since_restore",
    "iterations_since_restore", "config", "experiment_tag", "checkpoint_path", TIME_IN_TRAINER,
}


class Planner(Protocol):
    """What the writer asks of a searcher that decides points without running them (its kind's
    :meth:`lmtune.sweep.searchers.SearcherKind.planner`: the frontier's)."""

    def implied_rows(self) -> list[dict[str, Any]]:
        """trials.csv rows of the points it decided without running them."""

    def launch_cells(self, trial_id: str) -> dict[str, Any]:
        """Its cells (its kind's extra columns) of a trial's row."""


def _metrics_only(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _TUNE_KEYS and not k.startswith("config/")}


class ResultsWriter(HoldsLedger, Callback):
    """Writes trials/{id}/metrics.jsonl + summary.json and trials.csv from the driver; one console line
    per trial event (started, finished with status and metric, OOM, pruned, error, retry) with progress.
    """

    def __init__(self, results_dir: Path, space_keys: list[str], metrics: list[str], total: int | str, *,
                 ledger: Ledger, extra_columns: Iterable[str] = (), out: TextIO | None = None,
                 resources: dict[str, float] | None = None, workers: int = 1):
        """``total``: trials to run, or a label such as ``"≤12"`` when the searcher may stop earlier; ``ledger``: the
        run's (after a restore the runner hands it over again: it is not pickled with the writer); ``resources``: what
        one worker of a trial asks Ray for, ``workers`` of them (what a waiting trial waits for)."""
        self.ledger = ledger
        self.resources = dict(resources or {})
        self.workers = workers
        self.results_dir = Path(results_dir)
        self.space_keys = list(space_keys)
        self.metrics = list(metrics)
        self.total = total
        self.extra_columns = list(extra_columns)
        self.columns = csv_columns(self.space_keys, self.extra_columns)
        self._out = out
        self.planner: Planner | None = None
        """The searcher's planner, set by the runner (not pickled): the rows of the points it never launched."""
        self._reset()

    def _reset(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.trainer_s: dict[str, float] = {}
        self.reported: dict[str, int] = {}
        self.finished_before: set[str] = set()
        self.restarted: set[str] = set()
        """Trials (re)started in this driver whose next report may repeat steps already in metrics.jsonl."""
        self._progress: Progress | None = None

    # Pickled into Tune's tuner.pkl: keep only what rebuilds the writer.
    def __getstate__(self) -> dict[str, Any]:
        keep = ("results_dir", "space_keys", "metrics", "total", "extra_columns", "columns", "resources", "workers")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"resources": {}, "workers": 1, **state})  # a sweep saved before they were kept
        self._out = None
        self.planner = None
        self._reset()

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def progress(self) -> Progress:
        """The live block under the event lines (see lmtune.sweep.progress)."""
        if self._progress is None:
            wants = request_text(self.resources.get("CPU", 0), self.resources.get("GPU", 0), self.workers)
            self._progress = Progress(self.out, self.total, wants=wants if self.resources else "", free=self._free,
                                      workers=self.workers)
            self._progress.done = len(self.rows)
        return self._progress

    def _free(self) -> str:
        """What the cluster has free now: ``0 of 2 CPUs, 1 of 2 GPUs`` (GPUs when the trials or the cluster have any)."""
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
        kinds = ["CPU"] + (["GPU"] if self.resources.get("GPU") or total.get("GPU") else [])
        return ", ".join(f"{free.get(r, 0):g} of {total.get(r, 0):g} {r}s" for r in kinds)

    # --- Tune hooks ---

    def setup(self, **info) -> None:
        (self.results_dir / TRIALS_DIR).mkdir(parents=True, exist_ok=True)
        for row in read_trials_csv(self.results_dir / TRIALS_CSV, typed=False):  # a resumed sweep keeps its finished rows
            if not a_trial(row):
                continue  # a planner's row: the planner writes its rows as it knows them now
            self.rows[row["trial_id"]] = dict(row)
            self.finished_before.add(row["trial_id"])

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.ledger.reconciler is not None:  # every restored trial is in: before the first new suggestion
            self.ledger.reconciler.check_tune_restored()
            self.ledger.reconciler.after_restore()

    def on_step_end(self, iteration, trials, **info) -> None:
        # Tune holds a trial PENDING until the cluster has room for it: say so rather than wait in silence
        for tid in self.progress.pending(t.trial_id for t in trials if t.status == "PENDING"):
            self._line("waiting", tid, self.progress.waits_for())
        self.progress.tick()

    def on_experiment_end(self, trials, **info) -> None:
        self.progress.close()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        tid = trial.trial_id
        if tid in self.finished_before:  # restarted by a resume only to replay its recorded result
            return
        self.ledger.decisions.new_attempt(tid)
        self.restarted.add(tid)
        self.started.setdefault(tid, time.time())
        self.last.setdefault(tid, {})
        if trial.config.get(OOM_KILLED_KEY):
            return
        self.progress.start(tid, trial_config(trial.config).get("train.steps"))
        point = "  ".join(f"{k}={fmt(trial.config.get(k), k)}" for k in self.space_keys if k in trial.config)
        step = compat.checkpoint_step(trial)  # a retried or resumed trial goes on from its last checkpoint
        if step is None:
            self._line("start", tid, point)
        else:
            self._line("resume", tid, f"from step {step} (its last checkpoint)  {point}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        tid = trial.trial_id
        if tid in self.finished_before:
            return
        metrics = _metrics_only(result)
        metrics.pop(CHECKPOINT_REPORT, None)
        if TIME_IN_TRAINER in result:
            self.trainer_s[tid] = float(result[TIME_IN_TRAINER])
        self.last.setdefault(tid, {}).update(metrics)
        self.reported[tid] = self.reported.get(tid, 0) + 1
        self.progress.report(tid, metrics)
        tdir = trial_dir(self.results_dir, tid)
        tdir.mkdir(parents=True, exist_ok=True)
        if metrics.get("status", "running") == "running" and "node_id" in metrics:  # Tune adds node_ip to every result
            # An attempt's first new report says where it runs: one line per attempt in attempts.jsonl, kept out
            # of metrics.jsonl (whose reports a resumed attempt sends again as they were).
            where = {k: metrics.get(k) for k in PLACEMENT if k in metrics}
            for k in PLACEMENT:
                if k != "node_ip":  # node_ip is Tune's own, in every result
                    metrics.pop(k, None)
            with open(tdir / ATTEMPTS_JSONL, "a") as f:
                f.write(json.dumps({"step": metrics.get("step"), "at": time.time(), **where}) + "\n")
        if tid in self.restarted:
            self.restarted.discard(tid)
            drop_reports_from(tdir / METRICS_JSONL, metrics)
        with open(tdir / METRICS_JSONL, "a") as f:
            f.write(json.dumps(metrics, default=str) + "\n")

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self.ledger.pacing.checkpoint_registered()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, error=True)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.restarted.add(trial.trial_id)
        kind, message = self.ledger.decisions.errors.get(trial.trial_id, ("error", ""))
        if kind == "oom":
            self._line("failed", trial.trial_id, f"OOM-killed by Ray's memory monitor: recorded as oom ({message})")
        elif kind == "host_oom":
            self._line("failed", trial.trial_id, f"{message}; retrying from its last checkpoint")
        else:
            self._line("failed", trial.trial_id, f"retrying from its last checkpoint ({message})")

    # --- rows ---

    def _finish(self, trial, *, error: bool) -> None:
        tid = trial.trial_id
        if tid in self.finished_before:  # its row, summary and metrics are from the session that ran it
            return
        last = self.last.get(tid, {})
        status = self.ledger.decisions.status_of(tid, last, error)
        flat = trial_config(trial.config)
        reused_from = last.get(REUSED_FROM)
        row: dict[str, Any] = {"trial_id": tid, "status": status, "source": "reused" if reused_from else "run",
                               REUSED_FROM: reused_from or ""}
        row.update({k: flat.get(k) for k in self.space_keys})
        row.update({k: last.get(k) for k in TRIAL_METRICS})
        started = self.started.get(tid)
        self.ended[tid] = time.time()
        row["wall_time_s"] = round(time.time() - started, 3) if started else None
        row.update({k: last.get(k) for k in PLACEMENT})
        if self.planner is not None:
            row.update(self.planner.launch_cells(tid))
        message = ""
        if status in FAILED and tid in self.ledger.decisions.errors:
            message = self.ledger.decisions.errors[tid][1]
        elif status == "oom":
            message = str(last.get("oom_reason", ""))
        elif status == "error":
            message = str(last.get("error", ""))
        row["error"] = message if status in FAILED else ""
        self.rows[tid] = row
        tdir = trial_dir(self.results_dir, tid)
        tdir.mkdir(parents=True, exist_ok=True)
        summary = {**last, "status": status, "trial_id": tid, "config": flat, "wall_time_s": row["wall_time_s"],
                   "started_at": started, "ended_at": self.ended[tid]}
        if status == "pruned":
            summary["pruned_at_tokens"] = self.ledger.decisions.pruned.get(tid)
        if row["error"]:
            summary["error"] = row["error"]
        write_json(tdir / SUMMARY_JSON, summary)
        self._index(summary, reused_from, tdir)
        self.write_csv()
        self.progress.end(tid)
        self._line(status, tid, self._describe(status, row, last))

    def _index(self, summary: dict[str, Any], reused_from: str | None, tdir: Path) -> None:
        """A reused trial gets the original's curves; a trial that trained and can stand for later ones goes into the
        storage's index."""
        root = self.results_dir.parent
        if reused_from:
            run, _, trial_id = str(reused_from).partition("/")
            reuse.copy_curves(root, {"run": run, "trial_id": trial_id}, tdir)
            return
        entry = reuse.entry_of(self.results_dir, summary)
        if entry is not None:
            reuse.record(root, entry)

    def _describe(self, status: str, row: dict[str, Any], last: dict[str, Any]) -> str:
        parts = []
        if status == "pruned":
            parts.append(f"stopped by ASHA at tokens={fmt(self.ledger.decisions.pruned.get(row['trial_id']), 'tokens')}")
        for m in self.metrics:
            if last.get(m) is not None:
                parts.append(f"{m}={fmt(last[m], m)}")
        if status == "oom" and last.get("peak_reserved_gib") is not None and "peak_reserved_gib" not in self.metrics:
            parts.append(f"peak_reserved_gib={fmt(last['peak_reserved_gib'], 'peak_reserved_gib')}")
        if last.get("tokens") is not None:
            parts.append(f"tokens={fmt(last['tokens'], 'tokens')}")
        if row.get("wall_time_s") is not None:
            parts.append(f"{row['wall_time_s']:.1f}s")
        if row.get(REUSED_FROM):
            parts.append(f"reused: {row[REUSED_FROM]} (not trained again)")
        if row.get("error"):
            parts.append(row["error"])
        return "  ".join(parts)

    def write_csv(self) -> None:
        """trials.csv: one row per trial, then the planner's rows for the points it decided without running them."""
        planned = self.planner.implied_rows() if self.planner is not None else []
        write_trials_csv(self.results_dir / TRIALS_CSV, self.columns, [*self.rows.values(), *planned])

    def done(self) -> int:
        return len(self.rows)

    def _line(self, event: str, tid: str, text: str) -> None:
        width = len(str(self.total).lstrip("≤"))
        self.progress.line(f"[{self.done():>{width}}/{self.total} done] {event:<8} {tid}  {text}".rstrip())


