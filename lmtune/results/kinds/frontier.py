"""The memory frontier per AC budget, as the phase-0 study tables it, and the recommended operating point.

The frontier table is the phase-0 study's (docs/phase0.md, "Memory & Compute"): per budget, rows of
micro-batch, ``peak_reserved_gib``, ``tokens_per_s``, throughput relative to the best trial of the sweep,
``avg_step_time_ms``, ``wall_clock_s``, headroom (limit − peak) and status, then a recommended operating
point: the highest throughput with at least ``headroom_gib`` free, stated as the phase-0 study states it.

:func:`analyze_frontier` works on plain rows (dicts with trials.csv's columns), so the benchmark applies
the same rules to a simulated full grid and to the planner's trials. The planner that chooses which points
run is :mod:`lmtune.sweep.plan`.

A result kind (:mod:`lmtune.results.kinds`): frontier.md|csv|json and plots/frontier.png, for a sweep with a frontier.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lmtune.config import ConfigError
from lmtune.contract import FEASIBLE, FRONTIER_STEM
from lmtune.results.figures import pyplot, save
from lmtune.results.format import fmt, gib, markdown_table, number, short, sort_key, status_label
from lmtune.results.kinds import Kind
from lmtune.results.layout import measured
from lmtune.results.read import Results

AC_MODE_TEXT = {"budget": "the compile partitioner's activation memory budget, per compiled block",
                "blocks": "eager, round((1 − ac_budget)·n_layer) blocks checkpointed"}


@dataclass
class FrontierTable:
    line: dict[str, Any]
    """The budget (and any other grid axis) of this table."""
    rows: list[dict[str, Any]]
    largest_feasible: Any = None
    smallest_oom: Any = None
    prediction: dict[str, Any] = field(default_factory=dict)
    ac_mode: str | None = None
    """How the line's ac_budget was applied (``budget`` | ``blocks``), when the line has an AC budget."""
    oom_evidence: str = ""
    """What says the smallest OOM point is infeasible: ``ran``, ``implied by x=…`` or ``predicted …``."""

    @property
    def title(self) -> str:
        title = ", ".join(f"{short(k)}={v}" for k, v in self.line.items()) or "all trials"
        return f"{title} ({self.ac_mode})" if self.ac_mode else title


@dataclass
class FrontierReport:
    x: str
    line_keys: list[str]
    limit_gib: float | None
    limit_source: str
    headroom_gib: float
    tables: list[FrontierTable]
    best_tokens_per_s: float | None
    recommended: dict[str, Any] | None
    statement: str
    counts: dict[str, int]
    ac_mode: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def analyze_frontier(
    rows: Iterable[Mapping[str, Any]],
    *,
    x: str,
    line_keys: Sequence[str],
    limit_gib: float | None,
    headroom_gib: float,
    limit_source: str = "",
    grid_size: int | None = None,
    ac_mode: str | None = None,
    margin_gib: float | None = None,
) -> FrontierReport:
    """Frontier tables per line (the budget and other grid axes), the largest feasible x, and the recommendation.

    ``ac_mode``: how the budget axis was applied; a row whose own ``ac_mode`` differs (a trial run in the other
    mode) makes the frontier meaningless and is refused (ConfigError)."""
    rows = [dict(r) for r in rows if r.get(x) is not None]
    modes = {r["ac_mode"] for r in rows if r.get("ac_mode")} | ({ac_mode} if ac_mode else set())
    if len(modes) > 1:
        raise ConfigError(f"the frontier mixes AC modes ({', '.join(sorted(modes))}): the same ac_budget saves "
                          f"different memory in each, so their lines cannot be compared; run one frontier per mode.")
    ac_mode = next(iter(modes), None)
    ok = [r for r in rows if r.get("status") == "ok" and number(r.get("tokens_per_s"))]
    best = max((number(r["tokens_per_s"]) for r in ok), default=None)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in line_keys), []).append(r)
    tables = []
    for key in sorted(groups, key=sort_key):
        table_rows = [_table_row(r, x, best, limit_gib) for r in sorted(groups[key], key=lambda r: sort_key((r[x],)))]
        smallest_oom = min((r[x] for r in table_rows if r["status"].startswith("OOM")), default=None)
        feasible = [r[x] for r in table_rows if r["status"] in FEASIBLE
                    and (smallest_oom is None or r[x] < smallest_oom)]
        line = dict(zip(line_keys, key))
        tables.append(FrontierTable(
            line, table_rows, max(feasible, default=None), smallest_oom, _prediction_summary(table_rows),
            ac_mode if "train.ac_budget" in line else None,
            _oom_evidence(table_rows, x, smallest_oom, limit_gib, margin_gib),
        ))
    recommended = recommend(tables, x=x, limit_gib=limit_gib, headroom_gib=headroom_gib)
    counts = {
        "rows": len(rows),
        "run": sum(1 for r in rows if measured(r)),
        "implied": sum(1 for r in rows if r.get("source") == "implied"),
        "predicted": sum(1 for r in rows if r.get("source") == "predicted"),
        "grid": grid_size or len(rows),
    }
    mode = ac_mode if "train.ac_budget" in line_keys else None
    return FrontierReport(
        x, list(line_keys), limit_gib, limit_source, headroom_gib, tables, best, recommended,
        recommendation_statement(recommended, x=x, limit_gib=limit_gib, headroom_gib=headroom_gib,
                                 limit_source=limit_source, ac_mode=mode), counts, mode,
    )


