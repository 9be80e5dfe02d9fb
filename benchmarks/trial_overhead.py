"""Per-trial overhead of the sweep runner: sweep wall-clock minus the time spent inside the trainer.

Issue 3, point 8: a trivial 5-step TorchTrainer run inside a Tune function trial cost ~18-20 s per trial
on 2 CPUs, against ~1 s for a plain function trial. lmtune now runs single-worker trials in the trial
process itself and keeps Ray Train (TorchTrainer, DDP) for multi-worker trials, with Train's health-check
interval at 0.1 s. This benchmark runs the same N trivial trials (5 steps of a tiny model, no W&B, no
checkpoints), one at a time on a fresh embedded Ray per configuration:

  before      every trial through TorchTrainer, Train's default 2 s health-check interval
  train-0.1s  every trial through TorchTrainer, health check 0.1 s
  in-process  the trainer in the trial process (workers=1), a fresh process per trial (lmtune's default
              for sweeps that measure memory: frontier, emulated limit, peak-memory metric)
  after       lmtune's default otherwise: the trainer in the trial process, trial processes reused
  2-workers   lmtune's default for workers=2: TorchTrainer with 2 DDP workers, health check 0.1 s

Per trial i (sequential): overhead_i = (end_i - end_{i-1}) - time_in_trainer_i, with end_{-1} the start of
Tuner.fit (Ray's own start-up is not counted). Prints the median and mean per configuration and the
before/after ratio, and writes benchmarks/results/trial_overhead.md with the machine, date and commit.

    python benchmarks/trial_overhead.py [--trials N] [--only after]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "before": {"ray_train": True, "workers": 1, "health_check_s": "2.0"},
    "train-0.1s": {"ray_train": True, "workers": 1, "health_check_s": "0.1"},
    "in-process": {"ray_train": False, "workers": 1, "health_check_s": "0.1", "reuse_actors": False},
    "after": {"ray_train": False, "workers": 1, "health_check_s": "0.1", "reuse_actors": True},
    "2-workers": {"ray_train": True, "workers": 2, "health_check_s": "0.1"},
}


def measure(name: str, trials: int) -> dict:
    """One configuration, in this process (called in a fresh subprocess per configuration)."""
    c = CONFIGS[name]
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = c["health_check_s"]
    from lmtune.sweep import TINY_CPU, Sweep, grid
    from lmtune.sweep.load import resolve
    from lmtune.sweep.runner import Probe, run

    sweep = Sweep(
        name=f"overhead-{name.replace('.', '')}", workers=c["workers"],
        base={**TINY_CPU, "train.steps": 5, "train.eval_interval": 5, "train.eval_batches": 1,
              "train.log_interval": 5, "train.measure_interval": 0, "train.checkpoint": False},
        space={"train.seed": grid(list(range(trials)))}, metric="val_loss",
    )
    rs = resolve(sweep, __file__)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        probe = Probe(ray_train=c["ray_train"], reuse_actors=c.get("reuse_actors", False))
        out = run(rs, storage=tmp, max_concurrent=1, wandb=False, render=False, out=quiet, probe=probe)
    ends = sorted((t, tid) for tid, t in probe.trial_end.items())
    per_trial, prev = [], probe.fit_start
    for t, tid in ends:
        per_trial.append((t - prev) - probe.time_in_trainer_s.get(tid, 0.0))
        prev = t
    statuses = sorted({r["status"] for r in out.rows})
    return {"name": name, "trials": len(ends), "statuses": statuses, "wall_s": out.wall_s,
            "trainer_s": sum(probe.time_in_trainer_s.values()), "overhead_s": per_trial,
            "median_s": statistics.median(per_trial), "mean_s": statistics.fmean(per_trial)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--only", choices=list(CONFIGS), action="append")
    p.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/trial_overhead.md")
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.trials)), flush=True)
        return 0

    results = {}
    for name in args.only or list(CONFIGS):
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--trials", str(args.trials)],
                              capture_output=True, text=True, env=env, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: benchmark run failed")
        r = json.loads(line[len("RESULT "):])
        results[name] = r
        print(f"{name:<11} {r['trials']} trials {','.join(r['statuses'])}: per-trial overhead median "
              f"{r['median_s']:.2f} s, mean {r['mean_s']:.2f} s (sweep {r['wall_s']:.1f} s, in trainer "
              f"{r['trainer_s']:.1f} s)", flush=True)
    if "before" in results and "after" in results:
        ratio = results["before"]["median_s"] / results["after"]["median_s"]
        print(f"before/after (median per-trial overhead): {ratio:.1f}x; target: after <= 3 s "
              f"({'met' if results['after']['median_s'] <= 3 else 'NOT met'})")
    if not args.no_write and not args.only:
        write_results(results, args.trials)
    return 0


def write_results(results: dict, trials: int) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "lmtune"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    import ray
    import torch

    lines = [
        "# Sweep runner: per-trial overhead",
        "",
        f"`python benchmarks/trial_overhead.py --trials {trials}` — {time.strftime('%Y-%m-%d %H:%M')}, "
        f"commit {commit}{' + uncommitted changes in lmtune/' if dirty else ''}, {platform.machine()} "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.platform()}), Python {platform.python_version()}, "
        f"ray {ray.__version__}, torch {torch.__version__}. The machine is shared; medians are the robust number.",
        "",
        "Overhead per trial = (time between consecutive trial ends) − time inside the trainer (building it to the",
        "end of `fit`), trials run one at a time, Ray start-up excluded. Trivial trials: 5 steps of a 2-layer",
        "64-wide model, no W&B, no checkpoints.",
        "",
        "| configuration | median s/trial | mean s/trial | sweep s | in trainer s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['mean_s']:.2f} | {r['wall_s']:.1f} | {r['trainer_s']:.1f} |")
    if "before" in results and "after" in results:
        ratio = results["before"]["median_s"] / results["after"]["median_s"]
        lines += ["", f"before/after: **{ratio:.1f}×** less overhead per trial (median); target ≤ 3 s per trial: "
                      f"{'met' if results['after']['median_s'] <= 3 else 'not met'}."]
    lines += [
        "",
        "- before: every trial a Ray Train `TorchTrainer` run (controller, worker actor, gloo process group) with",
        "  Train's default 2 s health-check interval.",
        "- train-0.1s: the same with `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1`: faster reports and teardown, but the",
        "  Train controller, worker actor and process-group start remain.",
        "- in-process: the trainer runs in the Tune trial process (`tune.report`, `tune.get_checkpoint`), a fresh",
        "  process per trial: lmtune's default for `workers=1` in sweeps that measure memory.",
        "- after: lmtune's default for other `workers=1` sweeps: in-process and Tune's `reuse_actors` (the trial",
        "  process and its imports are reused; the trainable frees the previous trial's memory first). Its",
        "  time in the trainer is lower too: torch's first-use costs are paid once per process, not per trial.",
        "- 2-workers: lmtune's path for `workers>1`: `TorchTrainer` with 2 DDP workers (gloo), health check 0.1 s.",
        "",
    ]
    (REPO / "benchmarks" / "results" / "trial_overhead.md").write_text("\n".join(lines))
    print(f"wrote {REPO / 'benchmarks' / 'results' / 'trial_overhead.md'}")


if __name__ == "__main__":
    sys.exit(main())
