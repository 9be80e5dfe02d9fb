"""Benchmark: the frontier planner against running the full grid, on a simulated A100.

    python benchmarks/frontier_search.py [--out benchmarks/results/frontier_search.md]

Acceptance (issue 4): on the smoke grid of sweeps/memory_frontier.py and on a larger grid, the planner
finds the same frontier as the full grid (same largest feasible micro-batch per AC budget, same
recommended operating point) with at most 50% of the grid's trials. Both sides go through the same
tables code (lmtune.results.kinds.frontier.analyze_frontier); the baseline is the full grid measured in the same run.

The memory model is calibrated to the phase-0 study's A100 40GB measurements (docs/phase0.md, GPT-2 small,
seq_len 1024): no AC 22.5 GiB at mb 16, 38.1 at 28, 38.95 at 30, OOM at 32; budget 0.75 34.2 at 32,
OOM at 40; 0.38 30.2 at 32; 0.12 25.7 at 32. Activation memory is linear in the micro-batch, so the
caching allocator's demand is ``r0 + slope·mb``; near the device's capacity the allocator frees cached
blocks and retries instead of growing, so ``peak_reserved`` plateaus (the phase-0 study's 38.1 → 38.95 from mb 28
to 30) and the OOM comes only when the demand exceeds it by the freed cache (here 41.5 GiB of demand).
That plateau is what makes a linear prediction pessimistic near the limit; the margin must cover it.
Throughput: ``P·eff(budget)·mb/(mb+16)`` (utilisation saturating in the micro-batch, recomputation
costing up to 30% at budget 0), 10% slower on the plateau (allocator retries).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmtune.results.format import markdown_table  # noqa: E402
from lmtune.results.kinds.frontier import analyze_frontier  # noqa: E402
from lmtune.sweep.plan import FrontierPlan, simulate  # noqa: E402
from lmtune.sweep.spec import Frontier, Grid  # noqa: E402

X, BUDGET = "train.micro_batch_size", "train.ac_budget"
DEVICE_GIB = 40.0  # A100 40GB
PLATEAU_GIB = 38.95  # the highest peak_reserved the phase-0 study saw (no AC, mb 30)
OOM_DEMAND_GIB = 41.5
HEADROOM_GIB = 5.5  # the phase-0 study's "6 GiB headroom" was 40 − 34.2 = 5.8 rounded; 5.5 keeps its point eligible
# (r0, slope) of the allocator's demand per budget, through the phase-0 study's points
DEMAND = {1.0: (1.7, 1.3), 0.75: (2.0, (34.2 - 2.0) / 32), 0.38: (2.0, (30.2 - 2.0) / 32), 0.12: (2.0, (25.7 - 2.0) / 32)}
PEAK_TOKENS_PER_S = 150_000.0
SEQ_LEN = 1024
STEPS = 200

SEED_GRID = {X: [8, 16, 24, 28, 30, 32, 40, 48], BUDGET: [0.12, 0.38, 0.75, 1.0]}
LARGE_GRID = {X: list(range(1, 65)), BUDGET: [0.12, 0.38, 0.75, 1.0]}


def a100(config: dict[str, Any]) -> dict[str, Any]:
    """One simulated trial: the trainer's final result for this (micro-batch, budget)."""
    mb, budget = config[X], config[BUDGET]
    r0, slope = DEMAND[budget]
    noise = random.Random(f"{budget}-{mb}").gauss(0.0, 0.08)  # run-to-run jitter of reserved memory
    demand = r0 + slope * mb + noise
    if demand > OOM_DEMAND_GIB:
        return {"status": "oom", "peak_reserved_gib": PLATEAU_GIB}
    tps = PEAK_TOKENS_PER_S * (1 - 0.3 * (1 - budget)) * mb / (mb + 16)
    if demand > PLATEAU_GIB:
        tps *= 0.9
    step_ms = 1000 * mb * SEQ_LEN / tps
    return {"status": "ok", "peak_reserved_gib": min(demand, PLATEAU_GIB), "tokens_per_s": tps,
            "avg_step_time_ms": step_ms, "wall_clock_s": 60 + STEPS * step_ms / 1000}


