"""Seeds as replicates (lmtune.results.kinds.replicates): known answers for the statistics, each with deliberately
wrong variants the check must catch (as in test_measure.py), and the replicate tables of a sweep over seeds in
summary.md, replicates.csv, report.html, the console and export (the best arm by its mean, not the luckiest seed)."""

from __future__ import annotations

import csv
import io
import math
import statistics

import pytest

from lmtune import exporting
from lmtune.reporting import render
from lmtune.reporting.console import print_summary
from lmtune.results.kinds import replicates
from lmtune.results.kinds.replicates import Spread, paired, spread, t_quantile, verdict
from lmtune.results.layout import read_trials_csv
from lmtune.results.read import load_results
from tests.frontier_fixtures import norm_results, write_results_dir

# --- Student t -------------------------------------------------------------------------------------


def check_t(quantile) -> None:
    """Two-sided 95% critical values of Student's t (any printed table; Abramowitz & Stegun table 26.10)."""
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452)):
        assert quantile(df) == pytest.approx(t, abs=1e-4)


def test_t_quantile_known_answers():
    check_t(t_quantile)


@pytest.mark.parametrize("broken", [
    lambda df, p=0.975: 1.959964,  # z: the normal's quantile, too narrow for few seeds
    lambda df, p=0.975: t_quantile(df + 1, p),  # n degrees of freedom instead of n - 1
    lambda df, p=0.975: t_quantile(df, 0.95),  # one-sided
], ids=["z-not-t", "df-n", "one-sided"])
def test_t_check_catches_a_wrong_quantile(broken):
    with pytest.raises(AssertionError):
        check_t(broken)


# --- mean, standard deviation, interval ------------------------------------------------------------


def check_spread(summarize) -> None:
    """[2, 4, 6]: mean 4, sample sd 2 (squares 4 + 0 + 4 over n - 1 = 2), standard error 2/√3, t(2) = 4.3027,
    so the 95% interval is 4 ± 4.9683."""
    s = summarize([2.0, 4.0, 6.0])
    assert (s.n, s.mean, s.sd) == (3, pytest.approx(4.0), pytest.approx(2.0))
    half = 4.302653 * 2.0 / math.sqrt(3)
    assert (s.low, s.high) == (pytest.approx(4.0 - half, abs=1e-5), pytest.approx(4.0 + half, abs=1e-5))
    one = summarize([3.5])  # one seed: a mean, no spread, no interval
    assert (one.n, one.mean, one.sd, one.low, one.high) == (1, 3.5, None, None, None)


def test_spread_known_answers():
    check_spread(spread)


def _population_sd(values):
    xs = list(values)
    mean, sd = sum(xs) / len(xs), statistics.pstdev(xs)
    half = t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs)) if len(xs) > 1 else None
    return Spread(len(xs), mean, sd if len(xs) > 1 else None, half and mean - half, half and mean + half)


def _z_interval(values):
    s = spread(values)
    if s.sd is None:
        return s
    half = 1.959964 * s.sd / math.sqrt(s.n)
    return Spread(s.n, s.mean, s.sd, s.mean - half, s.mean + half)


def _sd_not_se(values):
    s = spread(values)
    if s.sd is None:
        return s
    half = t_quantile(s.n - 1) * s.sd
    return Spread(s.n, s.mean, s.sd, s.mean - half, s.mean + half)


@pytest.mark.parametrize("broken", [_population_sd, _z_interval, _sd_not_se],
                         ids=["population-sd", "z-not-t", "sd-not-standard-error"])
def test_spread_check_catches_a_wrong_interval(broken):
    with pytest.raises(AssertionError):
        check_spread(broken)


# --- the paired difference ---------------------------------------------------------------------------

BASE = {1: 3.0, 2: 3.5, 3: 4.0}
"""The baseline arm's val_loss by seed: seeds differ by far more than the arms do."""
ARM = {3: 3.91, 1: 2.9, 2: 3.38}
"""Another arm, its seeds listed in another order: 0.10, 0.12 and 0.09 below the baseline on the same seed."""


