"""The results directory of one sweep run, written from the driver (docs/CONTRACTS.md, "Results directory").

``{storage}/{n}-{sweep-name}-{YYYYmmdd-HHMMSS-ffffff}`` holds ``sweep.json``, ``trials.csv`` (one row per
trial, rewritten as trials finish), ``trials/{trial_id}/metrics.jsonl`` + ``summary.json``, ``optuna.db``,
``tune/`` (Tune's experiment state and TensorBoard logs), ``train/`` (Ray Train runs of multi-worker
trials), ``wandb/`` and ``logs/``. This module imports no Ray; the Tune callback that fills the directory
as trials run is :class:`lmtune.sweep.callback.ResultsWriter`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from lmtune import __version__
from lmtune.contract import PLACEMENT, TIME_IN_TRAINER, TRIAL_METRICS
from lmtune.sweep.load import ResolvedSweep

# Keys Tune adds to every result that are not the trainer's metrics (its node_ip is kept: where each report was made).
_TUNE_KEYS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "time_since_restore",
    "iterations_since_restore", "config", "experiment_tag", "checkpoint_path", TIME_IN_TRAINER,
}
_GROUP = re.compile(r"^(\d+)-(.+)-(\d{8}-\d{6}-\d{6})$")


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


def sweep_json(rs: ResolvedSweep, results_dir: Path) -> dict[str, Any]:
    f = rs.frontier
    return {
        "name": rs.name,
        "group": results_dir.name,
        "file": str(rs.file.resolve()),
        "smoke": rs.smoke,
        "metric": rs.metric,
        "mode": rs.mode,
        "searcher": rs.searcher,
        "scheduler": rs.sweep.scheduler,
        "num_trials": rs.num_samples,
        "workers": rs.sweep.workers,
        "gpus": rs.gpus,
        "cpus": rs.cpus,
        "export": list(rs.export),
        "frontier": None if f is None else {"x": f.x, "budget": f.budget, "headroom_gib": f.headroom_gib,
                                            "margin_gib": f.margin_gib, "verify_predicted": f.verify_predicted},
        "memory_limit_gib": rs.base.get("system.memory_limit_gib") or None,
        **device_memory(rs),
        "base": rs.base,
        "space": rs.space_json(),
        "overrides": {k: v for k, v in rs.base_overrides.items()},
        "description": rs.sweep.description,
        "created": datetime.now().isoformat(timespec="seconds"),
        "lmtune_version": __version__,
    }


def device_memory(rs: ResolvedSweep) -> dict[str, Any]:
    """``device_memory_gib``/``device_name`` when the driver knows them: CPU trials (no GPUs) run on this
    node's RAM (a joined cluster's worker nodes may differ: the trainer reports its own in summary.json);
    GPU trials leave it to the trainer's report of the GPU it ran on."""
    if rs.gpus or rs.base.get("system.device") == "cuda":  # "auto" too: the trials may run on GPUs
        return {}
    import platform

    import psutil

    return {"device_memory_gib": psutil.virtual_memory().total / 2**30,
            "device_name": f"cpu ({platform.processor() or platform.machine()}, node RAM)"}


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


# --- trials.csv -------------------------------------------------------------------------------------


def csv_columns(space_keys: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    return ["trial_id", "status", "source", *space_keys, *TRIAL_METRICS, *extra, "wall_time_s", *PLACEMENT, "error"]


def read_trials_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


def _metrics_only(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _TUNE_KEYS and not k.startswith("config/")}


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 1e4 else str(v)
    return str(v)


# --- the end-of-sweep table -------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table (fixed-width columns) for the console."""
    cells = [["" if r.get(c) is None else fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)



def oom_by_half(rows: list[dict[str, Any]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((OOMs, trials) of the first half, (OOMs, trials) of the second) of the trials that ran, in the order of
    ``rows`` (trials.csv: the order they finished in): whether the searcher learned where memory runs out."""
    ran = [r for r in rows if r.get("source", "run") == "run"]
    first, second = ran[: len(ran) // 2], ran[len(ran) // 2:]
    return tuple((sum(r.get("status") == "oom" for r in half), len(half)) for half in (first, second))


def oom_by_half_text(rows: list[dict[str, Any]]) -> str | None:
    """The console's sentence for :func:`oom_by_half`; None without an OOM."""
    (a, n), (b, m) = oom_by_half(rows)
    if not a + b:
        return None
    return (f"out of memory: {a} of the first {n} trials to finish, {b} of the last {m} (an OOM is a memory "
            "constraint the searcher learns, optuna.db: constraints)")