def _table_row(r: Mapping[str, Any], x: str, best: float | None, limit_gib: float | None) -> dict[str, Any]:
    """One trials.csv row as a row of its line's frontier table."""
    peak = number(r.get("peak_reserved_gib"))
    tps = number(r.get("tokens_per_s"))
    ran = measured(r)
    return {
        x: r[x],
        "peak_reserved_gib": peak if ran else None,
        "predicted_peak_gib": number(r.get("predicted_peak_gib")),
        "tokens_per_s": tps,
        "relative_throughput": tps / best if tps and best else None,
        "avg_step_time_ms": number(r.get("avg_step_time_ms")),
        "wall_clock_s": number(r.get("wall_clock_s")),
        "headroom_gib": (limit_gib - peak) if (limit_gib and peak is not None and r.get("status") in FEASIBLE)
        else None,
        "status": status_label(r),
        "trial_id": r.get("trial_id"),
        "source": r.get("source", "run"),
    }


def _oom_evidence(rows: Sequence[Mapping[str, Any]], x: str, smallest_oom: Any, limit_gib: float | None,
                  margin_gib: float | None) -> str:
    """Which evidence makes the smallest OOM point of a line infeasible."""
    row = next((r for r in rows if r[x] == smallest_oom and r["status"].startswith("OOM")), None)
    if row is None:
        return ""
    if row["source"] == "earlier":
        return "ran in an earlier sweep (--warm-start)"
    if measured(row):
        return "ran"
    if row["source"] == "implied":
        ran = min((r[x] for r in rows if r["status"] == "OOM" and r[x] < row[x]), default=None)
        return f"implied by the OOM at {ran}" if ran is not None else "implied"
    margin = margin_gib if margin_gib is not None else (0.05 * limit_gib if limit_gib else None)
    fit = row.get("predicted_peak_gib")
    return ("predicted, never run: the fit puts it at " + (gib(fit) if fit is not None else "?") + " GiB, above the "
            + (f"{limit_gib:g} GiB limit by more than the {gib(margin)} GiB margin" if limit_gib and margin is not None
               else "limit"))


def recommend(tables: Sequence[FrontierTable], *, x: str, limit_gib: float | None,
              headroom_gib: float) -> dict[str, Any] | None:
    """The highest-throughput ok row with at least ``headroom_gib`` free (ties: more headroom).

    Returns the table row plus ``line`` (the budget and other axes of its table), or None.
    """
    if limit_gib is None:
        return None
    best = None
    for t in tables:
        for r in t.rows:
            if r["status"] != "ok" or r["tokens_per_s"] is None or r["headroom_gib"] is None:
                continue
            if r["headroom_gib"] < headroom_gib:
                continue
            if best is None or (r["tokens_per_s"], r["headroom_gib"]) > (best["tokens_per_s"], best["headroom_gib"]):
                best = {**r, "line": dict(t.line)}
    return best


