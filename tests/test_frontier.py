"""Frontier and summary tables, plots and `python -m lmtune.report` on results directories."""

from __future__ import annotations

import csv
import json

import pytest

from lmtune import report as report_command
from lmtune.reporting import render
from lmtune.results.kinds import norm as plots
from lmtune.results.kinds.batch import val_loss_at_equal_tokens
from lmtune.results.kinds.frontier import analyze_frontier
from lmtune.results.read import load_results
from tests.conftest import REPO, run_module
from tests.frontier_fixtures import (
    SLOPES,
    B,
    X,
    batch_results,
    frontier_results,
    frontier_sweep_json,
    norm_results,
    write_results_dir,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_frontier_rows_equal_the_trial_results(tmp_path):
    d, plan = frontier_results(tmp_path / "r")
    written = render(d)
    assert {p.name for p in written} >= {"frontier.md", "frontier.csv", "frontier.json", "summary.md", "frontier.png"}
    data = json.loads((d / "frontier.json").read_text())
    with open(d / "trials.csv") as f:
        trials = {r["trial_id"]: r for r in csv.DictReader(f)}
    table_rows = [(t["line"], r) for t in data["tables"] for r in t["rows"]]
    assert len(table_rows) == len(trials)
    best = max(float(r["tokens_per_s"]) for r in trials.values() if r["status"] == "ok")
    for line, r in table_rows:
        t = trials[r["trial_id"]]
        assert float(t[B]) == line[B] and int(t[X]) == r[X]
        if t["source"] == "run" and t["status"] == "ok":
            assert r["status"] == "ok"
            assert r["peak_reserved_gib"] == pytest.approx(float(t["peak_reserved_gib"]))
            assert r["tokens_per_s"] == pytest.approx(float(t["tokens_per_s"]))
            assert r["avg_step_time_ms"] == pytest.approx(float(t["avg_step_time_ms"]))
            assert r["headroom_gib"] == pytest.approx(20.0 - float(t["peak_reserved_gib"]))
            assert r["relative_throughput"] == pytest.approx(float(t["tokens_per_s"]) / best)
        else:
            assert t["status"] == "oom"
            assert r["status"] == {"run": "OOM", "implied": "OOM (implied)", "predicted": "OOM (predicted)"}[t["source"]]
    for t in data["tables"]:  # the largest feasible micro-batch is the truth of the simulated memory
        b = t["line"][B]
        assert t["largest_feasible"] == max(x for x in range(1, 41) if 1 + SLOPES[b] * x <= 20.0)
    csv_rows = list(csv.DictReader(open(d / "frontier.csv")))
    assert len(csv_rows) == len(trials)


def test_recommended_point_is_the_fastest_with_headroom_stated_like_the_seed(tmp_path):
    d, _ = frontier_results(tmp_path / "r")
    render(d)
    data = json.loads((d / "frontier.json").read_text())
    rows = [(t["line"][B], r) for t in data["tables"] for r in t["rows"]]
    eligible = [(b, r) for b, r in rows if r["status"] == "ok" and r["headroom_gib"] >= 4.0]
    b, r = max(eligible, key=lambda br: br[1]["tokens_per_s"])
    assert data["recommended"]["trial_id"] == r["trial_id"]
    md = (d / "frontier.md").read_text()
    assert (f"Recommended operating point: ac_budget={b}, micro_batch_size={r[X]} (ac_mode budget). Gives the highest "
            f"throughput with {r['headroom_gib']:.1f} GiB headroom") in md
    assert "AC mode: budget (the compile partitioner's activation memory budget, per compiled block)" in md
    assert f"## ac_budget={b} (budget)" in md
    assert "Limit: 20 GiB (system.memory_limit_gib)" in md
    assert "OOM (implied)" in md and "| micro_batch_size | peak_reserved_gib | tokens_per_s |" in md


def test_the_seeds_a100_tables_give_the_seeds_recommendation():
    """The phase-0 readme's numbers: budget 0.75 at mb 32 (34.2 GiB) wins; no-AC mb 28 is fast but has ~1 GiB.
    With the shipped sweep's headroom and the 39.4 GiB an A100-40GB reports, the shipped sweep recommends
    what the phase-0 study did."""
    from lmtune.sweep.load import load_sweep

    sweep, _ = load_sweep(REPO / "sweeps" / "memory_frontier.py")
    seed = [(1.0, 16, 22.5, 90.0), (1.0, 28, 38.1, 99.0), (1.0, 30, 38.95, 98.0), (1.0, 32, None, None),
            (0.12, 32, 25.7, 80.0), (0.38, 32, 30.2, 88.0), (0.75, 32, 34.2, 100.0), (0.75, 40, None, None)]
    rows = [{"trial_id": f"s{i}", "source": "run", B: b, X: mb, "status": "ok" if peak else "oom",
             "peak_reserved_gib": peak, "tokens_per_s": tps} for i, (b, mb, peak, tps) in enumerate(seed)]
    rep = analyze_frontier(rows, x=X, line_keys=[B], limit_gib=39.4, headroom_gib=sweep.frontier.headroom_gib,
                           limit_source="A100 40GB", ac_mode="budget")
    assert rep.statement.startswith("Recommended operating point: ac_budget=0.75, micro_batch_size=32 (ac_mode "
                                    "budget). Gives the highest throughput with 5.2 GiB headroom")
    assert {t.line[B]: t.largest_feasible for t in rep.tables} == {0.12: 32, 0.38: 32, 0.75: 32, 1.0: 30}
    assert {t.line[B]: t.smallest_oom for t in rep.tables} == {0.12: None, 0.38: None, 0.75: 40, 1.0: 32}


def test_limit_falls_back_to_device_memory_and_unknown_limit_is_said(tmp_path):
    d, _ = frontier_results(tmp_path / "dev", limit=None, device=20.0)
    render(d)
    assert "Limit: 20 GiB (device memory (simulated))" in (d / "frontier.md").read_text()
    sweep = frontier_sweep_json([1, 2, 4], [1.0], limit=None, device=None)
    rows = [{"trial_id": "a", "source": "run", "status": "ok", X: 2, B: 1.0, "peak_reserved_gib": 1.0, "tokens_per_s": 5.0}]
    d2 = write_results_dir(tmp_path / "nolimit", sweep, rows)
    render(d2)
    assert "No recommended operating point: the memory limit is unknown" in (d2 / "frontier.md").read_text()


def _assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_plots_are_written_as_valid_pngs(tmp_path):
    d, _ = frontier_results(tmp_path / "f")
    render(d)
    _assert_png(d / "plots" / "frontier.png")
    _assert_png(d / "plots" / "loss_curves.png")
    n = norm_results(tmp_path / "n")
    written = render(n)
    for name in ("grad_norm_layers.png", "grad_norm_over_time.png"):
        assert n / "plots" / name in written
        _assert_png(n / "plots" / name)
    steps, norms = plots.layer_norm_history(load_results(n), {"trial_id": "t2"})
    assert steps == [100, 200, 300] and len(norms) == 4 and norms[3][0] == pytest.approx(10 ** -10)
    assert not (d / "plots" / "grad_norm_layers.png").exists()  # only for norm sweeps


def test_norm_and_batch_summary_tables(tmp_path):
    n = norm_results(tmp_path / "n")
    render(n)
    md = (n / "summary.md").read_text()
    assert "## Norm placement × warmup" in md
    assert "| t2 | post | 0 | 2.9 | 10 | yes |" in md  # diverged: its last val loss, spread 10, diverged yes
    assert "| t0 | pre | 0 | 3.1 | 0.5 | no |" in md
    assert "Best ok trial: t0" in md  # not t2, whose val_loss is lower but which diverged
    b = batch_results(tmp_path / "b")
    tokens, at = val_loss_at_equal_tokens(load_results(b))
    assert tokens == 1000 and at["a1"] == pytest.approx(3.0) and at["a4"] == pytest.approx(5.0 - 2.0 * 1000 / 2000)
    render(b)
    md = (b / "summary.md").read_text()
    assert "## Batch size × LR scaling" in md and "1,000 tokens" in md
    assert "| a4 | 4 | linear | 4 | 2.9 | 0.998 | 2345 |" in md


def test_report_works_on_a_running_sweep(tmp_path):
    d, _ = frontier_results(tmp_path / "r")
    (d / "trials.csv").unlink()  # not written yet: rows come from the trial directories
    tid = sorted(p.name for p in (d / "trials").iterdir())[0]
    (d / "trials" / tid / "summary.json").unlink()
    metrics = d / "trials" / tid / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]) + '{"step": 3, "tok')  # mid-write
    res = load_results(d)
    assert any(r["status"] == "running" for r in res.rows)
    proc = run_module("lmtune.report", str(d))
    assert proc.returncode == 0, proc.stderr
    assert "sweep still running" in proc.stdout and "written:" in proc.stdout


