"""Benchmark: TPE that learns memory as a constraint vs TPE told OOMs as failures, through the real runner.

    python benchmarks/oom_aware_search.py [--seeds 3] [--out benchmarks/results/oom_aware_search.md]

Issue 10: the smoke variant of ``sweeps/width_batch.py`` (width × micro-batch, 24 trials of a CPU-sized model
under an emulated 48 MiB device, about half of the space does not fit) runs through ``lmtune.sweep``'s real
runner (embedded Ray, Tune, Optuna TPE, the trainer and its memory model), one trial at a time so that both
arms see the same sequence of events, once per arm and searcher seed (the same seeds for both arms):

  constraints   lmtune: every trial's peak against the limit recorded with ``Trial.set_constraint``, an OOM
                COMPLETE with a violated constraint and a neutral value; TPE with γ = 1/4 (searchers.tpe_gamma)
  FAIL          the same TPE, an OOM told as FAIL, no constraints (``OptunaKind.learns_memory = False``):
                what the constraints alone change
  before        the baseline, lmtune before (today's behaviour in the issue): Optuna's default TPE (γ = 1/10),
                an OOM told as FAIL; TPE leaves FAIL trials out of its model

The two baseline arms are searcher kinds of this file's own (:class:`FailTpe`, :class:`DefaultTpe`), registered
with ``lmtune.sweep.searchers`` and named by the sweep as any searcher is.

For each run: the share of trials after the first 8 (TPE's first 10 are random either way) that ran out of
memory, and the best val_loss among the trials that fit. Target (issue 10): the constraints arm's OOM share
≤ 1/3 of the baseline's (pooled over the seeds), its best value no worse (mean over the seeds). The
constraints arm's optuna.db must hold a ``memory_gib`` constraint for every trial that ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILE = ROOT / "sweeps" / "width_batch.py"
ARMS = ("constraints", "FAIL", "before")
BASELINE = "before"
AFTER = 8
TARGET_RATIO = 1 / 3


def register_baselines() -> dict[str, str]:
    """The searcher each arm names: lmtune's TPE, and two kinds of this benchmark's own."""
    from lmtune.sweep.searchers import TpeKind, register

    @register
    class FailTpe(TpeKind):
        """The same TPE, an OOM told as FAIL and no memory constraints."""

        name = "tpe-oom-fails"
        learns_memory = False

    @register
    class DefaultTpe(FailTpe):
        """Optuna's default TPE (γ = 1/10), an OOM told as FAIL."""

        name = "tpe-optuna-defaults"
        options = {}

    return {"constraints": "tpe", "FAIL": FailTpe.name, "before": DefaultTpe.name}


def measure(arm: str, seed: int) -> dict:
    """One run of the sweep (in a fresh process per run: Ray, the ledger and the study start empty)."""
    import optuna

    from lmtune.sweep.load import load_sweep, resolve
    from lmtune.sweep.runner import run
    from lmtune.sweep.search import MEMORY_CONSTRAINT, study_storage

    searcher = register_baselines()[arm]
    sweep, path = load_sweep(SWEEP_FILE)
    rs = resolve(dataclasses.replace(sweep, seed=seed, searcher=searcher), path, smoke=True)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        out = run(rs, storage=tmp, max_concurrent=1, wandb=False, render=False, out=quiet)
        study = optuna.load_study(study_name=rs.name, storage=study_storage(out.results_dir))
        by_id = {t.user_attrs.get("trial_id"): t for t in study.trials}
        rows = sorted(out.rows, key=lambda r: by_id[r["trial_id"]].number)
        constrained = sum(MEMORY_CONSTRAINT in by_id[r["trial_id"]].constraints for r in rows)
    statuses = [r["status"] for r in rows]
    feasible = [r["val_loss"] for r in rows if r["status"] == "ok" and isinstance(r.get("val_loss"), float)]
    return {"arm": arm, "seed": seed, "statuses": statuses, "best": min(feasible) if feasible else None,
            "points": [[r.get("model.n_embd"), r.get("train.micro_batch_size")] for r in rows],
            "constrained": constrained, "wall_s": out.wall_s}


