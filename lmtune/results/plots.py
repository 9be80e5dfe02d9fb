"""The plots of a results directory (PNG files under ``plots/``; :mod:`lmtune.reporting.render` lists them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmtune.contract import PLOTS_DIR, layer_keys
from lmtune.results.format import finite, short
from lmtune.results.frontier import FrontierReport
from lmtune.results.read import Results
from lmtune.results.summary import experiments, pareto_front
from lmtune.results.transfer import LR_KEY, curves, transfer


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def render_plots(results: Results, rep: FrontierReport | None) -> list[Path]:
    plots = results.dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    out = []
    if rep is not None and rep.tables:
        out.append(plot_frontier(rep, plots / "frontier.png"))
    curves = plot_loss_curves(results, plots / "loss_curves.png")
    if curves is not None:
        out.append(curves)
    if len(results.objectives) > 1:
        pareto = plot_pareto(results, plots / "pareto.png")
        if pareto is not None:
            out.append(pareto)
    kinds = experiments(results.space_keys, results.frontier_spec)
    if "width" in kinds:
        written = plot_width_transfer(results, plots / "width_transfer.png")
        if written is not None:
            out.append(written)
    if "norm" in kinds:
        for plot, name in ((plot_grad_norm_layers, "grad_norm_layers.png"),
                           (plot_grad_norm_over_time, "grad_norm_over_time.png")):
            written = plot(results, plots / name)
            if written is not None:
                out.append(written)
    return out


def plot_frontier(rep: FrontierReport, path: Path) -> Path:
    """Left: peak_reserved_gib vs micro-batch per budget (OOMs marked at the limit); right: tokens/s."""
    plt = _pyplot()
    fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = rep.x
    oom_y = rep.limit_gib if rep.limit_gib is not None else max(
        [r["peak_reserved_gib"] or 0 for t in rep.tables for r in t.rows] + [1.0])
    markers = {"OOM": "x", "OOM (implied)": "1", "OOM (predicted)": "+"}
    step = 0.025 * oom_y  # OOM marks sit just above the limit, one row per budget, so they do not overlap
    seen: set[str] = set()
    for n, t in enumerate(rep.tables):
        color = f"C{n % 10}"
        ran = [r for r in t.rows if r["status"] not in markers and r["peak_reserved_gib"] is not None]
        ax_mem.plot([r[x] for r in ran], [r["peak_reserved_gib"] for r in ran], "o-", color=color, label=t.title)
        tps = [r for r in ran if r["tokens_per_s"] is not None]
        ax_tps.plot([r[x] for r in tps], [r["tokens_per_s"] for r in tps], "o-", color=color, label=t.title)
        for status, marker in markers.items():
            pts = [r[x] for r in t.rows if r["status"] == status]
            if pts:
                ax_mem.plot(pts, [oom_y + step * (n + 1)] * len(pts), marker, color=color, markersize=10,
                            linestyle="none")
                seen.add(status)
    for status in (s for s in markers if s in seen):  # legend entries in black: the colour is the budget's
        ax_mem.plot([], [], markers[status], color="black", markersize=10, linestyle="none", label=status)
    if rep.limit_gib is not None:
        ax_mem.axhline(rep.limit_gib, color="red", linewidth=1, label=f"limit {rep.limit_gib:g} GiB")
        ax_mem.axhline(rep.limit_gib - rep.headroom_gib, color="grey", linestyle="--", linewidth=1,
                       label=f"{rep.headroom_gib:g} GiB headroom")
    if rep.recommended is not None:
        r = rep.recommended
        for ax, y in ((ax_mem, r["peak_reserved_gib"]), (ax_tps, r["tokens_per_s"])):
            ax.plot([r[x]], [y], "*", color="gold", markeredgecolor="black", markersize=16, label="recommended")
    ax_mem.set(xlabel=short(x), ylabel="peak_reserved_gib", title="Peak memory")
    ax_tps.set(xlabel=short(x), ylabel="tokens_per_s", title="Throughput")
    return _save(fig, path, legends=(ax_mem, ax_tps))


def _label(results: Results, row: dict[str, Any]) -> str:
    axes = ", ".join(f"{short(k)}={row.get(k)}" for k in results.space_keys)
    return axes or str(row.get("trial_id"))


def plot_loss_curves(results: Results, path: Path, max_legend: int = 12) -> Path | None:
    """Train loss (line) and validation loss (markers) against tokens for every trial that reported any."""
    series = []
    for r in results.rows:
        if r.get("source", "run") != "run":
            continue
        ms = results.metrics(r["trial_id"])
        train = [(m["tokens"], m["loss"]) for m in ms if finite(m.get("loss")) and finite(m.get("tokens"))]
        val = [(m["tokens"], m["val_loss"]) for m in ms if finite(m.get("val_loss")) and finite(m.get("tokens"))]
        if train or val:
            series.append((r, train, val))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20" if len(series) > 10 else "tab10")
    for n, (r, train, val) in enumerate(series):
        color = cmap(n % cmap.N)
        label = _label(results, r) if n < max_legend else None
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.6, linewidth=1, label=label)
        if val:
            ax.plot(*zip(*val), "o--", color=color, markersize=4, label=None if train else label)
    ax.set(xlabel="tokens", ylabel="loss (line: train, markers: val)", title=f"Loss curves: {results.name}")
    return _save(fig, path, legends=(ax,))


def layer_norms(results: Results, row: dict[str, Any]) -> list[float]:
    """The trial's final ``grad_norm/layer_{i}`` values (summary.json, else its last report that has them)."""
    last: dict[str, Any] = {}
    for m in results.metrics(row["trial_id"]):
        if layer_keys(m):
            last = m
    return [float(last[k]) for k in layer_keys(last)]


