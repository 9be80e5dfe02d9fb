"""A sweep's winner as locked defaults: choosing it, the TOML and its table, the checks before and after writing.

The command is ``python -m lmtune.export`` (lmtune/export.py, which says what it writes and when it refuses).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune import config as config_lib
from lmtune.config import PROJECT_LOCKED, ConfigError
from lmtune.results.format import fmt, gib, markdown_table, short
from lmtune.results.frontier import frontier_report
from lmtune.results.read import AC_MODES, Results, load_results
from lmtune.results.summary import best_trial, pareto_front
from lmtune.results.transfer import PARAMETRIZATION_KEY, WIDTH_KEY

SECTION_TITLES = {"model": "Architecture", "data": "Data", "train": "Training recipe", "system": "System"}


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
    """The winning trial (or the chosen ``trial``) and its values of the sweep's export keys (ConfigError
    when there is none, or when a Pareto sweep's trial was not chosen)."""
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
    else:
        row = best_trial(results)
        if row is None:
            raise ConfigError(f"{results.dir}: nothing to export: no trial ended ok with a value of "
                              f"'{results.metric}' (statuses: {_status_counts(results)}).")
        metric, value = results.metric, row.get(results.metric)
        n_ok = sum(1 for r in results.rows if r.get("status") == "ok")
        source = f"{results.name} sweep ({results.group}): best {metric}={fmt(value, metric)} ({results.mode}) of {n_ok} ok trials"
    cfg = results.config_of(row)
    values = {}
    for key in keys:
        if key not in cfg:
            raise ConfigError(f"{results.dir}: export key '{key}' has no value for trial {row.get('trial_id')} "
                              f"(not in its config, the sweep's base or its summary.json).")
        values[key] = config_lib.coerce(key, cfg[key])
    return Winner(row, values, metric, value, source)


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
    return Winner(w.row, values, w.metric, w.metric_value, source), record


def _status_counts(results: Results) -> str:
    counts: dict[str, int] = {}
    for r in results.rows:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no trials"