def full_grid_rows(grid: dict[str, list]) -> list[dict[str, Any]]:
    rows = []
    for b in grid[BUDGET]:
        for mb in grid[X]:
            cfg = {BUDGET: b, X: mb}
            rows.append({"trial_id": f"grid-{len(rows) + 1:03d}", "source": "run", **cfg, **a100(cfg)})
    return rows


def planner_rows(grid: dict[str, list], *, concurrency: int, margin_gib: float, **options: Any):
    frontier = Frontier(x=X, budget=BUDGET, headroom_gib=HEADROOM_GIB, margin_gib=margin_gib)
    plan = FrontierPlan.from_space({k: Grid(tuple(v)) for k, v in grid.items()}, frontier,
                                   limit_gib=DEVICE_GIB, **options)
    launched = simulate(plan, a100, concurrency=concurrency)
    predicted = plan.launch_predictions()
    rows = [{"trial_id": t["trial_id"], "source": "run", **t["config"], **t["result"],
             "predicted_peak_gib": predicted[t["trial_id"]]} for t in launched]
    return rows + plan.implied_rows(), plan


def outcome(rows: list[dict[str, Any]]) -> tuple[dict, Any, Any]:
    rep = analyze_frontier(rows, x=X, line_keys=[BUDGET], limit_gib=DEVICE_GIB, headroom_gib=HEADROOM_GIB,
                           limit_source="A100 40GB")
    largest = {t.line[BUDGET]: t.largest_feasible for t in rep.tables}
    rec = (rep.recommended["line"][BUDGET], rep.recommended[X]) if rep.recommended else None
    return largest, rec, rep


