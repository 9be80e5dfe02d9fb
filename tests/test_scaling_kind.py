"""The scaling ladder as a result kind (lmtune.results.kinds.scaling), its sweep checks and ``export --for-compute``
(lmtune.exporting.compute) on a synthetic ladder whose losses follow known constants: the minima, laws and intervals
in summary.md, the plots, the console, the locked run with its predicted loss, the refusals (one line, exit 2) and
``--verify``; each numeric check with a deliberately broken variant it must catch."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from lmtune import export as export_command
from lmtune.exporting import compute
from lmtune.reporting import render
from lmtune.results import ladder, scaling
from lmtune.results.kinds import applicable
from lmtune.results.kinds import scaling as kind
from lmtune.results.read import load_results
from lmtune.sweep import TINY_CPU
from tests.frontier_fixtures import write_results_dir
from tests.helpers import one_error_line, sweep_file

TRUTH = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Hoffmann et al. 2022, eq. 10
BUDGETS = (3e9, 1e10, 3e10, 1e11)
WIDTHS = (4, 8, 16, 32, 64, 128)
SIZES = {4: (1520, 15264), 8: (3808, 35136), 16: (10688, 88704), 32: (33664, 251136), 64: (116480, 797184),
         128: (429568, 2774016)}
"""width → (N, FLOPs per token) of TINY_CPU's model at that width (lmtune.training.measure.model_size)."""
GOOD_LR = {3e9: 0.01, 1e10: 0.01, 3e10: 0.003, 1e11: 0.003}
"""Each budget's better lr: the other one's runs lose 0.5 more."""
BASE = {**TINY_CPU, "model.parametrization": "mup", "model.base_width": 16, "train.lr": 0.01}


def truth(n: float, d: float) -> float:
    return TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]


def ladder_results(root, budgets=BUDGETS):
    """A ladder over budgets × widths × two lrs: N and FLOPs per token as the trainer counts them, D = the tokens
    its steps train, the loss the truth's times 0.5% log-normal noise (+0.5 at the budget's worse lr)."""
    rng = np.random.default_rng(0)
    space = {"train.flops": {"type": "grid", "values": list(budgets)}, "model.n_embd": {"type": "grid", "values": list(WIDTHS)},
             "train.lr": {"type": "grid", "values": [0.01, 0.003]}}
    sweep = {"name": "isoflop", "group": "1-isoflop-20260101-000000-000000", "metric": "val_loss", "mode": "min",
             "searcher": "grid", "space": space, "export": ["model.n_embd", "train.flops"], "base": BASE, "cpus": 1}
    rows = []
    for c in budgets:
        for w in WIDTHS:
            n, fpt = SIZES[w]
            steps = max(1, round(c / fpt / 512))
            for lr in (0.01, 0.003):
                loss = truth(n, steps * 512) * np.exp(rng.normal(0, 0.005)) + (0 if lr == GOOD_LR[c] else 0.5)
                rows.append({"trial_id": f"c{c:g}-w{w}-lr{lr}", "status": "ok", "source": "run", "train.flops": c,
                             "model.n_embd": w, "train.lr": lr, "val_loss": float(loss), "tokens": steps * 512,
                             "flops": steps * 512 * fpt, "params": n, "flops_per_token": fpt})
    return write_results_dir(root, sweep, rows)


@pytest.fixture
def fresh_fit():
    ladder._fit.cache_clear()  # a broken variant must not reuse the real fit, nor the real one a broken fit
    yield
    ladder._fit.cache_clear()


def check_ladder(results) -> None:
    """Every budget's minimum inside the sizes tried, near the truth's optimum (the width whose truth is lowest),
    its loss the good lr's; N* ∝ C^(β/(α+β)) = C^0.45 inside its interval; the best lr per budget."""
    found = ladder.rungs(results)
    f = ladder.ladder_fit(found)
    assert [m.budget for m in f.minima] == list(BUDGETS) and not ladder.at_edge(found, f)
    for m in f.minima:
        best = min(SIZES.values(), key=lambda s: truth(s[0], round(m.budget / s[1] / 512) * 512))
        assert abs(np.log(m.n / best[0])) < np.log(3.2), (m.budget, m.n, best)
        assert m.loss == pytest.approx(truth(m.n, m.d), rel=0.05)
    exponent = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    assert f.n_opt.exponent == pytest.approx(exponent, abs=0.1) and exponent in f.intervals["n_exp"]
    assert f.intervals["n_exp"].low < f.n_opt.exponent < f.intervals["n_exp"].high
    assert {t.key: t.best for t in ladder.tuned(results, found)} == {"train.lr": GOOD_LR}


def test_the_ladder_is_read_as_its_truth(tmp_path, fresh_fit):
    check_ladder(load_results(ladder_results(tmp_path / "r")))


