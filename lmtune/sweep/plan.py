"""The frontier planner: find each memory frontier with as few trials as the grid allows.

A frontier sweep is a grid of ``x`` (the micro-batch) crossed with the other grid axes (the AC budget,
and any other grid axis). Every combination of the other axes is one *line*, measured on its own:
across lines nothing is assumed (memory is not monotone across AC budgets). Along one line:

* Memory is monotone in x. Once a point is OOM, every larger x is OOM by implication and is never
  launched; and a point is never launched while a smaller, still pending point could imply it.
* Two thresholds are searched, both monotone in x: the OOM boundary (largest feasible x) and the
  headroom boundary (largest x whose ``peak_reserved_gib`` leaves ``headroom_gib`` free, the
  candidates for the recommended operating point). Each is a bisection over the sorted grid.
* Peak memory is predicted by a least-squares line through the feasible points of the line
  (activations scale linearly with the micro-batch; points within ``margin_gib`` of the limit are left
  out, since the caching allocator's reserved memory plateaus there and would bend the line). With a fit, a probe is the grid
  point predicted to sit just under the threshold (interpolation search); guided probes alternate with
  plain bisection, so a biased fit costs at most twice the bisection count (Dekker's safeguard).
  Points predicted above ``limit_gib + margin_gib`` are not launched (recorded as OOM, source
  ``predicted``); points predicted to leave less than ``headroom_gib - margin_gib`` free are not measured
  for the recommendation. Every launched point keeps the prediction made before it ran, so the
  prediction error is reported against the points that ran (:meth:`FrontierPlan.prediction_errors`).
* Throughput is assumed unimodal in x within a line (it rises with the micro-batch and may sag near
  the memory limit): once every headroom boundary is settled, both grid neighbours of the fastest
  point with headroom (over all lines: the recommended point) are measured, and so on until it is a
  measured local maximum.

:class:`FrontierPlan` holds all of this and imports no Ray, so tests and ``benchmarks/frontier_search.py``
drive it with a simulated memory function (:func:`simulate`); :class:`lmtune.sweep.search.FrontierSearcher` adapts it to
Ray Tune's ``Searcher`` API.

Concurrency: a line never has two probes pending inside the same open interval (the second would be
chosen without the first's answer), so the planner returns ``None`` ("wait") when every open interval
already has a probe in flight; different lines and the two thresholds of one line proceed in parallel.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from lmtune.config import ConfigError
from lmtune.contract import FEASIBLE
from lmtune.results.format import number
from lmtune.sweep.domains import cross
from lmtune.sweep.findings import PEAK_KEY, THROUGHPUT_KEY, Findings
from lmtune.sweep.lines import Knowledge, Line, LineKey, MemoryModel, Point
from lmtune.sweep.spec import Frontier

FINISHED = "FINISHED"
"""Returned by :meth:`FrontierPlan.suggest` when every line is resolved (same value as Ray's Searcher.FINISHED)."""

class FrontierPlan(Findings):
    """Decide which (line, x) points to run; Ray-free.

    ``suggest(trial_id)`` returns a flat config ``{key: value}`` (the line's axes and ``x_key``), ``None``
    to wait for a pending result, or :data:`FINISHED`. ``complete(trial_id, result, error)`` feeds back
    the trial's final result (``status``, ``peak_reserved_gib``, ``tokens_per_s``).
    """

    def __init__(
        self,
        xs: Sequence[Any],
        lines: Sequence[Mapping[str, Any]] = ({},),
        *,
        x_key: str = "train.micro_batch_size",
        limit_gib: float | None = None,
        headroom_gib: float = 6.0,
        margin_gib: float | None = None,
        predict: bool = True,
        confirm_throughput: bool = True,
        verify_predicted: bool = True,
    ):
        """
        Args:
            xs: the grid of x (sorted and de-duplicated here).
            lines: one mapping of the other grid axes per line (``[{}]`` for a single line).
            limit_gib: the memory limit (``system.memory_limit_gib``, else the device's memory);
                None = unknown: only the OOM boundary is searched and nothing is predicted.
            headroom_gib: memory the recommended operating point keeps free.
            margin_gib: how far above the limit a prediction must be before the point is skipped;
                None = 5% of the limit (near capacity the reserved memory levels off, so a straight-line
                fit overshoots by a few percent: 1.8 GiB of 40 on the phase-0 study's A100).
            predict: use the linear fit (to guide probes and skip points); False = plain bisection.
            confirm_throughput: measure both grid neighbours of the fastest point with headroom.
            verify_predicted: run the smallest point of a line's OOM boundary once when only a prediction put
                it there (False: leave it ``OOM (predicted)``, saying so and by how much margin).
        """
        xs = sorted(set(xs))
        if not xs:
            raise ConfigError(f"the frontier axis {x_key} has no values.")
        if not lines:
            raise ConfigError("the frontier has no lines (the other grid axes have no values).")
        self.x_key = x_key
        self.xs = xs
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        self.memory = MemoryModel(limit_gib if limit_gib and limit_gib > 0 else None, headroom_gib, margin_gib,
                                  predict and numeric)
        self.confirm_throughput = confirm_throughput
        self.verify_predicted = verify_predicted
        self.lines = [Line(tuple(line.items()), [Point(x) for x in xs]) for line in lines]
        keys = {line.key for line in self.lines}
        if len(keys) != len(self.lines):
            raise ConfigError("the frontier lines are not distinct.")
        self._by_trial: dict[str, tuple[Line, Point]] = {}
        self._completed = 0
        self._next_line = 0  # round-robin start, so concurrent probes spread over lines
        self.notes: list[str] = []
        """Observations worth reporting (non-monotone memory, errors)."""
        self.earlier: dict[tuple[LineKey, Any], tuple[str, dict[str, Any]]] = {}
        """Points an earlier sweep measured (``--warm-start``): (its ``run/trial_id``, its result)."""

    # --- construction from a sweep's space --------------------------------------------------------

    @classmethod
    def from_space(
        cls, space: Mapping[str, Any], frontier: Frontier, *, limit_gib: float | None, **options: Any
    ) -> "FrontierPlan":
        """Build the plan for ``searcher="frontier"``: every axis must be a grid (or choice, or a list).

        The frontier's ``x`` is the axis searched; every other axis (the budget first) is crossed into
        lines, each measured on its own.
        """
        axes: dict[str, list] = {}
        for key, domain in space.items():
            values = domain if isinstance(domain, (list, tuple)) else domain.listed()
            if values is None:
                raise ConfigError(
                    f"searcher='frontier' needs grid axes only; {key} is {domain!r}. "
                    f"Use grid([...]) or another searcher."
                )
            axes[key] = list(values)
        if frontier.x not in axes:
            raise ConfigError(f"searcher='frontier': the frontier axis {frontier.x} is not a grid axis of the space.")
        others = [k for k in axes if k != frontier.x]
        others.sort(key=lambda k: k != frontier.budget)  # budget first, then the space's order
        lines = cross({k: axes[k] for k in others})
        return cls(
            axes[frontier.x], lines, x_key=frontier.x, limit_gib=limit_gib,
            headroom_gib=frontier.headroom_gib, margin_gib=frontier.margin_gib,
            verify_predicted=frontier.verify_predicted, **options,
        )

    @property
    def limit_gib(self) -> float | None:
        return self.memory.limit_gib

    @property
    def headroom_gib(self) -> float:
        return self.memory.headroom_gib

    @property
    def grid_size(self) -> int:
        return len(self.xs) * len(self.lines)

    def _guide_next(self, line: Line, purpose: str) -> bool:
        """Alternate guided probes with bisection (Dekker's safeguard): the fit can be biased near the limit,
        so after a guided probe that left the interval open, the next probe halves it regardless."""
        done = [p for p in line.points if p.purpose == purpose and p.completed >= 0]
        return not done or not max(done, key=lambda p: p.completed).guided

    def _probe_in(self, line: Line, lo: int, hi: int, purpose: str) -> tuple[int, bool] | None:
        """The next probe strictly between ``lo`` and ``hi`` (None if nothing to probe or one is pending)."""
        inside = range(lo + 1, hi)
        if any(line.points[i].state == "pending" for i in inside):
            return None
        unknown = [i for i in inside if line.points[i].state == "unknown"]
        if not unknown:
            return None
        if self.limit_gib is not None and self.memory.fit(line) and self._guide_next(line, purpose):
            threshold = self.limit_gib if purpose == "oom" else self.limit_gib - self.headroom_gib
            under = [i for i in unknown if self.memory.predicted_peak(line, line.points[i].x) <= threshold]
            return (under[-1] if under else unknown[0]), True
        mid = (lo + hi) / 2
        return min(unknown, key=lambda i: (abs(i - mid), i)), False

    def _line_probe(self, line: Line) -> tuple[int, str, bool] | None:
        """The next probe of one line for its OOM or headroom boundary, or None.

        Once the OOM boundary is bracketed, a boundary that rests on a prediction (its smallest OOM point never
        ran) is verified: that point runs once (``verify_predicted``), so that no frontier calls a point
        infeasible on a fit alone when one trial could say; if it fits after all, the search goes on above it."""
        k = self.memory.knowledge(line)
        pending = [i for i, p in enumerate(line.points) if p.state == "pending"]
        for lo, hi, purpose in ((k.lo_f, k.hi_f, "oom"), (k.lo_a, k.hi_a, "headroom")):
            if purpose == "headroom" and self.limit_gib is None:
                continue
            probe = self._probe_in(line, lo, hi, purpose)
            # Never launch a point that a pending smaller x could make OOM by implication.
            if probe is not None and not any(j < probe[0] for j in pending):
                return probe[0], purpose, probe[1]
        n = len(line.points)
        if (self.verify_predicted and k.hi_f < n and line.points[k.hi_f].state == "unknown" and not pending
                and all(p.state != "unknown" for p in line.points[k.lo_f + 1:k.hi_f])):
            return k.hi_f, "verify", False
        return None

    def _throughput_probe(self) -> tuple[Line, int] | None:
        """Once every headroom boundary is settled: the unmeasured grid neighbour of the fastest point with
        headroom (over all lines), so the recommended point is a measured local maximum of throughput."""
        if not self.confirm_throughput or self.limit_gib is None:
            return None
        room = self.limit_gib - self.headroom_gib
        best: tuple[float, Line, int, Knowledge] | None = None
        for line in self.lines:
            k = self.memory.knowledge(line)
            if any(p.state in ("unknown", "pending") for p in line.points[k.lo_a + 1: k.hi_a]):
                return None
            for i, p in enumerate(line.points[: k.lo_a + 1]):
                if p.state == "ok" and p.peak is not None and p.peak <= room and p.throughput is not None:
                    if best is None or p.throughput > best[0]:
                        best = (p.throughput, line, i, k)
        if best is None:
            return None
        _, line, i, k = best
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j <= k.lo_a]
        if any(line.points[j].state == "pending" for j in neighbours):
            return None
        return next(((line, j) for j in neighbours if line.points[j].state == "unknown"), None)

    # --- the searcher protocol --------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        n = len(self.lines)
        for off in range(n):
            line = self.lines[(self._next_line + off) % n]
            probe = self._line_probe(line)
            if probe is not None:
                self._next_line = (self._next_line + off + 1) % n
                return self._launch(trial_id, line, *probe)
        extra = self._throughput_probe()
        if extra is not None:
            return self._launch(trial_id, *extra, "throughput", False)
        if any(p.state == "pending" for line in self.lines for p in line.points):
            return None
        return FINISHED

    def _launch(self, trial_id: str, line: Line, i: int, purpose: str, guided: bool) -> dict[str, Any]:
        p = line.points[i]
        p.predicted = self.memory.predicted_peak(line, p.x)
        p.state, p.trial_id, p.purpose, p.guided = "pending", trial_id, purpose, guided
        self._by_trial[trial_id] = (line, p)
        return {**dict(line.key), self.x_key: p.x}

    def complete(self, trial_id: str, result: Mapping[str, Any] | None, error: bool = False) -> None:
        if trial_id not in self._by_trial:
            return
        line, p = self._by_trial[trial_id]
        result = result or {}
        if self.limit_gib is None and number(result.get("device_memory_gib")):
            self.memory.limit_gib = number(result.get("device_memory_gib"))  # no emulated limit: the device's memory
        # No status: the process died before it said how it ended (a crash), which is no evidence that it fits.
        status = str(result.get("status") or "error")
        p.status = status
        p.peak = number(result.get(PEAK_KEY))
        p.throughput = number(result.get(THROUGHPUT_KEY))
        if status == "oom":
            p.state = "oom"
        elif status in FEASIBLE and not error:
            p.state = "ok"
        else:
            p.state = "error"
            self.notes.append(f"{line.label()}, {self.x_key}={p.x}: trial {trial_id} ended with status "
                              f"{status!r}; the frontier around it is resolved without it.")
        p.completed = self._completed
        self._completed += 1
        self._check_monotone(line)

    def know(self, config: Mapping[str, Any], result: Mapping[str, Any], source: str) -> bool:
        """An earlier sweep's measurement of a grid point (``--warm-start``) as evidence: the point is settled as it
        ended there (ok, oom) and never launched; its row (source ``earlier``) goes into trials.csv. False when the
        config is no point of this grid, the point is already settled, or the result is no evidence (another status,
        or a frontier of another memory limit)."""
        found = self._point_at(config)
        status = str(result.get("status") or "")
        limit = number((result.get("config") or {}).get("system.memory_limit_gib")) or number(
            result.get("device_memory_gib"))
        if found is None or found[1].state != "unknown" or status not in ("ok", "oom"):
            return False
        if self.limit_gib is not None and limit is not None and abs(limit - self.limit_gib) > 1e-9 * self.limit_gib:
            return False
        line, p = found
        p.status, p.state = status, status
        p.peak, p.throughput = number(result.get(PEAK_KEY)), number(result.get(THROUGHPUT_KEY))
        p.purpose, p.completed = "earlier", self._completed
        self._completed += 1
        self.earlier[(line.key, p.x)] = (source, dict(result))
        self._check_monotone(line)
        return True

    def _check_monotone(self, line: Line) -> None:
        ooms = [p.x for p in line.points if p.state == "oom"]
        oks = [p.x for p in line.points if p.state == "ok"]
        if ooms and oks and max(oks) > min(ooms):
            note = (f"{line.label()}: memory not monotone in {self.x_key}: {self.x_key}={max(oks)} ran "
                    f"but {min(ooms)} was OOM (the boundary is taken at the smallest OOM).")
            if note not in self.notes:
                self.notes.append(note)

    @property
    def done(self) -> bool:
        """Nothing pending and nothing left to probe (what suggest() reports as FINISHED)."""
        return (all(p.state != "pending" for line in self.lines for p in line.points)
                and all(self._line_probe(line) is None for line in self.lines) and self._throughput_probe() is None)

    # --- a resumed sweep --------------------------------------------------------------------------

    def reconcile(self, restored: Mapping[str, tuple[Mapping[str, Any], bool]],
                  recorded: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """After ``--resume``: make the plan agree with the trials Tune restored and those the driver recorded.

        The plan is saved with Tune's searcher state, a moment after the experiment's trials, and a driver killed
        between the two writes (or while Tune copied them to the storage, when the resume falls back to an older
        whole snapshot) resumes a plan a step behind or ahead of them. Left so, the plan launches a point once more
        under a new id while its first trial runs or has its row (two rows for one grid point), or waits forever
        for a trial Tune no longer has. The trials decide: every trial Tune restored or the driver recorded holds
        its point, and only a pending trial that neither knows is given up (its point is planned again).

        ``restored``: trial id → (its config, finished) for every trial Tune restored; ``recorded``: trial id →
        the row (status and metrics, typed) of every trial the driver recorded as ended. Returns what changed, one
        line each.
        """
        changes = []
        for tid, (line, p) in list(self._by_trial.items()):
            if p.state != "pending" or (tid in restored and not restored[tid][1]):
                continue  # settled, or Tune runs it again and its result comes back as it does for any trial
            if tid in recorded:
                self.complete(tid, recorded[tid])
                changes.append(f"{line.label()}, {self.x_key}={p.x}: trial {tid} ended before the interruption "
                               f"({p.status})")
            else:
                self._give_up(tid)
                changes.append(f"{line.label()}, {self.x_key}={p.x}: trial {tid} is in no restored snapshot; "
                               f"the point is planned again")
        for tid, config in [*((t, c) for t, (c, _) in restored.items()), *recorded.items()]:
            found = self._point_at(config)
            if tid in self._by_trial or found is None or found[1].state != "unknown":
                continue
            line, p = found
            self._adopt(tid, line, p)
            if tid in restored and not restored[tid][1]:
                pass  # Tune runs it again: its result comes back as any trial's does
            elif tid in recorded:
                self.complete(tid, recorded[tid])
            else:  # Tune keeps it finished but nothing says how it ended: the point runs again
                self._give_up(tid)
                continue
            changes.append(f"{line.label()}, {self.x_key}={p.x}: trial {tid}, unknown to the saved plan, holds the "
                           f"point ({p.status or 'running'})")
        return changes

    def _adopt(self, trial_id: str, line: Line, p: Point) -> None:
        """Take a trial the plan has no record of as its point's. When it is the probe the plan would launch now (a
        plan one step behind the trials), it is launched as that probe, with its purpose and prediction, and the
        search goes on as if the plan had launched it; otherwise as a point of no purpose."""
        turn = self._next_line
        if self.suggest(trial_id) == {**dict(line.key), self.x_key: p.x}:
            return
        if trial_id in self._by_trial:  # it chose another point: not launched after all
            self._give_up(trial_id)
        self._next_line = turn
        p.state, p.trial_id, p.purpose, p.guided, p.predicted = "pending", trial_id, "resumed", False, None
        self._by_trial[trial_id] = (line, p)

    def _point_at(self, config: Mapping[str, Any]) -> tuple[Line, Point] | None:
        """The (line, point) of a trial's config, None when it is not a point of this grid."""
        for line in self.lines:
            if all(k in config and config[k] == v for k, v in line.key):
                return next(((line, p) for p in line.points if p.x == config.get(self.x_key)), None)
        return None

    def _give_up(self, trial_id: str) -> None:
        """The pending trial will never report: its point is unknown again (the plan may launch it anew)."""
        _, p = self._by_trial.pop(trial_id)
        p.state, p.trial_id, p.purpose, p.guided, p.predicted = "unknown", None, "", False, None

def simulate(
    plan: FrontierPlan, measure: Callable[[dict[str, Any]], Mapping[str, Any]], *, concurrency: int = 1
) -> list[dict[str, Any]]:
    """Drive ``plan`` to the end with ``measure(config) -> result`` and ``concurrency`` trials in flight.

    Trials complete in launch order (first in, first out), which is the hardest order for the planner:
    the oldest pending probe answers first. Returns the launched trials as
    ``[{"trial_id", "config", "result"}]`` in launch order.
    """
    launched: list[dict[str, Any]] = []
    in_flight: list[dict[str, Any]] = []
    while True:
        cfg = None
        while len(in_flight) < concurrency:
            tid = f"sim-{len(launched) + 1:04d}"
            cfg = plan.suggest(tid)
            if cfg is None or cfg == FINISHED:
                break
            trial = {"trial_id": tid, "config": cfg, "result": dict(measure(cfg))}
            launched.append(trial)
            in_flight.append(trial)
        if not in_flight:
            if cfg != FINISHED:
                raise RuntimeError("frontier plan waits with no trial in flight")
            return launched
        trial = in_flight.pop(0)
        plan.complete(trial["trial_id"], trial["result"])
