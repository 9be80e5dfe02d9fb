"""Never train the same trial twice: the index of finished trials at the storage root, by fingerprint.

Every trial's summary.json carries its fingerprint (:mod:`lmtune.training.fingerprint`: the resolved config, the data's
identity, lmtune's source, torch's version, the device). A sweep's driver appends each trial that ends ``ok`` or
``oom`` to ``{storage}/reuse.jsonl`` (one JSON object a line, under a lock: two sweeps may write the same storage at
once), reads the index when it starts and hands the trials its reusable entries; a trial whose fingerprint is there
reports that result instead of training (``source=reused``, ``reused_from`` naming the run and trial), and the driver
copies the original's curves into the new run. The searcher and the frontier planner see an ordinary result.

Failed, pruned and diverged trials are not reused: an error may be transient, a pruned trial's result depends on the
other trials of its sweep, and a diverged one is usually rerun on purpose. ``--rerun`` trains every trial (and still
records them).

A missing or corrupt index is rebuilt from the runs' summaries (the trial directories of every results directory in
the storage), with one line saying so.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from lmtune.config import ConfigError
from lmtune.contract import (
    METRICS_JSONL,
    REUSE_INDEX,
    REUSED_FROM,
    SUMMARY_JSON,
    SWEEP_JSON,
    TRIALS_CSV,
    TRIALS_DIR,
)
from lmtune.results.layout import measured, read_trials_csv

REUSABLE = ("ok", "oom")
"""Statuses whose result stands for any trial with the same fingerprint."""
NOT_RESULT = ("trial_id", "config", "wall_time_s", "started_at", "ended_at", "error", REUSED_FROM,
              "node_ip", "node_id", "gpu_ids", "cuda_visible_devices", "time_in_trainer_s")
"""summary.json keys about the trial's own run, not its result."""


