"""Matplotlib for the result kinds' plots (:mod:`lmtune.results.kinds`): PNG files only, never a window, every figure
finished and saved one way."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lmtune.results.format import short


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def point_label(space_keys: Sequence[str], row: dict[str, Any]) -> str:
    """A trial in a legend or a title: its point in the space (``lr=0.001, n_embd=64``), else its id."""
    axes = ", ".join(f"{short(k)}={row.get(k)}" for k in space_keys)
    return axes or str(row.get("trial_id"))


def save(fig, path: Path, legends=()) -> Path:
    """Grid and legend on ``legends`` axes, tight layout, PNG at 110 dpi, figure closed."""
    for ax in legends:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