def check_paired(difference) -> None:
    """Paired by seed: differences -0.10, -0.12, -0.09, mean -0.10333, sd 0.015275, so the interval is
    -0.10333 ± 4.3027 · 0.015275/√3 = [-0.14128, -0.06539]: it excludes 0 ("differs"), although each arm's own
    seed-to-seed sd (0.5) is far larger. A difference no larger than the noise between its pairs stays "within
    seed noise"."""
    d = difference(ARM, BASE)
    assert d.n == 3 and d.mean == pytest.approx(-0.103333, abs=1e-5) and d.sd == pytest.approx(0.015275, abs=1e-5)
    assert (d.low, d.high) == (pytest.approx(-0.141279, abs=1e-5), pytest.approx(-0.065388, abs=1e-5))
    assert verdict(d) == "differs"
    noisy = difference({1: 3.1, 2: 3.4, 3: 4.1}, BASE)  # +0.1, -0.1, +0.1: mean 0.0333, interval [-0.25, 0.32]
    assert verdict(noisy) == "within seed noise" and noisy.low < 0 < noisy.high
    assert difference({1: 3.1, 7: 3.0}, BASE).n == 1  # only the seeds both arms ran pair up


def test_paired_difference_known_answers():
    check_paired(paired)


def _unpaired(arm, base):
    """Welch's difference of means, seeds ignored."""
    a, b = spread(arm.values()), spread(base.values())
    se = math.sqrt(a.sd**2 / a.n + b.sd**2 / b.n)
    mean = a.mean - b.mean
    return Spread(min(a.n, b.n), mean, se, mean - 1.959964 * se, mean + 1.959964 * se)


def _by_position(arm, base):
    """Pairs the i-th listed trial of each arm, whatever its seed."""
    return spread(x - y for x, y in zip(arm.values(), base.values()))


def _baseline_minus_arm(arm, base):
    return spread(base[s] - arm[s] for s in arm if s in base)


@pytest.mark.parametrize("broken", [_unpaired, _by_position, _baseline_minus_arm],
                         ids=["unpaired", "paired-by-position", "wrong-sign"])
def test_paired_check_catches_a_wrong_difference(broken):
    with pytest.raises(AssertionError):
        check_paired(broken)


def test_verdict_says_differs_only_when_the_interval_excludes_zero():
    assert verdict(Spread(3, 0.2, 0.05, 0.1, 0.3)) == "differs"
    assert verdict(Spread(3, -0.2, 0.05, -0.3, -0.1)) == "differs"
    assert verdict(Spread(3, 0.1, 0.2, -0.4, 0.6)) == "within seed noise"
    assert verdict(Spread(1, 0.1, None, None, None)) == "too few pairs"


# --- a sweep over seeds --------------------------------------------------------------------------------

VALUES = {0.0: BASE, 0.1: ARM, 0.3: {1: 2.5, 2: 3.9, 3: 4.6}}
"""weight_decay → seed → val_loss. 0.3 holds the single best trial (seed 1: 2.5) but the worst mean (3.667); 0.1
the best mean (3.397)."""


def seed_results(root, base_decay=0.0):
    space = {"train.weight_decay": {"type": "grid", "values": [0.3, 0.0, 0.1]},
             "train.seed": {"type": "grid", "values": [1, 2, 3]}}
    sweep = {"name": "weight-decay", "group": "5-weight-decay-20260101-000000-000000", "metric": "val_loss",
             "mode": "min", "searcher": "grid", "space": space, "export": ["train.weight_decay"],
             "base": {"train.weight_decay": base_decay, "train.seed": 1337}}
    rows = [{"trial_id": f"d{wd}-s{s}", "status": "ok", "source": "run", "train.weight_decay": wd, "train.seed": s,
             "val_loss": v} for wd, by in VALUES.items() for s, v in by.items()]
    rows.append({"trial_id": "oom", "status": "oom", "source": "run", "train.weight_decay": 0.1, "train.seed": 4})
    return write_results_dir(root, sweep, rows)


