"""The frontier planner: pure decisions driven by simulated memory, then one real Ray Tune run."""

from __future__ import annotations

import math

import pytest

from lmtune.config import ConfigError
from lmtune.sweep.findings import prediction_summary
from lmtune.sweep.plan import FINISHED, FrontierPlan, simulate
from lmtune.sweep.spec import Frontier, Grid, loguniform

X, B = "train.micro_batch_size", "train.ac_budget"


def linear_memory(slopes: dict, intercept: float = 1.0, limit: float = 20.0, tps=None):
    """A simulated trainer: peak = intercept + slope·x per budget, OOM above ``limit``."""

    def measure(cfg):
        x = cfg[X]
        peak = intercept + slopes[cfg.get(B)] * x
        if peak > limit:
            return {"status": "oom", "peak_reserved_gib": limit}
        return {"status": "ok", "peak_reserved_gib": peak, "tokens_per_s": tps(x) if tps else 100.0 * x / (x + 4)}

    return measure


def run(plan, measure, concurrency=1):
    launched = simulate(plan, measure, concurrency=concurrency)
    return launched, {(t["config"].get(B), t["config"][X]) for t in launched}


def truth_largest(xs, slope, intercept=1.0, limit=20.0):
    feasible = [x for x in xs if intercept + slope * x <= limit]
    return max(feasible) if feasible else None


# --- monotone implication and bisection --------------------------------------------------------------


def test_oom_implies_larger_x_never_launched():
    xs = list(range(1, 17))
    plan = FrontierPlan(xs, [{B: 1.0}], limit_gib=20.0, headroom_gib=4.0, predict=False)
    launched, ran = run(plan, linear_memory({1.0: 2.0}))  # peak = 1 + 2x: x ≤ 9 fits under 20
    assert plan.frontier()[((B, 1.0),)] == {"largest_feasible": 9, "smallest_oom": 10}
    smallest_oom_seen = math.inf
    for t in launched:  # after an OOM at x, nothing at or above x is launched
        assert t["config"][X] < smallest_oom_seen
        if t["result"]["status"] == "oom":
            smallest_oom_seen = min(smallest_oom_seen, t["config"][X])
    implied = plan.implied_rows()
    assert {r[X] for r in implied} == set(range(11, 17)) - {x for _, x in ran}
    assert all(r["status"] == "oom" and r["source"] == "implied" for r in implied)
    assert not ({(r[B], r[X]) for r in implied} & ran)
    assert len(launched) + len(implied) <= len(xs)


@pytest.mark.parametrize("boundary", [0, 1, 2, 17, 31, 32, 33, 50, 63, 64])
def test_bisection_finds_every_boundary_in_log_trials(boundary):
    """x ≤ boundary fit; plain bisection over 64 sorted points needs ~2·log2(64) trials, not 64."""
    xs = list(range(1, 65))
    plan = FrontierPlan(xs, [{}], limit_gib=None, predict=False)

    def measure(cfg):
        return {"status": "ok" if cfg[X] <= boundary else "oom", "peak_reserved_gib": cfg[X] / 10}

    launched = simulate(plan, measure)
    got = plan.frontier()[()]
    assert got["largest_feasible"] == (boundary or None)
    assert got["smallest_oom"] == (boundary + 1 if boundary < 64 else None)
    assert len(launched) <= 7  # ceil(log2(65)) probes for one threshold


def test_headroom_boundary_and_throughput_neighbours_are_measured():
    xs = list(range(1, 33))
    plan = FrontierPlan(xs, [{B: 0.5}], limit_gib=20.0, headroom_gib=5.0, margin_gib=0.5, predict=False)
    launched, ran = run(plan, linear_memory({0.5: 0.5}))  # peak = 1 + x/2: headroom 5 → x ≤ 28
    by_x = {t["config"][X]: t["result"] for t in launched}
    assert 28 in by_x and 29 in by_x  # the headroom boundary, measured on both sides
    assert 27 in by_x  # the fastest point with headroom (28) gets its neighbour measured
    assert len(launched) <= 12


# --- prediction ----------------------------------------------------------------------------------------


