"""Tables from a results directory: the memory frontier per AC budget and summaries of other sweeps.

Input (docs/CONTRACTS.md, "Results directory"): ``sweep.json``, ``trials.csv`` and
``trials/{trial_id}/metrics.jsonl|summary.json``. A running sweep works too: trials that are not in
``trials.csv`` yet are read from their ``summary.json`` or, failing that, their last metrics line.

The frontier table is the phase-0 study's (docs/phase0.md, "Memory & Compute"): per budget, rows of
micro-batch, ``peak_reserved_gib``, ``tokens_per_s``, throughput relative to the best trial of the sweep,
``avg_step_time_ms``, ``wall_clock_s``, headroom (limit − peak) and status, then a recommended operating
point: the highest throughput with at least ``headroom_gib`` free, stated as the phase-0 study states it.

:func:`analyze_frontier` works on plain rows (dicts with trials.csv's columns), so the benchmark applies
the same rules to a simulated full grid and to the planner's trials.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lmtune.config import ConfigError, all_keys, coerce
from lmtune.contract import FEASIBLE

NORM_KEYS = ("model.norm_placement", "model.final_norm", "train.warmup_steps")
BATCH_KEYS = ("train.micro_batch_size", "train.accumulation_steps", "train.lr_scaling", "train.base_batch_tokens")
STUDIED = {"norm": ("grad_norm_spread",), "batch": ("grad_coherence", "noise_scale")}
"""What the phase-0 study's experiments look at besides the metric: the spread of per-layer gradient norms for norm
placement × warmup, gradient coherence and the noise scale for effective batch × LR scaling."""


def experiments(space_keys: Iterable[str], frontier: Any = None) -> list[str]:
    """Which of the phase-0 study's experiments a sweep over ``space_keys`` is (keys of :data:`STUDIED`); a memory
    frontier over micro-batch sizes is not a batch-size experiment."""
    keys = set(space_keys)
    kinds = ["norm"] if keys & set(NORM_KEYS) else []
    return kinds + (["batch"] if keys & set(BATCH_KEYS) and not frontier else [])
AC_MODES = {True: "budget", False: "blocks"}
AC_MODE_TEXT = {"budget": "the compile partitioner's activation memory budget, per compiled block",
                "blocks": "eager, round((1 − ac_budget)·n_layer) blocks checkpointed"}
SUMMARY_METRICS = ("val_loss", "loss", "tokens", "tokens_per_s", "peak_reserved_gib", "wall_clock_s", "device_hours")


def short(key: str) -> str:
    """``train.micro_batch_size`` → ``micro_batch_size`` (key names are unique across sections)."""
    return key.rpartition(".")[2]


# --- reading a results directory -------------------------------------------------------------------


@dataclass
class Results:
    dir: Path
    sweep: dict[str, Any]
    rows: list[dict[str, Any]]
    """trials.csv rows with typed values (None for empty cells), plus trials still running."""

    @property
    def name(self) -> str:
        return str(self.sweep.get("name", self.dir.name))

    @property
    def group(self) -> str:
        return str(self.sweep.get("group", self.dir.name))

    @property
    def space_keys(self) -> list[str]:
        return list(self.sweep.get("space") or {})

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, d in (self.sweep.get("space") or {}).items() if isinstance(d, dict) and d.get("type") == "grid"]

    @property
    def frontier_spec(self) -> dict[str, Any] | None:
        return self.sweep.get("frontier") or None

    @property
    def metric(self) -> str:
        m = self.sweep.get("metric") or "val_loss"
        return m[0] if isinstance(m, list) else m

    @property
    def mode(self) -> str:
        m = self.sweep.get("mode") or "min"
        return m[0] if isinstance(m, list) else m

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) pairs: one for a single-metric sweep, several for a Pareto sweep."""
        metrics, modes = self.sweep.get("metric") or "val_loss", self.sweep.get("mode") or "min"
        if not isinstance(metrics, list):
            return [(metrics, modes if isinstance(modes, str) else modes[0])]
        modes = modes if isinstance(modes, list) else [modes] * len(metrics)
        return list(zip(metrics, modes))

    def limit(self) -> tuple[float | None, str]:
        """The memory limit of the frontier: ``memory_limit_gib`` when set, else the device's memory."""
        emulated = _number(self.sweep.get("memory_limit_gib")) or _number((self.sweep.get("base") or {}).get(
            "system.memory_limit_gib"))
        if emulated:
            return emulated, "system.memory_limit_gib"
        device = _number(self.sweep.get("device_memory_gib"))
        if device:
            return device, f"device memory ({self.sweep.get('device_name') or 'device'})"
        reported = [_number(r.get("device_memory_gib")) for r in self.rows]
        reported += [_number((_read_json(self.dir / "trials" / str(r.get("trial_id")) / "summary.json") or {}).get(
            "device_memory_gib")) for r in self.rows if r.get("source", "run") == "run" and "device_memory_gib" not in r]
        reported = [v for v in reported if v]
        if reported:
            return min(reported), "device memory reported by the trials"
        return None, ""

    @property
    def ac_mode(self) -> str:
        """How the sweep's ``train.ac_budget`` was applied (lmtune.training.parallelize): ``budget`` with compile,
        ``blocks`` without; the frontier refuses a sweep whose trials mix the two."""
        return AC_MODES[bool((self.sweep.get("base") or {}).get("train.compile"))]

    def metrics(self, trial_id: str) -> list[dict[str, Any]]:
        """Every report of a trial (``trials/{id}/metrics.jsonl``); [] when there is none."""
        return _read_jsonl(self.dir / "trials" / str(trial_id) / "metrics.jsonl")

    def config_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The trial's full flat config: sweep base < the trial's summary.json config < its trials.csv cells."""
        cfg = dict(self.sweep.get("base") or {})
        summary = _read_json(self.dir / "trials" / str(row.get("trial_id")) / "summary.json")
        cfg.update((summary or {}).get("config") or {})
        cfg.update({k: v for k, v in row.items() if k in _CONFIG_KEYS and v is not None})
        return cfg


_CONFIG_KEYS = set(all_keys())


def load_results(path: str | Path) -> Results:
    """Read a results directory; ConfigError (one line, exit 2 at the command line) when it is not one."""
    d = Path(path)
    if not d.exists():
        raise ConfigError(f"results directory not found: {d}")
    if not d.is_dir():
        raise ConfigError(f"{d} is not a directory; expected a sweep's results directory (with sweep.json).")
    sweep = _read_json(d / "sweep.json")
    if sweep is None:
        raise ConfigError(f"{d} is not a results directory: no readable sweep.json "
                          f"(python -m lmtune.sweep writes one per sweep run).")
    rows = _read_trials_csv(d / "trials.csv")
    known = {r["trial_id"] for r in rows}
    trials_dir = d / "trials"
    for tdir in sorted(trials_dir.iterdir()) if trials_dir.is_dir() else []:
        if tdir.is_dir() and tdir.name not in known:
            row = _row_from_trial_dir(tdir)
            if row is not None:
                rows.append(row)
    return Results(d, sweep, rows)


def _read_json(path: Path) -> dict | None:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written by a running trial
        if isinstance(rec, dict):
            out.append(rec)
    return out


def parse_cell(key: str, text: str) -> Any:
    """A trials.csv cell → its value: config keys by their config type, other numbers as float."""
    if text is None or text == "":
        return None
    if key in _CONFIG_KEYS:
        try:
            return coerce(key, text)
        except ConfigError:
            return text
    if key in ("trial_id", "status", "source", "error"):
        return text
    try:
        return float(text)
    except ValueError:
        return text


def _read_trials_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: parse_cell(k, v) for k, v in r.items() if k is not None} for r in csv.DictReader(f)]
    for r in rows:
        r["trial_id"] = str(r.get("trial_id") or "")
        r.setdefault("source", "run")
        r["source"] = r.get("source") or "run"
    return rows


def _row_from_trial_dir(tdir: Path) -> dict[str, Any] | None:
    summary = _read_json(tdir / "summary.json")
    if summary is None:
        reports = _read_jsonl(tdir / "metrics.jsonl")
        if not reports:
            return None
        summary = {**reports[-1], "status": reports[-1].get("status", "running")}
    row = {k: v for k, v in summary.items() if k != "config" and not isinstance(v, (dict, list))}
    row.update((summary.get("config") or {}))
    row.update({"trial_id": tdir.name, "source": "run", "status": summary.get("status", "running")})
    return row


# --- the frontier ----------------------------------------------------------------------------------


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


def status_label(row: Mapping[str, Any]) -> str:
    """``ok``, ``OOM``, ``OOM (implied)``, ``OOM (predicted)``, or the trial's own status."""
    status = row.get("status") or "running"
    if status != "oom":
        return str(status)
    source = row.get("source") or "run"
    return "OOM" if source == "run" else f"OOM ({source})"


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
    ok = [r for r in rows if r.get("status") == "ok" and _number(r.get("tokens_per_s"))]
    best = max((_number(r["tokens_per_s"]) for r in ok), default=None)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in line_keys), []).append(r)
    tables = []
    for key in sorted(groups, key=_sort_key):
        table_rows = []
        for r in sorted(groups[key], key=lambda r: _sort_key((r[x],))):
            peak = _number(r.get("peak_reserved_gib"))
            tps = _number(r.get("tokens_per_s"))
            measured = r.get("source", "run") == "run"
            table_rows.append({
                x: r[x],
                "peak_reserved_gib": peak if measured else None,
                "predicted_peak_gib": _number(r.get("predicted_peak_gib")),
                "tokens_per_s": tps,
                "relative_throughput": tps / best if tps and best else None,
                "avg_step_time_ms": _number(r.get("avg_step_time_ms")),
                "wall_clock_s": _number(r.get("wall_clock_s")),
                "headroom_gib": (limit_gib - peak) if (limit_gib and peak is not None and r.get("status") in FEASIBLE)
                else None,
                "status": status_label(r),
                "trial_id": r.get("trial_id"),
                "source": r.get("source", "run"),
            })
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
        "run": sum(1 for r in rows if r.get("source", "run") == "run"),
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


