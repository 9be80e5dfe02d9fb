"""Read a sweep file and check everything about it before any cluster resource is used.

:func:`load_sweep` executes the file and finds its one :class:`~lmtune.sweep.spec.Sweep`;
:func:`resolve` applies ``--smoke`` and the command line's ``key=value`` overrides, checks every key,
value, domain and metric, resolves the base config and every grid point through
:func:`lmtune.config.load`, and returns a :class:`ResolvedSweep` that the runner turns into a Tune run. The checks
themselves are :mod:`lmtune.sweep.checks` (``--address`` and ``--storage`` too).

Every problem is a :class:`~lmtune.config.ConfigError` (one line, exit code 2). This module imports
neither ray nor optuna nor torch (a sweep with ``train.flops`` counts its models with torch, on the meta device).
"""

from __future__ import annotations

import itertools
import os
import re
import traceback
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmtune import config as config_lib
from lmtune.config import ConfigError
from lmtune.data.cache import cache_root
from lmtune.data.prepared import check_prepared
from lmtune.sweep import searchers
from lmtune.sweep.checks import (
    absolute_paths,
    check_fields,
    check_frontier,
    check_keys,
    check_ladder,
    check_metrics,
    check_resources,
    same_validation_text,
    to_domain,
)
from lmtune.sweep.domains import Domain, cross
from lmtune.sweep.presets import TINY_CPU
from lmtune.sweep.resolved import ResolvedSweep, grid_axes
from lmtune.sweep.spec import Frontier, Smoke, Sweep

# --- loading the file -------------------------------------------------------------------------------


def _accepted_fields(exc: Exception) -> str:
    """For a misspelt argument of Sweep, Smoke or Frontier: the arguments it takes."""
    import dataclasses

    m = re.match(r"(\w+)\.__init__\(\) got an unexpected keyword argument", str(exc))
    cls = {"Sweep": Sweep, "Smoke": Smoke, "Frontier": Frontier}.get(m.group(1)) if m else None
    if cls is None:
        return ""
    return f". {cls.__name__} accepts: {', '.join(f.name for f in dataclasses.fields(cls))}."