def plot_grad_norm_layers(results: Results, path: Path) -> Path | None:
    """Heatmap: one row per trial, one column per layer, colour = log10 of the final gradient norm."""
    rows = [(r, layer_norms(results, r)) for r in results.rows if r.get("source", "run") == "run"]
    rows = [(r, v) for r, v in rows if v]
    if not rows:
        return None
    plt = _pyplot()
    width = max(len(v) for _, v in rows)
    grid = [[math.log10(x) if x > 0 else float("nan") for x in v] + [float("nan")] * (width - len(v)) for _, v in rows]
    fig, ax = plt.subplots(figsize=(max(6.5, 3.5 + 0.45 * width), 1.6 + 0.45 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(width), [str(i) for i in range(width)])
    ax.set_yticks(range(len(rows)), [_label(results, r) for r, _ in rows], fontsize=7)
    ax.set(xlabel="layer", title="log10 final gradient norm per layer")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_pareto(results: Results, path: Path) -> Path | None:
    """The first two objectives of every ok trial; the Pareto front (over all objectives) marked and joined."""
    (mx, x_mode), (my, y_mode) = results.objectives[:2]
    ok = [r for r in results.rows if r.get("status") == "ok" and finite(r.get(mx)) and finite(r.get(my))]
    if not ok:
        return None
    front = [r for r in pareto_front(results) if r in ok]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([r[mx] for r in ok], [r[my] for r in ok], "o", color="C0", alpha=0.5, label="ok trials")
    line = sorted(front, key=lambda r: r[mx])
    ax.plot([r[mx] for r in line], [r[my] for r in line], "o-", color="C3", label="Pareto front")
    for r in front:
        ax.annotate(str(r["trial_id"]), (r[mx], r[my]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel=f"{mx} ({x_mode})", ylabel=f"{my} ({y_mode})", title=f"Pareto front: {results.name}")
    return _save(fig, path, legends=(ax,))


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
    series = [(r, *layer_norm_history(results, r)) for r in results.rows if r.get("source", "run") == "run"]
    series = [(r, steps, norms) for r, steps, norms in series if steps][:max_panels]
    if not series:
        return None
    plt = _pyplot()

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
        ax.set_title(_label(results, r) + f"  [{r.get('status')}]", fontsize=8)
        ax.set(xlabel="step", ylabel="layer")
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(f"log10 gradient norm per layer over training: {results.name}", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.9, label="log10 gradient norm")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_width_transfer(results: Results, path: Path) -> Path | None:
    """One panel per parametrization: the metric against the lr (log axis), one curve per width, each curve's
    optimum marked (Yang et al. 2021, Fig. 1): under μP the optima line up, under SP they drift with width."""
    found = curves(results)
    if not found:
        return None
    kinds = [t.parametrization for t in transfer(results)]
    widths = sorted({c.width for c in found})
    grid = sorted({lr for c in found for lr, _ in c.points})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.6), sharey=True, squeeze=False)
    colors = plt.get_cmap("viridis")
    for ax, kind in zip(axes[0], kinds):
        for c in (c for c in found if c.parametrization == kind):
            color = colors(widths.index(c.width) / max(1, len(widths) - 1))
            ax.plot(*zip(*c.points), "o-", color=color, label=f"width {c.width}")
            lr, value = c.best(results.mode)
            ax.plot([lr], [value], "*", color=color, markersize=15, markeredgecolor="black")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # the lr grid's own values label the axis
        ax.set_xticks(grid, [f"{lr:.3g}" for lr in grid])
        ax.set(xlabel=LR_KEY, title=f"{kind}: {results.metric} vs lr (★ each width's optimum)")
    axes[0][0].set_ylabel(f"{results.metric} ({results.mode})")
    return _save(fig, path, legends=tuple(axes[0]))


def _save(fig, path: Path, legends=()) -> Path:
    """Grid and legend on ``legends`` axes, tight layout, PNG at 110 dpi, figure closed."""
    for ax in legends:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


