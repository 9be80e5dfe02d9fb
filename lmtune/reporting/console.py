"""What a sweep prints on the console: what each trial asks for, and at the end the table of trials, the best
one (or the Pareto front, or the frontier's statement), what it cost and where to look next."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from lmtune.contract import STUDY_DB
from lmtune.results.format import fmt, table
from lmtune.results.kinds import applicable, studied
from lmtune.results.kinds.frontier import frontier_report
from lmtune.results.kinds.pareto import pareto_front
from lmtune.results.kinds.trials import best_trial, cost_text
from lmtune.results.layout import measured
from lmtune.results.read import Results, load_results


def request_text(cpus: float, gpus: float, workers: int) -> str:
    """What each trial asks Ray for: ``1 CPU + 1 GPU``, or ``2 workers × (1 CPU)`` for a Ray Train trial."""
    per = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    return f"{workers} workers × ({per})" if workers > 1 else per


def resources_text(*, cpus: float, gpus: float, workers: int, asked: float | str, device: str) -> str:
    """What each trial asks Ray for (``asked``: the sweep's ``gpus`` before "auto" was resolved), and why."""
    per_trial = request_text(cpus, gpus, workers)
    if asked == "auto":
        why = ("gpus='auto': the cluster has GPUs" if gpus else
               "gpus='auto': the trials train on the CPU (system.device='cpu')" if device == "cpu"
               else "gpus='auto': the cluster has no GPU")
    else:
        why = f"gpus={asked:g}"
    return f"{per_trial} each ({why}; --gpus/--cpus change it)"


def trial_text(base: dict[str, Any], swept: Sequence[str] = ()) -> str:
    """What each trial trains (the resolved base config; a key the space sweeps says so): said before the first
    trial starts, so that a run's size is never a surprise (a --smoke that shrank nothing showed GPT-2 small only
    in the trial's own logs)."""
    def v(key: str) -> str:
        return "swept" if key in swept else str(base.get(key))

    if base.get("train.flops") or "train.flops" in swept:  # the trainer's order: FLOPs, then tokens, epochs, steps
        length = f"{v('train.flops') if 'train.flops' in swept else format(base['train.flops'], '.3g')} FLOPs"
    elif base.get("train.tokens") or "train.tokens" in swept:
        length = f"{v('train.tokens')} tokens"
    elif base.get("train.epochs") or "train.epochs" in swept:
        length = f"{v('train.epochs')} epochs"
    else:
        length = f"{v('train.steps')} steps"
    return (f"{v('model.n_layer')} layers × {v('model.n_embd')} wide ({v('model.n_head')} heads), seq "
            f"{v('data.seq_len')}, {v('data.tokenizer')} tokens of {v('data.dataset')}, {length}, micro-batch "
            f"{v('train.micro_batch_size')}, {v('train.dtype')} "
            f"{'compiled' if base.get('train.compile') else 'eager'}{' (swept)' if 'train.compile' in swept else ''}, "
            f"device {v('system.device')}")


def print_summary(results_dir: Path, rows: list[dict[str, Any]], out: TextIO, *, metrics: Sequence[str],
                  modes: Sequence[str], space_keys: Sequence[str], searcher: str, frontier: Any,
                  tune_dir: str) -> dict[str, Any] | None:
    """The end of a sweep on the console; returns the best trial (None for a Pareto or frontier sweep)."""
    results = load_results(results_dir)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    metric = metrics[0]
    sign = 1 if modes[0] == "min" else -1

    def key(r):
        v = r.get(metric)
        ok = isinstance(v, (int, float)) and math.isfinite(v) and r.get("status") == "ok"
        return (not ok, sign * v if ok else 0.0)

    shown = ["trial_id", "status", *space_keys, *metrics]
    for extra in (*studied(_over(results, space_keys)), "tokens", "peak_reserved_gib", "wall_time_s"):
        if extra not in shown:
            shown.append(extra)
    print("", file=out)
    if rows:
        print(table(sorted(rows, key=key), shown), file=out)
        print("", file=out)
        print(f"{len(rows)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=out)
    else:
        print("no trial has finished", file=out)
    best = None
    if len(metrics) > 1:
        objectives = ", ".join(f"{m} {mode}" for m, mode in zip(metrics, modes))
        print(f"pareto front ({objectives}): " + ("; ".join(
            f"{r['trial_id']} (" + ", ".join(f"{m}={fmt(r.get(m), m)}" for m in metrics) + ")"
            for r in pareto_front(results)) or "no ok trial"), file=out)
    elif frontier is not None and searcher == "frontier":
        rep = frontier_report(results)
        print(rep.statement if rep is not None else "no frontier", file=out)
    else:
        best = best_trial(results)
        if best is not None:
            point = ", ".join(f"{k}={best.get(k)}" for k in space_keys)
            print(f"best: {best['trial_id']}  {metric}={fmt(best.get(metric), metric)}  ({point})", file=out)
        else:
            print(f"best: none (no trial finished ok with {metric})", file=out)
    for kind in applicable(results):
        for line in kind.console(results):
            print(line, file=out)
    learned = oom_by_half_text(rows) if searcher in ("tpe", "nsga2") else None
    if learned:
        print(learned, file=out)
    spent = cost_text(results)
    if spent:
        print(spent, file=out)
    print(f"results: {results_dir}", file=out)
    viewers = [f"TensorBoard: {_command('tensorboard')} --logdir {tune_dir}"]
    if searcher != "frontier":  # the frontier planner keeps no Optuna study
        viewers.insert(0, f"optuna.db: {_command('optuna-dashboard')} sqlite:///{results_dir / STUDY_DB}")
    print("  trials.csv, trials/<id>/; " + "; ".join(viewers), file=out)
    return best


def _over(results: Results, space_keys: Sequence[str]) -> Results:
    """``results`` as a sweep over ``space_keys``: the runner's, define-by-run keys too (sweep.json has only the
    space's), so that the console's kinds see every key its table shows."""
    space = results.sweep.get("space") or {}
    return dataclasses.replace(results, sweep={**results.sweep, "space": {k: space.get(k, {}) for k in space_keys}})


def oom_by_half(rows: list[dict[str, Any]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((OOMs, trials) of the first half, (OOMs, trials) of the second) of the trials that ran, in the order of
    ``rows`` (trials.csv: the order they finished in): whether the searcher learned where memory runs out."""
    ran = [r for r in rows if measured(r)]
    first, second = ran[: len(ran) // 2], ran[len(ran) // 2:]
    return tuple((sum(r.get("status") == "oom" for r in half), len(half)) for half in (first, second))


def oom_by_half_text(rows: list[dict[str, Any]]) -> str | None:
    """The console's sentence for :func:`oom_by_half`; None without an OOM."""
    (a, n), (b, m) = oom_by_half(rows)
    if not a + b:
        return None
    return (f"out of memory: {a} of the first {n} trials to finish, {b} of the last {m} (an OOM is a memory "
            "constraint the searcher learns, optuna.db: constraints)")


def _command(script: str) -> str:
    """How to run one of lmtune's viewers from here: its name when it is on PATH, else its path next to this
    Python (a virtual environment that is not activated)."""
    if shutil.which(script):
        return script
    beside = Path(sys.executable).parent / script
    return str(beside) if beside.exists() else script


def print_report(results_dir: Path, out: TextIO) -> None:
    """Render the report files (:func:`lmtune.reporting.render.render`) and list them."""
    from lmtune.reporting.render import render  # matplotlib: loaded when a report is drawn

    written = render(results_dir)
    if written:
        print("report: " + ", ".join(str(p.relative_to(results_dir)) for p in written), file=out)