def plan_export(results: Results, to: str | Path | None = None, *, date: str | None = None,
                trial: str | None = None, for_width: int | None = None) -> ExportPlan:
    """What :func:`export` would write: the merged values, provenance and the old → new lines. ``for_width``: the
    winner's values carried to a model of that width by μP (:func:`transferred`)."""
    path = Path(to) if to else PROJECT_LOCKED
    if for_width is not None and trial is None and PARAMETRIZATION_KEY in results.space_keys:
        # A width-transfer sweep holds both parametrizations: the μP trials are the ones whose values carry.
        results = dataclasses.replace(results, rows=[r for r in results.rows if _parametrization(results, r) == "mup"])
    w = winner(results, trial)
    transfer = None
    if for_width is not None:
        w, transfer = transferred(results, w, for_width)
    date = date or datetime.date.today().isoformat()
    provenance = {
        key: {"source": w.source, "sweep": results.name, "group": results.group, "metric": w.metric,
              "value": w.metric_value, "trial_id": str(w.row.get("trial_id")), "date": date,
              "results_dir": str(results.dir.resolve())}
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


def export(results_dir: str | Path, to: str | Path | None = None, *, force: bool = False) -> ExportPlan:
    """Write the locked-defaults TOML and its markdown table; ConfigError if refused or on bad input."""
    results = load_results(results_dir)
    return write_export(plan_export(results, to), results, force=force)


def _check_ac_mode(plan: ExportPlan) -> None:
    """A locked ac_budget applies only in the mode it was measured in (lmtune.config.resolve): refuse a file
    whose own train.compile would keep it from ever applying."""
    mode = plan.provenance.get("train.ac_budget", {}).get("ac_mode")
    if mode and "train.compile" in plan.values and AC_MODES[bool(plan.values["train.compile"])] != mode:
        raise ConfigError(f"{plan.path}: the exported train.ac_budget={plan.values['train.ac_budget']} was measured "
                          f"with ac_mode={mode}, but the file sets train.compile={str(plan.values['train.compile']).lower()}, "
                          f"so the trainer would never apply it; export to another file (--to), or remove "
                          f"train.compile from {plan.path.name} first.")


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


def write_export(plan: ExportPlan, results: Results, *, force: bool = False) -> ExportPlan:
    """Write the TOML and its markdown table, after :func:`check_export`; the TOML replaces the old file only
    once the trainer resolves it to the exported values (an invalid combination writes nothing)."""
    check_export(plan, results, force=force)
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    staged = plan.path.with_name(f".{plan.path.name}.new")
    staged.write_text(to_toml(plan.values, plan.provenance, results))
    try:
        check_round_trip(staged, plan.values, plan.provenance)
    except ConfigError as e:
        staged.unlink()
        raise ConfigError(f"{plan.path}: the exported values do not make a valid config with the defaults they "
                          f"would join: {e} Nothing written; export the keys they depend on too (the sweep file's "
                          f"export=[...]).") from None
    except BaseException:
        staged.unlink()
        raise
    os.replace(staged, plan.path)
    plan.path.with_suffix(".md").write_text(to_markdown(plan.values, plan.provenance, plan.path))
    return plan


def check_export(plan: ExportPlan, results: Results, *, force: bool = False) -> None:
    """Everything that refuses an export before anything runs or is written (ConfigError); a file that already
    holds the plan (``plan.unchanged``) refuses nothing, since nothing is written."""
    if plan.unchanged:
        return
    _check_ac_mode(plan)
    why = rehearsal(results)
    if why and plan.path.resolve() == PROJECT_LOCKED.resolve() and not force:
        raise ConfigError(f"{results.dir.name} is {why}: its values would become the defaults of every "
                          f"`python -m lmtune.train` in {Path.cwd()}; nothing written. Export it elsewhere with "
                          f"--to FILE (and use it with --locked FILE), or pass --force to lock it in here anyway.")
    if plan.path.exists() and not force:
        raise ConfigError(f"{plan.path} exists; nothing written. Rerun with --force to apply the changes above "
                          f"(keys not exported here are kept).")


def check_round_trip(path: Path, values: dict[str, Any], provenance: dict[str, dict[str, Any]] | None = None) -> None:
    """The trainer, given this file, resolves exactly the exported values (for a run in the AC mode they were
    measured in, when they name one)."""
    mode = (provenance or {}).get("train.ac_budget", {}).get("ac_mode")
    overrides = {"train.compile": mode == "budget"} if mode and "train.compile" not in values else {}
    cfg = config_lib.load(overrides=overrides, locked=path)
    wrong = {k: (cfg.get(k), v) for k, v in values.items() if cfg.get(k) != v}
    if wrong:
        raise RuntimeError(f"{path}: the trainer would not resolve the exported values: {wrong}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are valid TOML
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(values: dict[str, Any], provenance: dict[str, dict[str, Any]], results: Results) -> str:
    lines = [
        f"# lmtune locked defaults, written by `python -m lmtune.export {results.dir.resolve()}`.",
        "# The trainer reads this file over its built-in and shipped defaults (./lmtune.locked.toml is picked up",
        "# from the working directory; any path with --locked PATH or $LMTUNE_LOCKED); command-line keys win.",
        "",
    ]
    sections: dict[str, list[str]] = {}
    for key in sorted(values, key=lambda k: (list(config_lib.SECTIONS).index(k.split(".")[0]), k)):
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {_toml_value(values[key])}")
    for section, body in sections.items():
        lines += [f"[{section}]", *body, ""]
    for key in sorted(provenance):
        lines.append(f'[provenance."{key}"]')
        lines += [f"{k} = {_toml_value(v)}" for k, v in provenance[key].items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def to_markdown(values: dict[str, Any], provenance: dict[str, dict[str, Any]], toml_path: Path) -> str:
    """The phase-0 study's "Conclusions & Locked Configs" tables: one per config section."""
    lines = ["# Locked defaults", "",
             f"The values in `{toml_path.name}` (written by `python -m lmtune.export`); the trainer uses them as "
             f"its defaults. Carry them forward unless explicitly ablating them.", ""]
    by_section: dict[str, list[str]] = {}
    for key in values:
        by_section.setdefault(key.split(".")[0], []).append(key)
    for section in config_lib.SECTIONS:
        keys = by_section.get(section)
        if not keys:
            continue
        rows = [[short(k), _md_value(values[k]), provenance.get(k, {}).get("source", "")] for k in sorted(keys)]
        lines += [f"## {SECTION_TITLES[section]}", "", markdown_table(["Parameter", "Value", "Source"], rows), ""]
    return "\n".join(lines)


def _md_value(v: Any) -> str:
    return str(v) if not isinstance(v, list) else ", ".join(map(str, v))


