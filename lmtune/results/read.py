"""A results directory read back: :func:`load_results` → :class:`Results` (the sweep, its trials' rows, their reports).

Input (docs/CONTRACTS.md, "Results directory"): ``sweep.json``, ``trials.csv`` and
``trials/{trial_id}/metrics.jsonl|summary.json``. A running sweep works too: trials that are not in
``trials.csv`` yet are read from their ``summary.json`` or, failing that, their last metrics line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lmtune.config import ConfigError
from lmtune.contract import METRICS_JSONL, SUMMARY_JSON, SWEEP_JSON, TRIALS_CSV, TRIALS_DIR
from lmtune.results.format import number
from lmtune.results.layout import CONFIG_KEYS, measured, read_json, read_jsonl, read_trials_csv, trial_dir

AC_MODES = {True: "budget", False: "blocks"}
"""``train.ac_budget``'s mode by ``train.compile``: the compile partitioner's budget, or checkpointed blocks."""


@dataclass
class Results:
    dir: Path
    sweep: dict[str, Any]
    rows: list[dict[str, Any]]
    """trials.csv rows with typed values (None for empty cells), plus trials still running."""

    @property
    def name(self) -> str:
        return str(self.sweep.get("name", self.dir.name))

    @property
    def group(self) -> str:
        return str(self.sweep.get("group", self.dir.name))

    @property
    def space_keys(self) -> list[str]:
        return list(self.sweep.get("space") or {})

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, d in (self.sweep.get("space") or {}).items() if isinstance(d, dict) and d.get("type") == "grid"]

    @property
    def frontier_spec(self) -> dict[str, Any] | None:
        return self.sweep.get("frontier") or None

    @property
    def metric(self) -> str:
        m = self.sweep.get("metric") or "val_loss"
        return m[0] if isinstance(m, list) else m

    @property
    def mode(self) -> str:
        m = self.sweep.get("mode") or "min"
        return m[0] if isinstance(m, list) else m

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) pairs: one for a single-metric sweep, several for a Pareto sweep."""
        metrics, modes = self.sweep.get("metric") or "val_loss", self.sweep.get("mode") or "min"
        if not isinstance(metrics, list):
            return [(metrics, modes if isinstance(modes, str) else modes[0])]
        modes = modes if isinstance(modes, list) else [modes] * len(metrics)
        return list(zip(metrics, modes))

    def limit(self) -> tuple[float | None, str]:
        """The memory limit of the frontier: ``memory_limit_gib`` when set, else the device's memory."""
        emulated = number(self.sweep.get("memory_limit_gib")) or number((self.sweep.get("base") or {}).get(
            "system.memory_limit_gib"))
        if emulated:
            return emulated, "system.memory_limit_gib"
        device = number(self.sweep.get("device_memory_gib"))
        if device:
            return device, f"device memory ({self.sweep.get('device_name') or 'device'})"
        reported = [number(r.get("device_memory_gib")) for r in self.rows]
        reported += [number((read_json(trial_dir(self.dir, r.get("trial_id")) / SUMMARY_JSON) or {}).get(
            "device_memory_gib")) for r in self.rows if measured(r) and "device_memory_gib" not in r]
        reported = [v for v in reported if v]
        if reported:
            return min(reported), "device memory reported by the trials"
        return None, ""

    @property
    def ac_mode(self) -> str:
        """How the sweep's ``train.ac_budget`` was applied (lmtune.training.parallelize): ``budget`` with compile,
        ``blocks`` without; the frontier refuses a sweep whose trials mix the two."""
        return AC_MODES[bool((self.sweep.get("base") or {}).get("train.compile"))]

    def metrics(self, trial_id: str) -> list[dict[str, Any]]:
        """Every report of a trial (``trials/{id}/metrics.jsonl``); [] when there is none."""
        return read_jsonl(trial_dir(self.dir, trial_id) / METRICS_JSONL)

    def config_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The trial's full flat config: sweep base < the trial's summary.json config < its trials.csv cells."""
        cfg = dict(self.sweep.get("base") or {})
        summary = read_json(trial_dir(self.dir, row.get("trial_id")) / SUMMARY_JSON)
        cfg.update((summary or {}).get("config") or {})
        cfg.update({k: v for k, v in row.items() if k in CONFIG_KEYS and v is not None})
        return cfg


def load_results(path: str | Path) -> Results:
    """Read a results directory; ConfigError (one line, exit 2 at the command line) when it is not one."""
    d = Path(path)
    if not d.exists():
        raise ConfigError(f"results directory not found: {d}")
    if not d.is_dir():
        raise ConfigError(f"{d} is not a directory; expected a sweep's results directory (with sweep.json).")
    sweep = read_json(d / SWEEP_JSON)
    if sweep is None:
        raise ConfigError(f"{d} is not a results directory: no readable sweep.json "
                          f"(python -m lmtune.sweep writes one per sweep run).")
    rows = read_trials_csv(d / TRIALS_CSV)
    known = {r["trial_id"] for r in rows}
    trials_dir = d / TRIALS_DIR
    for tdir in sorted(trials_dir.iterdir()) if trials_dir.is_dir() else []:
        if tdir.is_dir() and tdir.name not in known:
            row = _row_from_trial_dir(tdir)
            if row is not None:
                rows.append(row)
    return Results(d, sweep, rows)


def _row_from_trial_dir(tdir: Path) -> dict[str, Any] | None:
    summary = read_json(tdir / SUMMARY_JSON)
    if summary is None:
        reports = read_jsonl(tdir / METRICS_JSONL)
        if not reports:
            return None
        summary = {**reports[-1], "status": reports[-1].get("status", "running")}
    row = {k: v for k, v in summary.items() if k != "config" and not isinstance(v, (dict, list))}
    row.update((summary.get("config") or {}))
    row.update({"trial_id": tdir.name, "source": "run", "status": summary.get("status", "running")})
    return row


