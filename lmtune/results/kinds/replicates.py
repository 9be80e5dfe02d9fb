"""Seeds as replicates: a configuration run over several ``train.seed`` values is one arm measured several times.

Wherever a sweep repeats a configuration (a seed axis, or ``num_samples`` repeats of a point), the trials of each
arm (the same values of every swept key but the seed) are aggregated: n, the mean of the sweep's metric, its sample
standard deviation and the 95% interval of the mean (Student t with n − 1 degrees of freedom). Each arm is compared
with the sweep's baseline arm (the one whose values are the sweep's base config, i.e. the locked defaults in force;
else the first arm in the grid's order) by the difference paired by seed, which cancels what a seed does to every
arm alike (its data order, its initialization), with its own 95% interval: "differs" when the interval excludes 0,
"within seed noise" when it does not. Only ``ok`` trials count. Export locks the arm with the best mean
(:func:`best_arm`), not the luckiest seed. A sweep that repeats nothing says that no spread was measured.

A result kind (:mod:`lmtune.results.kinds`): summary.md's Replicates section, replicates.csv beside trials.csv,
plots/replicates.png and the console's replicate table.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from lmtune.results.figures import pyplot, save
from lmtune.results.format import fmt, markdown_table, number, short, sort_key, table
from lmtune.results.kinds import Kind
from lmtune.results.layout import measured
from lmtune.results.read import Results

SEED_KEY = "train.seed"
REPLICATES_CSV = "replicates.csv"

# --- statistics -------------------------------------------------------------------------------------


def t_quantile(df: int, p: float = 0.975) -> float:
    """Student t's ``p`` quantile with ``df`` >= 1 degrees of freedom (12.706 for df=1 at 0.975, 1.960 as df → ∞),
    by bisection on the closed form of P(|T| <= t) for integer df (Abramowitz & Stegun 26.7.3-4)."""
    target, lo, hi = 2 * p - 1, 0.0, 1.0
    while _within(hi, df) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _within(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def _within(t: float, df: int) -> float:
    """P(|T| <= t) for T ~ Student t with df degrees of freedom: with θ = atan(t/√df), 2θ/π for df = 1;
    (2/π)(θ + sin θ (cos θ + 2/3 cos³θ + …)) for odd df; sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + …) for even."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


@dataclass(frozen=True)
class Spread:
    """n values: their mean, sample standard deviation (n − 1) and the 95% Student-t interval of the mean (None
    where n is too small to say)."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None


def spread(values: Iterable[float]) -> Spread:
    xs = list(values)
    n = len(xs)
    if n == 0:
        return Spread(0, None, None, None, None)
    mean = sum(xs) / n
    if n == 1:
        return Spread(1, mean, None, None, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Spread(n, mean, sd, mean - half, mean + half)


def paired(arm: Mapping[Any, float], baseline: Mapping[Any, float]) -> Spread:
    """The difference arm − baseline over the seeds both have, paired by seed."""
    return spread(arm[s] - baseline[s] for s in arm if s in baseline)


def verdict(diff: Spread) -> str:
    if diff.low is None:
        return "too few pairs"
    return "differs" if diff.low > 0 or diff.high < 0 else "within seed noise"


# --- arms -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    point: dict[str, Any]
    """The arm's values of the swept keys but the seed."""
    trials: list[dict[str, Any]]
    """Its trials that ran, by seed."""
    values: dict[Any, float]
    """(seed, repeat) → the metric of each ok trial."""

    def label(self) -> str:
        return ", ".join(f"{short(k)}={fmt(v, k)}" for k, v in self.point.items()) or "every trial"


def arm_keys(results: Results) -> list[str]:
    return [k for k in results.space_keys if k != SEED_KEY]


