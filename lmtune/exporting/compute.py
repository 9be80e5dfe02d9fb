"""``--for-compute C``: the run a scaling ladder's laws call for at a compute budget C, and ``--verify``: one such run
trained, against the loss the laws predicted for it.

The size is N*(C) from approach 2's power law (:mod:`lmtune.results.kinds.scaling`), rounded to the nearest width
the model accepts (a multiple of ``model.n_head``; the depth and heads of the ladder's runs, which varied the width),
counted as the trainer counts it (:func:`lmtune.training.measure.model_size`). ``train.flops = C`` then fixes its tokens
and steps. Under μP (``model.parametrization="mup"``) the learning rate the ladder used at its base width holds at the
new width, so the parametrization, the base width and the lr are locked with it; a batch or lr the ladder varied is
its power law in C at C. The predicted loss is approach 3's L(N, D) at the rounded size and the tokens it trains,
with the 90% interval of one such run's loss: the bootstrap's spread of the law and the scatter of the ladder's own
runs about it (:meth:`~lmtune.results.scaling.ScalingFit.loss_at` with ``new_run``), so that one run checks it. A C
below the smallest fitted budget is refused: the laws are fitted from it up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from lmtune import config as config_lib
from lmtune.config import ConfigError
from lmtune.exporting.plan import Winner
from lmtune.results.format import number
from lmtune.results.kinds.width import PARAMETRIZATION_KEY, WIDTH_KEY
from lmtune.results.ladder import FLOPS_KEY, LEVEL, budgets, fittable, is_ladder, ladder_fit, rungs, tuned
from lmtune.results.read import Results
from lmtune.results.scaling import Interval, ScalingFit

BATCH_KEYS = ("train.micro_batch_size", "train.accumulation_steps")


@dataclass
class ComputeRun:
    """The run locked for budget ``flops``: its config keys, size, tokens, steps and predicted loss."""

    flops: float
    values: dict[str, Any]
    config: dict[str, Any]
    """The full flat config it trains with (the ladder's run, these values over it)."""
    params: int
    tokens: float
    steps: int
    predicted: Interval
    n_opt: float
    note: str


def _fitted(results: Results) -> tuple[list, ScalingFit]:
    if not is_ladder(results):
        raise ConfigError(f"--for-compute: {results.dir} is not a scaling ladder (a sweep over {FLOPS_KEY} and the "
                          f"model's size, e.g. sweeps/isoflop.py); its space: {', '.join(results.space_keys) or 'empty'}.")
    found = rungs(results)
    f = ladder_fit(found)
    if f is None:
        raise ConfigError(f"--for-compute: no scaling law to export from {results.dir}: {fittable(found)}")
    return found, f


def check_range(f: ScalingFit, c: float, what: str = "--for-compute") -> None:
    fitted = sorted(m.budget for m in f.minima)
    if not math.isfinite(c) or c < fitted[0]:
        raise ConfigError(f"{what} {c:g} is below the fitted range ({fitted[0]:g} to {fitted[-1]:g} FLOPs): the laws "
                          f"are fitted from the smallest budget up; accepted: a budget of {fitted[0]:g} FLOPs or more "
                          f"(between the budgets is interpolation, beyond them extrapolation).")


def _flat(cfg: dict[str, Any]) -> config_lib.Config:
    return config_lib.from_flat({k: v for k, v in cfg.items() if k in config_lib.all_keys()})


def nearest_width(cfg: dict[str, Any], target: float, size: Callable = None) -> tuple[int, int]:
    """The width (a multiple of ``model.n_head``) whose N is nearest ``target`` in log, and that N."""
    if size is None:
        from lmtune.training.measure import model_size as size
    heads = int(cfg.get("model.n_head") or 1)
    count = {}

    def n_of(k: int) -> int:
        if k not in count:
            count[k] = size(_flat({**cfg, WIDTH_KEY: k * heads}))[0]
        return count[k]

    hi = 1
    while n_of(hi) < target and hi < 2**20:
        hi *= 2
    lo = max(1, hi // 2)
    while hi - lo > 1:  # N grows with the width: the first multiple at or above the target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n_of(mid) < target else (lo, mid)
    best = min({lo, hi}, key=lambda k: abs(math.log(n_of(k) / target)))
    return best * heads, n_of(best)


def compute_run(results: Results, c: float, *, size: Callable | None = None) -> ComputeRun:
    """The run the ladder's laws call for at budget ``c`` (ConfigError when it has no laws, or ``c`` is below them)."""
    if size is None:
        from lmtune.training.measure import model_size as size
    found, f = _fitted(results)
    check_range(f, c)
    top = max(budgets(found).items())[1]
    cfg = _flat(min(top, key=lambda g: g.trial.loss).config).flat()  # the largest budget's best run, resolved
    values: dict[str, Any] = {}
    law_note = []
    for t in tuned(results, found):
        if t.law is not None:
            v = float(t.law(c))
            values[t.key] = max(1, round(v)) if t.key in BATCH_KEYS else float(f"{v:.3g}")
            law_note.append(f"{t.key}={values[t.key]} from its power law in C")
    width, n = nearest_width({**cfg, **values}, float(f.n_opt(c)), size)
    values.update({WIDTH_KEY: width, "model.n_layer": int(cfg["model.n_layer"]), "model.n_head": int(cfg["model.n_head"]),
                   FLOPS_KEY: float(c)})
    mup = str(cfg.get(PARAMETRIZATION_KEY) or "sp") == "mup"
    if mup:
        values.update({PARAMETRIZATION_KEY: "mup", "model.base_width": int(cfg.get("model.base_width") or width)})
    values.setdefault("train.lr", float(cfg["train.lr"]))
    for key in BATCH_KEYS:
        values.setdefault(key, int(cfg[key]))
    full = {**cfg, **values}
    fpt = size(_flat(full))[1]
    batch = values["train.micro_batch_size"] * values["train.accumulation_steps"] * int(cfg.get("data.seq_len") or 1)
    steps = max(1, round(c / fpt / batch))
    tokens = steps * batch
    heads = values["model.n_head"]
    note = (f"N*(C)={f.n_opt(c):.3g} rounded to width {width} (a multiple of model.n_head={heads}: N={n:.3g})"
            + (f"; μP carries train.lr={values['train.lr']:g}, tuned at model.base_width={values['model.base_width']}, "
               f"to width {width}" if mup else "; standard parametrization: the ladder's lr, not carried by μP")
            + "".join(f"; {x}" for x in law_note))
    return ComputeRun(c, {k: config_lib.coerce(k, v) for k, v in values.items()}, full, n, tokens, steps,
                      f.loss_at(n, tokens, LEVEL, new_run=True), float(f.n_opt(c)), note)


def compute_winner(results: Results, run: ComputeRun) -> Winner:
    """The run as the export's winner: its values, its source and a provenance record with the prediction."""
    p, metric = run.predicted, results.metric
    source = (f"{results.name} scaling ladder ({results.group}): compute-optimal at train.flops={run.flops:g} from "
              f"the fit of {len(rungs(results))} runs; {run.note}; predicted {metric} {p.value:.4g} "
              f"[{p.low:.4g}, {p.high:.4g}] ({p.level:.0%} interval of a run's loss)")
    record = {"for_compute": run.flops, "params": run.params, "tokens": run.tokens, "steps": run.steps,
              "n_opt": run.n_opt, "predicted_loss": p.value, "predicted_low": p.low, "predicted_high": p.high,
              "interval_level": p.level, "verified": "no"}
    row = {"trial_id": "scaling-fit", **{k: v for k, v in run.values.items()}}
    return Winner(row, dict(run.values), metric, p.value, source,
                  label=f"the ladder's run for train.flops={run.flops:g} (width {run.values[WIDTH_KEY]}, "
                        f"{run.tokens:,.0f} tokens, {run.steps} steps)", record=record)


@dataclass
class Verification:
    lines: list[str]
    inside: bool
    record: dict[str, Any]


def verify(results: Results, run: ComputeRun, *, trainer_factory=None) -> Verification:
    """Train ``run`` afresh on this machine (no checkpoints, no W&B, one validation at the end) and compare its
    final metric with the interval predicted for it."""
    import tempfile

    from lmtune.training import Trainer

    flat = {**run.config, "train.steps": run.steps, "train.eval_interval": run.steps + 1, "train.checkpoint": False,
            "train.sample_interval": 0}
    if not flat.get("system.threads") and flat.get("system.device") == "cpu":
        flat["system.threads"] = max(1, int(number(results.sweep.get("cpus")) or 1))  # as the ladder's runs had
    with tempfile.TemporaryDirectory(prefix="lmtune-verify-") as tmp:
        summary = (trainer_factory or Trainer)(_flat(flat), out_dir=tmp).fit()
    metric, p = results.metric, run.predicted
    value = number(summary.get(metric))
    if summary.get("status") != "ok" or value is None:
        raise ConfigError(f"--verify: the run at train.flops={run.flops:g} ended {summary.get('status')} without a "
                          f"{metric}; nothing written.")
    inside = p.low <= value <= p.high
    verdict = "inside" if inside else "outside"
    lines = [f"verify: trained width {run.values[WIDTH_KEY]} (N={run.params:.3g}) at train.flops={run.flops:g} "
             f"({run.tokens:,.0f} tokens, {run.steps} steps) on this machine: {metric} {value:.4g}; predicted "
             f"{p.value:.4g} [{p.low:.4g}, {p.high:.4g}] ({p.level:.0%}): {verdict} the interval"]
    record = {"verified": verdict, "verify_flops": run.flops, "verify_width": run.values[WIDTH_KEY],
              "verify_loss": value, "verify_predicted": p.value, "verify_low": p.low, "verify_high": p.high}
    return Verification(lines, inside, record)


def verified(w: Winner, check: Verification) -> Winner:
    """The winner with the verification in its provenance."""
    return dataclasses.replace(w, record={**w.record, **check.record},
                               source=f"{w.source}; verified: {check.record['verified']} (a run at train.flops="
                                      f"{check.record['verify_flops']:g}: {check.record['verify_loss']:.4g})")
