"""Summaries of a sweep's trials: ranking, the best trial, the Pareto front, equal-token comparisons, the
phase-0 study's norm × warmup and batch × LR tables (``summary.md``), what the sweep cost, where OOMs fell."""

from __future__ import annotations

from typing import Any, Iterable

from lmtune.contract import TRIALS_TABLE
from lmtune.results.format import fmt, markdown_table, number, short, sort_key, status_label
from lmtune.results.read import Results
from lmtune.results.transfer import is_width_transfer, transfer_markdown

NORM_KEYS = ("model.norm_placement", "model.final_norm", "train.warmup_steps")
BATCH_KEYS = ("train.micro_batch_size", "train.accumulation_steps", "train.lr_scaling", "train.base_batch_tokens")
STUDIED = {"norm": ("grad_norm_spread",), "batch": ("grad_coherence", "noise_scale"), "width": ()}
"""What the phase-0 study's experiments look at besides the metric: the spread of per-layer gradient norms for norm
placement × warmup, gradient coherence and the noise scale for effective batch × LR scaling; a width-transfer
sweep (width × lr, :mod:`lmtune.results.transfer`) looks at where each width's optimum lr lies."""


def experiments(space_keys: Iterable[str], frontier: Any = None) -> list[str]:
    """Which of the phase-0 study's experiments a sweep over ``space_keys`` is (keys of :data:`STUDIED`); a memory
    frontier over micro-batch sizes is not a batch-size experiment."""
    keys = set(space_keys)
    kinds = ["norm"] if keys & set(NORM_KEYS) else []
    kinds += ["batch"] if keys & set(BATCH_KEYS) and not frontier else []
    return kinds + (["width"] if is_width_transfer(keys) else [])


def sorted_by_metric(results: Results) -> list[dict[str, Any]]:
    """Trials best first by the sweep's metric and mode, in three groups: finished (``ok``), then stopped early
    (``pruned``: their value is from fewer tokens, so it does not rank against a finished one), then the rest;
    trials without the metric last in each group."""
    metric, sign = results.metric, (1 if results.mode == "min" else -1)
    group = {"ok": 0, "pruned": 1}
    return sorted(results.rows, key=lambda r: (group.get(r.get("status"), 2), number(r.get(metric)) is None,
                                               sign * (number(r.get(metric)) or 0.0)))


def best_trial(results: Results) -> dict[str, Any] | None:
    """The best ``ok`` trial by the sweep's metric/mode."""
    for r in sorted_by_metric(results):
        if r.get("status") == "ok" and number(r.get(results.metric)) is not None:
            return r
    return None


def pareto_front(results: Results) -> list[dict[str, Any]]:
    """The ``ok`` trials no other ``ok`` trial beats on every objective (and strictly on one), ordered by the
    first objective. For a single-metric sweep that is the best trial (and its ties)."""
    signs = [(m, 1.0 if mode == "min" else -1.0) for m, mode in results.objectives]

    def costs(r: dict[str, Any]) -> tuple[float, ...] | None:
        values = [number(r.get(m)) for m, _ in signs]
        return None if any(v is None for v in values) else tuple(sign * v for (_, sign), v in zip(signs, values))

    ok = [(r, c) for r in results.rows if r.get("status") == "ok" and (c := costs(r)) is not None]
    front = [(r, c) for r, c in ok
             if not any(all(a <= b for a, b in zip(o, c)) and o != c for _, o in ok)]
    return [r for r, _ in sorted(front, key=lambda rc: rc[1])]


def val_loss_at_equal_tokens(results: Results) -> tuple[float | None, dict[str, float | None]]:
    """The largest token count every trial reached with a validation pass, and each trial's val_loss there
    (linear interpolation between its validation points)."""
    curves = {}
    for r in results.rows:
        pts = sorted((float(m["tokens"]), float(m["val_loss"])) for m in results.metrics(r["trial_id"])
                     if number(m.get("val_loss")) is not None and number(m.get("tokens")) is not None)
        if pts:
            curves[r["trial_id"]] = pts
    if not curves:
        return None, {}
    tokens = min(p[-1][0] for p in curves.values())
    return tokens, {tid: _interpolate(pts, tokens) for tid, pts in curves.items()}


def _interpolate(pts: list[tuple[float, float]], x: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1] if pts[0][0] == x else None


