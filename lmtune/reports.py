"""A run's report stream (``metrics.jsonl``): the order of reports and rewriting it after a resume.

Both the trainer (``python -m lmtune.train --resume`` into the same directory) and the sweep driver (a
retried or resumed trial) continue a stream that may already hold reports past the checkpoint they
resume from; each report must appear once, as in an uninterrupted run. Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def order(report: dict[str, Any]) -> tuple[int, int]:
    """Where a report falls in a run: its step, and at an eval step the training report before the eval's."""
    return int(report.get("step", -1)), int("val_loss" in report)


def keep_reports(path: Path, keep: Callable[[tuple[int, int]], bool]) -> int:
    """Rewrite ``path`` (atomically) with only the reports whose :func:`order` ``keep`` accepts; returns how
    many were dropped. Unreadable lines are kept as they are."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            report = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if keep(order(report)):
            kept.append(line)
    dropped = len([ln for ln in lines if ln.strip()]) - len(kept)
    if dropped:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return dropped
