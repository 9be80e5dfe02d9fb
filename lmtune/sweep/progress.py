"""Live progress of a sweep on the console: the sweep's count and, per running trial, its step of steps, loss,
tokens/s and time left; per trial that waits for resources, what it waits for and how long it has.

On a terminal the block is redrawn in place under the per-event lines (at most twice a second); when the output
is not a terminal (a CI log, a file) the same block is printed as plain lines every ``interval_s``. The driver's
Tune callback (:class:`lmtune.sweep.callback.ResultsWriter`) feeds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TextIO

REDRAW_S = 0.5
"""On a terminal: the block is redrawn at most this often."""
WAIT_SHOWN_S = 10.0
"""A trial held back this long (Tune's PENDING: no room on the cluster for it yet) is said to wait, once as an event
line and then in the block: a trial's process takes a few seconds to start anyway, which is no wait worth a word."""


def duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``2h 10m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


@dataclass
class _Running:
    steps: int | None
    started: float
    step: int = 0
    first: tuple[float, int] | None = None
    """(time, step) of its first report in this driver: the rate since then gives the time left."""
    loss: float | None = None
    tokens_per_s: float | None = None


class Progress:
    def __init__(self, out: TextIO, total: int | str, *, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, tty: bool | None = None, wants: str = "",
                 free: Callable[[], str] | None = None, workers: int = 1):
        """``wants``: what each trial asks the cluster for (``1 CPU + 1 GPU``); ``free``: what the cluster has free now
        (``0 of 2 CPUs``), asked only when a waiting trial is shown; ``workers`` > 1: a running trial without a report
        may be waiting for its Ray Train workers' resources, and says what they need."""
        self.out = out
        self.total = total
        self.interval_s = interval_s
        self.clock = clock
        self.tty = bool(getattr(out, "isatty", lambda: False)()) if tty is None else tty
        self.wants = wants
        self.free = free
        self.workers = workers
        self.started = clock()
        self.done = 0
        self.running: dict[str, _Running] = {}
        self.waiting: dict[str, float] = {}
        """Trials held back for resources → since when (the clock's time)."""
        self._said_waiting: set[str] = set()
        self._drawn = 0  # lines of the block on the terminal now
        self._last = clock()
        self._dirty = False

    # --- what the callback tells it ---

    def start(self, tid: str, steps: Any) -> None:
        self.running[tid] = _Running(steps=steps if isinstance(steps, int) else None, started=self.clock())
        self.waiting.pop(tid, None)
        self._dirty = True

    def pending(self, tids: Iterable[str]) -> list[str]:
        """The trials held back for resources now (every step of Tune's controller); returns those that have just
        waited :data:`WAIT_SHOWN_S`, for an event line each (:meth:`waits_for` says what for)."""
        now = self.clock()
        current = set(tids)
        for tid in [t for t in self.waiting if t not in current]:
            del self.waiting[tid]
            self._dirty = True
        new = []
        for tid in current:
            since = self.waiting.setdefault(tid, now)
            if now - since >= WAIT_SHOWN_S and tid not in self._said_waiting:
                self._said_waiting.add(tid)
                new.append(tid)
        return new

    def waits_for(self) -> str:
        """``for 1 CPU + 1 GPU (free now: 0 of 2 CPUs)``."""
        return self._waits_for(self._free_now())

    def report(self, tid: str, metrics: dict[str, Any]) -> None:
        r = self.running.get(tid)
        if r is None or not isinstance(metrics.get("step"), int):
            return
        now = self.clock()
        r.step = metrics["step"]
        if isinstance(metrics.get("total_steps"), int):  # the trainer's own count (train.flops, tokens, epochs)
            r.steps = metrics["total_steps"]
        if r.first is None:
            r.first = (now, r.step)
        if isinstance(metrics.get("loss"), (int, float)):
            r.loss = float(metrics["loss"])
        if isinstance(metrics.get("tokens_per_s"), (int, float)):
            r.tokens_per_s = float(metrics["tokens_per_s"])
        self._dirty = True

    def end(self, tid: str) -> None:
        self.running.pop(tid, None)
        self.done += 1
        self._dirty = True

    def line(self, text: str) -> None:
        """An event line, printed above the live block."""
        self._clear()
        print(text, file=self.out, flush=True)
        if self.tty:
            self._draw()

    def tick(self) -> None:
        """Called often (every step of Tune's controller): redraw or print the block when it is due."""
        now = self.clock()
        if self.tty:
            # a waiting trial's time goes on without reports: once a second
            due = self._dirty or (self._shown_waiting(now) and now - self._last >= 1.0)
            if due and now - self._last >= REDRAW_S:
                self._clear()
                self._draw()
        elif (self.running or self._shown_waiting(now)) and now - self._last >= self.interval_s:
            for text in self.lines():
                print(text, file=self.out)
            self.out.flush()
            self._last = now

    def close(self) -> None:
        self._clear()

    # --- the block ---

    def lines(self) -> list[str]:
        now = self.clock()
        elapsed = now - self.started
        waiting = self._shown_waiting(now)
        head = f"progress: {self.done}/{self.total} done, {len(self.running)} running, " + (
            f"{len(waiting)} waiting, " if waiting else "") + f"{duration(elapsed)} elapsed"
        if isinstance(self.total, int) and 0 < self.done < self.total:
            head += f", about {duration(elapsed * (self.total - self.done) / self.done)} left"
        out = [head]
        stalled = {tid for tid, r in self.running.items()
                   if self.workers > 1 and r.first is None and now - r.started >= WAIT_SHOWN_S}
        free = self._free_now() if waiting or stalled else ""  # asks the cluster: once per block, when said
        for tid, r in self.running.items():
            parts = [f"  {tid}"]
            parts.append(f"step {r.step}/{r.steps}" if r.steps else f"step {r.step}")
            if r.loss is not None:
                parts.append(f"loss {r.loss:.3f}")
            if r.tokens_per_s is not None:
                parts.append(f"{r.tokens_per_s:,.0f} tok/s")
            left = self._left(r, now)
            parts.append(f"{duration(now - r.started)} in" + (f", {duration(left)} left" if left is not None else ""))
            if tid in stalled:
                parts.append(f"no report yet: its workers need {self.wants}{free}")
            out.append("  ".join(parts))
        for tid in waiting:
            out.append(f"  {tid}  waiting {duration(now - self.waiting[tid])} {self._waits_for(free)}")
        return out

    def _shown_waiting(self, now: float) -> list[str]:
        return [tid for tid, since in self.waiting.items() if now - since >= WAIT_SHOWN_S]

    def _waits_for(self, free: str) -> str:
        return f"for {self.wants or 'resources'}{free}"

    def _free_now(self) -> str:
        free = self.free() if self.free else ""
        return f" (free now: {free})" if free else ""

    @staticmethod
    def _left(r: _Running, now: float) -> float | None:
        if not r.steps or r.first is None or r.step <= r.first[1]:
            return None
        rate = (now - r.first[0]) / (r.step - r.first[1])
        return rate * max(0, r.steps - r.step)

    def _draw(self) -> None:
        block = self.lines() if (self.running or self.done or self.waiting) else []
        for text in block:
            print("\x1b[2K" + text, file=self.out)
        self.out.flush()
        self._drawn = len(block)
        self._last = self.clock()
        self._dirty = False

    def _clear(self) -> None:
        if self.tty and self._drawn:
            # cursor up over the block, then erase to the end of the screen
            print(f"\x1b[{self._drawn}F\x1b[J", end="", file=self.out, flush=True)
            self._drawn = 0