def arms(results: Results) -> list[Arm]:
    """The sweep's arms in the grid's order (each axis by the order of its values in the space)."""
    keys, metric, groups = arm_keys(results), results.metric, {}
    fixed = (results.sweep.get("base") or {}).get(SEED_KEY)  # a seed the space does not sweep: every trial's
    for r in results.rows:
        if measured(r):
            groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for point, rows in groups.items():
        ranked = sorted(((r.get(SEED_KEY, fixed), r) for r in rows), key=lambda sr: sort_key((sr[0],)))
        values, seen = {}, {}
        for seed, r in ranked:
            seen[seed] = seen.get(seed, -1) + 1  # a repeat of the same seed (num_samples) pairs by its repeat
            if r.get("status") == "ok" and number(r.get(metric)) is not None:
                values[(seed, seen[seed])] = number(r.get(metric))
        out.append(Arm(dict(zip(keys, point)), [r for _, r in ranked], values))
    space = results.sweep.get("space") or {}

    def rank(arm: Arm) -> tuple:
        order = []
        for k, v in arm.point.items():
            listed = (space.get(k) or {}).get("values") or []
            order.append((0, listed.index(v), "") if v in listed else (1, 0, sort_key((v,))))
        return tuple(order)

    return sorted(out, key=rank)


def replicated(results: Results) -> bool:
    """Whether the sweep measured a seed-to-seed spread: an arm with two ok trials or more."""
    return any(len(a.values) > 1 for a in arms(results))


def no_spread(results: Results) -> str:
    """Why there is no replicate table."""
    if SEED_KEY in results.space_keys or any(len(a.trials) > 1 for a in arms(results)):
        return "No arm has two ok trials (yet): no seed-to-seed spread was measured."
    return NO_SPREAD


def baseline(results: Results, found: list[Arm]) -> Arm | None:
    """The arm of the sweep's base config (the locked defaults in force when it ran), else the first arm."""
    base = results.sweep.get("base") or {}
    return next((a for a in found if a.point and all(base.get(k) == v for k, v in a.point.items())),
                found[0] if found else None)


def best_arm(results: Results) -> Arm | None:
    """The arm with the best mean of the sweep's metric (its mode) over its ok trials; None without one."""
    sign = 1 if results.mode == "min" else -1
    scored = [(sign * spread(a.values.values()).mean, i, a) for i, a in enumerate(arms(results)) if a.values]
    return min(scored, key=lambda s: s[:2])[2] if scored else None


# --- the table --------------------------------------------------------------------------------------


def rows(results: Results) -> list[dict[str, Any]]:
    """One row per arm: its point, n, mean, sd, interval, and against the baseline the paired difference."""
    found = arms(results)
    base = baseline(results, found)
    out = []
    for a in found:
        s = spread(a.values.values())
        row = {**a.point, "metric": results.metric, "n": s.n, "mean": s.mean, "sd": s.sd, "ci95_low": s.low,
               "ci95_high": s.high}
        if a is base:
            row["verdict"] = "baseline"
        else:
            d = paired(a.values, base.values)
            row.update({"pairs": d.n, "diff_mean": d.mean, "diff_ci95_low": d.low, "diff_ci95_high": d.high,
                        "verdict": verdict(d)})
        row["seeds"] = " ".join(str(s) for s, _ in a.values if s is not None)
        row["trial_ids"] = " ".join(str(r.get("trial_id")) for r in a.trials)
        out.append(row)
    return out


def _interval(low: float | None, high: float | None, key: str) -> str:
    return "—" if low is None else f"[{fmt(low, key)}, {fmt(high, key)}]"


def _cells(results: Results, row: dict[str, Any]) -> list[str]:
    m = results.metric
    diff = ("baseline" if row["verdict"] == "baseline" else
            f"{fmt(row['diff_mean'], m)} ({row['pairs']} pair{'s' if row['pairs'] != 1 else ''})")
    return [*(fmt(row[k], k) for k in arm_keys(results)), str(row["n"]), fmt(row["mean"], m), fmt(row["sd"], m),
            _interval(row["ci95_low"], row["ci95_high"], m), diff,
            _interval(row.get("diff_ci95_low"), row.get("diff_ci95_high"), m),
            "" if row["verdict"] == "baseline" else row["verdict"]]


def _headers(results: Results) -> list[str]:
    return [*map(short, arm_keys(results)), "n", f"{results.metric} mean", "sd", "95% interval",
            "vs baseline (paired by seed)", "difference's 95% interval", "verdict"]


NO_SPREAD = ("One trial per configuration: no seed-to-seed spread was measured, so a difference between trials "
             f"cannot be told from seed noise (repeat each configuration over `{SEED_KEY}`, a seed axis, to measure it).")


