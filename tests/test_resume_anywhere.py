"""Kill the sweep's driver anywhere, resume, and end with the sweep an uninterrupted driver would have run.

One ASHA sweep (4 grid points, one trial at a time, early stopping at rungs) runs once uninterrupted as the
reference. Then the same sweep is SIGKILLed (the driver and the Ray it started, as if the machine went away) at
moments the test picks from what it watches the driver do: right after a trial starts, between two reports,
right after a checkpoint appears, while Tune writes its experiment snapshot, right after a trial ends: each
moment once, a report (at a random delay after it) twice, six kills in all, each followed by ``--resume``, the last
resume left to finish. (Each kill costs a driver, a Ray and a trial process, ~10 CPU-seconds: every moment twice,
ten kills, was 40 s more of a suite that has to fit 10 minutes on 2 cores.) Every resume must complete its part
without a traceback, and the end result must equal the reference: one row per config, the same trials stopped by
ASHA at the same rungs, each trial's report sequence as one uninterrupted run, no finished trial run again, and
the Optuna study in agreement with trials.csv.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import sweep_file

pytestmark = pytest.mark.slow

SWEEP = """
    sweep = Sweep(
        name="anywhere",
        base={**TINY_CPU, "train.steps": 24, "train.eval_interval": 4, "train.log_interval": 2},
        space={"train.lr": grid([3e-3, 1e-5, 2e-3, 3e-5])},
        metric="val_loss", mode="min", scheduler="asha", grace_tokens=4 * 8 * 64, reduction_factor=2,
        export=["train.lr"],
    )