def summary_markdown(results: Results) -> str:
    """``summary.md``: every trial sorted by the metric, plus the norm × warmup and batch × LR tables when they apply."""
    metric = results.metric
    axes = results.space_keys
    objectives = ", ".join(f"{m} ({mode})" for m, mode in results.objectives)
    several = len(results.objectives) > 1
    lines = [f"# Sweep summary: {results.name}", "",
             f"Group: {results.group}. {'Objectives' if several else 'Metric'}: {objectives}.", ""]
    best = None if several else best_trial(results)
    if several:
        front = pareto_front(results)
        headers = ["trial_id", *map(short, axes), *(m for m, _ in results.objectives)]
        body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), *(fmt(r.get(m), m) for m, _ in results.objectives)]
                for r in front]
        lines += ["## Pareto front", "",
                  f"The ok trials no other ok trial beats on every objective ({len(front)} of "
                  f"{sum(1 for r in results.rows if r.get('status') == 'ok')}); export one with "
                  f"`python -m lmtune.export {results.dir} --trial ID`.", "",
                  markdown_table(headers, body) if body else "No ok trial yet.", ""]
    if best is not None:
        lines += [f"Best ok trial: {best['trial_id']} ("
                  + ", ".join(f"{short(k)}={best.get(k)}" for k in axes) + f"), {metric} = {fmt(best.get(metric), metric)}.", ""]
    shown = [m for m in dict.fromkeys([metric, *(m for m, _ in results.objectives), *TRIALS_TABLE])
             if m == metric or any(number(r.get(m)) is not None for r in results.rows)]
    headers = ["trial_id", "status", *map(short, axes), *shown]
    body = [[r.get("trial_id"), status_label(r), *(fmt(r.get(k), k) for k in axes), *(fmt(r.get(m), m) for m in shown)]
            for r in sorted_by_metric(results)]
    pruned = sum(1 for r in results.rows if r.get("status") == "pruned")
    note = ([f"Finished trials first, by {metric}; then the {pruned} stopped early by the scheduler (their {metric} "
             f"is from fewer tokens: see the tokens column), then the rest.", ""] if pruned else [])
    lines += ["## Trials", "", *note, markdown_table(headers, body) if body else "No trials yet.", ""]
    spent = cost_text(results)
    if spent:
        lines += [spent, ""]
    kinds = experiments(axes, results.frontier_spec)
    if "norm" in kinds:
        headers = ["trial_id", *map(short, axes), "val_loss", "grad_norm_spread", "diverged"]
        body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), fmt(r.get("val_loss"), "val_loss"),
                 fmt(r.get("grad_norm_spread"), "grad_norm_spread"), "yes" if r.get("status") == "diverged" else "no"]
                for r in sorted(results.rows, key=lambda r: tuple(sort_key((r.get(k),)) for k in axes))]
        lines += ["## Norm placement × warmup", "",
                  "Final validation loss, the spread of per-layer gradient norms (log10 max/min over layers) and "
                  "whether the run diverged.", "", markdown_table(headers, body), ""]
    if "batch" in kinds:
        tokens, at = val_loss_at_equal_tokens(results)
        headers = ["trial_id", *map(short, axes), "val_loss_at_equal_tokens", "val_loss", "grad_coherence", "noise_scale"]
        body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), fmt(at.get(r["trial_id"]), "val_loss"),
                 fmt(r.get("val_loss"), "val_loss"), fmt(r.get("grad_coherence"), "grad_coherence"),
                 fmt(r.get("noise_scale"), "noise_scale")]
                for r in sorted(results.rows, key=lambda r: tuple(sort_key((r.get(k),)) for k in axes))]
        at_text = (f"{tokens:,.0f} tokens (the most every trial reached)" if tokens is not None
                   else "equal tokens (no validation points yet)")
        lines += ["## Batch size × LR scaling", "",
                  f"Validation loss at {at_text}; gradient coherence and the noise scale (McCandlish et al. 2018, "
                  f"B_simple) at the end.", "", markdown_table(headers, body), ""]
    if "width" in kinds:
        lines += [transfer_markdown(results)]
    return "\n".join(lines)


def cost(results: Results) -> tuple[float, str, int]:
    """(device-hours of the trials that ran, ``GPU-hours`` | ``CPU-hours``, how many reported it): each trial's
    ``device_hours`` is its wall-clock × the GPUs (or, on a CPU, the threads) its ranks used."""
    hours = [number(r.get("device_hours")) for r in results.rows if r.get("source", "run") == "run"]
    hours = [h for h in hours if h is not None]
    gpus = number(results.sweep.get("gpus")) or 0
    return sum(hours), "GPU-hours" if gpus > 0 else "CPU-hours", len(hours)


def cost_text(results: Results) -> str | None:
    total, unit, n = cost(results)
    return f"Cost: {total:.3g} {unit} over the {n} trial(s) that ran (each trial's device_hours)." if n else None


def oom_by_half(rows: list[dict[str, Any]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((OOMs, trials) of the first half, (OOMs, trials) of the second) of the trials that ran, in the order of
    ``rows`` (trials.csv: the order they finished in): whether the searcher learned where memory runs out."""
    ran = [r for r in rows if r.get("source", "run") == "run"]
    first, second = ran[: len(ran) // 2], ran[len(ran) // 2:]
    return tuple((sum(r.get("status") == "oom" for r in half), len(half)) for half in (first, second))


def oom_by_half_text(rows: list[dict[str, Any]]) -> str | None:
    """The console's sentence for :func:`oom_by_half`; None without an OOM."""
    (a, n), (b, m) = oom_by_half(rows)
    if not a + b:
        return None
    return (f"out of memory: {a} of the first {n} trials to finish, {b} of the last {m} (an OOM is a memory "
            "constraint the searcher learns, optuna.db: constraints)")


