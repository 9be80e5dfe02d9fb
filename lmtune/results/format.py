"""How results read: table cells, numbers, GiB, Markdown and console tables (one format for files and console)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence


def short(key: str) -> str:
    """``train.micro_batch_size`` → ``micro_batch_size`` (key names are unique across sections)."""
    return key.rpartition(".")[2]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def fmt(v: Any, key: str = "") -> str:
    """A table cell: thousands separators for token counts, 2–3 decimals for GiB, 4 significant digits otherwise."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if key in ("tokens_per_s", "tokens") or key.endswith("_tokens"):
        return f"{v:,.0f}"
    if key == "relative_throughput":
        return f"{v:.2f}"
    if key.endswith("_gib"):
        return gib(v)
    if key.endswith("_ms") or key.endswith("_s"):
        return f"{v:.1f}"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def gib(v: float) -> str:
    """GiB with two decimals, three below 1 GiB (CPU smoke runs measure in tenths of a GiB)."""
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


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
    return "OOM" if source == "run" else f"OOM ({source})"
