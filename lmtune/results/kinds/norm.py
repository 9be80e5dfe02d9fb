"""Norm placement × warmup, as the phase-0 study reads it (docs/phase0.md, "Norm placement × warmup"): per trial
the final validation loss, the spread of its per-layer gradient norms (log10 max/min over layers) and whether it
diverged; the final norms per layer, and their course over training, where post-LN's spread opens up.

A result kind (:mod:`lmtune.results.kinds`): summary.md's Norm placement × warmup section,
plots/grad_norm_layers.png and plots/grad_norm_over_time.png.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmtune.contract import layer_keys
from lmtune.results.figures import point_label, pyplot, save
from lmtune.results.format import finite, fmt, markdown_table, short, sort_key
from lmtune.results.kinds import Kind
from lmtune.results.layout import measured
from lmtune.results.read import Results

NORM_KEYS = ("model.norm_placement", "model.final_norm", "train.warmup_steps")


def applies(results: Results) -> bool:
    return bool(set(results.space_keys) & set(NORM_KEYS))


def tables(results: Results) -> list[str]:
    axes = results.space_keys
    headers = ["trial_id", *map(short, axes), "val_loss", "grad_norm_spread", "diverged"]
    body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), fmt(r.get("val_loss"), "val_loss"),
             fmt(r.get("grad_norm_spread"), "grad_norm_spread"), "yes" if r.get("status") == "diverged" else "no"]
            for r in sorted(results.rows, key=lambda r: tuple(sort_key((r.get(k),)) for k in axes))]
    return ["## Norm placement × warmup", "",
            "Final validation loss, the spread of per-layer gradient norms (log10 max/min over layers) and "
            "whether the run diverged.", "", markdown_table(headers, body), ""]


def layer_norms(results: Results, row: dict[str, Any]) -> list[float]:
    """The trial's final ``grad_norm/layer_{i}`` values (summary.json, else its last report that has them)."""
    last: dict[str, Any] = {}
    for m in results.metrics(row["trial_id"]):
        if layer_keys(m):
            last = m
    return [float(last[k]) for k in layer_keys(last)]


def plot_grad_norm_layers(results: Results, path: Path) -> Path | None:
    """Heatmap: one row per trial, one column per layer, colour = log10 of the final gradient norm."""
    rows = [(r, layer_norms(results, r)) for r in results.rows if measured(r)]
    rows = [(r, v) for r, v in rows if v]
    if not rows:
        return None
    plt = pyplot()
    width = max(len(v) for _, v in rows)
    grid = [[math.log10(x) if x > 0 else float("nan") for x in v] + [float("nan")] * (width - len(v)) for _, v in rows]
    fig, ax = plt.subplots(figsize=(max(6.5, 3.5 + 0.45 * width), 1.6 + 0.45 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(width), [str(i) for i in range(width)])
    ax.set_yticks(range(len(rows)), [point_label(results.space_keys, r) for r, _ in rows], fontsize=7)
    ax.set(xlabel="layer", title="log10 final gradient norm per layer")
    fig.colorbar(im, ax=ax)
    return save(fig, path)


def layer_norm_history(results: Results, row: dict[str, Any]) -> tuple[list[int], list[list[float]]]:
    """(steps, norms[layer][i]) from every report of the trial that has per-layer gradient norms."""
    steps, columns = [], []
    for m in results.metrics(row["trial_id"]):
        layers = layer_keys(m)
        if layers and finite(m.get("step")):
            steps.append(int(m["step"]))
            columns.append([float(m[k]) if finite(m[k]) else float("nan") for k in layers])
    depth = max((len(c) for c in columns), default=0)
    norms = [[c[j] if j < len(c) else float("nan") for c in columns] for j in range(depth)]
    return steps, norms


def plot_grad_norm_over_time(results: Results, path: Path, max_panels: int = 12) -> Path | None:
    """One panel per trial: layer (rows, input at the top) × step (columns), colour = log10 gradient norm,
    one colour scale for all panels so that pre-LN's flat O(1) and post-LN's spread compare at a glance."""
    series = [(r, *layer_norm_history(results, r)) for r in results.rows if measured(r)]
    series = [(r, steps, norms) for r, steps, norms in series if steps][:max_panels]
    if not series:
        return None
    plt = pyplot()

    def log10(x: float) -> float:
        return math.log10(x) if x > 0 else float("nan")

    grids = [[[log10(x) for x in layer] for layer in norms] for _, _, norms in series]
    values = [v for g in grids for layer in g for v in layer if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    cols = min(4, math.ceil(math.sqrt(len(series))))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols + 1.2, 2.8 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    im = None
    for ax, (r, steps, norms), grid in zip(axes.flat, series, grids):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest",
                       extent=(steps[0], steps[-1], len(norms) - 0.5, -0.5))
        ax.set_title(point_label(results.space_keys, r) + f"  [{r.get('status')}]", fontsize=8)
        ax.set(xlabel="step", ylabel="layer")
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(f"log10 gradient norm per layer over training: {results.name}", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.9, label="log10 gradient norm")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(results: Results, plots: Path) -> list[Path]:
    written = [plot(results, plots / name) for plot, name in ((plot_grad_norm_layers, "grad_norm_layers.png"),
                                                             (plot_grad_norm_over_time, "grad_norm_over_time.png"))]
    return [p for p in written if p is not None]


KIND = Kind("norm", 40, applies=applies, tables=tables, plots=plots, studied=("grad_norm_spread",))