def _oom_evidence(rows: Sequence[Mapping[str, Any]], x: str, smallest_oom: Any, limit_gib: float | None,
                  margin_gib: float | None) -> str:
    """Which evidence makes the smallest OOM point of a line infeasible."""
    row = next((r for r in rows if r[x] == smallest_oom and r["status"].startswith("OOM")), None)
    if row is None:
        return ""
    if row["source"] == "run":
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
                            ac_mode=results.ac_mode, margin_gib=_number(spec.get("margin_gib")))


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
    md, cs, js = out_dir / "frontier.md", out_dir / "frontier.csv", out_dir / "frontier.json"
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


# --- summaries of other sweeps ---------------------------------------------------------------------


def sorted_by_metric(results: Results) -> list[dict[str, Any]]:
    """Trials best first by the sweep's metric and mode, in three groups: finished (``ok``), then stopped early
    (``pruned``: their value is from fewer tokens, so it does not rank against a finished one), then the rest;
    trials without the metric last in each group."""
    metric, sign = results.metric, (1 if results.mode == "min" else -1)
    group = {"ok": 0, "pruned": 1}
    return sorted(results.rows, key=lambda r: (group.get(r.get("status"), 2), _number(r.get(metric)) is None,
                                               sign * (_number(r.get(metric)) or 0.0)))


