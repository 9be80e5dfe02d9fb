"""What a results directory records about its sweep: ``sweep.json``, written when the sweep starts and held
against the invocation of a ``--resume`` (docs/CONTRACTS.md lists its fields). No Ray."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from lmtune import __version__
from lmtune.config import ConfigError
from lmtune.contract import SWEEP_JSON
from lmtune.results.layout import read_json, write_json
from lmtune.sweep.resolved import ResolvedSweep


def sweep_json(rs: ResolvedSweep, results_dir: Path) -> dict[str, Any]:
    f = rs.frontier
    return {
        "name": rs.name,
        "group": results_dir.name,
        "file": str(rs.file.resolve()),
        "smoke": rs.smoke,
        "metric": rs.metric,
        "mode": rs.mode,
        "searcher": rs.searcher,
        "scheduler": rs.sweep.scheduler,
        "num_trials": rs.num_trials,
        "workers": rs.sweep.workers,
        "gpus": rs.gpus,
        "cpus": rs.cpus,
        "export": list(rs.export),
        "frontier": None if f is None else {"x": f.x, "budget": f.budget, "headroom_gib": f.headroom_gib,
                                            "margin_gib": f.margin_gib, "verify_predicted": f.verify_predicted},
        "memory_limit_gib": rs.base.get("system.memory_limit_gib") or None,
        **device_memory(rs),
        "base": rs.base,
        "space": rs.space_json(),
        "overrides": {k: v for k, v in rs.base_overrides.items()},
        "description": rs.sweep.description,
        "created": datetime.now().isoformat(timespec="seconds"),
        "lmtune_version": __version__,
    }


def device_memory(rs: ResolvedSweep) -> dict[str, Any]:
    """``device_memory_gib``/``device_name`` when the driver knows them: CPU trials (no GPUs) run on this
    node's RAM (a joined cluster's worker nodes may differ: the trainer reports its own in summary.json);
    GPU trials leave it to the trainer's report of the GPU it ran on."""
    if rs.gpus or rs.base.get("system.device") == "cuda":  # "auto" too: the trials may run on GPUs
        return {}
    import platform

    import psutil

    return {"device_memory_gib": psutil.virtual_memory().total / 2**30,
            "device_name": f"cpu ({platform.processor() or platform.machine()}, node RAM)"}


def check_same_sweep(rs: ResolvedSweep, results_dir: Path) -> None:
    """A resumed run must have the config it started with: unfinished trials would otherwise mix two."""
    then = json.loads((results_dir / SWEEP_JSON).read_text())
    now = json.loads(json.dumps(sweep_json(rs, results_dir), default=str))
    changed = [k for k in sorted(set(then["base"]) | set(now["base"])) if then["base"].get(k) != now["base"].get(k)]
    changed += [f"space[{k}]" for k in sorted(set(then["space"]) | set(now["space"]))
                if then["space"].get(k) != now["space"].get(k)]
    changed += [k for k in ("metric", "mode", "searcher", "scheduler", "num_trials", "workers") if then.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"--resume: {results_dir.name} was started with a different sweep ({', '.join(changed[:6])}"
                          f"{' …' if len(changed) > 6 else ''} changed); resume with the same file and overrides, "
                          f"or start a new run without --resume.")




def mark_finished(results_dir: Path) -> None:
    """``finished`` in sweep.json: the run reached its end (not stopped by Ctrl-C or SIGTERM), so that a ``--resume``
    of it has nothing to continue and need not start Ray (:func:`finished_at`)."""
    meta = read_json(results_dir / SWEEP_JSON)
    if meta is not None:
        write_json(results_dir / SWEEP_JSON, {**meta, "finished": datetime.now().isoformat(timespec="seconds")})


def finished_at(results_dir: Path) -> str | None:
    """When the run in ``results_dir`` reached its end (None: it did not, or it is older than this record)."""
    return (read_json(results_dir / SWEEP_JSON) or {}).get("finished")
