"""Scaling-law fits (lmtune.results.scaling) on synthetic losses with known constants: the fit recovers them, its
bootstrap intervals cover them as often as they claim, and each check catches a deliberately broken variant."""

from __future__ import annotations

import numpy as np
import pytest

from lmtune.results import scaling
from lmtune.results.scaling import Trial, fit, fit_all

TRUTH = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Hoffmann et al. 2022, eq. 10
BUDGETS = (1e17, 3e17, 1e18, 3e18, 1e19)


def draw(rng: np.random.Generator, noise: float = 0.005) -> list[Trial]:
    """An IsoFLOP grid: 7 sizes per budget, D = C/6N, losses from the truth times log-normal noise."""
    trials = []
    for c in BUDGETS:
        for n in np.geomspace(c**0.5 / 300, c**0.5 / 3, 7):
            d = c / (6 * n)
            loss = (TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]) \
                * np.exp(rng.normal(0, noise))
            trials.append(Trial(n, d, c, loss, c))
    return trials


def check_recovery(fit_fn) -> None:
    f = fit_fn(draw(np.random.default_rng(0)), replicates=20)
    assert abs(f.loss.alpha - TRUTH["alpha"]) <= 0.05 and abs(f.loss.beta - TRUTH["beta"]) <= 0.05
    assert abs(f.loss.E / TRUTH["E"] - 1) <= 0.02
    # approach 2: N* ∝ C^(β/(α+β)) under the truth (Hoffmann et al., eq. 4)
    assert f.n_opt.exponent == pytest.approx(TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"]), abs=0.05)


def check_coverage(fit_all_fn, draws: int = 100) -> float:
    rng = np.random.default_rng(1)
    covered = []
    for f in fit_all_fn([draw(rng) for _ in range(draws)], replicates=50, seed=2):
        covered += [TRUTH["alpha"] in f.intervals["alpha"], TRUTH["beta"] in f.intervals["beta"]]
    share = float(np.mean(covered))
    assert 0.80 <= share <= 0.98, share  # 50 replicates a draw: percentile intervals, a little noisy
    return share


def test_the_fit_recovers_known_constants():
    check_recovery(fit)


@pytest.mark.slow
def test_90_percent_intervals_cover_the_truth_about_90_percent_of_the_time():
    check_coverage(fit_all)


def _nothing_resampled(n, replicates, rng):
    return np.ones((replicates, n))


@pytest.mark.slow
def test_the_coverage_check_catches_a_bootstrap_that_resamples_nothing(monkeypatch):
    monkeypatch.setattr(scaling, "bootstrap_weights", _nothing_resampled)
    with pytest.raises(AssertionError):
        check_coverage(fit_all, draws=20)


def test_the_recovery_check_catches_a_fit_that_ignores_the_data_terms(monkeypatch):
    real = scaling._as_loss_fit
    monkeypatch.setattr(scaling, "_as_loss_fit", lambda row: real(np.array([row[0] * 0.8, *row[1:]])))
    with pytest.raises(AssertionError):
        check_recovery(fit)


def test_a_prediction_carries_its_interval():
    f = fit(draw(np.random.default_rng(2)), replicates=100)
    c = 1e21
    p = f.predict(c)
    truth_n = f.n_opt(c)
    assert p["n"].low <= truth_n <= p["n"].high and p["loss"].low < p["loss"].value < p["loss"].high
    true_loss = TRUTH["E"] + TRUTH["A"] / p["n"].value ** TRUTH["alpha"] + TRUTH["B"] / p["d"].value ** TRUTH["beta"]
    assert p["loss"].low <= true_loss <= p["loss"].high  # 100x beyond the largest budget fitted