def recommendation_statement(rec: Mapping[str, Any] | None, *, x: str, limit_gib: float | None,
                             headroom_gib: float, limit_source: str = "", ac_mode: str | None = None) -> str:
    """The phase-0 study's sentence: "Recommended operating point: ac_budget=0.75, micro_batch_size=32. Gives ..."."""
    if limit_gib is None:
        return ("No recommended operating point: the memory limit is unknown (sweep.json has neither "
                "memory_limit_gib nor device_memory_gib), so headroom cannot be computed.")
    if rec is None:
        return (f"No recommended operating point: no ok trial leaves at least {headroom_gib:g} GiB free "
                f"under the {limit_gib:g} GiB limit.")
    axes = ", ".join(f"{short(k)}={v}" for k, v in [*rec["line"].items(), (x, rec[x])])
    if ac_mode:
        axes += f" (ac_mode {ac_mode})"
    headroom = f"{rec['headroom_gib']:.1f}" if rec["headroom_gib"] >= 1 else gib(rec["headroom_gib"])
    return (f"Recommended operating point: {axes}. Gives the highest throughput with "
            f"{headroom} GiB headroom ({rec['tokens_per_s']:,.0f} tokens/s; limit "
            f"{limit_gib:g} GiB{f' from {limit_source}' if limit_source else ''}, at least {headroom_gib:g} GiB kept free).")


def _prediction_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    errs = [r["peak_reserved_gib"] - r["predicted_peak_gib"] for r in rows
            if r["status"] == "ok" and r["peak_reserved_gib"] is not None and r["predicted_peak_gib"] is not None]
    if not errs:
        return {}
    return {"points": len(errs), "mean_abs_error_gib": sum(map(abs, errs)) / len(errs),
            "max_abs_error_gib": max(map(abs, errs)), "mean_error_gib": sum(errs) / len(errs)}


def frontier_report(results: Results) -> FrontierReport | None:
    """The frontier of a results directory (None when the sweep declares no frontier)."""
    spec = results.frontier_spec
    if not spec:
        return None
    x = spec.get("x", "train.micro_batch_size")
    budget = spec.get("budget", "train.ac_budget")
    line_keys = [budget] + [k for k in results.grid_keys if k not in (x, budget)]
    if budget not in results.space_keys and not any(r.get(budget) is not None for r in results.rows):
        line_keys.remove(budget)
    limit, source = results.limit()
    space = results.sweep.get("space") or {}
    grid = math.prod(len(space[k].get("values") or []) for k in [x, *line_keys] if k in space) or None
    return analyze_frontier(results.rows, x=x, line_keys=line_keys, limit_gib=limit,
                            headroom_gib=float(spec.get("headroom_gib", 6.0)), limit_source=source, grid_size=grid,
                            ac_mode=results.ac_mode, margin_gib=number(spec.get("margin_gib")))


FRONTIER_COLUMNS = ("peak_reserved_gib", "tokens_per_s", "relative_throughput", "avg_step_time_ms",
                    "wall_clock_s", "headroom_gib", "status")


def frontier_markdown(rep: FrontierReport, *, title: str = "") -> str:
    lines = [f"# Memory frontier{f': {title}' if title else ''}", ""]
    limit = (f"{rep.limit_gib:g} GiB ({rep.limit_source})" if rep.limit_gib is not None
             else "unknown (no memory_limit_gib or device_memory_gib in sweep.json)")
    lines += [f"Limit: {limit}. Headroom = limit − peak_reserved_gib. Relative throughput is against the best "
              f"ok trial of the sweep ({fmt(rep.best_tokens_per_s, 'tokens_per_s')} tokens/s).", ""]
    if rep.ac_mode:
        lines += [f"AC mode: {rep.ac_mode} ({AC_MODE_TEXT[rep.ac_mode]}); budgets of the other mode save different "
                  f"memory and are not comparable with these.", ""]
    c = rep.counts
    if c["run"] < c["grid"]:
        unneeded = c["grid"] - c["rows"]
        lines += [f"Trials run: {c['run']} of {c['grid']} grid points ({c['run'] / c['grid']:.0%}); "
                  f"{c['implied']} OOM by implication and {c['predicted']} OOM by prediction were never launched"
                  + (f"; {unneeded} more lie below a measured point (feasible, memory being monotone in "
                     f"{short(rep.x)}) and were not needed." if unneeded > 0 else "."), ""]
    with_pred = any(r["predicted_peak_gib"] is not None for t in rep.tables for r in t.rows)
    headers = [short(rep.x), *FRONTIER_COLUMNS] + (["predicted_peak_gib"] if with_pred else [])
    for t in rep.tables:
        lines += [f"## {t.title}", ""]
        body = [[fmt(r.get(h) if h != short(rep.x) else r[rep.x], h) for h in headers] for r in t.rows]
        lines += [markdown_table(headers, body), ""]
        lines.append(f"Largest feasible {short(rep.x)}: {t.largest_feasible if t.largest_feasible is not None else 'none'}"
                     + (f"; smallest OOM: {t.smallest_oom} ({t.oom_evidence})." if t.smallest_oom is not None
                        else "; no OOM in the grid."))
        if t.prediction:
            p = t.prediction
            lines.append(f"Peak predicted before launch (linear fit in {short(rep.x)}): mean |error| "
                         f"{p['mean_abs_error_gib']:.2f} GiB, max {p['max_abs_error_gib']:.2f} GiB over {p['points']} "
                         f"point(s) that ran.")
        lines.append("")
    lines += [rep.statement, ""]
    return "\n".join(lines)


