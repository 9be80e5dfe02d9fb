"""A sweep's trials read as a scaling ladder: each compute budget's runs as (N, D, C, loss) points for the fits of
:mod:`lmtune.results.scaling`, and what else the sweep varied as each budget's best value.

A ladder sweep varies ``train.flops`` (the compute budget C: every size trains for C ÷ its FLOPs per token tokens)
and the model's size (``model.n_embd``, ``model.n_layer``). N is the model's non-embedding parameter count
(``GPT.num_params()``, what the trainer's 6N FLOPs per token count): the ``params`` a run's summary.json records, else
recovered from its ``flops_per_token`` (6N + 12·L·H·Q·T, :func:`lmtune.training.measure.flops_per_token`); D is the
tokens it trained, C its measured ``flops``. Where the sweep also varies the learning rate or the batch, each (budget,
size) keeps its best run (the IsoFLOP profile is the best loss a size reaches at a budget), and each budget's best run
gives that budget's best lr or batch: a power law in C of its own.

The fit is memoized on the trials it is made from: summary.md, the plots, the console and ``export --for-compute``
each ask for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from lmtune.contract import BUDGET_KEY, LADDER_MIN, SIZE_KEYS, SUMMARY_JSON
from lmtune.results.format import number
from lmtune.results.layout import read_json, trial_dir
from lmtune.results.read import Results
from lmtune.results.scaling import PowerLaw, ScalingFit, Trial, fit, power_law

FLOPS_KEY = BUDGET_KEY
TUNED_KEYS = ("train.lr", "train.micro_batch_size", "train.accumulation_steps")
"""Axes of a ladder whose best value per budget is read as a power law in C."""
MIN_BUDGETS = MIN_SIZES = LADDER_MIN
REPLICATES = 200
LEVEL = 0.9


def is_ladder(results: Results) -> bool:
    keys = set(results.space_keys)
    return FLOPS_KEY in keys and bool(keys & set(SIZE_KEYS)) and results.mode == "min"


@dataclass(frozen=True)
class Rung:
    """One (budget, size): the best ok run of that size at that budget."""

    trial: Trial
    row: dict[str, Any]
    config: dict[str, Any]


def params_of(summary: dict[str, Any], config: dict[str, Any]) -> float | None:
    """N of a run: summary.json's ``params``, else recovered from its FLOPs per token and its config."""
    params = number(summary.get("params"))
    if params:
        return params
    fpt = number(summary.get("flops_per_token"))
    layers, heads, width = (number(config.get(k)) for k in ("model.n_layer", "model.n_head", "model.n_embd"))
    seq = number(config.get("data.seq_len"))
    if not (fpt and layers and heads and width and seq):
        return None
    n = (fpt - 12 * layers * width * seq) / 6  # 12·L·H·Q·T with H·Q = the width
    return n if n > 0 else None


def better(loss: float, than: float) -> bool:
    return loss < than


def rungs(results: Results) -> list[Rung]:
    """Per (budget, size), the ok run with the lowest metric, by budget then N."""
    metric, best = results.metric, {}
    for r in results.rows:
        loss = number(r.get(metric))
        if r.get("status") != "ok" or r.get("source", "run") != "run" or loss is None or loss <= 0:
            continue
        summary = read_json(trial_dir(results.dir, r.get("trial_id")) / SUMMARY_JSON) or {}
        config = results.config_of(r)
        budget, n = number(config.get(FLOPS_KEY)), params_of(summary, config)
        d = number(r.get("tokens")) or number(summary.get("tokens"))
        c = number(r.get("flops")) or number(summary.get("flops")) or budget
        if not (budget and n and d and c):
            continue
        key = (budget, *(config.get(k) for k in SIZE_KEYS))
        if key not in best or better(loss, best[key].trial.loss):
            best[key] = Rung(Trial(float(n), float(d), float(c), float(loss), float(budget)), r, config)
    return sorted(best.values(), key=lambda g: (g.trial.budget, g.trial.n))


def budgets(found: list[Rung]) -> dict[float, list[Rung]]:
    out: dict[float, list[Rung]] = {}
    for g in found:
        out.setdefault(g.trial.budget, []).append(g)
    return out


def fittable(found: list[Rung]) -> str:
    """Why the rungs cannot be fitted ('' when they can)."""
    placed = [b for b, gs in budgets(found).items() if len({g.trial.n for g in gs}) >= MIN_SIZES]
    if len(placed) < 2:
        return (f"{len(placed)} budget(s) with {MIN_SIZES} sizes or more that ended ok: a power law in C needs two "
                f"at least ({MIN_BUDGETS} to be more than a line through two points).")
    return ""


@lru_cache(maxsize=8)
def _fit(trials: tuple[Trial, ...], replicates: int, seed: int) -> ScalingFit:
    return fit(list(trials), replicates=replicates, seed=seed, level=LEVEL)


def ladder_fit(found: list[Rung], replicates: int = REPLICATES, seed: int = 0) -> ScalingFit | None:
    """Approaches 2 and 3 with their 90% bootstrap intervals; None when :func:`fittable` says why not."""
    if fittable(found):
        return None
    return _fit(tuple(g.trial for g in found), replicates, seed)


def at_edge(found: list[Rung], f: ScalingFit) -> list[float]:
    """Budgets whose minimum sits at the smallest or largest size tried: the grid does not bracket it."""
    by = budgets(found)
    edge = []
    for m in f.minima:
        ns = [g.trial.n for g in by[m.budget]]
        if math.isclose(m.n, min(ns), rel_tol=1e-6) or math.isclose(m.n, max(ns), rel_tol=1e-6):
            edge.append(m.budget)
    return edge


@dataclass(frozen=True)
class Tuned:
    """A hyper-parameter the ladder varied besides the size: each budget's best value and its power law in C."""

    key: str
    best: dict[float, float]
    law: PowerLaw | None


def tuned(results: Results, found: list[Rung]) -> list[Tuned]:
    """For each of :data:`TUNED_KEYS` the sweep varies, its value in each budget's best run."""
    out = []
    for key in (k for k in TUNED_KEYS if k in results.space_keys):
        best = {}
        for budget, gs in budgets(found).items():
            value = number(min(gs, key=lambda g: g.trial.loss).config.get(key))
            if value is not None and value > 0:
                best[budget] = value
        law = power_law(np.array(list(best)), np.array(list(best.values()))) if len(best) >= 2 else None
        out.append(Tuned(key, best, law))
    return out