def test_a_boundary_resting_on_a_prediction_is_verified_by_one_trial():
    """39 is predicted at 20.5 > 20 + 0.25 GiB: by default that one point runs before the boundary is closed."""
    xs = list(range(1, 65))
    plan = FrontierPlan(xs, [{B: 1.0}], limit_gib=20.0, headroom_gib=4.0, margin_gib=0.25)
    launched, ran = run(plan, linear_memory({1.0: 0.5}))  # peak = 1 + x/2 exactly: x ≤ 38 fits
    assert plan.frontier()[((B, 1.0),)] == {"largest_feasible": 38, "smallest_oom": 39}
    assert (1.0, 39) in ran and not [r for r in plan.implied_rows() if r["source"] == "predicted"]
    verified = [p for p in plan.lines[0].points if p.purpose == "verify"]
    assert [p.x for p in verified] == [39] and verified[0].state == "oom"


def test_a_prediction_that_was_wrong_is_corrected_by_its_verification():
    """A fit that over-predicts (memory levels off near the limit, as a caching allocator's does): the point
    predicted OOM fits when it runs, and the search goes on above it to the true boundary."""
    xs = list(range(1, 41))
    plan = FrontierPlan(xs, [{}], limit_gib=20.0, headroom_gib=0.0, margin_gib=0.1, confirm_throughput=False)

    def leveling(cfg):  # linear up to 16 GiB, then a quarter of the slope
        x = cfg[X]
        peak = 0.5 * x if 0.5 * x <= 16 else 16 + 0.125 * (x - 32)
        return {"status": "oom", "peak_reserved_gib": 20.0} if peak > 20 else {"status": "ok", "peak_reserved_gib": peak}

    simulate(plan, leveling)
    assert plan.frontier()[()]["largest_feasible"] == 40  # 16 + 1 at x=40: every point fits
    assert not [r for r in plan.implied_rows() if r["source"] == "predicted"]


def test_prediction_skips_points_above_limit_plus_margin_and_reports_errors():
    xs = list(range(1, 65))
    plan = FrontierPlan(xs, [{B: 1.0}], limit_gib=20.0, headroom_gib=4.0, margin_gib=0.25, verify_predicted=False)
    launched, ran = run(plan, linear_memory({1.0: 0.5}))  # peak = 1 + x/2 exactly: x ≤ 38 fits
    assert plan.frontier()[((B, 1.0),)] == {"largest_feasible": 38, "smallest_oom": 39}
    rows = plan.implied_rows()
    # Bisection measured 48 and 40 OOM before the fit existed; 39 is predicted at 20.5 > 20.25 GiB and
    # never launched (verification off); everything above 40 is implied by the measured OOMs.
    predicted = [r for r in rows if r["source"] == "predicted"]
    assert [r[X] for r in predicted] == [39]
    assert [r[X] for r in rows if r["source"] == "implied"] == [*range(41, 48), *range(49, 65)]
    assert {x for _, x in ran} >= {40, 48}
    for r in predicted:
        assert r["predicted_peak_gib"] == pytest.approx(1 + r[X] / 2)
        assert (r[B], r[X]) not in ran
    errors = plan.prediction_errors()
    assert errors and all(abs(e["error_gib"]) < 1e-9 for e in errors if e["error_gib"] is not None)
    assert len(launched) < 12  # the exact fit jumps to the boundaries


def test_prediction_error_is_measured_minus_predicted_when_memory_is_not_linear():
    xs = list(range(1, 41))
    plan = FrontierPlan(xs, [{}], limit_gib=30.0, headroom_gib=5.0, margin_gib=1.0)

    def measure(cfg):  # slightly convex: a linear fit under-predicts the large points
        x = cfg[X]
        peak = 2 + 0.4 * x + 0.01 * x * x
        return {"status": "oom", "peak_reserved_gib": 30.0} if peak > 30 else {"status": "ok", "peak_reserved_gib": peak}

    launched = simulate(plan, measure)
    errors = plan.prediction_errors()
    assert errors
    for e in errors:
        if e["error_gib"] is not None:
            x = e[X]
            assert e["error_gib"] == pytest.approx(2 + 0.4 * x + 0.01 * x * x - e["predicted_gib"])
    predicted_at_launch = plan.launch_predictions()
    assert set(predicted_at_launch) == {t["trial_id"] for t in launched}
    summary = prediction_summary(errors)
    assert summary["points"] >= 1 and summary["max_abs_error_gib"] > 0
    truth = max(x for x in xs if 2 + 0.4 * x + 0.01 * x * x <= 30)
    assert plan.frontier()[()]["largest_feasible"] == truth