def best_trial(results: Results) -> dict[str, Any] | None:
    """The best ``ok`` trial by the sweep's metric/mode."""
    for r in sorted_by_metric(results):
        if r.get("status") == "ok" and _number(r.get(results.metric)) is not None:
            return r
    return None


def pareto_front(results: Results) -> list[dict[str, Any]]:
    """The ``ok`` trials no other ``ok`` trial beats on every objective (and strictly on one), ordered by the
    first objective. For a single-metric sweep that is the best trial (and its ties)."""
    signs = [(m, 1.0 if mode == "min" else -1.0) for m, mode in results.objectives]

    def costs(r: dict[str, Any]) -> tuple[float, ...] | None:
        values = [_number(r.get(m)) for m, _ in signs]
        return None if any(v is None for v in values) else tuple(sign * v for (_, sign), v in zip(signs, values))

    ok = [(r, c) for r in results.rows if r.get("status") == "ok" and (c := costs(r)) is not None]
    front = [(r, c) for r, c in ok
             if not any(all(a <= b for a, b in zip(o, c)) and o != c for _, o in ok)]
    return [r for r, _ in sorted(front, key=lambda rc: rc[1])]


def val_loss_at_equal_tokens(results: Results) -> tuple[float | None, dict[str, float | None]]:
    """The largest token count every trial reached with a validation pass, and each trial's val_loss there
    (linear interpolation between its validation points)."""
    curves = {}
    for r in results.rows:
        pts = sorted((float(m["tokens"]), float(m["val_loss"])) for m in results.metrics(r["trial_id"])
                     if _number(m.get("val_loss")) is not None and _number(m.get("tokens")) is not None)
        if pts:
            curves[r["trial_id"]] = pts
    if not curves:
        return None, {}
    tokens = min(p[-1][0] for p in curves.values())
    return tokens, {tid: _interpolate(pts, tokens) for tid, pts in curves.items()}