def _largest_size(trials, weights=None):
    """The minimum taken at the largest size of each budget, not at the vertex."""
    out = []
    for m in REAL_MINIMA(trials, weights):
        biggest = max((t for t in trials if t.budget == m.budget), key=lambda t: t.n)
        out.append(scaling.Minimum(m.budget, biggest.n, biggest.d, biggest.loss, m.sizes))
    return out


REAL_MINIMA = scaling.isoflop_minima


@pytest.mark.parametrize("broken", ["worst-run-per-size", "minimum-at-largest-size"])
def test_the_ladder_check_catches_a_wrong_reading(tmp_path, fresh_fit, monkeypatch, broken):
    if broken == "worst-run-per-size":
        monkeypatch.setattr(ladder, "better", lambda loss, than: loss > than)
    else:
        monkeypatch.setattr(scaling, "isoflop_minima", _largest_size)
    with pytest.raises(AssertionError):
        check_ladder(load_results(ladder_results(tmp_path / "r")))


def test_the_kind_writes_its_fit_and_intervals_everywhere(tmp_path, fresh_fit):
    d = ladder_results(tmp_path / "r")
    results = load_results(d)
    assert "scaling" in [k.name for k in applicable(results)]
    written = render(d)
    md = (d / "summary.md").read_text()
    f = ladder.ladder_fit(ladder.rungs(results))
    n_exp = f.intervals["n_exp"]
    assert "## Scaling ladder" in md and "at the edge" not in md
    assert f"| N*(C) | {kind.g(f.n_opt.k)} · C^{f.n_opt.exponent:.3f} | {f.n_opt.exponent:.3f} | " \
           f"[{kind.g(n_exp.low)}, {kind.g(n_exp.high)}] |" in md
    assert f"| α (size) | {kind.g(f.loss.alpha)} | [{kind.g(f.intervals['alpha'].low)}, " in md
    assert "| lr | 3e+09: 0.01, 1e+10: 0.01, 3e+10: 0.003, 1e+11: 0.003 |" in md
    assert f"Compute-optimal scaling: N* ∝ C^{f.n_opt.exponent:.3f}" in md
    for name in ("scaling_isoflop.png", "scaling_laws.png", "scaling_predicted.png"):
        assert d / "plots" / name in written and (d / "plots" / name).stat().st_size > 10_000
    assert "Scaling ladder" in (d / "report.html").read_text()
    lines = kind.console(results)
    assert len(lines) == 2 and lines[0].startswith(f"scaling (90% intervals): N* ∝ C^{f.n_opt.exponent:.3f}")


def test_a_ladder_without_two_placed_budgets_says_why(tmp_path, fresh_fit):
    d = ladder_results(tmp_path / "r", budgets=(3e9,))
    render(d)
    assert "No fit yet: 1 budget(s) with 3 sizes or more" in (d / "summary.md").read_text()


# --- export --for-compute --------------------------------------------------------------------------


def test_for_compute_locks_the_width_its_law_calls_for_with_the_predicted_loss(tmp_path, fresh_fit, capsys):
    d = ladder_results(tmp_path / "r")
    out = tmp_path / "c.toml"
    assert export_command.main([str(d), "--for-compute", "1e12", "--to", str(out)]) == 0
    doc = tomllib.loads(out.read_text())
    found = ladder.rungs(load_results(d))
    f, lr_law = ladder.ladder_fit(found), ladder.tuned(load_results(d), found)[0].law
    width = doc["model"]["n_embd"]
    assert width % 2 == 0 and doc["train"]["flops"] == 1e12
    assert doc["train"]["lr"] == float(f"{lr_law(1e12):.3g}") < 0.003  # the best lr fell with C: its law, carried
    assert doc["model"]["parametrization"] == "mup" and doc["model"]["base_width"] == 16
    record = doc["provenance"]["model.n_embd"]
    from lmtune.training.measure import model_size

    sizes = {w: model_size(compute._flat({**BASE, "model.n_embd": w}))[0] for w in (width - 2, width, width + 2)}
    target = f.n_opt(1e12)
    assert min(sizes, key=lambda w: abs(np.log(sizes[w] / target))) == width and record["params"] == sizes[width]
    assert record["predicted_low"] < record["predicted_loss"] < record["predicted_high"]
    assert record["predicted_loss"] == pytest.approx(f.loss(sizes[width], record["tokens"]))
    assert record["interval_level"] == 0.9 and record["verified"] == "no" and record["for_compute"] == 1e12
    assert "val_loss = " in capsys.readouterr().out


