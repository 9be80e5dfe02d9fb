"""The kinds of result a sweep can hold, one module each, and their registry.

Every module of this package is one kind and defines ``KIND = Kind(...)``: which sweeps it applies to and what it
adds to summary.md, the plots, report.html and the sweep's console summary. The report (:mod:`lmtune.reporting`)
and the console ask :func:`applicable` and go through the kinds in their ``order``; nothing else knows them, so a
new result table is a new module here and nothing more.

    order  kind                  applies to
    10     frontier              a sweep with a memory frontier (frontier.md|csv|json, plots/frontier.png)
    20     trials                every sweep: the best trial, every trial ranked, the cost, loss curves, trial cards
    30     pareto                a sweep with several metrics: the Pareto front
    40     norm                  norm placement × warmup (the phase-0 study's per-layer gradient norms)
    50     batch                 effective batch × LR scaling (val loss at equal tokens, coherence, noise scale)
    60     width                 width × lr: does the optimum lr stay put as the model widens (μP)
    70     replicates            single-metric sweeps: each arm over its seeds, paired against the baseline arm
    80     scaling               compute budgets × model sizes: IsoFLOP minima, power laws in C, L(N, D), intervals
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

from lmtune.results.read import Results


def _nothing(results: Results, *more) -> list:
    return []


@dataclass(frozen=True)
class Kind:
    name: str
    order: int
    """Where its parts stand among the other kinds' (in summary.md, plots/, report.html, the console)."""
    applies: Callable[[Results], bool]
    """Whether a sweep holds this kind of result (its space, its metrics, its frontier)."""
    found: Callable[[Results], list[str]] = _nothing
    """summary.md's lines under its title: what the sweep found (the best trial, the Pareto front)."""
    tables: Callable[[Results], list[str]] = _nothing
    """summary.md's lines after that: the kind's own sections (markdown)."""
    files: Callable[[Results], list[Path]] = _nothing
    """Table files of its own in the results directory, written before summary.md (report.html shows the .md)."""
    plots: Callable[[Results, Path], list[Path]] = _nothing
    """PNG files written into the given plots directory."""
    html: Callable[[Results], list[str]] = _nothing
    """report.html's sections of its own, after the plots (HTML)."""
    console: Callable[[Results], list[str]] = _nothing
    """Lines of its own in the sweep's console summary, after the best trial (or front, or frontier)."""
    studied: tuple[str, ...] = ()
    """Metrics the experiment looks at besides the sweep's metric: columns of the console's table."""


@cache
def registered() -> tuple[Kind, ...]:
    """Every kind of this package, by order."""
    found = [importlib.import_module(f"{__name__}.{m.name}").KIND for m in pkgutil.iter_modules(__path__)]
    return tuple(sorted(found, key=lambda k: k.order))


def applicable(results: Results) -> list[Kind]:
    """The kinds of result ``results`` holds, by order."""
    return [k for k in registered() if k.applies(results)]


def studied(results: Results) -> list[str]:
    """What the sweep's kinds look at besides its metric, in their order."""
    return [m for k in applicable(results) for m in k.studied]
