"""Trial reuse: ``make demo`` (the smoke memory frontier) run again in the same storage, with one more micro-batch, and
after a one-character change of the trainer's source.

Four sweeps, one after the other, into one fresh storage, each a whole process as a user runs it
(``python -m lmtune.sweep sweeps/memory_frontier.py --smoke``, W&B off):

  first       the demo: every trial trains (the baseline)
  again       the same command: target 0 trials trained, the same frontier and recommendation
  one more    the smoke grid with one micro-batch added where the first run's frontier has a gap (between a line's
              largest feasible and smallest OOM micro-batch): only what the new point needs trains
  code edit   the demo with lmtune's trainer changed by one character (a copy of the package): every trial trains

Prints trials trained and reused, wall-clock and its ratio to the first run, and writes benchmarks/results/reuse.md
with the machine, date and commit.

    python benchmarks/reuse.py [--no-write]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "memory_frontier.py"


def sweep(storage: Path, sweep_file: Path, pythonpath: Path) -> dict:
    """One sweep as a user runs it; its trials, what it recommended, its wall-clock."""
    before = set(storage.glob("*-memory-frontier-*"))
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmtune.sweep", str(sweep_file), "--smoke", "--no-wandb",
                           "--storage", str(storage)], env=env, capture_output=True, text=True, cwd=storage.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{sweep_file.name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (run,) = set(storage.glob("*-memory-frontier-*")) - before
    with open(run / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    frontier = json.loads((run / "frontier.json").read_text())
    recommended = {k: v for k, v in (frontier.get("recommended") or {}).items()
                   if k not in ("trial_id", "source")}  # a reused trial has a new id and says it was reused
    return {"trained": sum(r["source"] == "run" for r in rows), "reused": sum(r["source"] == "reused" for r in rows),
            "rows": len(rows), "wall_s": wall, "recommended": recommended,
            "frontier": {json.dumps(t["line"], sort_keys=True): (t["largest_feasible"], t["smallest_oom"])
                         for t in frontier["tables"]}}


def a_gap(frontier: dict) -> int:
    """A micro-batch between a line's largest feasible and smallest OOM one, not in the grid: a point the planner
    must run to place that line's frontier again."""
    for feasible, oom in frontier.values():
        if feasible is not None and oom is not None and oom - feasible > 1:
            return (feasible + oom) // 2
    sys.exit(f"no line of the first run has a gap to fill: {frontier}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/reuse.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        storage = tmp / "results"
        storage.mkdir()
        one_more = tmp / "memory_frontier.py"
        edited = tmp / "edited"
        shutil.copytree(REPO / "lmtune", edited / "lmtune", ignore=shutil.ignore_patterns("__pycache__"))
        trainer = edited / "lmtune" / "training" / "trainer.py"
        trainer.write_text(trainer.read_text() + "#")
        runs = {}
        for name, sweep_file, path in (("first", DEMO, REPO), ("again", DEMO, REPO), ("one more", one_more, REPO),
                                       ("code edit", DEMO, edited)):
            if name == "one more":
                smoke = "grid([8, 16, 32, 64, 96, 128])"
                added = a_gap(runs["first"]["frontier"])
                grid = sorted([8, 16, 32, 64, 96, 128, added])
                one_more.write_text(DEMO.read_text().replace(smoke, f"grid({grid})"))
                print(f"one more: micro-batch {added} added to the smoke grid", flush=True)
            runs[name] = sweep(storage, sweep_file, path)
            if name == "one more":
                runs[name]["added"] = added
            r = runs[name]
            print(f"{name:<10} trained {r['trained']:>2}  reused {r['reused']:>2}  rows {r['rows']:>2}  "
                  f"{r['wall_s']:6.1f} s  ({r['wall_s'] / runs['first']['wall_s']:.2f}x the first)", flush=True)
    same = (runs["again"]["recommended"] == runs["first"]["recommended"]
            and runs["again"]["frontier"] == runs["first"]["frontier"])
    print(f"again: the same frontier and recommendation: {same}")
    if not same:
        for name in ("first", "again"):
            print(f"  {name}: frontier {runs[name]['frontier']}, recommended {runs[name]['recommended']}")
    if not args.no_write:
        write(runs, same)
    return 0 if same and runs["again"]["trained"] == 0 else 1


def write(runs: dict, same: bool) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    lines = [f"# Trial reuse ({time.strftime('%Y-%m-%d')}, commit {commit}, {platform.node()}: {os.cpu_count()} CPUs, "
             f"{platform.python_version()})", "", "`python benchmarks/reuse.py`: the smoke memory frontier four times "
             "into one storage.", "", "| run | trained | reused | rows | wall-clock | vs first |", "|---|---|---|---|---|---|"]
    first = runs["first"]["wall_s"]
    lines += [f"| {n} | {r['trained']} | {r['reused']} | {r['rows']} | {r['wall_s']:.1f} s | {r['wall_s'] / first:.2f}x |"
              for n, r in runs.items()]
    lines += ["", f"One more: micro-batch {runs['one more']['added']} added to the smoke grid (a gap in the first run's "
              f"frontier).", f"The second run's frontier and recommendation equal the first's: {same}."]
    out = REPO / "benchmarks" / "results" / "reuse.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    sys.exit(main())