# --- concurrency and independence of lines ---------------------------------------------------------------


def test_waits_for_a_pending_result_instead_of_guessing():
    plan = FrontierPlan(list(range(1, 17)), [{}], limit_gib=None, predict=False)
    first = plan.suggest("t1")
    assert isinstance(first, dict)
    assert plan.suggest("t2") is None  # one line, one open interval, its probe pending: wait
    plan.complete("t1", {"status": "ok", "peak_reserved_gib": 1.0})
    assert isinstance(plan.suggest("t3"), dict)


def test_waits_rather_than_launch_above_a_pending_smaller_point():
    """A pending smaller x could come back OOM and imply a larger one: the larger one waits for it."""
    plan = FrontierPlan(list(range(1, 33)), [{}], limit_gib=20.0, headroom_gib=5.0, predict=False)
    assert plan.suggest("t1")[X] == 16
    plan.complete("t1", {"status": "ok", "peak_reserved_gib": 18.0})  # feasible, but without headroom
    upper, lower = plan.suggest("t2")[X], plan.suggest("t3")[X]  # OOM boundary above, headroom boundary below
    assert upper > 16 > lower
    plan.complete("t2", {"status": "ok", "peak_reserved_gib": 19.0})
    assert plan.suggest("t4") is None  # the OOM interval is open again, but t3 (smaller) is pending
    plan.complete("t3", {"status": "ok", "peak_reserved_gib": 10.0})
    assert plan.suggest("t5")[X] > upper


def test_never_launches_above_a_pending_smaller_point():
    xs = list(range(1, 33))
    plan = FrontierPlan(xs, [{B: b} for b in (0.25, 0.5, 1.0)], limit_gib=20.0, headroom_gib=6.0)
    measure = linear_memory({0.25: 0.3, 0.5: 0.5, 1.0: 0.9})
    pending: dict[str, dict] = {}
    n = 0
    max_in_flight = 0
    while True:
        while len(pending) < 4:
            n += 1
            cfg = plan.suggest(f"t{n}")
            if cfg is None or cfg == FINISHED:
                break
            assert not any(c.get(B) == cfg.get(B) and c[X] < cfg[X] for c in pending.values())
            pending[f"t{n}"] = cfg
        max_in_flight = max(max_in_flight, len(pending))
        if not pending:
            break
        tid = next(reversed(pending))  # the newest completes first: the opposite of simulate()'s order
        plan.complete(tid, measure(pending.pop(tid)))
    assert max_in_flight > 1
    for b, slope in ((0.25, 0.3), (0.5, 0.5), (1.0, 0.9)):
        assert plan.frontier()[((B, b),)]["largest_feasible"] == truth_largest(xs, slope)


