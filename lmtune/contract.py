"""lmtune's vocabulary: the names that users, scripts and every layer rely on, spelled once.

Metric names, trial statuses, the markers reports carry, and the files of a run and of a results directory
(docs/CONTRACTS.md describes what each holds). Standard library only: the trainer, the sweep driver, the
results readers and the GPU check all import it. Adding a metric means adding it here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# --- metrics ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One number (or word) the trainer reports, and where it goes. A run's summary.json holds each one the run
    measured (its last value); the fields say what else reads it."""

    name: str
    carried: bool = False
    """The trainer's final report carries its latest value even when the last step did not measure it
    (``lmtune.training.reporting``); the others the final report sets itself (peaks, ``ac_mode``, ``flops``...)."""
    optimizable: bool = False
    """A sweep may name it as its ``metric`` (a number in the trainer's final report)."""
    column: bool = False
    """A trials.csv column; the columns stand in the order of :data:`METRICS`."""
    every_n: bool = False
    """Measured only every ``train.measure_interval`` steps (never when it is 0)."""
    trials_table: int | None = None
    """Its place among the metric columns of summary.md's Trials table (1 = first); None: not shown there."""
    format: str = "number"
    """How a table cell shows it (``lmtune.results.format.FORMATS``): ``count`` (thousands separators), ``gib``,
    ``time`` (one decimal: ms or s), ``number`` (an integer as it is, else 4 significant digits; a word as it is)."""


def _final(name: str, **fields) -> Metric:
    """A metric of the trainer's final report that a sweep may optimize."""
    return Metric(name, carried=True, optimizable=True, **fields)


METRICS = (
    _final("val_loss", column=True, trials_table=1),
    _final("val_ppl", column=True),
    _final("loss", column=True, trials_table=2),
    _final("tokens", column=True, trials_table=3, format="count"),
    _final("tokens_per_s", column=True, trials_table=4, format="count"),
    _final("avg_step_time_ms", column=True, format="time"),
    _final("wall_clock_s", column=True, trials_table=6, format="time"),
    _final("device_hours", column=True, trials_table=7),
    _final("peak_reserved_gib", column=True, trials_table=5, format="gib"),
    _final("peak_allocated_gib", column=True, format="gib"),
    Metric("peak_rss_gib", carried=True, column=True, format="gib"),
    Metric("alloc_retries", carried=True, column=True),
    _final("grad_norm_spread", column=True),
    _final("grad_coherence", column=True, every_n=True),
    _final("noise_scale", column=True, every_n=True),
    _final("mfu", column=True),
    Metric("ac_mode", column=True),
    Metric("flops", column=True),
    _final("lr"),
    _final("grad_norm"),
    _final("step_time_ms", format="time"),
    Metric("step", optimizable=True),
    Metric("epoch", optimizable=True),
    Metric("total_steps"),
    Metric("flops_per_token"),
    Metric("params"),
    Metric("data_source"),
)
"""Every metric, once (DESIGN.md's vocabulary; per-layer norms are :func:`layer_metric`). Adding a metric means
adding its record here: the trainer's final report, the sweep's checks, trials.csv and the tables read this."""
METRIC = {m.name: m for m in METRICS}

SUMMARY_METRICS = tuple(m.name for m in METRICS if m.carried)
"""The metrics the trainer's final report carries (when it measured them), per-layer norms besides."""
REPORTED_METRICS = tuple(m.name for m in METRICS if m.optimizable)
"""Numbers in the trainer's final report that a sweep may optimize (``metric=``), per-layer norms besides."""
MEASURED_EVERY = tuple(m.name for m in METRICS if m.every_n)
"""Metrics measured only every ``train.measure_interval`` steps (none when it is 0)."""
TRIAL_METRICS = tuple(m.name for m in METRICS if m.column)
"""trials.csv's metric columns, in order."""
TRIALS_TABLE = tuple(m.name for m in sorted(METRICS, key=lambda m: m.trials_table or 0) if m.trials_table)
"""The metric columns of summary.md's Trials table, in order (after the sweep's own metrics)."""

PLACEMENT = ("node_ip", "node_id", "gpu_ids", "cuda_visible_devices")
"""Where a trial's attempt ran: trials.csv columns and attempts.jsonl fields."""

LAYER_PREFIX = "grad_norm/layer_"
"""Per-layer gradient norms: ``grad_norm/layer_{i}`` for block i (before clipping)."""
_LAYER = re.compile(rf"^{re.escape(LAYER_PREFIX)}(\d+)$")


def layer_metric(i: int) -> str:
    return f"{LAYER_PREFIX}{i}"


def layer_index(key: str) -> int | None:
    """i for ``grad_norm/layer_{i}``, else None."""
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None


