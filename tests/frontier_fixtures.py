"""Results directories in the layout of docs/CONTRACTS.md, for the report and export tests.

The sweep runner writes the real ones; these are built from simulated trials (through the real planner
for the frontier) so that tests of lmtune.results (tables, report, export) run in milliseconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lmtune.sweep.plan import FrontierPlan, simulate
from lmtune.sweep.spec import Frontier, Grid

X, B = "train.micro_batch_size", "train.ac_budget"
METRIC_COLUMNS = ["val_loss", "val_ppl", "loss", "tokens", "tokens_per_s", "avg_step_time_ms", "wall_clock_s",
                  "device_hours", "peak_reserved_gib", "peak_allocated_gib", "grad_norm_spread", "grad_coherence", "noise_scale", "mfu"]


def write_results_dir(root: Path, sweep: dict[str, Any], rows: list[dict[str, Any]],
                      metrics: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """sweep.json, trials.csv (CONTRACTS column order) and trials/{id}/metrics.jsonl + summary.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(sweep, indent=2))
    space = list(sweep.get("space") or {})
    columns = ["trial_id", "status", "source", *space, *METRIC_COLUMNS, "predicted_peak_gib", "wall_time_s", "error"]
    with open(root / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    for r in rows:
        if r.get("source", "run") != "run":
            continue
        tdir = root / "trials" / r["trial_id"]
        tdir.mkdir(parents=True, exist_ok=True)
        reports = (metrics or {}).get(r["trial_id"]) or [{k: v for k, v in r.items() if k not in space}]
        (tdir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in reports))
        summary = {**reports[-1], "status": r["status"], "config": {**sweep.get("base", {}), **{k: r[k] for k in space}}}
        (tdir / "summary.json").write_text(json.dumps(summary))
    return root


def frontier_sweep_json(xs, budgets, *, limit: float | None = 20.0, device: float | None = None,
                        headroom: float = 4.0, margin: float = 0.5, export=(X, B), smoke: bool = True) -> dict[str, Any]:
    return {
        "name": "memory-frontier", "group": "1-memory-frontier-20260101-000000-000000", "file": "sweeps/memory_frontier.py",
        "smoke": smoke, "metric": "tokens_per_s", "mode": "max", "searcher": "frontier", "export": list(export),
        "frontier": {"x": X, "budget": B, "headroom_gib": headroom, "margin_gib": margin},
        "memory_limit_gib": limit or 0.0, "device_memory_gib": device, "device_name": "simulated",
        "base": {"model.n_layer": 2, "train.steps": 20, "train.compile": True},
        "space": {X: {"type": "grid", "values": list(xs)}, B: {"type": "grid", "values": list(budgets)}},
        "created": "2026-01-01T00:00:00", "lmtune_version": "0.1.0",
    }


SLOPES = {0.25: 0.3, 0.5: 0.5, 1.0: 0.9}  # peak = 1 + slope·mb GiB, OOM above 20 GiB


def simulated_trial(cfg: dict[str, Any], limit: float = 20.0) -> dict[str, Any]:
    mb, b = cfg[X], cfg[B]
    peak = 1.0 + SLOPES[b] * mb
    if peak > limit:
        return {"status": "oom", "peak_reserved_gib": limit}
    tps = 1000.0 * (1 - 0.3 * (1 - b)) * mb / (mb + 8)
    return {"status": "ok", "peak_reserved_gib": peak, "tokens_per_s": tps, "avg_step_time_ms": 1000 * mb * 32 / tps,
            "wall_clock_s": 5.0 + mb / 10, "device_hours": (5.0 + mb / 10) / 3600, "tokens": 20 * mb * 32}


def frontier_results(root: Path, xs=tuple(range(1, 41)), budgets=(0.25, 0.5, 1.0), *, measure=None,
                     verify_predicted: bool = True, **sweep_kw) -> tuple[Path, FrontierPlan]:
    """A frontier sweep run by the real planner on simulated memory (``measure``, default
    :func:`simulated_trial`): rows of every source."""
    sweep = frontier_sweep_json(xs, budgets, **sweep_kw)
    spec = sweep["frontier"]
    spec["verify_predicted"] = verify_predicted
    plan = FrontierPlan.from_space({X: Grid(tuple(xs)), B: Grid(tuple(budgets))},
                                   Frontier(headroom_gib=spec["headroom_gib"], margin_gib=spec["margin_gib"],
                                            verify_predicted=verify_predicted),
                                   limit_gib=sweep["memory_limit_gib"] or sweep["device_memory_gib"])
    launched = simulate(plan, measure or simulated_trial)
    predicted = plan.launch_predictions()
    rows = [{"trial_id": t["trial_id"], "source": "run", **t["config"], **t["result"],
             "predicted_peak_gib": predicted[t["trial_id"]]} for t in launched]
    metrics = {r["trial_id"]: [
        {"step": s, "tokens": s * r[X] * 32, "loss": 4.0 - 0.1 * s, "status": "running"} for s in (5, 10, 15)
    ] + [{"step": 20, "tokens": 20 * r[X] * 32, "loss": 2.5, "val_loss": 2.6, **{k: r[k] for k in r if k in METRIC_COLUMNS},
          "status": r["status"]}] for r in rows}
    return write_results_dir(root, sweep, rows + plan.implied_rows(), metrics), plan


