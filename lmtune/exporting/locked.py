"""Locked defaults on disk: an export plan (:mod:`lmtune.exporting.plan`) written as the TOML the trainer reads and
the phase-0-style markdown table beside it, after the checks that refuse it, and read back to check it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmtune import config as config_lib
from lmtune.config import PROJECT_LOCKED, ConfigError
from lmtune.exporting.plan import ExportPlan, plan_export, rehearsal
from lmtune.results.format import markdown_table, short
from lmtune.results.read import AC_MODES, Results, load_results

SECTION_TITLES = {"model": "Architecture", "data": "Data", "train": "Training recipe", "system": "System"}


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


