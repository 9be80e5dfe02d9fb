"""``--validate N``: the winner trained afresh on this machine, against what the sweep measured for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtune import config as config_lib
from lmtune.config import ConfigError
from lmtune.contract import SUMMARY_JSON
from lmtune.exporting.plan import ExportPlan
from lmtune.results.format import fmt, markdown_table, number
from lmtune.results.kinds.frontier import frontier_report
from lmtune.results.layout import measured, read_json, trial_dir
from lmtune.results.read import Results

VALIDATE_TOLERANCE = 0.2
"""Default largest relative drift of tokens/s between the sweep's measurement and the validation run."""


def percent(r: float) -> str:
    """A relative tolerance in percent, as precise as given: 0.2 → ``20``, 0.001 → ``0.1`` (``:.0%`` said ±0%)."""
    return f"{r * 100:.6g}"


@dataclass
class Validation:
    lines: list[str]
    """The side-by-side table and the verdict, for the console."""
    passed: bool


def validate(results: Results, plan: ExportPlan, steps: int, *, tolerance: float = VALIDATE_TOLERANCE,
             trainer_factory=None) -> Validation:
    """A fresh ``steps``-step run at the winner's full config on this machine (no checkpoints, no W&B, one
    validation pass at the end), against what the sweep measured for it: tokens/s, peak memory and the headroom
    left under the limit. It fails when tokens/s drift by more than ``tolerance`` or the headroom the sweep kept
    is gone (the phase-0 study's "validate with a fresh 200-step timing run before committing a long job")."""
    import tempfile

    from lmtune.training import Trainer

    row = plan.winner.row
    flat, warmup = _fresh_config(results, row, steps)
    with tempfile.TemporaryDirectory(prefix="lmtune-validate-") as tmp:
        summary = (trainer_factory or Trainer)(config_lib.from_flat(flat), out_dir=tmp).fit()
    limit, where = results.limit()
    rep = frontier_report(results)
    keep = rep.headroom_gib if rep is not None else 0.0
    swept_tps, fresh_tps = number(row.get("tokens_per_s")), number(summary.get("tokens_per_s"))
    swept_peak, fresh_peak = number(row.get("peak_reserved_gib")), number(summary.get("peak_reserved_gib"))

    def headroom(peak):
        return None if limit is None or peak is None else limit - peak

    drift = (fresh_tps / swept_tps - 1) if swept_tps and fresh_tps is not None else None
    table = [["tokens_per_s", fmt(swept_tps, "tokens_per_s"), fmt(fresh_tps, "tokens_per_s"),
              f"{drift:+.1%}" if drift is not None else "—"],
             ["peak_reserved_gib", fmt(swept_peak, "peak_reserved_gib"), fmt(fresh_peak, "peak_reserved_gib"),
              f"{fresh_peak - swept_peak:+.3f}" if swept_peak is not None and fresh_peak is not None else "—"],
             ["headroom_gib", fmt(headroom(swept_peak), "headroom_gib"), fmt(headroom(fresh_peak), "headroom_gib"),
              f"limit {limit:g} GiB ({where})" if limit else "no limit known"]]
    problems = []
    if summary.get("status") != "ok":
        problems.append(f"the validation run ended {summary.get('status')}"
                        + (f" ({summary.get('oom_reason')})" if summary.get("oom_reason") else ""))
    if drift is None:
        problems.append("tokens/s could not be compared (missing on one side)")
    elif abs(drift) > tolerance:
        problems.append(f"tokens/s drifted {drift:+.1%} (tolerance ±{percent(tolerance)}%)")
    room = headroom(fresh_peak)
    if room is not None and room < keep:
        problems.append(f"{room:.3f} GiB headroom left, the sweep keeps {keep:g} GiB")
    threads = f", {flat['system.threads']} CPU thread(s) as in the sweep" if flat.get("system.threads") else ""
    lines = [f"validation: {steps} fresh steps of trial {row.get('trial_id')} on this machine "
             f"(tokens/s and peaks after the first {warmup} steps{threads})", "",
             markdown_table(["", "sweep", "validation", "difference"], table), ""]
    lines.append("validation passed" if not problems else "validation FAILED: " + "; ".join(problems))
    sharing = _overlapping(results, row)
    if sharing and drift is not None:
        lines.append(f"note: the sweep measured trial {row.get('trial_id')} while {sharing} other trial(s) ran on its "
                     f"node, which share its CPUs/memory bandwidth; for timings to lock, run the sweep with "
                     f"--max-concurrent 1 (or one trial per GPU).")
    return Validation(lines, not problems)


def _fresh_config(results: Results, row: dict[str, Any], steps: int) -> tuple[dict[str, Any], int]:
    """The winner's full config for ``steps`` fresh steps (no checkpoints, no samples, one validation pass), and its
    untimed warmup steps."""
    cfg = results.config_of(row)
    warmup = int(cfg.get("train.compile_warmup_steps") or 0)
    if steps <= warmup + 1:
        raise ConfigError(f"--validate {steps}: expected more steps than train.compile_warmup_steps + 1 "
                          f"({warmup + 1}): the first {warmup} are not timed.")
    flat = {**cfg, "train.steps": steps, "train.eval_interval": steps, "train.checkpoint": False,
            "train.sample_interval": 0}
    if not flat.get("system.threads") and flat.get("system.device") == "cpu":
        # as the trial ran: Ray gives a trial's process as many threads as CPUs it asked for (OMP_NUM_THREADS)
        flat["system.threads"] = max(1, int(number(results.sweep.get("cpus")) or 1))
    return {k: v for k, v in flat.items() if k in config_lib.all_keys()}, warmup


def _overlapping(results: Results, row: dict[str, Any]) -> int:
    """How many other trials ran on the same node while ``row``'s trial did (trials/*/summary.json times)."""
    def span(r):
        s = read_json(trial_dir(results.dir, r.get("trial_id")) / SUMMARY_JSON) or {}
        return number(s.get("started_at")), number(s.get("ended_at")), r.get("node_id") or s.get("node_id")

    start, end, node = span(row)
    if start is None or end is None:
        return 0
    others = [span(r) for r in results.rows
              if r.get("trial_id") != row.get("trial_id") and measured(r)]
    return sum(1 for s, e, where in others if s is not None and e is not None and s < end and e > start
               and where == node)


# --- command line ------------------------------------------------------------------------------------