def norm_results(root: Path) -> Path:
    """A norm placement × warmup sweep: per-layer gradient norms in metrics.jsonl, one diverged trial whose last
    val_loss (2.9, before it diverged) beats every ok trial's: a winner must be an ok trial."""
    sweep = {
        "name": "norm-warmup", "group": "2-norm-warmup-20260101-000000-000000", "metric": "val_loss", "mode": "min",
        "searcher": "grid", "export": ["model.norm_placement", "train.warmup_steps"], "frontier": None,
        "memory_limit_gib": 0.0, "base": {"model.n_layer": 4},
        "space": {"model.norm_placement": {"type": "grid", "values": ["pre", "post"]},
                  "train.warmup_steps": {"type": "grid", "values": [0, 100]}},
    }
    rows, metrics = [], {}
    for i, (norm, warm, val, status) in enumerate([("pre", 0, 3.1, "ok"), ("pre", 100, 3.2, "ok"),
                                                   ("post", 0, 2.9, "diverged"), ("post", 100, 3.4, "ok")]):
        tid = f"t{i}"
        spread = 0.5 if norm == "pre" else 10.0
        layers = {f"grad_norm/layer_{j}": (10 ** (-spread * j / 3)) for j in range(4)}
        rows.append({"trial_id": tid, "status": status, "source": "run", "model.norm_placement": norm,
                     "train.warmup_steps": warm, "val_loss": val, "loss": float("nan") if status == "diverged" else val,
                     "grad_norm_spread": spread})
        metrics[tid] = [{"step": s, "tokens": s * 1024, "loss": 5 - s / 100, **layers, "status": "running"} for s in (100, 200)]
        metrics[tid].append({"step": 300, "tokens": 300 * 1024, "val_loss": val, **layers, "status": status,
                             "grad_norm_spread": spread})
    return write_results_dir(root, sweep, rows, metrics)


def batch_results(root: Path) -> Path:
    """A batch × LR-scaling sweep with validation curves of different lengths (for val loss at equal tokens)."""
    sweep = {
        "name": "batch-lr", "group": "3-batch-lr-20260101-000000-000000", "metric": "val_loss", "mode": "min",
        "searcher": "grid", "export": ["train.accumulation_steps"], "frontier": None, "memory_limit_gib": 0.0,
        "base": {}, "space": {"train.accumulation_steps": {"type": "grid", "values": [1, 4]},
                              "train.lr_scaling": {"type": "grid", "values": ["linear"]}},
    }
    rows = [
        {"trial_id": "a1", "status": "ok", "source": "run", "train.accumulation_steps": 1, "train.lr_scaling": "linear",
         "val_loss": 3.0, "grad_coherence": 0.999, "noise_scale": 1234.0},
        {"trial_id": "a4", "status": "ok", "source": "run", "train.accumulation_steps": 4, "train.lr_scaling": "linear",
         "val_loss": 2.9, "grad_coherence": 0.998, "noise_scale": 2345.0},
    ]
    metrics = {  # a1 reaches 1000 tokens, a4 4000: equal tokens = 1000
        "a1": [{"tokens": 500, "val_loss": 4.0}, {"tokens": 1000, "val_loss": 3.0}],
        "a4": [{"tokens": 0, "val_loss": 5.0}, {"tokens": 2000, "val_loss": 3.0}, {"tokens": 4000, "val_loss": 2.9}],
    }
    return write_results_dir(root, sweep, rows, metrics)


def pareto_results(root: Path) -> Path:
    """A sweep with two metrics (val_loss min, tokens_per_s max): a front of three, one dominated, one oom."""
    sweep = {
        "name": "pareto", "group": "4-pareto-20260101-000000-000000", "metric": ["val_loss", "tokens_per_s"],
        "mode": ["min", "max"], "searcher": "nsga2", "export": ["train.lr"], "frontier": None,
        "memory_limit_gib": 0.0, "base": {"train.lr": 6e-4},
        "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
    }
    points = [("a", 3.0, 1000.0, "ok"), ("b", 3.2, 2000.0, "ok"), ("c", 3.5, 3000.0, "ok"),
              ("d", 3.3, 1500.0, "ok"), ("e", None, None, "oom")]
    rows = [{"trial_id": tid, "status": status, "source": "run", "train.lr": 1e-3 * (i + 1), "val_loss": val,
             "tokens_per_s": tps} for i, (tid, val, tps, status) in enumerate(points)]
    return write_results_dir(root, sweep, rows)
