"""What several test files share: a sweep file written in a test's directory, a run's trials read back, waiting for a
condition instead of sleeping, the one-line error every command gives bad input, a clock a test moves by hand."""

from __future__ import annotations

import csv
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Callable

GOOD_SWEEP = """
from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid, loguniform
sweep = Sweep(
    name="tiny",
    base={**TINY_CPU},
    space={"train.lr": loguniform(1e-4, 1e-2), "model.norm_placement": grid(["pre", "post"])},
    metric="val_loss", mode="min", num_samples=2,
    export=["train.lr"],
    smoke=Smoke(base={"train.steps": 10}, num_samples=1),
)
"""
"""A sweep file every input check accepts (a test breaks one thing of it at a time)."""


def write(tmp_path: Path, text: str, name: str = "s.py") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def sweep_file(tmp_path: Path, body: str, name: str = "sweep.py") -> Path:
    """A sweep file with lmtune.sweep's usual names imported, ``body`` defining ``sweep``."""
    p = tmp_path / name
    p.write_text("from lmtune.sweep import TINY_CPU, Sweep, grid, loguniform\n" + textwrap.dedent(body))
    return p


def only_run(storage: Path) -> Path:
    runs = [p for p in storage.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def rows(results: Path) -> dict[str, dict[str, str]]:
    with open(results / "trials.csv", newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def wait_for(pred: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None,
             what: str = "the sweep") -> None:
    """Until ``pred()``, polling; an error when ``proc`` ends first or ``timeout`` seconds pass."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} ended before it could be interrupted:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def one_error_line(err: str) -> str:
    """The command's stderr is one ``error: …`` line, no traceback; returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


class Clock:
    """A clock a test moves by hand (``clock.t += 30``)."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t
