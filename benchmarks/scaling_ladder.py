"""The scaling ladder on real text: fit how loss, model size and tokens scale with compute from small runs, predict a
run at three times the largest budget, and train it to see whether its loss lands inside the predicted interval.

1. ``python -m lmtune.sweep sweeps/isoflop_cpu.py`` on WikiText-2 (``../shared/data/wikitext-2``: valid and test
   as the training files, validation held out by hash), byte-level models 2 layers deep, 24-128 wide under μP,
   budgets 2e11, 6e11 and 1.8e12 FLOPs: 18 runs;
2. the fit the sweep's report shows (Chinchilla's approach 2: each budget's minimum → N*(C), D*(C), L*(C) as power
   laws; approach 3: L(N, D) = E + A/N^α + B/D^β; 90% bootstrap intervals), read from its summary.md;
3. ``python -m lmtune.export RESULTS --for-compute 5.4e12 --verify``: the predicted run at 3× the largest budget,
   trained on this machine, its val_loss against the predicted 90% interval (the baseline: the prediction).

Writes benchmarks/results/scaling_ladder.md with the machine, date and commit.

    python benchmarks/scaling_ladder.py [--data DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LADDER = REPO / "sweeps" / "isoflop_cpu.py"
TARGET = 3 * 1.8e12


def run(args: list[str], cwd: Path) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:2])}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikitext-2",
                    help="a directory with WikiText-2's valid.txt and test.txt")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/scaling_ladder.md")
    args = ap.parse_args()
    files = [args.data / "valid.txt", args.data / "test.txt"]
    if not all(f.is_file() for f in files):
        sys.exit(f"no WikiText-2 at {args.data} (valid.txt, test.txt); pass --data DIR")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out, sweep_s = run(["lmtune.sweep", str(LADDER), "data.dataset=files", "data.files=" + ",".join(map(str, files)),
                            "--no-wandb", "--no-dashboard", "--storage", str(tmp / "results")], tmp)
        (results,) = [p for p in (tmp / "results").iterdir() if p.is_dir()]
        summary = (results / "summary.md").read_text()
        fit = [line for line in out.splitlines() if line.startswith("scaling")]
        print("\n".join(fit), flush=True)
        exported, verify_s = run(["lmtune.export", str(results), "--for-compute", f"{TARGET:g}", "--verify", "--force",
                                  "--to", str(tmp / "locked.toml")], tmp)
        verdict = next(line for line in exported.splitlines() if line.startswith("verify:"))
        print(verdict)
        section = summary[summary.find("## Scaling"):] if "## Scaling" in summary else summary
    inside = " inside the interval" in verdict
    print(f"sweep {sweep_s:.0f} s, verification {verify_s:.0f} s; the run at 3x the largest budget landed "
          f"{'inside' if inside else 'OUTSIDE'} its predicted 90% interval")
    if not args.no_write:
        write(fit, verdict, section, sweep_s, verify_s)
    return 0


def write(fit: list[str], verdict: str, section: str, sweep_s: float, verify_s: float) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    lines = [f"# The scaling ladder on WikiText-2 ({time.strftime('%Y-%m-%d')}, commit {commit}, {platform.node()}: "
             f"{os.cpu_count()} CPUs)", "", "`python benchmarks/scaling_ladder.py`: `sweeps/isoflop_cpu.py` (18 runs, "
             f"{sweep_s:.0f} s), then `export --for-compute {TARGET:g} --verify` ({verify_s:.0f} s).", "",
             "The sweep's console:", "", *[f"    {line}" for line in fit], "", "The verification:", "",
             f"    {verdict}", "", re.sub(r"\n{3,}", "\n\n", section.strip())]
    out = REPO / "benchmarks" / "results" / "scaling_ladder.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    sys.exit(main())
