"""lmtune's vocabulary: the names that users, scripts and every layer rely on, spelled once.

Metric names, trial statuses, the markers reports carry, and the files of a run and of a results directory
(docs/CONTRACTS.md describes what each holds). Standard library only: the trainer, the sweep driver, the
results readers and the GPU check all import it. Adding a metric means adding it here.
"""

from __future__ import annotations

import re

# --- metrics ----------------------------------------------------------------------------------------

SUMMARY_METRICS = (
    "loss", "lr", "grad_norm", "step_time_ms", "val_loss", "val_ppl", "tokens", "tokens_per_s", "avg_step_time_ms",
    "wall_clock_s", "device_hours", "peak_reserved_gib", "peak_allocated_gib", "peak_rss_gib", "alloc_retries",
    "grad_norm_spread", "grad_coherence", "noise_scale", "mfu",
)
"""The metrics the trainer's final report carries (when it measured them), per-layer norms besides."""

REPORTED_METRICS = (
    "val_loss", "val_ppl", "loss", "grad_norm", "grad_norm_spread", "grad_coherence", "noise_scale",
    "step_time_ms", "avg_step_time_ms", "wall_clock_s", "device_hours", "tokens_per_s", "mfu", "peak_reserved_gib",
    "peak_allocated_gib", "tokens", "step", "epoch", "lr",
)
"""Numbers in the trainer's final report that a sweep may optimize (``metric=``), per-layer norms besides."""

MEASURED_EVERY = ("grad_coherence", "noise_scale")
"""Metrics measured only every ``train.measure_interval`` steps (none when it is 0)."""

TRIAL_METRICS = (
    "val_loss", "val_ppl", "loss", "tokens", "tokens_per_s", "avg_step_time_ms", "wall_clock_s", "device_hours",
    "peak_reserved_gib", "peak_allocated_gib", "peak_rss_gib", "alloc_retries", "grad_norm_spread",
    "grad_coherence", "noise_scale", "mfu", "ac_mode", "flops",
)
"""trials.csv's metric columns, in order."""

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


# --- statuses ---------------------------------------------------------------------------------------

STATUSES = ("ok", "oom", "host_oom", "diverged", "pruned", "error")
"""A finished trial's status (trials.csv ``status``). ``host_oom``: Ray's memory monitor killed the trial while
other trials ran on its node (retried; no evidence about its config)."""
RUNNING = "running"
"""The status of every report before a run's last one."""
TRAINER_STATUSES = ("ok", "oom", "diverged")
"""The statuses a trainer's last report can carry (an error is an exception)."""
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
