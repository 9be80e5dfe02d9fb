"""Effective batch × LR scaling, as the phase-0 study reads it (docs/phase0.md, "Effective batch × LR scaling"): the
validation loss at equal tokens (larger batches reach more tokens in the same steps), gradient coherence and the
gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", B_simple).

A result kind (:mod:`lmtune.results.kinds`): summary.md's Batch size × LR scaling section. A memory frontier over
micro-batch sizes is not a batch-size experiment.
"""

from __future__ import annotations

from lmtune.results.format import fmt, markdown_table, number, short, sort_key
from lmtune.results.kinds import Kind
from lmtune.results.read import Results

BATCH_KEYS = ("train.micro_batch_size", "train.accumulation_steps", "train.lr_scaling", "train.base_batch_tokens")


def applies(results: Results) -> bool:
    return bool(set(results.space_keys) & set(BATCH_KEYS)) and not results.frontier_spec


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



def tables(results: Results) -> list[str]:
    axes = results.space_keys
    tokens, at = val_loss_at_equal_tokens(results)
    headers = ["trial_id", *map(short, axes), "val_loss_at_equal_tokens", "val_loss", "grad_coherence", "noise_scale"]
    body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), fmt(at.get(r["trial_id"]), "val_loss"),
             fmt(r.get("val_loss"), "val_loss"), fmt(r.get("grad_coherence"), "grad_coherence"),
             fmt(r.get("noise_scale"), "noise_scale")]
            for r in sorted(results.rows, key=lambda r: tuple(sort_key((r.get(k),)) for k in axes))]
    at_text = (f"{tokens:,.0f} tokens (the most every trial reached)" if tokens is not None
               else "equal tokens (no validation points yet)")
    return ["## Batch size × LR scaling", "",
            f"Validation loss at {at_text}; gradient coherence and the noise scale (McCandlish et al. 2018, "
            f"B_simple) at the end.", "", markdown_table(headers, body), ""]


KIND = Kind("batch", 50, applies=applies, tables=tables, studied=("grad_coherence", "noise_scale"))