def entry_of(run: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The index entry for a trial's summary.json in results directory ``run``; None unless it can be reused."""
    if summary.get("status") not in REUSABLE or not summary.get("fingerprint") or summary.get(REUSED_FROM):
        return None
    return {"fingerprint": summary["fingerprint"], "run": run.name, "trial_id": summary.get("trial_id"),
            "status": summary["status"], "device_hours": summary.get("device_hours"),
            "result": {k: v for k, v in summary.items() if k not in NOT_RESULT}}


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{REUSE_INDEX}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def record(root: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to the storage's index (one line, under the lock: safe with other sweeps writing)."""
    with _locked(root), open(root / REUSE_INDEX, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def load(root: Path, out: TextIO | None = None) -> dict[str, dict[str, Any]]:
    """The storage's reusable trials by fingerprint (the latest of each). A missing index where runs exist, or a line
    that is not an entry, is rebuilt from the runs' summaries, and ``out`` gets one line saying so."""
    path = root / REUSE_INDEX
    with _locked(root):
        entries, bad = _read(path)
        if bad is None and path.exists():
            return {e["fingerprint"]: e for e in entries}
        runs = _runs(root)
        entries = [e for run in runs for e in _entries_of_run(run)]
        tmp = path.with_name(f".{REUSE_INDEX}.tmp")
        tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in entries))
        os.replace(tmp, path)
    if bad is not None or entries:  # a new storage (or one of runs from before fingerprints) starts an empty one
        why = f"corrupt (line {bad})" if bad is not None else "missing"
        print(f"reuse: the index {path} was {why}; rebuilt from {len(runs)} run(s)' summaries ({len(entries)} "
              f"reusable trial(s))", file=out)
    return {e["fingerprint"]: e for e in entries}


def _read(path: Path) -> tuple[list[dict[str, Any]], int | None]:
    """The index's entries, and the number of its first line that is not one (None when all are)."""
    if not path.exists():
        return [], None
    entries = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            return entries, n
        if not isinstance(entry, dict) or not {"fingerprint", "run", "trial_id", "status", "result"} <= entry.keys():
            return entries, n
        entries.append(entry)
    return entries, None


def _runs(root: Path) -> list[Path]:
    """The results directories in the storage, oldest first."""
    return sorted((p.parent for p in root.glob(f"*/{SWEEP_JSON}")), key=lambda p: p.stat().st_mtime)


def _entries_of_run(run: Path) -> list[dict[str, Any]]:
    out = []
    for summary_path in sorted((run / TRIALS_DIR).glob(f"*/{SUMMARY_JSON}")):
        try:
            entry = entry_of(run, json.loads(summary_path.read_text()))
        except ValueError:
            continue
        if entry is not None:
            out.append(entry)
    return out


def check_warm_start(paths: list[str], searcher: str, searcher_warms: bool, resume: bool) -> list[Path]:
    """``--warm-start RESULTS…`` checked before any cluster: results directories of earlier sweeps, a searcher that
    learns from trials, a new run. ConfigError in one line otherwise."""
    if not paths:
        return []
    if resume:
        raise ConfigError("--warm-start seeds a new sweep's searcher; a resumed sweep keeps its own study. Accepted: "
                          "--warm-start without --resume.")
    if not searcher_warms:
        raise ConfigError(f"--warm-start seeds a searcher that learns from finished trials (tpe, nsga2, the frontier "
                          f"planner); this sweep runs {searcher}, whose points run anyway (the storage's finished "
                          f"ones are reused).")
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not (path / SWEEP_JSON).is_file() or not (path / TRIALS_CSV).is_file():
            raise ConfigError(f"--warm-start {p}: not a sweep's results directory (it needs {SWEEP_JSON} and "
                              f"{TRIALS_CSV}); accepted: directories such as results/1-tiny-20261203-101500.")
        out.append(path)
    return out


def earlier_trials(paths: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``run/trial_id``, its summary.json) of every measured trial of the results directories ``paths``."""
    for run in paths:
        for row in read_trials_csv(run / TRIALS_CSV, typed=False):
            summary = run / TRIALS_DIR / str(row["trial_id"]) / SUMMARY_JSON
            if measured(row) and summary.is_file():
                try:
                    yield f"{run.name}/{row['trial_id']}", json.loads(summary.read_text())
                except ValueError:
                    continue


def warm_start(searcher: Any, space_keys: list[str], paths: list[Path], out: TextIO) -> None:
    """The earlier sweeps' finished trials in ``searcher``'s study (their values of this sweep's axes), and one line
    on how many were added and how many were left out (outside this space, or a status it cannot tell)."""
    added = left = 0
    for source, summary in earlier_trials(paths):
        config = summary.get("config") or {}
        params = {k: config[k] for k in space_keys if k in config}
        if searcher.add_earlier(params, summary, source):
            added += 1
        else:
            left += 1
    print(f"warm start: {added} finished trial(s) of {len(paths)} earlier sweep(s) taken as evidence; {left} left out "
          f"(outside this sweep's space, or not ok/oom)", file=out)


def copy_curves(root: Path, entry: dict[str, Any], trial_dir: Path) -> None:
    """The reused trial's reports (metrics.jsonl) in the new trial's directory, in place of its one final report."""
    original = root / entry["run"] / TRIALS_DIR / str(entry["trial_id"]) / METRICS_JSONL
    if original.is_file():
        trial_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, trial_dir / METRICS_JSONL)


def saving_text(rows: list[dict[str, Any]]) -> str | None:
    """What reuse saved in a run: trials and device-hours (None when it reused nothing)."""
    reused = [r for r in rows if r.get("source") == "reused"]
    if not reused:
        return None
    hours = sum(float(r.get("device_hours") or 0) for r in reused)
    ran = sum(1 for r in rows if (r.get("source") or "run") == "run")
    return (f"reuse: {len(reused)} trial(s) not trained again (the same config, data, code, torch and device finished "
            f"before in this storage), {ran} trained; saved {hours:.3g} device-hours. --rerun trains every trial.")