def write_frontier(rep: FrontierReport, out_dir: Path, *, title: str = "") -> list[Path]:
    """``frontier.md``, ``frontier.csv`` (one row per table row, with the line's axes) and ``frontier.json``."""
    md, cs, js = (out_dir / f"{FRONTIER_STEM}.{ext}" for ext in ("md", "csv", "json"))
    md.write_text(frontier_markdown(rep, title=title))
    cols = [*rep.line_keys, "ac_mode", rep.x, *FRONTIER_COLUMNS, "predicted_peak_gib", "trial_id", "source"]
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for t in rep.tables:
            for r in t.rows:
                w.writerow({**t.line, "ac_mode": t.ac_mode or "", **{k: ("" if v is None else v) for k, v in r.items()}})
    js.write_text(json.dumps(rep.to_json(), indent=2, default=str))
    return [md, cs, js]


def plot_frontier(rep: FrontierReport, path: Path) -> Path:
    """Left: peak_reserved_gib vs micro-batch per budget (OOMs marked at the limit); right: tokens/s."""
    plt = pyplot()
    fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = rep.x
    oom_y = rep.limit_gib if rep.limit_gib is not None else max(
        [r["peak_reserved_gib"] or 0 for t in rep.tables for r in t.rows] + [1.0])
    markers = {"OOM": "x", "OOM (implied)": "1", "OOM (predicted)": "+"}
    step = 0.025 * oom_y  # OOM marks sit just above the limit, one row per budget, so they do not overlap
    seen: set[str] = set()
    for n, t in enumerate(rep.tables):
        color = f"C{n % 10}"
        ran = [r for r in t.rows if r["status"] not in markers and r["peak_reserved_gib"] is not None]
        ax_mem.plot([r[x] for r in ran], [r["peak_reserved_gib"] for r in ran], "o-", color=color, label=t.title)
        tps = [r for r in ran if r["tokens_per_s"] is not None]
        ax_tps.plot([r[x] for r in tps], [r["tokens_per_s"] for r in tps], "o-", color=color, label=t.title)
        for status, marker in markers.items():
            pts = [r[x] for r in t.rows if r["status"] == status]
            if pts:
                ax_mem.plot(pts, [oom_y + step * (n + 1)] * len(pts), marker, color=color, markersize=10,
                            linestyle="none")
                seen.add(status)
    for status in (s for s in markers if s in seen):  # legend entries in black: the colour is the budget's
        ax_mem.plot([], [], markers[status], color="black", markersize=10, linestyle="none", label=status)
    if rep.limit_gib is not None:
        ax_mem.axhline(rep.limit_gib, color="red", linewidth=1, label=f"limit {rep.limit_gib:g} GiB")
        ax_mem.axhline(rep.limit_gib - rep.headroom_gib, color="grey", linestyle="--", linewidth=1,
                       label=f"{rep.headroom_gib:g} GiB headroom")
    if rep.recommended is not None:
        r = rep.recommended
        for ax, y in ((ax_mem, r["peak_reserved_gib"]), (ax_tps, r["tokens_per_s"])):
            ax.plot([r[x]], [y], "*", color="gold", markeredgecolor="black", markersize=16, label="recommended")
    ax_mem.set(xlabel=short(x), ylabel="peak_reserved_gib", title="Peak memory")
    ax_tps.set(xlabel=short(x), ylabel="tokens_per_s", title="Throughput")
    return save(fig, path, legends=(ax_mem, ax_tps))


def _files(results: Results) -> list[Path]:
    return write_frontier(frontier_report(results), results.dir, title=f"{results.name} ({results.group})")


def _plots(results: Results, plots: Path) -> list[Path]:
    rep = frontier_report(results)
    return [plot_frontier(rep, plots / "frontier.png")] if rep.tables else []


KIND = Kind("frontier", 10, applies=lambda results: bool(results.frontier_spec), files=_files, plots=_plots)
