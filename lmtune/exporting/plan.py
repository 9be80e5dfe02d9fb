"""A sweep's winner and what exporting it would write: the winning trial, its values of the sweep's export keys,
their provenance, merged with the locked-defaults file already there (old → new per key).

:mod:`lmtune.exporting.locked` writes the plan; ``python -m lmtune.export`` (lmtune/export.py) is the command.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune import config as config_lib
from lmtune.config import PROJECT_LOCKED, ConfigError
from lmtune.results.format import fmt, gib
from lmtune.results.kinds.frontier import frontier_report
from lmtune.results.kinds.pareto import pareto_front
from lmtune.results.kinds.replicates import arms, best_arm, replicated, spread
from lmtune.results.kinds.trials import best_trial
from lmtune.results.kinds.width import PARAMETRIZATION_KEY, WIDTH_KEY
from lmtune.results.read import AC_MODES, Results


@dataclass
class Winner:
    row: dict[str, Any]
    """The winning trials.csv row."""
    values: dict[str, Any]
    """Exported key → value (typed as the config declares it)."""
    metric: str
    metric_value: float | None
    source: str
    """Phase-0-style text for the Source column."""
    label: str = ""
    """What the command calls it: ``trial ID``, or for a replicated sweep ``arm ... (mean of n seeds: trials ...)``."""
    record: dict[str, Any] = field(default_factory=dict)
    """More provenance for every key: an arm's ``replicates`` and ``arm_trial_ids``."""


@dataclass
class ExportPlan:
    path: Path
    winner: Winner
    values: dict[str, Any]
    provenance: dict[str, dict[str, Any]]
    changes: list[str] = field(default_factory=list)
    """Human lines: ``key: old → new`` for every key of the new file."""
    unchanged: bool = False
    """The file exists and already holds these values, locked from the same trial: writing would change nothing
    (but the date), so nothing is written and no ``--force`` is needed."""


def winner(results: Results, trial: str | None = None) -> Winner:
    """The winning trial (or the chosen ``trial``; in a sweep that repeats its configurations over seeds, the arm
    with the best mean) and its values of the sweep's export keys (ConfigError when there is none, or when a
    Pareto sweep's trial was not chosen)."""
    keys = list(results.sweep.get("export") or [])
    if not keys:
        raise ConfigError(f"{results.dir}: the sweep exports no keys (sweep.json 'export' is empty); "
                          f"add export=[...] to the sweep file.")
    rep = frontier_report(results)
    several = len(results.objectives) > 1
    if trial is not None:
        row = next((r for r in results.rows if str(r.get("trial_id")) == trial), None)
        ok = [str(r.get("trial_id")) for r in results.rows if r.get("status") == "ok"]
        if row is None or row.get("status") != "ok":
            what = "is not a trial of this sweep" if row is None else f"ended {row.get('status')}, not ok"
            raise ConfigError(f"--trial {trial} {what}. Ok trials: {', '.join(ok) or 'none'}.")
        metric = results.metric
        value = row.get(metric)
        on_front = " (on the Pareto front)" if several and row in pareto_front(results) else ""
        source = f"{results.name} sweep ({results.group}): trial {trial} chosen{on_front}, {metric}={fmt(value, metric)}"
    elif several:
        front = ", ".join(f"{r['trial_id']} (" + ", ".join(f"{m}={fmt(r.get(m), m)}" for m, _ in results.objectives) + ")"
                          for r in pareto_front(results))
        raise ConfigError(f"{results.dir}: a sweep with several metrics has no single winner; choose a trial of "
                          f"its Pareto front with --trial ID. Front: {front or 'no ok trial'}.")
    elif rep is not None:
        if rep.recommended is None:
            raise ConfigError(f"{results.dir}: nothing to export. {rep.statement}")
        row = next(r for r in results.rows if r.get("trial_id") == rep.recommended["trial_id"])
        metric, value = "tokens_per_s", rep.recommended["tokens_per_s"]
        source = (f"{results.name} frontier ({results.group}): recommended operating point, "
                  f"{gib(rep.recommended['headroom_gib'])} GiB headroom of {rep.limit_gib:g} GiB")
    elif replicated(results):
        return _best_arm(results, keys)
    else:
        row = best_trial(results)
        if row is None:
            raise ConfigError(f"{results.dir}: nothing to export: no trial ended ok with a value of "
                              f"'{results.metric}' (statuses: {_status_counts(results)}).")
        metric, value = results.metric, row.get(results.metric)
        n_ok = sum(1 for r in results.rows if r.get("status") == "ok")
        source = f"{results.name} sweep ({results.group}): best {metric}={fmt(value, metric)} ({results.mode}) of {n_ok} ok trials"
    return Winner(row, _values(results, row, keys), metric, value, source, label=f"trial {row.get('trial_id')}")


