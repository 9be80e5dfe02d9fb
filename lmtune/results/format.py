"""How results read: table cells, numbers, GiB, Markdown and console tables (one format for files and console)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from lmtune.contract import MEASURED, METRIC


def short(key: str) -> str:
    """``train.micro_batch_size`` → ``micro_batch_size`` (key names are unique across sections)."""
    return key.rpartition(".")[2]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def fmt(v: Any, key: str = "") -> str:
    """A table cell: a metric as its record in :data:`lmtune.contract.METRICS` says (:data:`FORMATS`), any other
    column by its name (:func:`format_of`); "—" for a missing or NaN value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return FORMATS[format_of(key)](v)


def format_of(key: str) -> str:
    """The format of a column: a metric's own; for the other columns (config keys, headroom, ...) by their names."""
    if key in METRIC:
        return METRIC[key].format
    if key.endswith("_tokens"):
        return "count"
    if key == "relative_throughput":
        return "ratio"
    if key.endswith("_gib"):
        return "gib"
    if key.endswith("_ms") or key.endswith("_s"):
        return "time"
    return "number"


def gib(v: float) -> str:
    """GiB with two decimals, three below 1 GiB (CPU smoke runs measure in tenths of a GiB)."""
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


FORMATS: dict[str, Callable[[float], str]] = {
    "count": lambda v: f"{v:,.0f}",
    "gib": gib,
    "time": lambda v: f"{v:.1f}",
    "ratio": lambda v: f"{v:.2f}",
    "number": lambda v: str(v) if isinstance(v, int) else f"{v:.4g}",
}
"""Cell formats by name (a metric names its own: :class:`lmtune.contract.Metric`)."""


def number(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def finite(v: Any) -> bool:
    """A real number that is finite (not a bool, not a numeric string)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sort_key(values: tuple) -> tuple:
    """Sort mixed values: numbers numerically, then everything else as text; None last."""
    return tuple((2, "") if v is None else (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                 else (1, str(v)) for v in values)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table (fixed-width columns) for the console."""
    cells = [["" if r.get(c) is None else fmt(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def status_label(row: Mapping[str, Any]) -> str:
    """``ok``, ``OOM``, ``OOM (implied)``, ``OOM (predicted)``, or the trial's own status."""
    status = row.get("status") or "running"
    if status != "oom":
        return str(status)
    source = row.get("source") or "run"
    return "OOM" if source in MEASURED else f"OOM ({source})"