"""
KILLS = ["start", "report", "checkpoint", "end", "snapshot", "report"]


def _args(f: Path, storage: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "lmtune.sweep", str(f), "--storage", str(storage), "--max-concurrent", "1",
            "--no-wandb", "--no-report", "--no-dashboard", *(["--resume"] if resume else [])]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _rows(results: Path) -> dict[str, dict[str, str]]:
    path = results / "trials.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def _reports(results: Path, tid: str) -> list[tuple[int, bool]]:
    path = results / "trials" / tid / "metrics.jsonl"
    return [(r["step"], "val_loss" in r) for r in map(json.loads, path.read_text().splitlines())]


class Watch:
    """What the running driver has done, read from its console and its results directory."""

    def __init__(self, storage: Path):
        self.storage = storage
        self.lines: list[str] = []

    def results(self) -> Path | None:
        runs = [p for p in self.storage.iterdir() if p.is_dir()] if self.storage.exists() else []
        return runs[0] if runs else None

    def state(self) -> dict:
        r = self.results()
        if r is None:
            return {"reports": 0, "checkpoints": 0, "snapshot": None}
        reports = sum(len(m.read_text().splitlines()) for m in (r / "trials").glob("*/metrics.jsonl"))
        checkpoints = len(list((r / "tune").glob("*/checkpoint_*")))
        snaps = sorted((r / "tune").glob("experiment_state-*.json"))
        snapshot = max((p.stat().st_mtime_ns for p in snaps), default=None)
        return {"reports": reports, "checkpoints": checkpoints, "snapshot": snapshot}


def _run_until(proc: subprocess.Popen, watch: Watch, event: str, rng: random.Random, timeout: float = 120) -> bool:
    """Read the driver until ``event`` happens, then SIGKILL it (after a small random delay for 'report');
    returns False when the driver finished first."""
    import threading

    def read() -> None:
        for line in proc.stdout:
            watch.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    before, seen = watch.state(), len(watch.lines)
    end = time.time() + timeout
    while time.time() < end:
        new, seen = watch.lines[seen:], len(watch.lines)
        now = watch.state()
        hit = (
            (event == "start" and any(" start " in ln for ln in new))
            or (event == "end" and any(" ok " in ln or " pruned " in ln for ln in new if "done]" in ln))
            or (event == "report" and now["reports"] > before["reports"])
            or (event == "checkpoint" and now["checkpoints"] > before["checkpoints"])
            or (event == "snapshot" and before["snapshot"] is not None and now["snapshot"] != before["snapshot"])
        )
        if event == "snapshot" and before["snapshot"] is None and now["snapshot"] is not None:
            before["snapshot"] = now["snapshot"]  # the first snapshot of a new run: wait for the next write
        if hit:
            if event == "report":
                time.sleep(rng.uniform(0.0, 0.15))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(5)
            return True
        if proc.poll() is not None:
            reader.join(5)
            return False
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError(f"timed out waiting for '{event}'; the driver printed:\n" + "\n".join(watch.lines[-30:]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    f = sweep_file(tmp, SWEEP)
    proc = subprocess.run(_args(f, tmp / "results", False), cwd=tmp, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (results,) = [p for p in (tmp / "results").iterdir() if p.is_dir()]  # beside it: the storage's reuse index
    return results


def _no_traceback(lines: list[str], tmp_path: Path) -> None:
    """No driver printed a traceback (all of their output is kept in drivers.log next to the sweep)."""
    text = "\n".join(lines)
    if "Traceback" in text:
        (tmp_path / "drivers.log").write_text(text)
        tail = [line for line in lines[-200:] if line.strip()]
        raise AssertionError("a driver printed a traceback:\n" + "\n".join(tail[-120:]))


def test_a_driver_killed_anywhere_resumes_into_the_uninterrupted_sweep(tmp_path, reference):
    f = sweep_file(tmp_path, SWEEP)
    storage = tmp_path / "results"
    watch = Watch(storage)
    rng = random.Random(0)
    kills: list[str] = []
    resume = False
    for event in KILLS:
        proc = subprocess.Popen(_args(f, storage, resume), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if not _run_until(proc, watch, event, rng):
            assert proc.returncode == 0, "\n".join(watch.lines[-80:])
            break  # the sweep finished before this kill: nothing left to interrupt
        kills.append(event)
        resume = True
        _no_traceback(watch.lines, tmp_path)
    else:
        final = subprocess.run(_args(f, storage, True), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                               timeout=600)
        watch.lines += final.stdout.splitlines() + final.stderr.splitlines()
        _no_traceback(watch.lines, tmp_path)
        assert final.returncode == 0, final.stdout + final.stderr
    assert len(kills) == len(KILLS), kills
    results = watch.results()
    got, want = _rows(results), _rows(reference)
    # One row per config, and the same outcome per config: status, and for a trial ASHA stopped, where.
    by_point = {r["train.lr"]: r for r in got.values()}
    assert len(got) == len(by_point) == len(want) == 4, got
    for r in want.values():
        mine = by_point[r["train.lr"]]
        assert (mine["status"], mine["tokens"]) == (r["status"], r["tokens"]), (mine, r)
        assert mine["val_loss"] == r["val_loss"], (mine["val_loss"], r["val_loss"])
        # Each trial's reports read as one uninterrupted run: the reference trial's, report for report.
        assert _reports(results, mine["trial_id"]) == _reports(reference, r["trial_id"])
    # No finished trial ran again: after its end line, its id never starts again.
    for tid, r in got.items():
        ends = [i for i, ln in enumerate(watch.lines) if f" {r['status']} " in ln and tid in ln and "done]" in ln]
        starts = [i for i, ln in enumerate(watch.lines) if " start " in ln and tid in ln]
        assert ends and not [i for i in starts if i > ends[0]], (tid, watch.lines)
    # The study agrees with trials.csv: each row's trial once, finished, in the state its status implies;
    # any other study trial was closed as interrupted (asked after a snapshot, its point run again).
    import optuna

    study = optuna.load_study(study_name="anywhere", storage=f"sqlite:///{results / 'optuna.db'}")
    state = {"ok": "COMPLETE", "pruned": "PRUNED", "oom": "COMPLETE", "diverged": "FAIL", "error": "FAIL"}
    mine = {}
    for t in study.trials:
        tid = t.user_attrs.get("trial_id")
        if tid in got and t.user_attrs.get("status") != "interrupted":
            assert tid not in mine, f"two study trials for {tid}"
            mine[tid] = t
        else:
            assert t.state.name == "FAIL" and t.user_attrs.get("status") == "interrupted", (t.number, t.user_attrs)
    assert set(mine) == set(got)
    for tid, t in mine.items():
        assert t.state.name == state[got[tid]["status"]], (tid, t.state, got[tid]["status"])