def test_for_compute_below_the_fitted_budgets_is_one_line_exit_2(tmp_path, fresh_fit, capsys):
    d = ladder_results(tmp_path / "r")
    assert export_command.main([str(d), "--for-compute", "1e9", "--to", str(tmp_path / "c.toml")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--for-compute 1e+09 is below the fitted range (3e+09 to 1e+11 FLOPs)" in line
    assert not (tmp_path / "c.toml").exists()


def test_a_ladder_sweep_of_two_budgets_is_refused_before_ray(tmp_path, capsys):
    from lmtune.sweep.__main__ import main

    path = sweep_file(tmp_path, """
        sweep = Sweep(name="two", base={**TINY_CPU}, metric="val_loss", mode="min",
                      space={"train.flops": grid([2e9, 6e9]), "model.n_embd": grid([16, 32, 64])})
    """)
    assert main([str(path), "--storage", str(tmp_path / "s")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "needs 3 budgets at least with 3 model sizes at least each" in line and "it has 2 budget(s)" in line
    tiny = sweep_file(tmp_path, """
        sweep = Sweep(name="tiny", base={**TINY_CPU}, metric="val_loss", mode="min",
                      space={"train.flops": grid([1e5, 6e9, 2e10]), "model.n_embd": grid([16, 32, 64])})
    """, name="tiny.py")
    assert main([str(tiny), "--storage", str(tmp_path / "s")]) == 2
    assert "train.flops=1e+05 is less than one optimizer step" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


# --- --verify ------------------------------------------------------------------------------------------


class FakeRun:
    """Stands in for the trainer: its run ends ok with ``LOSS``."""

    LOSS = 0.0

    def __init__(self, cfg, out_dir):
        self.cfg = cfg

    def fit(self):
        return {"status": "ok", "val_loss": FakeRun.LOSS}


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_verify_says_inside_or_outside_and_outside_writes_nothing_without_force(tmp_path, fresh_fit, capsys,
                                                                                monkeypatch, where):
    d = ladder_results(tmp_path / "r")
    run = compute.compute_run(load_results(d), 1e10)
    FakeRun.LOSS = run.predicted.value if where == "inside" else run.predicted.high * 1.1
    monkeypatch.setattr("lmtune.training.Trainer", FakeRun)
    out = tmp_path / "c.toml"
    argv = [str(d), "--for-compute", "1e12", "--verify", "--verify-flops", "1e10", "--to", str(out)]
    code = export_command.main(argv)
    said = capsys.readouterr()
    assert f"val_loss {FakeRun.LOSS:.4g}; predicted {run.predicted.value:.4g}" in said.out and f": {where} the" in said.out
    if where == "outside":
        assert code == 2 and "is outside the predicted interval" in one_error_line(said.err) and not out.exists()
        assert export_command.main([*argv, "--force"]) == 0
    else:
        assert code == 0
    record = tomllib.loads(out.read_text())["provenance"]["model.n_embd"]
    assert record["verified"] == where and record["verify_flops"] == 1e10
    assert record["verify_loss"] == pytest.approx(FakeRun.LOSS)


def test_verify_check_catches_an_interval_that_ignores_the_runs_scatter(tmp_path, fresh_fit):
    """One run strays from the law as the fitted runs did: the interval it is checked against is wider than the
    law's own (the bootstrap of the constants alone would call a typical run outside)."""
    results = load_results(ladder_results(tmp_path / "r"))
    f = ladder.ladder_fit(ladder.rungs(results))
    run = compute.compute_run(results, 1e10)
    law = f.loss_at(run.params, run.tokens)
    assert run.predicted.high - run.predicted.low > law.high - law.low


def test_verify_trains_the_ladders_run_for_real(tmp_path, fresh_fit, capsys):
    """A real run of the smallest budget's width (a few seconds on a CPU): the verdict is what its numbers say. The
    synthetic ladder's losses are Chinchilla's (~40 at these sizes), a byte model's ~3: outside, written with --force."""
    d = ladder_results(tmp_path / "r")
    out = tmp_path / "c.toml"
    argv = [str(d), "--for-compute", "1e11", "--verify", "--verify-flops", "3e9", "--to", str(out)]
    assert export_command.main(argv) == 2 and not out.exists()
    assert export_command.main([*argv, "--force"]) == 0
    record = tomllib.loads(out.read_text())["provenance"]["train.flops"]
    assert record["verified"] == "outside" and 0 < record["verify_loss"] < record["verify_low"]
    assert "outside the interval" in capsys.readouterr().out


def test_the_console_line_of_a_sweep_with_no_fit(tmp_path, fresh_fit):
    d = ladder_results(tmp_path / "r", budgets=(3e9,))
    assert kind.console(load_results(d)) == ["scaling: no fit yet: 1 budget(s) with 3 sizes or more that ended ok: a "
                                             "power law in C needs two at least (3 to be more than a line through "
                                             "two points)."]
