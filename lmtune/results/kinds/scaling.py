"""The scaling ladder: compute budgets × model sizes read as Hoffmann et al. 2022 read their IsoFLOP profiles.

A sweep over ``train.flops`` (the compute budget C) and the model's size (:mod:`lmtune.results.ladder`) gives per
budget the compute-optimal size N*, tokens D* and loss L* (approach 2: the vertex of the loss against log N), across
budgets the power laws N*(C), D*(C), L*(C), and on every run at once L(N, D) = E + A/N^α + B/D^β (approach 3), each
constant with its 90% bootstrap interval (:mod:`lmtune.results.scaling`). Where the sweep varies the learning rate or
the batch too, each budget's best value as a power law in C. ``python -m lmtune.export RESULTS --for-compute C``
locks the run these laws predict at a budget C (and ``--verify`` trains one to check them).

A result kind (:mod:`lmtune.results.kinds`): summary.md's Scaling ladder section, plots/scaling_isoflop.png (loss
against N per budget, each budget's parabola and minimum), plots/scaling_laws.png (N*(C) and D*(C): the minima, the
fit and its 90% band carried past the largest budget) and plots/scaling_predicted.png (approach 3's loss against the
measured one), and two console lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmtune.results.figures import pyplot, save
from lmtune.results.format import markdown_table, short
from lmtune.results.kinds import Kind
from lmtune.results.ladder import LEVEL, at_edge, budgets, fittable, is_ladder, ladder_fit, rungs, tuned
from lmtune.results.read import Results
from lmtune.results.scaling import Interval, ScalingFit

EXTRAPOLATE = 100.0
"""How far past the largest budget the laws' plots and the console's prediction go (×C)."""


def g(x: float) -> str:
    """Three significant digits, exponents for large numbers: 1.23e+09, 0.456; ≈0 for the fit's floor (1e-300: a
    term the fit dropped)."""
    return "≈0" if 0 < abs(x) < 1e-100 else f"{x:.3g}"


def _ci(i: Interval | None) -> str:
    return "—" if i is None or not np.isfinite(i.low) else f"[{g(i.low)}, {g(i.high)}]"


def _fit(results: Results) -> tuple[list, ScalingFit | None]:
    found = rungs(results)
    return found, ladder_fit(found)


def minima_rows(found, f: ScalingFit) -> list[list[str]]:
    edge, by = at_edge(found, f), budgets(found)
    return [[g(m.budget), str(len(by[m.budget])), g(m.n), g(m.d), f"{m.d / m.n:.3g}", f"{m.loss:.4g}",
             "at the edge of the sizes tried" if m.budget in edge else "inside"] for m in f.minima]


def laws_rows(f: ScalingFit) -> list[list[str]]:
    iv = f.intervals
    return [["N*(C)", f"{g(f.n_opt.k)} · C^{f.n_opt.exponent:.3f}", f"{f.n_opt.exponent:.3f}", _ci(iv.get("n_exp"))],
            ["D*(C)", f"{g(f.d_opt.k)} · C^{f.d_opt.exponent:.3f}", f"{f.d_opt.exponent:.3f}", _ci(iv.get("d_exp"))],
            ["L*(C)", f"{g(f.l_opt.k)} · C^{f.l_opt.exponent:.4f}", f"{f.l_opt.exponent:.4f}", _ci(iv.get("l_exp"))]]


def constants_rows(f: ScalingFit) -> list[list[str]]:
    names = {"E": "E (irreducible loss)", "A": "A", "alpha": "α (size)", "B": "B", "beta": "β (data)"}
    return [[label, g(getattr(f.loss, k)), _ci(f.intervals.get(k))] for k, label in names.items()]


def tables(results: Results) -> list[str]:
    found, f = _fit(results)
    head = ["## Scaling ladder", ""]
    if f is None:
        return [*head, f"No fit yet: {fittable(found)}", ""]
    pct = f"{LEVEL:.0%}"
    lines = [*head,
             f"{results.metric} of each budget's runs against their size N (non-embedding parameters; the best run "
             f"of a size at a budget), D the tokens trained, C = `train.flops`. Approach 2 (Hoffmann et al. 2022): "
             f"per budget the vertex of a parabola in log N, then power laws in C; approach 3: L(N, D) = E + A/N^α + "
             f"B/D^β on every run. Intervals: {pct} bootstrap percentiles ({f.replicates['alpha'].size} resamplings "
             f"of the runs).", "",
             "### Compute-optimal size per budget", "",
             markdown_table(["C (FLOPs)", "sizes", "N*", "D* (tokens)", "D*/N*", "L*", "minimum"],
                            minima_rows(found, f)), ""]
    edge = at_edge(found, f)
    if edge:
        lines += [f"A minimum at the edge of the sizes tried ({', '.join(map(g, edge))}) is a bound, not a vertex: "
                  f"add sizes beyond it.", ""]
    lines += ["### Power laws in C", "",
              markdown_table(["", "law", "exponent", f"{pct} interval"], laws_rows(f)), "",
              "### L(N, D) = E + A/N^α + B/D^β", "",
              markdown_table(["constant", "value", f"{pct} interval"], constants_rows(f)), ""]
    lines += _tuned_lines(results, found)
    c = max(m.budget for m in f.minima) * EXTRAPOLATE
    p = f.predict(c)
    lines += [f"At C = {g(c)} ({EXTRAPOLATE:g}× the largest budget): N* = {g(p['n'].value)} {_ci(p['n'])}, D* = "
              f"{g(p['d'].value)} {_ci(p['d'])}, {results.metric} {p['loss'].value:.4g} {_ci(p['loss'])}; "
              f"`python -m lmtune.export {results.dir} --for-compute C` locks such a run.", ""]
    return lines


def _tuned_lines(results: Results, found) -> list[str]:
    rows = [[short(t.key), ", ".join(f"{g(c)}: {g(v)}" for c, v in sorted(t.best.items())),
             f"{g(t.law.k)} · C^{t.law.exponent:.3f}" if t.law else "—"] for t in tuned(results, found)]
    if not rows:
        return []
    return ["### Best values per budget", "",
            markdown_table(["key", "best per budget (C: value)", "power law in C"], rows), ""]


def found(results: Results) -> list[str]:
    _, f = _fit(results)
    if f is None:
        return []
    iv = f.intervals
    return [f"Compute-optimal scaling: N* ∝ C^{f.n_opt.exponent:.3f} {_ci(iv.get('n_exp'))}, D* ∝ "
            f"C^{f.d_opt.exponent:.3f} {_ci(iv.get('d_exp'))} ({LEVEL:.0%} intervals; see Scaling ladder).", ""]


def console(results: Results) -> list[str]:
    found_, f = _fit(results)
    if f is None:
        return [f"scaling: no fit yet: {fittable(found_)}"]
    iv = f.intervals
    c = max(m.budget for m in f.minima) * EXTRAPOLATE
    p = f.predict(c)
    return [f"scaling ({LEVEL:.0%} intervals): N* ∝ C^{f.n_opt.exponent:.3f} {_ci(iv.get('n_exp'))}, "
            f"D* ∝ C^{f.d_opt.exponent:.3f} {_ci(iv.get('d_exp'))}, L = {g(f.loss.E)} + {g(f.loss.A)}/N^"
            f"{f.loss.alpha:.2f} + {g(f.loss.B)}/D^{f.loss.beta:.2f}",
            f"scaling: at C={g(c)}: N*={g(p['n'].value)}, {results.metric} {p['loss'].value:.4g} {_ci(p['loss'])} "
            f"(export --for-compute C locks it)"]


# --- plots ---------------------------------------------------------------------------------------


def plot_isoflop(results: Results, found, f: ScalingFit, path: Path) -> Path:
    """Loss against N (log axis) per budget: the runs, the parabola in log N, its minimum (★)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = plt.get_cmap("viridis")
    by = budgets(found)
    for i, m in enumerate(f.minima):
        color = colors(i / max(1, len(f.minima) - 1))
        pts = sorted((r.trial.n, r.trial.loss) for r in by[m.budget])
        x = np.log10([n for n, _ in pts])
        ax.plot(*zip(*pts), "o", color=color, label=f"C={g(m.budget)}")
        grid = np.linspace(x.min(), x.max(), 50)
        ax.plot(10**grid, np.polyval(np.polyfit(x, [v for _, v in pts], 2), grid), "-", color=color, alpha=0.6)
        ax.plot([m.n], [m.loss], "*", color=color, markersize=15, markeredgecolor="black")
    ax.set_xscale("log")
    ax.set(xlabel="N (non-embedding parameters)", ylabel=results.metric, title="IsoFLOP profiles (★ each budget's minimum)")
    return save(fig, path, legends=(ax,))