def test_a_seed_sweep_aggregates_its_arms_everywhere(tmp_path):
    d = seed_results(tmp_path / "r")
    written = render(d)
    md = (d / "summary.md").read_text()
    assert "## Replicates" in md and "(weight_decay=0: the sweep's base config" in md
    assert "| 0.1 | 3 | 3.397 | 0.5052 | [2.142, 4.652] | -0.1033 (3 pairs) | [-0.1413, -0.06539] | differs |" in md
    assert "Best arm by mean over its seeds: weight_decay=0.1" in md
    with open(d / "replicates.csv", newline="") as f:
        table = {r["train.weight_decay"]: r for r in csv.DictReader(f)}
    assert d / "replicates.csv" in written and d / "plots" / "replicates.png" in written
    assert table["0.0"]["verdict"] == "baseline" and table["0.1"]["verdict"] == "differs"
    assert float(table["0.1"]["diff_ci95_high"]) == pytest.approx(-0.065388, abs=1e-5)
    assert table["0.3"]["n"] == "3" and table["0.1"]["n"] == "3" and table["0.1"]["seeds"] == "1 2 3"  # the oom: no
    assert "<h3>Replicates</h3>" in (d / "report.html").read_text()

    out = io.StringIO()
    results = load_results(d)
    print_summary(d, read_trials_csv(d / "trials.csv"), out, metrics=["val_loss"], modes=["min"],
                  space_keys=results.space_keys, searcher="grid", frontier=None, tune_dir="tune")
    text = out.getvalue()
    assert "replicates (val_loss per arm over its seeds" in text and "within seed noise" in text
    assert "best arm by mean: weight_decay=0.1  val_loss=3.397 (n=3; export locks it)" in text


def test_export_locks_the_best_arm_by_its_mean_not_the_luckiest_seed(tmp_path, capsys):
    from lmtune import export as export_command

    d = seed_results(tmp_path / "r")
    w = exporting.winner(load_results(d))
    assert w.values == {"train.weight_decay": 0.1} and w.metric_value == pytest.approx(3.396667, abs=1e-5)
    out = tmp_path / "wd.toml"
    assert export_command.main([str(d), "--to", str(out)]) == 0
    said = capsys.readouterr().out
    assert "winner: arm weight_decay=0.1 (mean of 3 seeds: trials d0.1-s1, d0.1-s2, d0.1-s3)" in said
    import tomllib

    record = tomllib.loads(out.read_text())["provenance"]["train.weight_decay"]
    assert "best arm by mean val_loss=3.397" in record["source"] and "not its luckiest seed" in record["source"]
    assert record["replicates"] == 3 and record["arm_trial_ids"] == ["d0.1-s1", "d0.1-s2", "d0.1-s3"]


def test_the_baseline_is_the_base_configs_arm_else_the_first_in_the_grid(tmp_path):
    results = load_results(seed_results(tmp_path / "a"))
    assert replicates.baseline(results, replicates.arms(results)).point == {"train.weight_decay": 0.0}
    other = load_results(seed_results(tmp_path / "b", base_decay=0.05))  # no arm is the base config
    found = replicates.arms(other)
    assert [a.point["train.weight_decay"] for a in found] == [0.3, 0.0, 0.1]  # the grid's order
    assert replicates.baseline(other, found).point == {"train.weight_decay": 0.3}
    assert "0.3 | 3 | 3.667" in "".join(replicates.tables(other)) and "the first arm" in "".join(replicates.tables(other))


def test_a_single_seed_sweep_says_no_spread_was_measured(tmp_path):
    d = norm_results(tmp_path / "n")
    render(d)
    assert "One trial per configuration: no seed-to-seed spread was measured" in (d / "summary.md").read_text()
    assert not (d / "replicates.csv").exists()
    out = io.StringIO()
    print_summary(d, read_trials_csv(d / "trials.csv"), out, metrics=["val_loss"], modes=["min"],
                  space_keys=load_results(d).space_keys, searcher="grid", frontier=None, tune_dir="tune")
    assert "seeds: One trial per configuration: no seed-to-seed spread was measured" in out.getvalue()