@pytest.mark.parametrize("concurrency", [1, 2, 4])
def test_same_frontier_at_any_concurrency(concurrency):
    xs = [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    slopes = {0.1: 0.2, 0.5: 0.35, 1.0: 0.6}
    plan = FrontierPlan(xs, [{B: b} for b in slopes], limit_gib=20.0, headroom_gib=4.0, margin_gib=0.5)
    launched, _ = run(plan, linear_memory(slopes), concurrency=concurrency)
    for b, s in slopes.items():
        assert plan.frontier()[((B, b),)]["largest_feasible"] == truth_largest(xs, s)
    assert len(launched) <= len(xs) * len(slopes) // 2


def test_each_budget_is_measured_independently():
    """An OOM at a small x on one budget says nothing about another: the other still runs its largest x."""
    xs = list(range(1, 17))
    plan = FrontierPlan(xs, [{B: 0.1}, {B: 1.0}], limit_gib=20.0, headroom_gib=2.0)
    launched, ran = run(plan, linear_memory({0.1: 0.1, 1.0: 6.0}))  # 1.0: OOM from x=4; 0.1: never
    assert (0.1, 16) in ran  # measured, not assumed
    assert plan.frontier()[((B, 1.0),)] == {"largest_feasible": 3, "smallest_oom": 4}
    assert plan.frontier()[((B, 0.1),)] == {"largest_feasible": 16, "smallest_oom": None}
    assert {r[B] for r in plan.implied_rows()} == {1.0}


@pytest.mark.parametrize("crash", [{"status": "error"}, {}, {"returncode": 1, "stderr": "Traceback ..."}])
def test_an_errored_trial_is_not_retried_and_the_plan_finishes(crash):
    """An error, or a process that crashed before it wrote a status (no summary), is no evidence that it fits."""
    plan = FrontierPlan(list(range(1, 17)), [{}], limit_gib=None, predict=False)

    def measure(cfg):
        if cfg[X] == 8:
            return crash
        return {"status": "ok" if cfg[X] <= 10 else "oom", "peak_reserved_gib": cfg[X] / 10}

    launched = simulate(plan, measure)
    assert [t["config"][X] for t in launched].count(8) == 1
    assert plan.frontier()[()]["largest_feasible"] == 10
    assert any("status 'error'" in n for n in plan.notes)


def test_unimodal_throughput_confirmation_walks_to_the_real_peak():
    xs = list(range(1, 33))

    def tps(x):  # peaks at x=10, well below the headroom boundary (28)
        return 1000 - (x - 10) ** 2

    plan = FrontierPlan(xs, [{}], limit_gib=20.0, headroom_gib=5.0, margin_gib=0.5)
    launched = simulate(plan, lambda c: linear_memory({None: 0.5}, tps=tps)(c))
    measured = {t["config"][X]: t["result"]["tokens_per_s"] for t in launched if t["result"]["status"] == "ok"}
    assert max(measured, key=measured.get) == 10
    assert len(launched) < len(xs)


# --- building from a sweep's space --------------------------------------------------------------------------


def test_from_space_crosses_other_grid_axes_into_lines():
    space = {X: Grid((8, 4, 16)), B: Grid((0.5, 1.0)), "model.n_layer": Grid((2, 4))}
    plan = FrontierPlan.from_space(space, Frontier(), limit_gib=10.0)
    assert plan.xs == [4, 8, 16] and plan.grid_size == 12
    assert [dict(line.key) for line in plan.lines][0] == {B: 0.5, "model.n_layer": 2}
    cfg = plan.suggest("t1")
    assert set(cfg) == {X, B, "model.n_layer"}


def test_from_space_refuses_non_grid_axes_and_a_missing_x():
    with pytest.raises(ConfigError, match="grid axes only"):
        FrontierPlan.from_space({X: Grid((1, 2)), "train.lr": loguniform(1e-4, 1e-3)}, Frontier(), limit_gib=None)
    with pytest.raises(ConfigError, match="not a grid axis"):
        FrontierPlan.from_space({B: Grid((0.5,))}, Frontier(), limit_gib=None)


# --- one real Ray Tune run -------------------------------------------------------------------------------

MIB = 2**20
LIMIT_GIB = 100 / 1024  # 100 MiB of measured growth
PER_X_MIB = {1.0: 16, 0.25: 6}  # budget 1.0 crosses the limit after x=6; 0.25 never does (16·6 = 96 MiB)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def tune_run(tmp_path_factory):
    """A frontier sweep through Ray Tune whose trials really allocate x·PER_X_MIB and measure their RSS."""
    ray = pytest.importorskip("ray")
    from ray import tune

    from lmtune.sweep.search import FrontierSearcher

    root = tmp_path_factory.mktemp("tune")
    launched_dir = root / "launched"
    launched_dir.mkdir()
    limit, per_x, rss = LIMIT_GIB, dict(PER_X_MIB), _rss_bytes

    def trainable(config):  # a closure: pickled by value into the Ray worker
        import numpy as np

        x, budget = config[X], config[B]
        (launched_dir / f"{budget}-{x}").write_text("")
        before = rss()
        buf = np.ones(x * per_x[budget] * MIB // 8)  # written, so every page is resident
        grown = (rss() - before) / 2**30
        status = "oom" if grown > limit else "ok"
        tune.report({"status": status, "peak_reserved_gib": grown, "tokens_per_s": 1000.0 * x / (x + 4),
                     "avg_step_time_ms": 1.0, "wall_clock_s": 0.1, "buffer_sum": float(buf[:8].sum())})

    space = {X: Grid(tuple(range(1, 17))), B: Grid((0.25, 1.0))}
    plan = FrontierPlan.from_space(space, Frontier(headroom_gib=30 / 1024, margin_gib=5 / 1024), limit_gib=limit)
    searcher = FrontierSearcher(plan, metric="tokens_per_s", mode="max")
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    started = not ray.is_initialized()  # another test may have left its local Ray up: use it, leave it
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=plan.grid_size, max_concurrent_trials=2),
            run_config=tune.RunConfig(storage_path=str(root / "storage"), name="frontier", verbose=0),
        )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    results = [(r.config, r.metrics) for r in grid]
    launched = {tuple(p.name.split("-")) for p in launched_dir.iterdir()}
    return {"plan": searcher.plan, "searcher": searcher, "results": results, "launched": launched}


