"""What the frontier planner (:class:`lmtune.sweep.plan.FrontierPlan`) has found, read for trials.csv and the
tables: the points never launched (OOM by implication or prediction), the peak predicted for each point when it
was launched and how it compared with the measurement, and the boundaries of every line.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from lmtune.contract import REUSED_FROM, TRIAL_METRICS
from lmtune.sweep.lines import Line, LineKey, MemoryModel, Point

PEAK_KEY = "peak_reserved_gib"
THROUGHPUT_KEY = "tokens_per_s"
PREDICTED_KEY = "predicted_peak_gib"
"""The trials.csv column of the peak the plan predicted for a point (before it ran, for a trial that ran)."""


class Findings:
    """What a :class:`FrontierPlan` has found, for trials.csv and the tables: the points never launched, the
    predictions made at launch and how they compared with the measurements, the boundaries per line."""

    lines: list[Line]
    x_key: str
    memory: MemoryModel
    _by_trial: dict[str, tuple[Line, Point]]
    limit_gib: float | None
    earlier: dict[tuple[LineKey, Any], tuple[str, dict[str, Any]]]

    def trials_run(self) -> int:
        return len(self._by_trial)

    def implied_rows(self) -> list[dict[str, Any]]:
        """trials.csv rows for the points never launched: those an earlier sweep measured (``--warm-start``: source
        ``earlier``, its metrics, ``reused_from`` the trial that measured it), and those OOM by implication or
        prediction (``source`` is ``implied`` when a measured OOM at a smaller x implies it, else ``predicted``;
        ``predicted_peak_gib`` is the line's fit at that x, None without a fit).
        """
        rows = [{"trial_id": f"earlier-{n:03d}", "status": result.get("status"), "source": "earlier",
                 REUSED_FROM: source, **dict(key), self.x_key: x, **{m: result.get(m) for m in TRIAL_METRICS}}
                for n, ((key, x), (source, result)) in enumerate(getattr(self, "earlier", {}).items(), 1)]
        ruled_out = 0
        for line in self.lines:
            k = self.memory.knowledge(line)
            first_oom = min((p.x for p in line.points if p.state == "oom"), default=None)
            for i in range(k.hi_f, len(line.points)):
                p = line.points[i]
                if p.state != "unknown":
                    continue
                source = "implied" if first_oom is not None and first_oom <= p.x else "predicted"
                ruled_out += 1
                rows.append({
                    "trial_id": f"{source}-{ruled_out:03d}", "status": "oom", "source": source,
                    **dict(line.key), self.x_key: p.x, PREDICTED_KEY: self.memory.predicted_peak(line, p.x),
                })
        return rows

    def launch_predictions(self) -> dict[str, float | None]:
        """``{trial_id: peak predicted when it was launched}`` for the trials.csv column ``predicted_peak_gib``."""
        return {tid: p.predicted for tid, (_, p) in self._by_trial.items()}

    def launch_cells(self, trial_id: str) -> dict[str, Any]:
        """The planner's cells of a launched trial's trials.csv row."""
        return {PREDICTED_KEY: self.launch_predictions().get(trial_id)}

    def prediction_errors(self) -> list[dict[str, Any]]:
        """For every launched point that had a prediction: predicted vs measured peak.

        ``error_gib`` = measured − predicted for feasible points; for an OOM point the measured peak is
        only the last reading before the OOM, so ``error_gib`` is None and ``consistent`` says whether
        the prediction was above the limit.
        """
        out = []
        for line in self.lines:
            for p in line.points:
                if p.trial_id is None or p.predicted is None or p.state not in ("ok", "oom"):
                    continue
                row = {**dict(line.key), self.x_key: p.x, "trial_id": p.trial_id, "status": p.status,
                       "predicted_gib": p.predicted, "measured_gib": p.peak, "error_gib": None, "consistent": None}
                if p.state == "ok" and p.peak is not None:
                    row["error_gib"] = p.peak - p.predicted
                elif p.state == "oom" and self.limit_gib is not None:
                    row["consistent"] = p.predicted > self.limit_gib
                out.append(row)
        return out

    def frontier(self) -> dict[LineKey, dict[str, Any]]:
        """Per line: largest feasible x and smallest OOM x (measured, implied or predicted)."""
        out = {}
        for line in self.lines:
            k = self.memory.knowledge(line)
            out[line.key] = {
                "largest_feasible": line.points[k.lo_f].x if k.lo_f >= 0 else None,
                "smallest_oom": line.points[k.hi_f].x if k.hi_f < len(line.points) else None,
            }
        return out


def prediction_summary(errors: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean/max absolute error over the feasible points, and how many OOM points the fit saw coming."""
    errs = [abs(e["error_gib"]) for e in errors if e.get("error_gib") is not None]
    oom = [e for e in errors if e.get("consistent") is not None]
    return {
        "points": len(errs),
        "mean_abs_error_gib": sum(errs) / len(errs) if errs else None,
        "max_abs_error_gib": max(errs) if errs else None,
        "oom_points": len(oom),
        "oom_predicted_above_limit": sum(1 for e in oom if e["consistent"]),
    }