def _interpolate(pts: list[tuple[float, float]], x: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1] if pts[0][0] == x else None


def summary_markdown(results: Results) -> str:
    """``summary.md``: every trial sorted by the metric, plus the norm × warmup and batch × LR tables when they apply."""
    metric = results.metric
    axes = results.space_keys
    objectives = ", ".join(f"{m} ({mode})" for m, mode in results.objectives)
    several = len(results.objectives) > 1
    lines = [f"# Sweep summary: {results.name}", "",
             f"Group: {results.group}. {'Objectives' if several else 'Metric'}: {objectives}.", ""]
    best = None if several else best_trial(results)
    if several:
        front = pareto_front(results)
        headers = ["trial_id", *map(short, axes), *(m for m, _ in results.objectives)]
        body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), *(fmt(r.get(m), m) for m, _ in results.objectives)]
                for r in front]
        lines += ["## Pareto front", "",
                  f"The ok trials no other ok trial beats on every objective ({len(front)} of "
                  f"{sum(1 for r in results.rows if r.get('status') == 'ok')}); export one with "
                  f"`python -m lmtune.export {results.dir} --trial ID`.", "",
                  markdown_table(headers, body) if body else "No ok trial yet.", ""]
    if best is not None:
        lines += [f"Best ok trial: {best['trial_id']} ("
                  + ", ".join(f"{short(k)}={best.get(k)}" for k in axes) + f"), {metric} = {fmt(best.get(metric), metric)}.", ""]
    shown = [m for m in dict.fromkeys([metric, *(m for m, _ in results.objectives), *SUMMARY_METRICS])
             if m == metric or any(_number(r.get(m)) is not None for r in results.rows)]
    headers = ["trial_id", "status", *map(short, axes), *shown]
    body = [[r.get("trial_id"), status_label(r), *(fmt(r.get(k), k) for k in axes), *(fmt(r.get(m), m) for m in shown)]
            for r in sorted_by_metric(results)]
    pruned = sum(1 for r in results.rows if r.get("status") == "pruned")
    note = ([f"Finished trials first, by {metric}; then the {pruned} stopped early by the scheduler (their {metric} "
             f"is from fewer tokens: see the tokens column), then the rest.", ""] if pruned else [])
    lines += ["## Trials", "", *note, markdown_table(headers, body) if body else "No trials yet.", ""]
    spent = cost_text(results)
    if spent:
        lines += [spent, ""]
    kinds = experiments(axes, results.frontier_spec)
    if "norm" in kinds:
        headers = ["trial_id", *map(short, axes), "val_loss", "grad_norm_spread", "diverged"]
        body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), fmt(r.get("val_loss"), "val_loss"),
                 fmt(r.get("grad_norm_spread"), "grad_norm_spread"), "yes" if r.get("status") == "diverged" else "no"]
                for r in sorted(results.rows, key=lambda r: tuple(_sort_key((r.get(k),)) for k in axes))]
        lines += ["## Norm placement × warmup", "",
                  "Final validation loss, the spread of per-layer gradient norms (log10 max/min over layers) and "
                  "whether the run diverged.", "", markdown_table(headers, body), ""]
    if "batch" in kinds:
        tokens, at = val_loss_at_equal_tokens(results)
        headers = ["trial_id", *map(short, axes), "val_loss_at_equal_tokens", "val_loss", "grad_coherence", "noise_scale"]
        body = [[r.get("trial_id"), *(fmt(r.get(k), k) for k in axes), fmt(at.get(r["trial_id"]), "val_loss"),
                 fmt(r.get("val_loss"), "val_loss"), fmt(r.get("grad_coherence"), "grad_coherence"),
                 fmt(r.get("noise_scale"), "noise_scale")]
                for r in sorted(results.rows, key=lambda r: tuple(_sort_key((r.get(k),)) for k in axes))]
        at_text = f"{tokens:,.0f} tokens (the most every trial reached)" if tokens is not None else "equal tokens (no validation points yet)"
        lines += ["## Batch size × LR scaling", "",
                  f"Validation loss at {at_text}; gradient coherence and the noise scale (McCandlish et al. 2018, "
                  f"B_simple) at the end.", "", markdown_table(headers, body), ""]
    return "\n".join(lines)