def load_sweep(path: str | os.PathLike) -> tuple[Sweep, Path]:
    """Execute a sweep file and return its one Sweep object."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"sweep file not found: {p}; expected a Python file that defines a Sweep, "
                          f"e.g. sweeps/norm_warmup.py.")
    if not p.is_file():
        raise ConfigError(f"{p} is not a file (expected a sweep file such as sweeps/norm_warmup.py).")
    if p.suffix != ".py":  # a README or a TOML given by mistake read as "syntax error" at its first line
        raise ConfigError(f"{p} is not a sweep file: expected a Python file (.py) that defines a Sweep, e.g. "
                          f"sweeps/norm_warmup.py (README.md step 5 shows one).")
    try:
        source = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read sweep file {p}: {e}") from None
    try:
        code = compile(source, str(p), "exec")
    except SyntaxError as e:
        raise ConfigError(f"{p}:{e.lineno}: syntax error: {e.msg}") from None
    module = types.ModuleType(f"lmtune_sweep_file_{p.stem}")
    module.__file__ = str(p.resolve())
    try:
        exec(code, module.__dict__)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(p)]
        where = f":{frames[-1].lineno}" if frames else ""
        raise ConfigError(f"{p}{where}: {type(e).__name__}: {e}{_accepted_fields(e)}") from None
    found = {k: v for k, v in vars(module).items() if isinstance(v, Sweep)}
    if not found:
        raise ConfigError(f"{p} defines no Sweep object; declare one, e.g. `sweep = Sweep(name=..., space=...)`.")
    if len({id(v) for v in found.values()}) > 1:
        raise ConfigError(f"{p} defines several Sweep objects ({', '.join(found)}); keep one per file.")
    return next(iter(found.values())), p


# --- checking and resolving ------------------------------------------------------------------------


DEFAULT_SMOKE_SAMPLES = 2
"""Trials per grid point of the default smoke variant (tpe/nsga2 sweeps)."""


def default_smoke(sweep: Sweep) -> Smoke:
    """``--smoke`` for a file that declares no smoke variant: TINY_CPU as the base and at most
    :data:`DEFAULT_SMOKE_SAMPLES` samples per grid point (the space's axes are kept). Without it ``--smoke`` applied
    nothing and ran the full-size sweep (GPT-2 small, 1000 steps, compiled) on whatever machine it was."""
    samples = sweep.num_samples if isinstance(sweep.num_samples, int) and not isinstance(sweep.num_samples, bool) else 1
    return Smoke(base=dict(TINY_CPU), num_samples=max(1, min(samples, DEFAULT_SMOKE_SAMPLES)))



def resolve(sweep: Sweep, file: str | os.PathLike, *, smoke: bool = False,
            overrides: list[str] | dict[str, Any] | None = None, gpus: float | str | None = None,
            cpus: float | None = None) -> ResolvedSweep:
    """Apply --smoke, overrides and --gpus/--cpus to ``sweep`` and check everything; raises ConfigError."""
    file = Path(file)
    where = str(file)
    check_fields(sweep, where)
    if gpus is not None or cpus is not None:
        check_resources(sweep.gpus if gpus is None else gpus, sweep.cpus if cpus is None else cpus, "command line")
    smoke_default = smoke and sweep.smoke == Smoke()
    space, base_overrides, num_samples, frontier = _declared(sweep, smoke, smoke_default, where)
    base_overrides.update(_command_line(overrides, space, where))
    if smoke_default:  # a problem found from here on may come from the default variant, not the file's own lines
        where = f"{where} (--smoke without a smoke= variant: lmtune's default, base TINY_CPU)"
    space = {k: to_domain(k, d, where) for k, d in space.items()}
    if not space and sweep.define_by_run is None:
        raise ConfigError(f"{where}: the search space is empty; give at least one axis, e.g. "
                          f"space={{'train.lr': loguniform(1e-4, 3e-3)}}.")
    base_overrides.update(same_validation_text(space, base_overrides, sweep.workers))
    base = _base_config(base_overrides, where)
    metrics = [sweep.metric] if isinstance(sweep.metric, str) else list(sweep.metric)
    modes = [sweep.mode] if isinstance(sweep.mode, str) else list(sweep.mode)
    check_metrics(metrics, modes, base, where)
    kind, why = searchers.chosen(sweep, space, frontier, metrics, where)
    _check_frontier_and_scheduler(sweep, kind, space, frontier, metrics, where)
    rs = ResolvedSweep(sweep=sweep, file=file, smoke=smoke, base=base, base_overrides=base_overrides,
                       space=space, metrics=metrics, modes=modes, searcher=kind.name, searcher_note=why,
                       num_trials=kind.num_trials(len(cross(grid_axes(space))), num_samples),
                       export=list(sweep.export), frontier=frontier,
                       gpus=sweep.gpus if gpus is None else gpus, cpus=sweep.cpus if cpus is None else cpus,
                       smoke_default=smoke_default)
    if rs.gpus == 0 and base.get("system.device") == "cuda":
        raise ConfigError(f"{where}: system.device='cuda' but the trials ask for gpus=0, so Ray gives them no GPU; "
                          f"use gpus='auto' or a number >= 1 (or --gpus).")
    check_ladder(space, rs.grid_points(), where)
    check_points(rs, where)
    if sweep.define_by_run is not None:
        rs = replace(rs, define_by_run_keys=dry_run_define_by_run(rs, where))
    return rs


def _declared(sweep: Sweep, smoke: bool, smoke_default: bool,
              where: str) -> tuple[dict[str, Any], dict[str, Any], int, Frontier | None]:
    """(space, base overrides, num_samples, frontier) as the file declares them, its smoke variant applied with
    ``smoke`` (:func:`default_smoke`'s with ``smoke_default``); the keys checked."""
    space: dict[str, Any] = dict(sweep.space)
    base_overrides: dict[str, Any] = dict(sweep.base)
    num_samples, frontier = sweep.num_samples, sweep.frontier
    if smoke:
        sm = default_smoke(sweep) if smoke_default else sweep.smoke
        if not isinstance(sm, Smoke):
            raise ConfigError(f"{where}: smoke must be Smoke(base=..., space=..., num_samples=...), got {sm!r}.")
        check_keys(sm.base, f"{where}: smoke.base")
        check_keys(sm.space, f"{where}: smoke.space")
        base_overrides.update(sm.base)
        space.update(sm.space)
        if sm.frontier is not None:
            frontier = sm.frontier
        if sm.num_samples is not None:
            if not isinstance(sm.num_samples, int) or sm.num_samples < 1:
                raise ConfigError(f"{where}: smoke.num_samples={sm.num_samples!r} is not accepted: expected an integer >= 1.")
            num_samples = sm.num_samples
    elif isinstance(sweep.smoke, Smoke):  # checked without --smoke too: a typo there is still a typo
        check_keys(sweep.smoke.base, f"{where}: smoke.base")
        check_keys(sweep.smoke.space, f"{where}: smoke.space")
    check_keys(base_overrides, f"{where}: base")
    check_keys(space, f"{where}: space")
    return space, base_overrides, num_samples, frontier


def _command_line(overrides: list[str] | dict[str, Any] | None, space: dict[str, Any], where: str) -> dict[str, Any]:
    """The command line's ``key=value`` overrides, checked (an axis of the space is not one)."""
    cli = _cli_overrides(overrides)
    for key in cli:
        if key in space:
            raise ConfigError(f"{key} is an axis of the sweep's space; a command-line value would be ignored "
                              f"(change the space in {where}, or override a base key).")
    return cli


def _base_config(base_overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """The flat resolved config every trial starts from, its relative paths made absolute; its prepared data, if
    any, there and whole (one line naming the prepare command otherwise, before any trial)."""
    try:
        base_cfg = config_lib.load(overrides=base_overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: base config: {e}") from None
    try:
        check_prepared(base_cfg.data, cache_root(base_cfg.data))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return absolute_paths(base_cfg.flat())


def _check_frontier_and_scheduler(sweep: Sweep, kind: searchers.SearcherKind, space: dict[str, Domain],
                                  frontier: Frontier | None, metrics: list[str], where: str) -> None:
    if frontier is not None:
        check_frontier(frontier, space, where)
        if "train.compile" in space:
            raise ConfigError(f"{where}: a frontier compares AC budgets within one ac_mode, but train.compile is an "
                              f"axis of its space (compile on: the partitioner's memory budget; off: checkpointed "
                              f"blocks). Run one frontier per mode: set train.compile in base.")
    if sweep.scheduler not in ("asha", "none"):
        raise ConfigError(f"{where}: scheduler={sweep.scheduler!r} is not accepted: expected 'asha' or 'none'.")
    if sweep.scheduler == "asha" and len(metrics) > 1:
        raise ConfigError(f"{where}: scheduler='asha' stops trials on one metric; this sweep has {len(metrics)} "
                          f"({', '.join(metrics)}). Use scheduler='none' for a Pareto sweep.")
    if sweep.scheduler == "asha" and not kind.early_stopping:
        raise ConfigError(f"{where}: scheduler='asha' would stop {kind.name} probes early; use scheduler='none'.")


def resolve_gpus(gpus: float | str, base: dict[str, Any], cluster_gpus: float) -> float:
    """GPUs per worker for ``gpus`` ("auto" or a number) on a cluster with ``cluster_gpus`` GPUs in all."""
    if gpus != "auto":
        return float(gpus)
    return 1.0 if cluster_gpus >= 1 and base.get("system.device") != "cpu" else 0.0


def _cli_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        check_keys(overrides, "command line")
        return dict(overrides)
    return config_lib.parse_overrides(list(overrides))


# --- checks of the resolved sweep ---------------------------------------------------------------


MAX_CHECKED_POINTS = 4096
"""Grid points resolved one by one at validation; beyond this many, a random-free sample of corners."""


def check_points(rs: ResolvedSweep, where: str) -> None:
    """Resolve the base plus every grid point (sampled axes at their bounds) through lmtune.config.load."""
    bounds = {k: d.bounds() for k, d in rs.sampled_axes.items() if d.bounds() is not None}
    listed = {k: d.listed() for k, d in rs.sampled_axes.items() if d.listed() is not None}
    ends = [{k: b[i] for k, b in bounds.items()} for i in (0, 1)] if bounds else [{}]  # every range at its low, then high
    combos = itertools.product(rs.grid_points(), cross(listed), ends)
    for i, (g, c, s) in enumerate(combos):
        if i >= MAX_CHECKED_POINTS:
            break
        point = {**g, **c, **s}
        try:
            cfg = config_lib.load(overrides={**rs.base_overrides, **point})
            if cfg.train.flops:
                check_budget(cfg, rs.sweep.workers)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"{where}: the trial with {shown} has an invalid config: {e}") from None


def check_budget(cfg: config_lib.Config, workers: int) -> None:
    """A ``train.flops`` budget holds one optimizer step of its model at least (what the trainer refuses at its
    start): the model counted on the meta device, so torch is imported for such sweeps only."""
    from lmtune.training.measure import model_size
    from lmtune.training.optim import Plan

    Plan.of(cfg, 0, workers, flops_per_token=model_size(cfg)[1])


def dry_run_define_by_run(rs: ResolvedSweep, where: str, runs: int = 16) -> list[str]:
    """Call the define-by-run function on a throwaway in-memory study (random sampler, fixed seed) and
    check that every key it suggests or returns is a config key with an accepted value, and that the
    resulting trial configs resolve."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=rs.sweep.seed))
    keys: list[str] = []
    for _ in range(runs):
        trial = study.ask()
        try:
            constants = rs.sweep.define_by_run(trial)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{where}: define_by_run failed: {type(e).__name__}: {e}") from None
        if constants is not None and not isinstance(constants, dict):
            raise ConfigError(f"{where}: define_by_run must return a dict of config key → value or None, "
                              f"got {type(constants).__name__}.")
        point = {**trial.params, **(constants or {})}
        check_keys(point, f"{where}: define_by_run")
        for k in point:
            if k in rs.space and rs.space[k].crossed:
                raise ConfigError(f"{where}: define_by_run sets {k}, which is already a grid axis of the space.")
            if k not in keys:
                keys.append(k)
        grid = rs.grid_points()[0] if rs.grid_axes else {}
        try:
            config_lib.load(overrides={**rs.base_overrides, **grid, **point})
        except ConfigError as e:
            shown = ", ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"{where}: define_by_run gave a trial with {shown} whose config is invalid: {e}") from None
        study.tell(trial, 0.0)
    return keys


__all__ = ["ResolvedSweep", "load_sweep", "resolve"]