def _band(law_k: np.ndarray, law_exp: np.ndarray, cs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(law_k) & np.isfinite(law_exp)
    ys = law_k[ok, None] * np.power(cs[None, :], law_exp[ok, None])
    return np.quantile(ys, (1 - LEVEL) / 2, axis=0), np.quantile(ys, (1 + LEVEL) / 2, axis=0)


def plot_laws(results: Results, f: ScalingFit, path: Path) -> Path:
    """N*(C) and D*(C): each budget's minimum, the power law and its bootstrap band, carried past the largest budget."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    cs_fit = np.array([m.budget for m in f.minima])
    cs = np.geomspace(cs_fit.min(), cs_fit.max() * EXTRAPOLATE, 60)
    reps = f.replicates
    for ax, key, law, label in ((axes[0], "n", f.n_opt, "N* (parameters)"), (axes[1], "d", f.d_opt, "D* (tokens)")):
        ax.plot(cs_fit, [getattr(m, key) for m in f.minima], "o", color="C0", label="each budget's minimum")
        ax.plot(cs, law(cs), "-", color="C3", label=f"{label.split()[0]} ∝ C^{law.exponent:.3f}")
        if np.isfinite(reps[f"{key}_k"]).sum() >= 2:
            low, high = _band(reps[f"{key}_k"], reps[f"{key}_exp"], cs)
            ax.fill_between(cs, low, high, color="C3", alpha=0.15, label=f"{LEVEL:.0%} bootstrap band")
        ax.axvline(cs_fit.max(), color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="C (training FLOPs)", ylabel=label, title=f"{label.split()[0]}(C), extrapolated past the sweep")
    return save(fig, path, legends=tuple(axes))


def plot_predicted(results: Results, found, f: ScalingFit, path: Path) -> Path:
    """Approach 3's L(N, D) against the measured loss of every run; the diagonal is a perfect fit."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 5))
    measured = np.array([r.trial.loss for r in found])
    predicted = np.array([f.loss(r.trial.n, r.trial.d) for r in found])
    ax.plot(measured, predicted, "o", color="C0", label="a run")
    lo, hi = min(measured.min(), predicted.min()), max(measured.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "--", color="grey", linewidth=1, label="predicted = measured")
    ax.set(xlabel=f"measured {results.metric}", ylabel="L(N, D) fitted", title="Approach 3: predicted vs measured")
    return save(fig, path, legends=(ax,))


def plots(results: Results, plots_dir: Path) -> list[Path]:
    found_, f = _fit(results)
    if f is None:
        return []
    return [plot_isoflop(results, found_, f, plots_dir / "scaling_isoflop.png"),
            plot_laws(results, f, plots_dir / "scaling_laws.png"),
            plot_predicted(results, found_, f, plots_dir / "scaling_predicted.png")]


def applies(results: Results) -> bool:
    """A sweep over compute budgets and model sizes with a run that ended ok."""
    return is_ladder(results) and any(r.get("status") == "ok" for r in results.rows)


KIND = Kind("scaling", 80, applies=applies, found=found, tables=tables, plots=plots, console=console)