def _best_arm(results: Results, keys: list[str]) -> Winner:
    """A sweep that repeats its configurations over seeds: the arm with the best mean, not its luckiest seed (its
    values are the arm's; the provenance names its first ok trial and every trial averaged)."""
    arm, metric = best_arm(results), results.metric
    ok = [r for r in arm.trials if r.get("status") == "ok" and r.get(metric) is not None]
    ids = [str(r.get("trial_id")) for r in ok]
    mean = spread(arm.values.values()).mean
    source = (f"{results.name} sweep ({results.group}): best arm by mean {metric}={fmt(mean, metric)} ({results.mode}) "
              f"over {len(ids)} seeds, of {len(arms(results))} arms; the arm's mean, not its luckiest seed")
    return Winner(ok[0], _values(results, ok[0], keys), metric, mean, source,
                  label=f"arm {arm.label()} (mean of {len(ids)} seeds: trials {', '.join(ids)})",
                  record={"replicates": len(ids), "arm_trial_ids": ids})


def _values(results: Results, row: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """The trial's values of the export keys, typed as the config declares them."""
    cfg = results.config_of(row)
    values = {}
    for key in keys:
        if key not in cfg:
            raise ConfigError(f"{results.dir}: export key '{key}' has no value for trial {row.get('trial_id')} "
                              f"(not in its config, the sweep's base or its summary.json).")
        values[key] = config_lib.coerce(key, cfg[key])
    return values


def _parametrization(results: Results, row: dict[str, Any]) -> str:
    return str(results.config_of(row).get(PARAMETRIZATION_KEY) or "sp")


def transferred(results: Results, w: Winner, width: int) -> tuple[Winner, dict[str, Any]]:
    """The winner's values for a model ``width`` wide, and the provenance of the transfer.

    Under μP (``model.parametrization="mup"``) the tuned hyper-parameters hold at any width as long as the model keeps
    the width it was tuned at as its ``model.base_width`` (Yang et al. 2021): so the export locks the parametrization,
    that base width and the new ``model.n_embd`` next to the tuned values, with the depth and heads the trial had (μP
    carries width, not depth; its attention scale is for a fixed number of heads). Under the standard
    parametrization the optimum learning rate moves with the width, and the export is refused."""
    cfg = results.config_of(w.row)
    tid, kind, tuned = w.row.get("trial_id"), _parametrization(results, w.row), int(cfg.get(WIDTH_KEY) or 0)
    if kind != "mup":
        raise ConfigError(
            f"--for-width {width}: trial {tid} was trained with {PARAMETRIZATION_KEY}={kind}, where the best learning "
            f"rate moves with the width (Yang et al. 2021, Fig. 1; summary.md's Width transfer table shows by how much), "
            f"so values tuned at width {tuned} do not hold at {width}. Sweep at width {width}, or tune with "
            f"{PARAMETRIZATION_KEY}=mup (sweeps/width_transfer.py) and export a μP trial.")
    heads = int(cfg.get("model.n_head") or 1)
    if width < 1 or width % heads:
        raise ConfigError(f"--for-width {width}: expected a width that model.n_head={heads} divides "
                          f"(e.g. {max(1, width // heads) * heads or heads}).")
    base = int(cfg.get("model.base_width") or tuned)
    values = {**w.values, PARAMETRIZATION_KEY: "mup", "model.base_width": base, WIDTH_KEY: width,
              "model.n_head": heads, "model.n_layer": int(cfg.get("model.n_layer") or 1)}
    source = f"{w.source}; tuned at width {tuned}, transferred to width {width} by μP (model.base_width={base})"
    record = {"transfer": "mup", "tuned_width": tuned, "transferred_to": width}
    return dataclasses.replace(w, values=values, source=source), record


def _status_counts(results: Results) -> str:
    counts: dict[str, int] = {}
    for r in results.rows:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no trials"


def plan_export(results: Results, to: str | Path | None = None, *, date: str | None = None,
                trial: str | None = None, for_width: int | None = None, chosen: Winner | None = None) -> ExportPlan:
    """What :func:`export` would write: the merged values, provenance and the old → new lines. ``for_width``: the
    winner's values carried to a model of that width by μP (:func:`transferred`); ``chosen``: a winner made
    elsewhere (a scaling ladder's run for a compute budget, :mod:`lmtune.exporting.compute`)."""
    path = Path(to) if to else PROJECT_LOCKED
    if for_width is not None and trial is None and PARAMETRIZATION_KEY in results.space_keys:
        # A width-transfer sweep holds both parametrizations: the μP trials are the ones whose values carry.
        results = dataclasses.replace(results, rows=[r for r in results.rows if _parametrization(results, r) == "mup"])
    w = chosen or winner(results, trial)
    transfer = None
    if for_width is not None:
        w, transfer = transferred(results, w, for_width)
    date = date or datetime.date.today().isoformat()
    provenance = {
        key: {"source": w.source, "sweep": results.name, "group": results.group, "metric": w.metric,
              "value": w.metric_value, "trial_id": str(w.row.get("trial_id")), "date": date,
              "results_dir": str(results.dir.resolve()), **w.record}
        for key in w.values
    }
    if transfer:
        for record in provenance.values():
            record.update(transfer)
    why = rehearsal(results)
    if why:  # said next to every key it locks
        for record in provenance.values():
            record["measured_on"] = why
            record["source"] += f" [{why}]"
    if "train.ac_budget" in provenance:  # a budget means what its mode makes of it (lmtune.training.parallelize)
        provenance["train.ac_budget"]["ac_mode"] = AC_MODES[bool(results.config_of(w.row).get("train.compile"))]
    old_values, old_prov = _read_locked(path) if path.exists() else ({}, {})
    same_source = {k for k in w.values if _record(old_prov.get(k)) == _record(provenance[k])}
    unchanged = path.exists() and all(k in old_values and old_values[k] == v and k in same_source
                                      for k, v in w.values.items())
    values = {**old_values, **w.values}
    provenance = {**{k: v for k, v in old_prov.items() if k in values}, **provenance}
    current = _current_defaults()
    changes = []
    for key in values:
        new = values[key]
        if key not in w.values:
            changes.append(f"  {key}: {_show(new)} (kept)")
        elif key in old_values:
            old = old_values[key]
            if old != new:
                changes.append(f"  {key}: {_show(old)} → {_show(new)}")
            elif key in same_source:
                changes.append(f"  {key}: {_show(old)} (unchanged)")
            else:  # the same value, locked from elsewhere: the record of where it comes from would change
                was = (old_prov.get(key) or {}).get("source") or "no provenance"
                changes.append(f"  {key}: {_show(old)} (unchanged; its provenance would change from: {was})")
        else:
            was = f"(not set; default {_show(current[key])})" if key in current else "(not set)"
            changes.append(f"  {key}: {was} → {_show(new)}")
    return ExportPlan(path, w, values, provenance, changes, unchanged)


def _record(prov: dict[str, Any] | None) -> dict[str, Any] | None:
    """A provenance record as the TOML keeps it, without its date: two exports of the same trial compare equal."""
    if prov is None:
        return None
    return {k: v for k, v in prov.items() if v is not None and k != "date"}


def _read_locked(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    try:
        doc = tomllib.loads(path.read_text())
        values = config_lib.flatten_toml(doc, str(path))
    except (OSError, tomllib.TOMLDecodeError, ConfigError):
        return {}, {}  # unreadable: --force replaces it entirely
    return values, dict(doc.get("provenance") or {})


def _current_defaults() -> dict[str, Any]:
    try:
        return config_lib.load().flat()
    except ConfigError:
        return {}


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)



def rehearsal(results: Results) -> str:
    """Why a sweep's winner is not a measurement of the real run ('' when it is): a ``--smoke`` run, or one
    under an emulated memory limit (a small device emulated on a bigger one)."""
    why = []
    if results.sweep.get("smoke"):
        why.append("a --smoke run (a CPU-sized model)")
    limit = results.sweep.get("memory_limit_gib") or (results.sweep.get("base") or {}).get("system.memory_limit_gib")
    if limit:
        why.append(f"run under an emulated {limit:g} GiB memory limit")
    return " and ".join(why)