def oom_share(statuses: list[str], start: int = AFTER) -> tuple[int, int]:
    later = statuses[start:]
    return sum(s == "oom" for s in later), len(later)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="searcher seeds per arm (default 3)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "oom_aware_search.md"))
    ap.add_argument("--child", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.child[0], int(args.child[1]))), flush=True)
        return 0

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs: list[dict] = []
    for seed in range(args.seeds):
        for arm in ARMS:
            proc = subprocess.run([sys.executable, __file__, "--child", arm, str(seed)], capture_output=True,
                                  text=True, env=env, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{arm}, seed {seed}: the sweep failed")
            r = json.loads(line[len("RESULT "):])
            runs.append(r)
            k, n = oom_share(r["statuses"])
            print(f"seed {seed} {arm:<11}: {len(r['statuses'])} trials, {r['statuses'].count('oom')} OOM in all, "
                  f"{k}/{n} after the first {AFTER}; best val_loss {r['best']:.4f}; {r['wall_s']:.0f} s", flush=True)

    pooled = {arm: [sum(x) for x in zip(*(oom_share(r["statuses"]) for r in runs if r["arm"] == arm))]
              for arm in ARMS}
    share = {arm: k / n for arm, (k, n) in pooled.items()}
    best = {arm: statistics.fmean(r["best"] for r in runs if r["arm"] == arm) for arm in ARMS}
    ratio = share["constraints"] / share[BASELINE] if share[BASELINE] else float("inf")
    every_trial_constrained = all(r["constrained"] == len(r["statuses"]) for r in runs if r["arm"] == "constraints")
    passed = ratio <= TARGET_RATIO and best["constraints"] <= best[BASELINE] and every_trial_constrained
    verdict = "PASS" if passed else "FAIL"
    print(f"OOM share after the first {AFTER}: " + ", ".join(f"{a} {share[a]:.2f}" for a in ARMS)
          + f" (constraints/{BASELINE} {ratio:.2f}, target ≤ {TARGET_RATIO:.2f}); mean best val_loss "
          + ", ".join(f"{a} {best[a]:.4f}" for a in ARMS)
          + f"; every trial constrained in optuna.db: {every_trial_constrained} -> {verdict}")
    write(Path(args.out), runs, pooled, share, best, ratio, every_trial_constrained, verdict, args.seeds)
    print(f"written {args.out}")
    return 0 if passed else 1


def write(path: Path, runs, pooled, share, best, ratio, constrained, verdict, seeds) -> None:
    import optuna
    import ray
    import torch

    from lmtune.results.format import markdown_table

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "lmtune", "sweeps"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    lines = [
        "# OOM-aware search: memory as a constraint vs OOM as FAIL (TPE, real runner)", "",
        f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}), Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
        f"optuna {optuna.__version__}. Date: {datetime.date.today().isoformat()}. Commit: {commit or 'unknown'}"
        f"{' (plus uncommitted changes in lmtune/ or sweeps/)' if dirty else ''}.", "",
        f"Command: `python benchmarks/oom_aware_search.py --seeds {seeds}`: the smoke variant of "
        "`sweeps/width_batch.py` (model.n_embd ∈ 32…256 × train.micro_batch_size 4…64 log, 24 trials, emulated "
        "0.047 GiB device, one trial at a time), once per arm and searcher seed. The OOM share counts the trials "
        f"after the first {AFTER}; best = the lowest val_loss of a trial that fit.", "",
    ]
    table = []
    for r in runs:
        k, n = oom_share(r["statuses"])
        ooms = "".join("x" if s == "oom" else "." for s in r["statuses"])
        table.append([r["seed"], r["arm"], f"{k}/{n}", f"{r['best']:.4f}", f"`{ooms}`", f"{r['wall_s']:.0f}"])
    lines += [markdown_table(["seed", "arm", f"OOM after {AFTER}", "best val_loss", "trials in order (x = OOM)",
                              "sweep s"], table), ""]
    lines += [f"Pooled OOM share after the first {AFTER}: " + ", ".join(
                  f"{a} **{share[a]:.2f}** ({pooled[a][0]}/{pooled[a][1]})" for a in ARMS)
              + f". constraints / {BASELINE}: **{ratio:.2f}** (target ≤ 0.33); constraints / FAIL (the constraints "
              f"alone, same sampler): {share['constraints'] / share['FAIL'] if share['FAIL'] else float('inf'):.2f}. "
              "Mean best val_loss: " + ", ".join(f"{a} {best[a]:.4f}" for a in ARMS)
              + f" (target: constraints no worse than {BASELINE}). Every trial of the constraints arm has its "
              f"`memory_gib` constraint in optuna.db: {constrained}.", "", f"Verdict: **{verdict}**.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