@pytest.mark.slow
def test_tune_runs_only_what_the_plan_launches(tune_run):
    plan, results, launched = tune_run["plan"], tune_run["results"], tune_run["launched"]
    assert len(results) == len(launched) == plan.trials_run() < plan.grid_size // 2
    implied = {(str(r[B]), str(r[X])) for r in tune_run["searcher"].implied_rows()}
    assert implied and not (implied & launched)  # implied/predicted points were never launched
    statuses = {(c[B], c[X]): m["status"] for c, m in results}
    assert statuses.get((1.0, 7), "oom") == "oom"  # really crossed the limit (if it ran: it may be predicted)
    assert plan.frontier()[((B, 1.0),)] == {"largest_feasible": 6, "smallest_oom": 7}
    assert plan.frontier()[((B, 0.25),)] == {"largest_feasible": 16, "smallest_oom": None}
    assert statuses[(0.25, 16)] == "ok"  # measured on its own budget, not assumed
    for c, m in results:  # the status came from the measured size, not from the model
        assert (m["status"] == "oom") == (m["peak_reserved_gib"] > LIMIT_GIB)


@pytest.mark.slow
def test_tables_from_the_tune_run_equal_its_results(tune_run, tmp_path):
    from lmtune import reporting as report
    from tests.frontier_fixtures import frontier_sweep_json, write_results_dir

    plan = tune_run["plan"]
    predicted = plan.launch_predictions()
    rows = [{"trial_id": m["trial_id"], "source": "run", **c, **m, "predicted_peak_gib": predicted[m["trial_id"]]}
            for c, m in tune_run["results"]]
    sweep = frontier_sweep_json(range(1, 17), (0.25, 1.0), limit=LIMIT_GIB, headroom=30 / 1024, margin=5 / 1024)
    d = write_results_dir(tmp_path / "r", sweep, rows + plan.implied_rows())
    report.render(d)
    import json

    data = json.loads((d / "frontier.json").read_text())
    got = {(t["line"][B], r[X]): r for t in data["tables"] for r in t["rows"]}
    assert len(got) == len(rows) + len(plan.implied_rows())
    for c, m in tune_run["results"]:
        r = got[(c[B], c[X])]
        assert r["trial_id"] == m["trial_id"]
        assert r["status"] == {"ok": "ok", "oom": "OOM"}[m["status"]]
        assert r["peak_reserved_gib"] == pytest.approx(m["peak_reserved_gib"])
        if m["status"] == "ok":
            assert r["tokens_per_s"] == pytest.approx(m["tokens_per_s"])
            assert r["headroom_gib"] == pytest.approx(LIMIT_GIB - m["peak_reserved_gib"])
    for row in plan.implied_rows():
        assert got[(row[B], row[X])]["status"] == f"OOM ({row['source']})"
    assert {t["line"][B]: t["largest_feasible"] for t in data["tables"]} == {0.25: 16, 1.0: 6}