def test_report_command_prints_tables_and_files(tmp_path):
    d, _ = frontier_results(tmp_path / "r")
    proc = run_module("lmtune.report", str(d))
    assert proc.returncode == 0, proc.stderr
    assert "Recommended operating point:" in proc.stdout
    assert str(d / "plots" / "frontier.png") in proc.stdout


@pytest.mark.parametrize("case", ["missing", "file", "no_sweep_json"])
def test_report_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case):
    target = tmp_path / "x"
    if case == "file":
        target.write_text("hello")
    elif case == "no_sweep_json":
        target.mkdir()
        (target / "trials.csv").write_text("trial_id,status\n")
    assert report_command.main([str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_report_module_exit_code(tmp_path):
    proc = run_module("lmtune.report", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: results directory not found")
    assert "Traceback" not in proc.stderr


def test_limit_falls_back_to_the_device_memory_trials_reported(tmp_path):
    d, _ = frontier_results(tmp_path / "r", limit=None, device=None)
    for s in (d / "trials").glob("*/summary.json"):
        s.write_text(json.dumps({**json.loads(s.read_text()), "device_memory_gib": 20.0}))
    assert load_results(d).limit() == (20.0, "device memory reported by the trials")


def test_pareto_front_summary_and_plot(tmp_path):
    from lmtune.results.kinds.pareto import pareto_front
    from tests.frontier_fixtures import pareto_results

    d = pareto_results(tmp_path / "p")
    results = load_results(d)
    assert results.objectives == [("val_loss", "min"), ("tokens_per_s", "max")]
    assert [r["trial_id"] for r in pareto_front(results)] == ["a", "b", "c"]  # d is beaten by b on both
    written = render(d)
    md = (d / "summary.md").read_text()
    assert "Objectives: val_loss (min), tokens_per_s (max)." in md and "## Pareto front" in md
    front_table = md.split("## Pareto front")[1].split("## Trials")[0]
    assert "| a |" in front_table and "| c |" in front_table and "| d |" not in front_table
    assert d / "plots" / "pareto.png" in written
    _assert_png(d / "plots" / "pareto.png")


def test_summary_ranks_pruned_trials_after_finished_ones_with_their_tokens(tmp_path):
    """A trial ASHA stopped at 5,120 tokens with a lower val_loss does not rank above one finished at 15,360."""
    sweep = {"name": "optimizer", "group": "1-optimizer-20260101-000000-000000", "metric": "val_loss", "mode": "min",
             "searcher": "tpe", "scheduler": "asha", "export": ["train.lr"], "frontier": None, "base": {},
             "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    rows = [{"trial_id": "a", "status": "pruned", "source": "run", "train.lr": 1e-3, "val_loss": 2.5, "tokens": 5120},
            {"trial_id": "b", "status": "ok", "source": "run", "train.lr": 3e-3, "val_loss": 2.8, "tokens": 15360},
            {"trial_id": "c", "status": "ok", "source": "run", "train.lr": 1e-4, "val_loss": 3.1, "tokens": 15360}]
    d = write_results_dir(tmp_path / "asha", sweep, rows)
    render(d)
    md = (d / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and line[2] in "abc"]
    assert [line[2] for line in table] == ["b", "c", "a"]
    assert "| tokens |" in md.replace(" tokens | tokens_per_s", " tokens |") and "15,360" in md and "5,120" in md
    assert "stopped early by the scheduler" in md


def convex_trial(cfg, limit: float = 20.0):
    """Memory that grows faster than linearly: a line through the small points under-predicts the large ones."""
    mb, b = cfg[X], cfg[B]
    peak = 1.0 + SLOPES[b] * mb + 0.004 * mb * mb
    if peak > limit:
        return {"status": "oom", "peak_reserved_gib": limit}
    tps = 1000.0 * mb / (mb + 8)
    return {"status": "ok", "peak_reserved_gib": peak, "tokens_per_s": tps, "avg_step_time_ms": 1000 * mb * 32 / tps,
            "wall_clock_s": 5.0, "tokens": 20 * mb * 32}


def test_every_infeasible_point_says_its_evidence_and_the_prediction_error_is_reported(tmp_path):
    """With verification off, a boundary can rest on a prediction: the row says OOM (predicted), the sentence under
    its table says so and by how much margin, and the fit's error against the points that ran is reported. With it
    on (the default), that point runs and the sentence says so."""
    d, _ = frontier_results(tmp_path / "p", measure=convex_trial, verify_predicted=False, margin=0.1)
    render(d)
    md = (d / "frontier.md").read_text()
    assert "| OOM (predicted) |" in md
    assert ("(predicted, never run: the fit puts it at" in md and "above the 20 GiB limit by more than the 0.100 GiB "
            "margin)" in md)
    assert "(implied by the OOM at" in md or "(ran)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("Peak predicted before launch"))
    mean = float(line.split("mean |error| ")[1].split(" GiB")[0])
    assert mean > 0  # convex memory: the linear fit is off, and the table says by how much
    d2, _ = frontier_results(tmp_path / "v", measure=convex_trial, margin=0.1)
    render(d2)
    md2 = (d2 / "frontier.md").read_text()
    assert "| OOM (predicted) |" not in md2 and "predicted, never run" not in md2
    assert "(ran)." in md2