def tables(results: Results) -> list[str]:
    if not replicated(results):
        return ["## Replicates", "", no_spread(results), ""]
    found, metric = rows(results), results.metric
    base = baseline(results, arms(results))
    return ["## Replicates", "",
             f"{metric} per arm over its seeds (`{SEED_KEY}`; ok trials only): n, mean, sample standard deviation "
             f"and the 95% interval of the mean (Student t, n − 1 degrees of freedom). Against the baseline arm "
             f"({base.label()}: {_why_baseline(results, base)}), the difference paired by seed with its 95% interval: "
             f"\"differs\" when the interval excludes 0, else \"within seed noise\".", "",
             markdown_table(_headers(results), [_cells(results, r) for r in found]), ""]


def found(results: Results) -> list[str]:
    """The best arm by its mean, beside the best single trial."""
    best = best_arm(results) if replicated(results) else None
    if best is None:
        return []
    m = results.metric
    return [f"Best arm by mean over its seeds: {best.label()} ({m} {fmt(spread(best.values.values()).mean, m)} over "
            f"{len(best.values)} seeds; see Replicates); export locks this arm, not its luckiest seed.", ""]


def _why_baseline(results: Results, base: Arm) -> str:
    sweep_base = results.sweep.get("base") or {}
    matches = base.point and all(sweep_base.get(k) == v for k, v in base.point.items())
    return "the sweep's base config, the defaults in force" if matches else "the first arm; no arm is the base config"


def console(results: Results) -> list[str]:
    if not replicated(results):
        return ["seeds: " + no_spread(results).replace("`", "")]
    m = results.metric
    shown = [dict(zip(_headers(results), _cells(results, r))) for r in rows(results)]
    lines = ["", f"replicates ({m} per arm over its seeds, 95% intervals; paired by seed against the baseline):",
             table(shown, _headers(results))]
    best = best_arm(results)
    if best is not None:
        lines.append(f"best arm by mean: {best.label()}  {m}={fmt(spread(best.values.values()).mean, m)} "
                     f"(n={len(best.values)}; export locks it)")
    return lines


def write_csv(results: Results) -> list[Path]:
    """replicates.csv beside trials.csv: :func:`rows` (the numbers unrounded)."""
    if not replicated(results):
        return []
    found = rows(results)
    columns = [*arm_keys(results), "metric", "n", "mean", "sd", "ci95_low", "ci95_high", "pairs", "diff_mean",
               "diff_ci95_low", "diff_ci95_high", "verdict", "seeds", "trial_ids"]
    path = results.dir / REPLICATES_CSV
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in found)
    return [path]


def plots(results: Results, plots: Path) -> list[Path]:
    """Each arm's seeds (dots) and its mean with the 95% interval (bar); the baseline's mean as a line."""
    found = [a for a in arms(results) if a.values]
    if not replicated(results) or not found:
        return []
    plt, m = pyplot(), results.metric
    base = baseline(results, arms(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(found) + 2), 4.5))
    for i, a in enumerate(found):
        s = spread(a.values.values())
        ax.plot([i] * s.n, list(a.values.values()), "o", color="C0", alpha=0.5, label="a seed" if i == 0 else None)
        err = [[s.mean - s.low], [s.high - s.mean]] if s.low is not None else None
        ax.errorbar([i + 0.15], [s.mean], yerr=err, fmt="s", color="C3", capsize=4,
                    label="mean, 95% interval" if i == 0 else None)
    if base is not None and base.values:
        ax.axhline(spread(base.values.values()).mean, color="grey", linestyle="--", linewidth=1, label="baseline mean")
    ax.set_xticks(range(len(found)), [a.label() for a in found], rotation=20, ha="right", fontsize=7)
    ax.set(ylabel=f"{m} ({results.mode})", title=f"Replicates: {results.name}")
    return [save(fig, plots / "replicates.png", legends=(ax,))]


def applies(results: Results) -> bool:
    """Single-metric sweeps that ran something, a memory frontier aside (its points are configurations of memory)."""
    return (not results.frontier_spec and len(results.objectives) == 1
            and any(measured(r) for r in results.rows))


KIND = Kind("replicates", 70, applies=applies, found=found, tables=tables, files=write_csv, plots=plots, console=console)