def test_limit_learned_from_the_device_memory_a_trial_reports():
    plan = FrontierPlan(list(range(1, 33)), [{}], limit_gib=None, headroom_gib=5.0)
    cfg = plan.suggest("t1")
    plan.complete("t1", {"status": "ok", "peak_reserved_gib": 1 + 0.5 * cfg[X], "device_memory_gib": 20.0})
    assert plan.limit_gib == 20.0
    launched = simulate(plan, lambda c: {"status": "ok", "peak_reserved_gib": 1 + 0.5 * c[X], "tokens_per_s": c[X]})
    assert plan.frontier()[()]["largest_feasible"] == 32
    assert any(t["config"][X] in (28, 29) for t in launched)  # the headroom boundary (1 + x/2 ≤ 15) was searched


def test_searcher_state_survives_save_and_restore(tmp_path):
    """Tune checkpoints the searcher (resume after an interrupted sweep): the restored plan goes on identically."""
    pytest.importorskip("ray")
    from lmtune.sweep.search import FrontierSearcher

    def fresh():
        return FrontierSearcher(FrontierPlan(list(range(1, 33)), [{B: 0.5}, {B: 1.0}], limit_gib=20.0, headroom_gib=4.0))

    measure = linear_memory({0.5: 0.4, 1.0: 0.8})
    a = fresh()
    for n in range(3):
        a.on_trial_complete(f"t{n}", measure(a.suggest(f"t{n}")))
    pending = a.suggest("t3")
    a.save(str(tmp_path / "searcher.pkl"))
    b = fresh()
    b.restore(str(tmp_path / "searcher.pkl"))
    for s in (a, b):
        s.on_trial_complete("t3", measure(pending))
    for n in range(4, 40):
        ca, cb = a.suggest(f"t{n}"), b.suggest(f"t{n}")
        assert ca == cb
        if ca == "FINISHED":
            break
        a.on_trial_complete(f"t{n}", measure(ca))
        b.on_trial_complete(f"t{n}", measure(cb))
    assert ca == "FINISHED" and a.implied_rows() == b.implied_rows()


# --- a resumed sweep: the plan and the trials Tune restored ------------------------------------------


def _two_lines() -> FrontierPlan:
    return FrontierPlan(list(range(1, 25)), [{B: 0.5}, {B: 1.0}], limit_gib=20.0, headroom_gib=4.0)


def _found(plan: FrontierPlan, launched: list[dict]) -> dict:
    """What a plan found, trial ids aside: the points run (each once), the rows never launched, the frontier."""
    points = sorted((c[B], c[X]) for c in launched)
    assert len(points) == len(set(points)), points  # no grid point ran twice
    implied = sorted((r[B], r[X], r["source"]) for r in plan.implied_rows())
    return {"ran": points, "implied": implied, "frontier": plan.frontier()}


def curved_memory(cfg):
    """Memory that grows faster than the linear fit says (the fit's guided probes overshoot, so the plan alternates
    them with bisection: a resumed plan must know which kind of probe a trial it adopts was)."""
    x = cfg[X]
    peak = 1 + {0.5: 0.7, 1.0: 0.9}[cfg[B]] * x + 0.01 * x * x
    if peak > 20.0:
        return {"status": "oom", "peak_reserved_gib": 20.0}
    return {"status": "ok", "peak_reserved_gib": peak, "tokens_per_s": 100.0 * x / (x + 4)}


