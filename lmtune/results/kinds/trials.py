"""Every sweep's trials: ranked by the sweep's metric, the best one, what they cost, their loss curves, and a card
per trial with its status, its evidence, its learning curve and its per-layer gradient norms.

A result kind (:mod:`lmtune.results.kinds`) that applies to every sweep: summary.md's best trial and Trials table
with the cost, plots/loss_curves.png, report.html's Every trial.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmtune.contract import TRIALS_TABLE, layer_keys
from lmtune.results.figures import point_label, pyplot, save
from lmtune.results.format import finite, fmt, markdown_table, number, short, status_label
from lmtune.results.kinds import Kind
from lmtune.results.layout import measured
from lmtune.results.markup import esc
from lmtune.results.read import Results

# --- ranking and cost -------------------------------------------------------------------------------


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



# --- summary.md -------------------------------------------------------------------------------------


def found(results: Results) -> list[str]:
    """The best ok trial, for a sweep with one metric."""
    best = best_trial(results) if len(results.objectives) == 1 else None
    if best is None:
        return []
    metric = results.metric
    return [f"Best ok trial: {best['trial_id']} (" + ", ".join(f"{short(k)}={best.get(k)}" for k in results.space_keys)
            + f"), {metric} = {fmt(best.get(metric), metric)}.", ""]


def tables(results: Results) -> list[str]:
    """Every trial sorted by the metric, then what the sweep cost."""
    metric, axes = results.metric, results.space_keys
    shown = [m for m in dict.fromkeys([metric, *(m for m, _ in results.objectives), *TRIALS_TABLE])
             if m == metric or any(number(r.get(m)) is not None for r in results.rows)]
    headers = ["trial_id", "status", *map(short, axes), *shown]
    body = [[r.get("trial_id"), status_label(r), *(fmt(r.get(k), k) for k in axes), *(fmt(r.get(m), m) for m in shown)]
            for r in sorted_by_metric(results)]
    pruned = sum(1 for r in results.rows if r.get("status") == "pruned")
    note = ([f"Finished trials first, by {metric}; then the {pruned} stopped early by the scheduler (their {metric} "
             f"is from fewer tokens: see the tokens column), then the rest.", ""] if pruned else [])
    lines = ["## Trials", "", *note, markdown_table(headers, body) if body else "No trials yet.", ""]
    spent = cost_text(results)
    return lines + ([spent, ""] if spent else [])


# --- plots ------------------------------------------------------------------------------------------


def plot_loss_curves(results: Results, path: Path, max_legend: int = 12) -> Path | None:
    """Train loss (line) and validation loss (markers) against tokens for every trial that reported any."""
    series = []
    for r in results.rows:
        if not measured(r):
            continue
        ms = results.metrics(r["trial_id"])
        train = [(m["tokens"], m["loss"]) for m in ms if finite(m.get("loss")) and finite(m.get("tokens"))]
        val = [(m["tokens"], m["val_loss"]) for m in ms if finite(m.get("val_loss")) and finite(m.get("tokens"))]
        if train or val:
            series.append((r, train, val))
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20" if len(series) > 10 else "tab10")
    for n, (r, train, val) in enumerate(series):
        color = cmap(n % cmap.N)
        label = point_label(results.space_keys, r) if n < max_legend else None
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.6, linewidth=1, label=label)
        if val:
            ax.plot(*zip(*val), "o--", color=color, markersize=4, label=None if train else label)
    ax.set(xlabel="tokens", ylabel="loss (line: train, markers: val)", title=f"Loss curves: {results.name}")
    return save(fig, path, legends=(ax,))


def plots(results: Results, plots: Path) -> list[Path]:
    written = plot_loss_curves(results, plots / "loss_curves.png")
    return [written] if written is not None else []


# --- report.html ------------------------------------------------------------------------------------


def html(results: Results) -> list[str]:
    return ["<h2>Every trial</h2>", trials_html(results)]


def trials_html(results: Results) -> str:
    cards = []
    for r in results.rows:
        tid = str(r.get("trial_id"))
        status = str(r.get("status") or "running")
        point = ", ".join(f"{short(k)}={fmt(r.get(k), k)}" for k in results.space_keys if r.get(k) is not None)
        ms = results.metrics(tid) if measured(r) else []
        body = [f"<div class='trial'><h3>{esc(tid)} <span class='status-{esc(status)}'>{esc(status_label(r))}"
                f"</span></h3><div class='muted'>{esc(point)}</div>", f"<div class='muted'>{esc(evidence(r))}</div>"]
        curve = curves_svg(ms)
        body.append(curve or "<div class='muted'>no loss reported</div>")
        norms = layer_norms_svg(ms)
        if norms:
            body.append(norms)
        body.append("</div>")
        cards.append("".join(body))
    return "<div class='trials'>" + "\n".join(cards) + "</div>" if cards else "<p>No trials yet.</p>"


def evidence(row: dict[str, Any]) -> str:
    """Why a trial has its status: for an OOM, whether it ran, was implied by a smaller OOM, or was predicted."""
    status, source = row.get("status"), row.get("source") or "run"
    extra = []
    if status == "oom":
        extra.append({"run": "ran out of memory", "reused": "ran out of memory (in the run it was reused from)",
                      "implied": "implied by an OOM at a smaller micro-batch (never ran)",
                      "predicted": "predicted above the limit + margin (never ran)"}.get(source, source))
        if row.get("predicted_peak_gib") is not None:
            extra.append(f"predicted peak {fmt(row['predicted_peak_gib'], 'peak_reserved_gib')} GiB")
    if row.get("error"):
        extra.append(str(row["error"])[:160])
    for key in ("val_loss", "tokens_per_s", "peak_reserved_gib", "device_hours"):
        if row.get(key) is not None:
            extra.append(f"{key} {fmt(row[key], key)}")
    if row.get("node_id"):
        extra.append(f"ran on node {row.get('node_ip') or ''} {str(row['node_id'])[:8]}".replace("  ", " "))
    return "; ".join(extra)



def curves_svg(metrics: list[dict[str, Any]], width: int = 340, height: int = 150) -> str | None:
    """Train loss (line) and val_loss (dots) against tokens."""
    train = [(m["tokens"], m["loss"]) for m in metrics if finite(m.get("tokens")) and finite(m.get("loss"))]
    val = [(m["tokens"], m["val_loss"]) for m in metrics if finite(m.get("tokens")) and finite(m.get("val_loss"))]
    pts = train + val
    if not pts:
        return None
    pad = 30
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

    def xy(p):
        return (pad + (p[0] - x0) / (x1 - x0) * (width - pad - 8), 8 + (y1 - p[1]) / (y1 - y0) * (height - 8 - pad))

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='loss against tokens'>",
           f"<rect x='{pad}' y='8' width='{width - pad - 8}' height='{height - 8 - pad}' fill='#fbfbfd' stroke='#ccc'/>"]
    if len(train) > 1:
        out.append("<polyline fill='none' stroke='#4a7bd0' stroke-width='1.5' points='"
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in map(xy, train)) + "'/>")
    out += [f"<circle cx='{a:.1f}' cy='{b:.1f}' r='2.5' fill='#e67e22'/>" for a, b in map(xy, val)]
    out += [f"<text x='{pad}' y='{height - 14}' font-size='10'>{fmt(x0, 'tokens')}</text>",
            f"<text x='{width - 8}' y='{height - 14}' font-size='10' text-anchor='end'>{fmt(x1, 'tokens')} tokens</text>",
            f"<text x='2' y='16' font-size='10'>{y1:.3g}</text>",
            f"<text x='2' y='{height - pad}' font-size='10'>{y0:.3g}</text>",
            f"<text x='{width / 2:.0f}' y='{height - 2}' font-size='10' text-anchor='middle'>"
            "line: loss · dots: val_loss</text></svg>"]
    return "".join(out)


def layer_norms_svg(metrics: list[dict[str, Any]], width: int = 340, height: int = 70) -> str | None:
    """The last reported per-layer gradient norms, log10, one bar per layer."""
    last = next((m for m in reversed(metrics) if layer_keys(m)), None)
    if last is None:
        return None
    keys = layer_keys(last)
    logs = [math.log10(last[k]) if finite(last[k]) and last[k] > 0 else None for k in keys]
    shown = [v for v in logs if v is not None]
    if not shown:
        return None
    lo, hi = min(shown + [0.0]), max(shown + [0.0])
    span = (hi - lo) or 1.0
    bar = (width - 10) / len(keys)
    base = 8 + (hi - 0.0) / span * (height - 24)  # the log10 = 0 line
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='gradient norm per layer'>"]
    for i, v in enumerate(logs):
        if v is None:
            continue
        y = 8 + (hi - v) / span * (height - 24)
        top, h = min(y, base), abs(base - y) or 1
        out.append(f"<rect x='{5 + i * bar:.1f}' y='{top:.1f}' width='{max(bar - 2, 1):.1f}' height='{h:.1f}' "
                   f"fill='#6c5ce7'><title>layer {i}: log10 grad norm {v:.2f}</title></rect>")
    out.append(f"<text x='5' y='{height - 3}' font-size='10'>log10 gradient norm per layer (last report): "
               f"{min(shown):.2f} … {max(shown):.2f}</text></svg>")
    return "".join(out)


# --- markdown (the subset lmtune writes) and helpers ----------------------------------------------------


KIND = Kind("trials", 20, applies=lambda results: True, found=found, tables=tables, plots=plots, html=html)
