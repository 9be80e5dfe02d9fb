"""A frontier line (every combination of the grid's other axes is one) and what its measurements say about memory.

:class:`Line` holds the line's points along x; :class:`MemoryModel` fits peak memory against x through a line's
feasible points and places its two boundaries (the OOM one and the headroom one), measured or predicted. The
planner that decides what runs next is :mod:`lmtune.sweep.plan`. No Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LineKey = tuple[tuple[str, Any], ...]


@dataclass
class Point:
    x: Any
    state: str = "unknown"  # unknown | pending | ok (any FEASIBLE status) | oom | error
    status: str = ""  # the trial's own status
    peak: float | None = None
    throughput: float | None = None
    trial_id: str | None = None
    predicted: float | None = None  # peak predicted when launched (None: no fit yet)
    purpose: str = ""  # "oom" | "headroom" | "throughput": which question the probe answers
    guided: bool = False  # chosen by the prediction (not by bisection)
    completed: int = -1  # completion order, for the bisection safeguard


@dataclass
class Line:
    key: LineKey
    points: list[Point]

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key) or "(single line)"


@dataclass
class Knowledge:
    """What one line's measurements say, recomputed from the points whenever asked."""

    lo_f: int  # largest feasible index below the OOM boundary (-1: none)
    hi_f: int  # smallest index known or predicted OOM (n: none)
    lo_a: int  # largest index measured with headroom (-1: none)
    hi_a: int  # smallest index known or predicted without headroom (n: none)


@dataclass
class MemoryModel:
    """What the measurements of a line say about memory: the linear fit of peak against x, and where the OOM and
    headroom boundaries lie (measured, or predicted past ``limit_gib + margin_gib``)."""

    limit_gib: float | None
    headroom_gib: float
    margin: float | None = None
    """How far above the limit a prediction must be before a point is skipped; None = 5% of the limit."""
    predict: bool = True

    @property
    def margin_gib(self) -> float:
        if self.margin is not None:
            return self.margin
        return 0.05 * self.limit_gib if self.limit_gib else 0.0

    def fit(self, line: Line) -> tuple[float, float] | None:
        """Least-squares ``peak ≈ intercept + slope·x`` through the line's feasible points (needs two x).

        Near the limit, reserved memory stops growing linearly: the caching allocator frees cached blocks
        and retries instead of reserving more (the phase-0 study's no-AC run: 38.1 GiB at mb 28, 38.95 at 30, OOM at
        32). Points within ``margin_gib`` of the limit are therefore left out (no fit without two others).
        """
        if not self.predict:
            return None
        pts = [(float(p.x), p.peak) for p in line.points if p.state == "ok" and p.peak is not None]
        if self.limit_gib is not None:
            pts = [(x, y) for x, y in pts if y <= self.limit_gib - self.margin_gib]
        if len({x for x, _ in pts}) < 2:
            return None
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
        return slope, my - slope * mx

    def predicted_peak(self, line: Line, x: Any) -> float | None:
        f = self.fit(line)
        return None if f is None else f[1] + f[0] * float(x)

    def knowledge(self, line: Line) -> Knowledge:
        """The line's boundaries as its measurements and the fit place them."""
        pts = line.points
        n = len(pts)
        fit = self.fit(line)
        rising = fit is not None and fit[0] > 0  # skip by prediction only while memory grows with x

        def predicted_above(i: int, threshold: float) -> bool:
            return rising and pts[i].state == "unknown" and fit[1] + fit[0] * float(pts[i].x) > threshold

        hi_meas = min((i for i, p in enumerate(pts) if p.state == "oom"), default=n)
        lo_f = max((i for i, p in enumerate(pts[:hi_meas]) if p.state == "ok"), default=-1)
        hi_f = hi_meas
        if self.limit_gib is not None:
            hi_f = next((i for i in range(lo_f + 1, hi_meas) if predicted_above(i, self.limit_gib + self.margin_gib)),
                        hi_meas)
        lo_a, hi_a = -1, n
        if self.limit_gib is not None:
            room = self.limit_gib - self.headroom_gib
            no_room = [i for i, p in enumerate(pts) if p.state == "ok" and p.peak is not None and p.peak > room]
            hi_a = min([hi_f, *no_room])
            lo_a = max((i for i, p in enumerate(pts[:hi_a])
                        if p.state == "ok" and p.peak is not None and p.peak <= room), default=-1)
            hi_a = next((i for i in range(lo_a + 1, hi_a) if predicted_above(i, room + self.margin_gib)), hi_a)
        return Knowledge(lo_f, hi_f, lo_a, hi_a)


