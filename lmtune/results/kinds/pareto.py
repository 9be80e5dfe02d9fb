"""The Pareto front of a sweep with several metrics: the ok trials no other ok trial beats on every objective.

A result kind (:mod:`lmtune.results.kinds`): summary.md's Pareto front (in place of a best trial: such a sweep has no
single winner, export takes ``--trial ID``) and plots/pareto.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.results.figures import pyplot, save
from lmtune.results.format import finite, fmt, markdown_table, number, short
from lmtune.results.kinds import Kind
from lmtune.results.read import Results


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



def found(results: Results) -> list[str]:
    axes, front = results.space_keys, pareto_front(results)
    headers = ["trial_id", *map(short, axes), *(m for m, _ in results.objectives)]
    body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), *(fmt(r.get(m), m) for m, _ in results.objectives)]
            for r in front]
    return ["## Pareto front", "",
            f"The ok trials no other ok trial beats on every objective ({len(front)} of "
            f"{sum(1 for r in results.rows if r.get('status') == 'ok')}); export one with "
            f"`python -m lmtune.export {results.dir} --trial ID`.", "",
            markdown_table(headers, body) if body else "No ok trial yet.", ""]


def plot_pareto(results: Results, path: Path) -> Path | None:
    """The first two objectives of every ok trial; the Pareto front (over all objectives) marked and joined."""
    (mx, x_mode), (my, y_mode) = results.objectives[:2]
    ok = [r for r in results.rows if r.get("status") == "ok" and finite(r.get(mx)) and finite(r.get(my))]
    if not ok:
        return None
    front = [r for r in pareto_front(results) if r in ok]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([r[mx] for r in ok], [r[my] for r in ok], "o", color="C0", alpha=0.5, label="ok trials")
    line = sorted(front, key=lambda r: r[mx])
    ax.plot([r[mx] for r in line], [r[my] for r in line], "o-", color="C3", label="Pareto front")
    for r in front:
        ax.annotate(str(r["trial_id"]), (r[mx], r[my]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel=f"{mx} ({x_mode})", ylabel=f"{my} ({y_mode})", title=f"Pareto front: {results.name}")
    return save(fig, path, legends=(ax,))


def plots(results: Results, plots: Path) -> list[Path]:
    written = plot_pareto(results, plots / "pareto.png")
    return [written] if written is not None else []


KIND = Kind("pareto", 30, applies=lambda results: len(results.objectives) > 1, found=found, plots=plots)
