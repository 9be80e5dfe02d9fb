"""Width transfer: does the best learning rate stay put as the model widens?

A sweep over ``model.n_embd`` × ``train.lr`` (× ``model.parametrization``) is read as the Maximal Update
Parametrization paper reads it (Yang et al. 2021, "Tensor Programs V", Fig. 1): one curve of the metric against
the learning rate per width, one panel per parametrization, and per width the learning rate at the curve's
optimum. Under μP the optimum should not move with width (tune small, use large); under the standard
parametrization (SP) it shifts. The spread of the optima (log2 of the largest over the smallest, and in steps of
the sweep's lr grid) and what the narrowest width's optimum costs at the widest (its metric there against that
width's own optimum) say how well a value locked at one width carries to another.

A result kind (:mod:`lmtune.results.kinds`): summary.md's Width transfer section and plots/width_transfer.png.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lmtune.results.figures import pyplot, save
from lmtune.results.format import fmt, markdown_table, number
from lmtune.results.kinds import Kind
from lmtune.results.read import Results

WIDTH_KEY = "model.n_embd"
LR_KEY = "train.lr"
PARAMETRIZATION_KEY = "model.parametrization"


def is_width_transfer(space_keys: Iterable[str]) -> bool:
    keys = set(space_keys)
    return WIDTH_KEY in keys and LR_KEY in keys


@dataclass
class Curve:
    """The metric against the learning rate at one width and parametrization (ok trials, the mean of repeats)."""

    parametrization: str
    width: int
    points: list[tuple[float, float]] = field(default_factory=list)
    """(lr, metric) by lr."""

    def best(self, mode: str = "min") -> tuple[float, float] | None:
        if not self.points:
            return None
        return (min if mode == "min" else max)(self.points, key=lambda p: p[1])

    def at(self, lr: float) -> float | None:
        return next((v for x, v in self.points if math.isclose(x, lr, rel_tol=1e-9)), None)


def curves(results: Results) -> list[Curve]:
    """One curve per (parametrization, width) from the sweep's ok trials, by parametrization then width."""
    metric, base = results.metric, results.sweep.get("base") or {}
    groups: dict[tuple[str, int], dict[float, list[float]]] = {}
    for r in results.rows:
        width, lr, value = number(r.get(WIDTH_KEY)), number(r.get(LR_KEY)), number(r.get(metric))
        if r.get("status") != "ok" or width is None or lr is None or value is None:
            continue
        kind = str(r.get(PARAMETRIZATION_KEY) or base.get(PARAMETRIZATION_KEY) or "sp")
        groups.setdefault((kind, int(width)), {}).setdefault(lr, []).append(value)
    return [Curve(kind, width, sorted((lr, sum(v) / len(v)) for lr, v in by_lr.items()))
            for (kind, width), by_lr in sorted(groups.items())]


@dataclass
class Transfer:
    """What one parametrization's curves say across widths."""

    parametrization: str
    best_lr: dict[int, float]
    """width → the lr at its optimum."""
    spread_log2: float | None
    """log2(largest optimum lr / smallest) across widths (None with fewer than two widths)."""
    spread_steps: float | None
    """The same in steps of the sweep's lr grid (log-spaced): 0 when every width has the same optimum."""
    narrow_to_wide: float | None
    """The widest width's metric at the narrowest width's optimum lr over its own best value (1.0: nothing lost)."""


def transfer(results: Results) -> list[Transfer]:
    """Per parametrization (``sp`` before ``mup``), the optima across widths."""
    mode, by_kind, found = results.mode, {}, curves(results)
    for c in found:
        by_kind.setdefault(c.parametrization, []).append(c)
    grid = sorted({lr for c in found for lr, _ in c.points})
    step = _grid_step(grid)
    out = []
    for kind in sorted(by_kind, key=lambda k: (k != "sp", k)):
        cs = [c for c in by_kind[kind] if c.best(mode) is not None]
        best = {c.width: c.best(mode)[0] for c in cs}
        spread = math.log2(max(best.values()) / min(best.values())) if len(best) > 1 else None
        carried = None
        if len(cs) > 1:
            narrow, wide = cs[0], cs[-1]
            at = wide.at(narrow.best(mode)[0])
            carried = at / wide.best(mode)[1] if at is not None and wide.best(mode)[1] else None
        steps = spread / step if spread is not None and step else None
        out.append(Transfer(kind, best, spread, steps, carried))
    return out


def _grid_step(grid: list[float]) -> float | None:
    """log2 of the lr grid's ratio between neighbours (its smallest, for an uneven grid)."""
    ratios = [math.log2(b / a) for a, b in zip(grid, grid[1:]) if a > 0]
    return min(ratios) if ratios else None


def transfer_markdown(results: Results) -> str:
    """summary.md's section: the optimum lr per width and parametrization, and how far it moves."""
    found = transfer(results)
    if not found:
        return "## Width transfer\n\nNo ok trial yet.\n"
    metric = results.metric
    widths = sorted({w for t in found for w in t.best_lr})
    rows = []
    for c in curves(results):
        best = c.best(results.mode)
        rows.append([c.parametrization, c.width, fmt(best[0], LR_KEY), fmt(best[1], metric), len(c.points)])
    lines = ["## Width transfer", "",
             f"{metric} against {LR_KEY}, one curve per width ({', '.join(map(str, widths))}): the lr at each curve's "
             "optimum (Yang et al. 2021, Fig. 1). Under μP the optimum should stay put as the width grows.", "",
             markdown_table(["parametrization", "width", "best lr", f"{metric} there", "lrs tried"], rows), ""]
    for t in found:
        if t.spread_log2 is None:
            continue
        moved = (f"the optimum lr moves by {t.spread_log2:.2f} in log2 ({t.spread_steps:.1f} steps of the lr grid)"
                 if t.spread_steps is not None else f"the optimum lr moves by {t.spread_log2:.2f} in log2")
        carried = (f"; the narrowest width's optimum at the widest width gives {t.narrow_to_wide:.3f}× its best "
                   f"{metric}" if t.narrow_to_wide is not None else "")
        lines.append(f"- {t.parametrization}: across widths {min(t.best_lr)}–{max(t.best_lr)} {moved}{carried}.")
    return "\n".join(lines) + "\n"


def plot_width_transfer(results: Results, path: Path) -> Path | None:
    """One panel per parametrization: the metric against the lr (log axis), one curve per width, each curve's
    optimum marked (Yang et al. 2021, Fig. 1): under μP the optima line up, under SP they drift with width."""
    found = curves(results)
    if not found:
        return None
    kinds = [t.parametrization for t in transfer(results)]
    widths = sorted({c.width for c in found})
    grid = sorted({lr for c in found for lr, _ in c.points})
    plt = pyplot()
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
    return save(fig, path, legends=tuple(axes[0]))



def _plots(results: Results, plots: Path) -> list[Path]:
    written = plot_width_transfer(results, plots / "width_transfer.png")
    return [written] if written is not None else []


KIND = Kind("width", 60, applies=lambda results: is_width_transfer(results.space_keys),
            tables=lambda results: [transfer_markdown(results)], plots=_plots)