@pytest.mark.parametrize("memory", ["linear", "curved"])
@pytest.mark.parametrize("snapshot", ["plan behind", "plan ahead", "older session"])
def test_a_resumed_plan_agrees_with_the_trials_and_ends_as_the_uninterrupted_one(snapshot, memory):
    """Tune saves the plan (its searcher state) a moment after the experiment's trials, and a resume can fall back to
    an older whole snapshot; killed anywhere in the sweep, the resumed plan must still run each point once, wait for
    no trial Tune no longer has, and end with the uninterrupted sweep's points, rows and frontier.

    * plan behind: the trial pending in the saved plan had ended (recorded) and Tune restored the next one running;
    * plan ahead: the saved plan launched a trial the restored experiment never had;
    * older session: plan and experiment from before the last trial, which ran and was recorded.

    Every interruption point of the sweep is tried."""
    import pickle

    measure = linear_memory({0.5: 0.5, 1.0: 0.9}) if memory == "linear" else curved_memory

    def row(config):
        return {**config, **measure(config)}

    reference = _two_lines()
    want = _found(reference, [t["config"] for t in simulate(reference, measure)])
    for k in range(1, len(want["ran"])):
        plan, launched = _two_lines(), []
        for n in range(k):  # trials t0..t{k-2} ended, t{k-1} running: the saved plan
            launched.append(plan.suggest(f"t{n}"))
            if n < k - 1:
                plan.complete(f"t{n}", measure(launched[-1]))
        before = pickle.dumps(plan)
        last = f"t{k - 1}"
        ended = {f"t{n}": row(launched[n]) for n in range(k - 1)}  # trials.csv: the point and its result
        restored = {t: (launched[n], True) for n, t in enumerate(ended)}
        if snapshot == "plan behind":
            plan.complete(last, measure(launched[-1]))
            ended[last] = row(launched[-1])
            restored[last] = (launched[-1], True)
            after = plan.suggest(f"t{k}")
            if isinstance(after, dict):
                launched.append(after)
                restored[f"t{k}"] = (after, False)
        elif snapshot == "plan ahead":
            launched.pop()  # never run: the resumed plan must give it up and plan its point again
        else:
            ended[last] = row(launched[-1])
            before = pickle.dumps(_replayed(measure, launched[:-1]))
        resumed: FrontierPlan = pickle.loads(before)
        resumed.reconcile(restored, ended)
        for tid, (config, finished) in restored.items():
            if not finished:  # Tune runs it again
                resumed.complete(tid, measure(config))
        launched += [t["config"] for t in simulate(resumed, measure)]  # raises if the plan waits for nothing
        assert _found(resumed, launched) == want, (snapshot, k)


def _replayed(measure, configs: list[dict]) -> FrontierPlan:
    """The plan that launched and completed ``configs`` in order (an older snapshot)."""
    plan = _two_lines()
    for n, config in enumerate(configs):
        assert plan.suggest(f"t{n}") == config
        plan.complete(f"t{n}", measure(config))
    return plan


def test_an_earlier_sweeps_points_settle_theirs_and_only_what_they_leave_open_runs():
    """--warm-start on a frontier: the points an earlier sweep measured are the plan's evidence (never launched, rows
    of source ``earlier``); with one micro-batch added, only what it leaves open runs; the frontier is the same."""
    xs = [8, 16, 32, 64, 96, 128]
    measure = linear_memory({0.5: 0.1, 1.0: 0.25})
    first = FrontierPlan(xs, [{B: 0.5}, {B: 1.0}], limit_gib=20.0, headroom_gib=2.0)
    ran, _ = run(first, measure)
    earlier = [({**t["config"]}, {**t["result"], "config": {"system.memory_limit_gib": 20.0}}) for t in ran]

    again = FrontierPlan(xs, [{B: 0.5}, {B: 1.0}], limit_gib=20.0, headroom_gib=2.0)
    assert all(again.know(config, result, f"1-earlier/t{i}") for i, (config, result) in enumerate(earlier))
    assert simulate(again, measure) == [] and again.frontier() == first.frontier()
    rows = again.implied_rows()
    assert sorted((r[B], r[X]) for r in rows if r["source"] == "earlier") == sorted(
        (c[B], c[X]) for c, _ in earlier)
    assert {r["reused_from"] for r in rows if r["source"] == "earlier"} == {f"1-earlier/t{i}" for i in range(len(ran))}

    more = FrontierPlan(sorted([*xs, 80]), [{B: 0.5}, {B: 1.0}], limit_gib=20.0, headroom_gib=2.0)
    for i, (config, result) in enumerate(earlier):
        more.know(config, result, f"1-earlier/t{i}")
    new, points = run(more, measure)
    assert 0 < len(new) <= 2 and all(x == 80 for _, x in points), points  # only the new value, where it matters
    # evidence from a frontier of another memory limit is no evidence here
    other = FrontierPlan(xs, [{B: 0.5}], limit_gib=40.0, headroom_gib=2.0)
    config, result = earlier[0]
    assert not other.know({B: 0.5, X: config[X]}, result, "x")
