"""The results directory of a sweep run, both ways: its name, its files, and reading and writing them.

``{storage}/{n}-{sweep-name}-{YYYYmmdd-HHMMSS-ffffff}`` (docs/CONTRACTS.md, "Results directory") holds
``sweep.json``, ``trials.csv`` (one row per trial, rewritten as trials finish), ``trials/{trial_id}/`` with
``metrics.jsonl``, ``attempts.jsonl`` and ``summary.json``, ``optuna.db``, ``tune/`` (Tune's experiment state and
TensorBoard logs), ``train/`` (Ray Train runs of multi-worker trials), ``wandb/`` and ``logs/``. The sweep
driver writes it (:class:`lmtune.sweep.callback.ResultsWriter`); everything that reads it reads it through
here, a running sweep's too (a line being written is skipped, a missing file is empty). No Ray.
"""

from __future__ import annotations

import csv
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from lmtune.config import ConfigError, all_keys, coerce
from lmtune.contract import MEASURED, PLACEMENT, TRIAL_METRICS, TRIAL_SOURCES, TRIALS_DIR

_GROUP = re.compile(r"^(\d+)-(.+)-(\d{8}-\d{6}-\d{6})$")
CONFIG_KEYS = frozenset(all_keys())


# --- the directory ----------------------------------------------------------------------------------


def group_name(n: int, name: str, when: datetime | None = None) -> str:
    return f"{n}-{name}-{(when or datetime.now()).strftime('%Y%m%d-%H%M%S-%f')}"


def runs_of(storage: Path, name: str) -> list[Path]:
    """Result directories of sweep ``name`` in ``storage``, oldest first."""
    if not storage.is_dir():
        return []
    runs = []
    for p in storage.iterdir():
        m = _GROUP.match(p.name)
        if p.is_dir() and m and m.group(2) == name:
            runs.append((int(m.group(1)), m.group(3), p))
    return [p for *_, p in sorted(runs)]


def new_results_dir(storage: Path, name: str) -> Path:
    """The next ``{n}-{name}-{timestamp}`` directory (n counts this sweep's runs in ``storage``)."""
    existing = runs_of(storage, name)
    n = 1 + max((int(_GROUP.match(p.name).group(1)) for p in existing), default=0)
    path = storage / group_name(n, name)
    path.mkdir(parents=True)
    return path


def trial_dir(results_dir: str | Path, trial_id: Any) -> Path:
    """``trials/{trial_id}/`` of a results directory."""
    return Path(results_dir) / TRIALS_DIR / str(trial_id)


# --- JSON and JSON lines ----------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written by a running trial
        if isinstance(rec, dict):
            out.append(rec)
    return out


# --- a run's report stream (metrics.jsonl) ----------------------------------------------------------
# Both the trainer (``python -m lmtune.train --resume`` into the same directory) and the sweep driver (a retried or
# resumed trial) continue a stream that may already hold reports past the checkpoint they resume from; each report
# must appear once, as in an uninterrupted run.


def order(report: dict[str, Any]) -> tuple[int, int]:
    """Where a report falls in a run: its step, and at an eval step the training report before the eval's."""
    return int(report.get("step", -1)), int("val_loss" in report)


def keep_reports(path: Path, keep: Callable[[tuple[int, int]], bool]) -> int:
    """Rewrite ``path`` (atomically) with only the reports whose :func:`order` ``keep`` accepts; returns how
    many were dropped. Unreadable lines are kept as they are."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            report = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if keep(order(report)):
            kept.append(line)
    dropped = len([ln for ln in lines if ln.strip()]) - len(kept)
    if dropped:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return dropped


# --- trials.csv -------------------------------------------------------------------------------------


def measured(row: dict[str, Any]) -> bool:
    """A trials.csv row with a measured result: a trial that trained in this run or one reused from an earlier run
    (not a frontier point decided without running)."""
    return (row.get("source") or "run") in MEASURED


def a_trial(row: dict[str, Any]) -> bool:
    """A trials.csv row that is one of the run's own trials (trained, or reused under its own trial id)."""
    return (row.get("source") or "run") in TRIAL_SOURCES


def csv_columns(space_keys: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    return ["trial_id", "status", "source", *space_keys, *TRIAL_METRICS, *extra, "wall_time_s", *PLACEMENT, "error", "reused_from"]


def parse_cell(key: str, text: str) -> Any:
    """A trials.csv cell → its value: config keys by their config type, other numbers as float."""
    if text is None or text == "":
        return None
    if key in CONFIG_KEYS:
        try:
            return coerce(key, text)
        except ConfigError:
            return text
    if key in ("trial_id", "status", "source", "error", "reused_from"):
        return text
    try:
        return float(text)
    except ValueError:
        return text


def read_trials_csv(path: Path, *, typed: bool = True) -> list[dict[str, Any]]:
    """trials.csv's rows ([] when there is none): typed (:func:`parse_cell`; ``source`` defaults to ``run``), or
    with ``typed=False`` the cells as written (what the driver keeps of a resumed sweep and writes back as it was)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        raw = [{k: v for k, v in r.items() if k is not None} for r in csv.DictReader(f)]
    if not typed:
        return raw
    rows = [{k: parse_cell(k, v) for k, v in r.items()} for r in raw]
    for r in rows:
        r["trial_id"] = str(r.get("trial_id") or "")
        r["source"] = r.get("source") or "run"
    return rows


def write_trials_csv(path: Path, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k)) for k in columns})
    tmp.replace(path)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