def cost(results: Results) -> tuple[float, str, int]:
    """(device-hours of the trials that ran, ``GPU-hours`` | ``CPU-hours``, how many reported it): each trial's
    ``device_hours`` is its wall-clock × the GPUs (or, on a CPU, the threads) its ranks used."""
    hours = [_number(r.get("device_hours")) for r in results.rows if r.get("source", "run") == "run"]
    hours = [h for h in hours if h is not None]
    gpus = _number(results.sweep.get("gpus")) or 0
    return sum(hours), "GPU-hours" if gpus > 0 else "CPU-hours", len(hours)


def cost_text(results: Results) -> str | None:
    total, unit, n = cost(results)
    return f"Cost: {total:.3g} {unit} over the {n} trial(s) that ran (each trial's device_hours)." if n else None


# --- formatting ------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def fmt(v: Any, key: str = "") -> str:
    """A table cell: thousands separators for token counts, 2–3 decimals for GiB, 4 significant digits otherwise."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if key in ("tokens_per_s", "tokens") or key.endswith("_tokens"):
        return f"{v:,.0f}"
    if key == "relative_throughput":
        return f"{v:.2f}"
    if key.endswith("_gib"):
        return gib(v)
    if key.endswith("_ms") or key.endswith("_s"):
        return f"{v:.1f}"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def gib(v: float) -> str:
    """GiB with two decimals, three below 1 GiB (CPU smoke runs measure in tenths of a GiB)."""
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _sort_key(values: tuple) -> tuple:
    """Sort mixed values: numbers numerically, then everything else as text; None last."""
    return tuple((2, "") if v is None else (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                 else (1, str(v)) for v in values)