def smoke_grid() -> tuple[dict[str, list] | None, str]:
    """The smoke grid of sweeps/memory_frontier.py, rescaled onto the A100 model (None if the file is absent)."""
    path = ROOT / "sweeps" / "memory_frontier.py"
    if not path.is_file():
        return None, "sweeps/memory_frontier.py does not exist yet"
    spec = importlib.util.spec_from_file_location("memory_frontier", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sweep = mod.sweep
    space = {**sweep.space, **sweep.smoke.space}
    fx = (sweep.frontier.x if sweep.frontier else X)
    fb = (sweep.frontier.budget if sweep.frontier else BUDGET)
    xs = list(space[fx].values)
    budgets = list(space[fb].values) if fb in space else [1.0]
    # The CPU smoke model is tiny; map its micro-batches onto the A100's range (largest → mb 48) and its
    # budgets onto the calibrated ones (nearest), so the simulated limit falls inside the grid as it does
    # with the smoke sweep's emulated limit.
    scale = 48 / max(xs)
    mapped_x = sorted({max(1, round(x * scale)) for x in xs})
    mapped_b = sorted({min(DEMAND, key=lambda c: abs(c - b)) for b in budgets})
    note = (f"{fx} {xs} × {fb} {budgets} from the file, mapped onto the A100 model as {X} {mapped_x} × "
            f"{BUDGET} {mapped_b}")
    return {X: mapped_x, BUDGET: mapped_b}, note


def run_case(name: str, grid: dict[str, list], lines: list[str], checks: list[bool]) -> None:
    size = len(grid[X]) * len(grid[BUDGET])
    full_largest, full_rec, full_rep = outcome(full_grid_rows(grid))
    lines += [f"### {name}: {len(grid[X])} micro-batches × {len(grid[BUDGET])} budgets = {size} grid points", ""]
    lines += [f"Full grid: largest feasible per budget {full_largest}; recommended {full_rec}.", "",
              f"> {full_rep.statement}", ""]
    table, misses = [], []
    print(f"\n{name}: grid {size}; full grid: largest feasible {full_largest}, recommended {full_rec}")
    variants = [
        ("planner, Frontier() default margin (5% of the limit = 2.0 GiB)", dict(margin_gib=None), True, (1, 2, 4)),
        ("planner, fixed margin 0.5 GiB (too small near capacity)", dict(margin_gib=0.5), False, (1, 2, 4)),
        ("plain bisection (no prediction)", dict(margin_gib=2.0, predict=False), False, (1,)),
        ("no throughput confirmation", dict(margin_gib=2.0, confirm_throughput=False), False, (1,)),
    ]
    for label, opts, is_acceptance, concurrencies in variants:
        for conc in concurrencies:
            t0 = time.perf_counter()
            rows, plan = planner_rows(grid, concurrency=conc, **opts)
            ms = 1000 * (time.perf_counter() - t0)
            largest, rec, rep = outcome(rows)
            same = largest == full_largest and rec == full_rec
            ratio = plan.trials_run() / size
            errs = [abs(t.prediction["max_abs_error_gib"]) for t in rep.tables if t.prediction]
            table.append([label, conc, plan.trials_run(), size, f"{ratio:.0%}", "yes" if same else "**no**",
                          f"{max(errs):.2f}" if errs else "—", f"{ms:.0f}"])
            print(f"  {label:<45} concurrency {conc}: {plan.trials_run():3d} trials of {size} ({ratio:.0%}); "
                  f"same frontier and recommendation: {same}" + ("" if same else f" (largest {largest}, rec {rec})"))
            if is_acceptance:
                checks.append(same and ratio <= 0.5)
            if not same:
                misses.append(f"{label}, concurrency {conc}: largest feasible {largest}, recommended {rec}")
    lines += [markdown_table(["planner", "concurrency", "trials run", "grid", "ratio", "same frontier + recommendation",
                              "max abs prediction error (GiB)", "planning ms"], table), ""]
    if misses:
        lines += ["Runs that missed the full grid's answer: " + "; ".join(misses) + ". A point skipped by "
                  "prediction was feasible: near the device's capacity the caching allocator's peak_reserved "
                  "plateaus (the phase-0 study's no-AC 38.1 → 38.95 GiB from mb 28 to 30), so a line through the lower "
                  "points over-predicts by up to ~1.8 GiB there; margin_gib has to cover that (≈5% of a GPU).", ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "frontier_search.md"))
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Frontier search: planner vs full grid (simulated A100 40GB)", "",
        f"Machine: {platform.node()} ({platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}). Date: {datetime.date.today().isoformat()}. Commit: {commit or 'unknown'} "
        f"(plus the uncommitted working tree).", "",
        "Command: `python benchmarks/frontier_search.py`. Memory and throughput are simulated (see the module "
        "docstring): calibrated to the phase-0 study's A100 numbers, limit = 40 GiB device memory, headroom 5.5 GiB. "
        "Baseline: every grid point run, through the same table code. Acceptance: same largest feasible "
        "micro-batch per budget and same recommended point with ≤ 50% of the grid's trials (first row group).", "",
    ]
    checks: list[bool] = []
    smoke, note = smoke_grid()
    cases = [("seed A100 grid", SEED_GRID), ("large grid", LARGE_GRID)]
    if smoke is not None:
        cases.insert(0, ("smoke grid of sweeps/memory_frontier.py", smoke))
        lines += [f"Smoke grid: {note}.", ""]
    else:
        lines += [f"Smoke grid: not run ({note}); the phase-0 study's A100 grid stands in for it.", ""]
    for name, grid in cases:
        run_case(name, grid, lines, checks)
    verdict = "PASS" if all(checks) else "FAIL"
    lines += [f"Acceptance: **{verdict}** ({sum(checks)}/{len(checks)} planner runs found the full grid's frontier "
              f"and recommendation with ≤ 50% of its trials).", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"\nacceptance: {verdict}; written {args.out}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