def layer_keys(metrics: dict) -> list[str]:
    """The per-layer norm keys of ``metrics``, by layer."""
    return sorted((k for k in metrics if layer_index(k) is not None), key=layer_index)


# --- compute budgets (the scaling ladder) -------------------------------------------------------------

BUDGET_KEY = "train.flops"
"""A run's compute budget: a sweep over it and the model's size is a scaling ladder (IsoFLOP profiles)."""
SIZE_KEYS = ("model.n_embd", "model.n_layer")
"""The axes that change a model's size."""
LADDER_MIN = 3
"""Budgets a ladder needs at least, and sizes per budget: three points place a budget's minimum (a parabola in
log N), three minima make a power law in C more than a line through two points."""

# --- statuses ---------------------------------------------------------------------------------------

STATUSES = ("ok", "oom", "host_oom", "diverged", "pruned", "error")
"""A finished trial's status (trials.csv ``status``). ``host_oom``: Ray's memory monitor killed the trial while
other trials ran on its node (retried; no evidence about its config)."""
RUNNING = "running"
"""The status of every report before a run's last one."""
TRAINER_STATUSES = ("ok", "oom", "diverged")
"""The statuses a trainer's last report can carry (an error is an exception)."""
SOURCES = ("run", "reused", "earlier", "implied", "predicted")
"""Where a trials.csv row comes from: a trial this run trained; a trial this run did not train because an earlier run
in the same storage finished the same one (same fingerprint: its result and curves copied, ``reused_from`` says
whose); a frontier point the planner took from an earlier sweep given with ``--warm-start`` (``reused_from`` says
which trial measured it; not run here); a frontier point never launched (OOM implied by a smaller OOM, or predicted
above the limit)."""
TRIAL_SOURCES = ("run", "reused")
"""Sources of rows that are this run's trials (a resumed sweep reads them back as its finished trials)."""
MEASURED = ("run", "reused", "earlier")
"""Sources of rows with a measured result (a trial that trained here, or in the run it was taken from)."""
FEASIBLE = ("ok", "diverged", "pruned")
"""Statuses of trials whose config fit in memory."""
FAILED = ("error", "oom", "host_oom")
"""Statuses that come with an error message (trials.csv ``error``)."""
SETTLED = ("ok", "oom", "host_oom", "diverged", "pruned")
"""Statuses a trial keeps across a resume: it is not run again."""

# --- report markers ---------------------------------------------------------------------------------

CHECKPOINT_REPORT = "lmtune_checkpoint_report"
"""Set on the reports a resumed trainer sends again first: those made since the checkpoint before the
previous one, up to the checkpoint it resumes from (saved in the checkpoint). Whoever collects reports (the
sweep driver) may have lost the last of them when the run was interrupted (on Ray Train the checkpoint can
be persisted before its reports reach Tune); from the first of them on, they replace what it recorded."""
REPLAYED = "lmtune_replayed"
"""Set on the final report a trial sends again without training: it had finished before an interruption."""
TIME_IN_TRAINER = "time_in_trainer_s"
REUSED_FROM = "reused_from"
"""On the final report of a trial that did not train because the storage held the same finished trial (its
fingerprint): ``{run}/{trial_id}`` of that trial; the trials.csv column of the same name."""
"""Seconds a trial's process spent inside the trainer (the rest of its wall time is Ray's)."""

# --- files ------------------------------------------------------------------------------------------

METRICS_JSONL = "metrics.jsonl"
"""Every report of a run (a trainer's --out, a trial's directory), one JSON object a line."""
SUMMARY_JSON = "summary.json"
"""A run's last report with its flat config."""
SAMPLES_TXT = "samples.txt"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_CONFIG = "config.json"
"""Next to a checkpoint: the flat config it was saved with."""

SWEEP_JSON = "sweep.json"
TRIALS_CSV = "trials.csv"
REUSE_INDEX = "reuse.jsonl"
"""At the storage root: every finished ok/oom trial of every run there, by fingerprint (:mod:`lmtune.sweep.reuse`)."""
TRIALS_DIR = "trials"
ATTEMPTS_JSONL = "attempts.jsonl"
STUDY_DB = "optuna.db"
SUMMARY_MD = "summary.md"
FRONTIER_STEM = "frontier"
"""frontier.md, frontier.csv, frontier.json."""
REPORT_HTML = "report.html"
PLOTS_DIR = "plots"
TUNE_DIR = "tune"
"""Tune's experiment (its snapshots for --resume, TensorBoard logs)."""
TRAIN_DIR = "train"
"""Ray Train's runs of multi-worker trials."""
LOG_DIR = "logs"
"""Ray's own output and the driver's log."""
