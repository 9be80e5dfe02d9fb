"""Scaling laws from a sweep's trials: how loss, model size and tokens scale with compute, with intervals.

Two fits of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), as replicated by Besiroglu et al.
2024 ("Chinchilla Scaling: A replication attempt"):

* approach 2, :func:`isoflop_minima`: per compute budget C, the loss against log N is a parabola; its vertex is the
  budget's compute-optimal size N*(C) (and tokens D*(C), loss L*(C)); across budgets each is a power law in C
  (:func:`power_law`).
* approach 3, :func:`fit_loss`: L(N, D) = E + A/N^α + B/D^β, fitted on every trial at once by minimizing the Huber
  loss (δ = 10⁻³) between log L and log L̂, with L̂ = LSE(a − α log N, b − β log D, e) (A = eᵃ, B = eᵇ, E = eᵉ),
  by Levenberg-Marquardt (iteratively reweighted for Huber's loss) from several starting points: the best (α, β)
  pairs of a grid, each with E, A, B from linear least squares
  (the model is linear in them once α and β are fixed); Hoffmann et al. (section D.2) started from a grid too, and
  Besiroglu et al. show that a fit from one start is not the fit.

Intervals are bootstrap percentiles: the trials resampled with replacement (multinomial weights on the trials, one
row of weights per replicate) and everything refitted. The replicates and their starting points are rows of batches
that torch optimizes together (float64; the problems are independent, so the sum's gradient is each one's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class Trial:
    """One finished run: parameters N, training tokens D, compute C (FLOPs), final loss, and its budget's label."""

    n: float
    d: float
    c: float
    loss: float
    budget: float


@dataclass
class LossFit:
    """L(N, D) = E + A/N^α + B/D^β."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)


@dataclass
class Minimum:
    """A budget's compute-optimal point (approach 2)."""

    budget: float
    n: float
    d: float
    loss: float
    sizes: int


@dataclass
class PowerLaw:
    """y = k · x^exponent."""

    k: float
    exponent: float

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.k * np.power(x, self.exponent)


@dataclass
class Interval:
    value: float
    low: float
    high: float
    level: float = 0.9

    def __contains__(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass
class ScalingFit:
    """Both approaches on one sweep, with bootstrap intervals of every fitted constant."""

    minima: list[Minimum]
    n_opt: PowerLaw
    d_opt: PowerLaw
    l_opt: PowerLaw
    loss: LossFit
    intervals: dict[str, Interval] = field(default_factory=dict)
    replicates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Each bootstrap replicate's constants (for predictions with intervals)."""
    residuals: np.ndarray = field(default_factory=lambda: np.zeros(1), repr=False)
    """log L − log L̂ of approach 3's fit on each trial: how far one run strays from the law."""

    def predict(self, c: float, level: float = 0.9) -> dict[str, Interval]:
        """N*, D* and the loss at compute ``c``: approach 2's power laws, approach 3's L(N*, D*), each with its
        bootstrap interval."""
        reps = self.replicates
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a wild replicate: dropped as non-finite
            n = reps["n_k"] * np.power(c, reps["n_exp"])
            d = reps["d_k"] * np.power(c, reps["d_exp"])
            loss = reps["E"] + reps["A"] / np.power(n, reps["alpha"]) + reps["B"] / np.power(d, reps["beta"])
        central_n, central_d = self.n_opt(c), self.d_opt(c)
        return {"n": _interval(central_n, n, level), "d": _interval(central_d, d, level),
                "loss": _interval(float(self.loss(central_n, central_d)), loss, level)}

    def loss_at(self, n: float, d: float, level: float = 0.9, *, new_run: bool = False, seed: int = 0) -> Interval:
        """Approach 3's loss of a model of ``n`` parameters trained on ``d`` tokens, with its bootstrap interval (a
        run whose size was rounded from N*(C) to a width the model accepts, and whose tokens its FLOPs fix).
        ``new_run``: the interval of one new run's loss, not of the law's: each replicate's prediction times the
        exponential of a residual drawn from the trials' (a run strays from the law as the fitted runs did)."""
        reps = self.replicates
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss = reps["E"] + reps["A"] / np.power(n, reps["alpha"]) + reps["B"] / np.power(d, reps["beta"])
            if new_run:
                loss = loss * np.exp(np.random.default_rng(seed).choice(self.residuals, size=loss.shape))
        return _interval(float(self.loss(n, d)), loss, level)


def _interval(value: float, samples: np.ndarray, level: float) -> Interval:
    samples = samples[np.isfinite(samples)]
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2]) if len(samples) else (math.nan, math.nan)
    return Interval(float(value), float(lo), float(hi), level)


# --- approach 2 ----------------------------------------------------------------------------------------------


def isoflop_minima(trials: list[Trial], weights: np.ndarray | None = None) -> list[Minimum]:
    """Per budget with at least 3 sizes: the vertex of the parabola of loss in log10 N (weighted least squares; the
    vertex kept inside the sizes tried), the tokens there (log D is linear in log N at one budget), its loss."""
    w = np.ones(len(trials)) if weights is None else weights
    out = []
    for budget in sorted({t.budget for t in trials}):
        idx = [i for i, t in enumerate(trials) if t.budget == budget and w[i] > 0]
        x = np.log10([trials[i].n for i in idx])
        if len(set(x)) < 3:
            continue
        y = np.array([trials[i].loss for i in idx])
        ww = np.sqrt(w[idx])
        a2, a1, a0 = np.polyfit(x, y, 2, w=ww)
        xv = -a1 / (2 * a2) if a2 > 0 else x[np.argmin(y)]
        xv = float(np.clip(xv, x.min(), x.max()))
        slope, icept = np.polyfit(x, np.log10([trials[i].d for i in idx]), 1, w=ww)
        out.append(Minimum(budget, 10**xv, 10 ** (icept + slope * xv), float(np.polyval([a2, a1, a0], xv)), len(set(x))))
    return out


def power_law(xs: np.ndarray, ys: np.ndarray) -> PowerLaw:
    """Least squares in log-log space."""
    exponent, log_k = np.polyfit(np.log(xs), np.log(ys), 1)
    return PowerLaw(float(np.exp(log_k)), float(exponent))


# --- approach 3 ----------------------------------------------------------------------------------------------


def _huber(r: torch.Tensor, delta: float = HUBER_DELTA) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


EXPONENTS = torch.arange(0.05, 1.21, 0.05, dtype=torch.float64)
"""The grid of α and β the starting points are searched on."""


def _objective(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor,
               w: torch.Tensor) -> torch.Tensor:
    """Approach 3's loss per problem: theta (K, 5) = alpha, beta, e, a, b; data (K, P); returns (K,)."""
    alpha, beta, e, a, b = theta.unbind(-1)
    terms = torch.stack([a[:, None] - alpha[:, None] * log_n, b[:, None] - beta[:, None] * log_d,
                         e[:, None].expand_as(log_n)])
    return (w * _huber(torch.logsumexp(terms, dim=0) - log_l)).sum(-1)


def _grid_starts(log_n, log_d, log_l, w, keep: int) -> torch.Tensor:
    """The ``keep`` best (α, β) of :data:`EXPONENTS`² per problem, each with E, A, B from weighted least squares of L
    on (1, N^-α, D^-β) (linear once α and β are fixed; a non-positive coefficient rules the pair out): (K, keep, 5)."""
    K = log_n.shape[0]
    al, be = torch.meshgrid(EXPONENTS, EXPONENTS, indexing="ij")
    al, be = al.reshape(-1), be.reshape(-1)  # (G,)
    X = torch.stack([torch.ones_like(log_n)[:, None, :].expand(K, len(al), -1),
                     torch.exp(-al[None, :, None] * log_n[:, None, :]),
                     torch.exp(-be[None, :, None] * log_d[:, None, :])], dim=-1)  # (K, G, P, 3)
    y = torch.exp(log_l)[:, None, :, None]
    wx = X * w[:, None, :, None]
    coef = torch.linalg.solve(wx.transpose(-1, -2) @ X + 1e-12 * torch.eye(3, dtype=X.dtype),
                              wx.transpose(-1, -2) @ y.expand(-1, len(al), -1, -1))[..., 0]  # (K, G, 3)
    ok = (coef > 0).all(-1)
    # alpha, beta, e (of E), a (of A), b (of B)
    theta = torch.stack([al.expand(K, -1), be.expand(K, -1), *torch.log(coef.clamp_min(1e-300)).unbind(-1)], dim=-1)
    # Ranked by the weighted squared error of log L̂ (what the Huber loss is within δ; the refinement uses Huber's)
    pred = (X @ coef[..., None])[..., 0].clamp_min(1e-300)  # (K, G, P)
    score = (w[:, None, :] * (torch.log(pred) - log_l[:, None, :]) ** 2).sum(-1)
    score = torch.where(ok, score, torch.full_like(score, math.inf))
    best = score.topk(keep, dim=1, largest=False).indices  # (K, keep)
    return torch.gather(theta, 1, best[..., None].expand(-1, -1, 5))


def _residuals_and_jacobian(theta: torch.Tensor, log_n, log_d, log_l) -> tuple[torch.Tensor, torch.Tensor]:
    """r = log L̂ − log L (K, P) and its Jacobian in (α, β, e, a, b) (K, P, 5), analytically: log L̂ is a
    log-sum-exp of three terms, whose softmax weights are the terms' shares of L̂."""
    alpha, beta, e, a, b = theta.unbind(-1)
    terms = torch.stack([a[:, None] - alpha[:, None] * log_n, b[:, None] - beta[:, None] * log_d,
                         e[:, None].expand_as(log_n)])
    pred = torch.logsumexp(terms, dim=0)
    s = torch.softmax(terms, dim=0)  # (3, K, P)
    jac = torch.stack([-s[0] * log_n, -s[1] * log_d, s[2], s[0], s[1]], dim=-1)
    return pred - log_l, jac


def fit_loss_batched(log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor, weights: torch.Tensor,
                     keep: int = 4, chunk: int = 256, iterations: int = 200) -> torch.Tensor:
    """Approach 3 for K problems (each a row of data and of trial weights, (K, P)): starting points from the α, β
    grid (:func:`_grid_starts`), each refined by Levenberg-Marquardt on iteratively reweighted least squares (Huber's
    weights: 1 within δ, δ/|r| beyond; a step is kept only when it lowers the Huber loss itself), the best kept; (K, 5)."""
    out = []
    eye = torch.eye(5, dtype=torch.float64)
    for s in range(0, log_n.shape[0], chunk):
        sl = slice(s, s + chunk)
        n, d, y, w = log_n[sl], log_d[sl], log_l[sl], weights[sl] / weights[sl].sum(1, keepdim=True)
        K = n.shape[0]
        starts = _grid_starts(n, d, y, w, keep).reshape(K * keep, 5)
        n, d, y, w = (t.repeat_interleave(keep, 0) for t in (n, d, y, w))
        theta = torch.where(torch.isfinite(starts), starts, torch.zeros_like(starts))
        value = _objective(theta, n, d, y, w)
        lam = torch.full((theta.shape[0],), 1e-2, dtype=torch.float64)
        stalled = torch.zeros(theta.shape[0], dtype=torch.long)
        active = torch.arange(theta.shape[0])  # the problems still moving: a converged one is left as it is
        for _ in range(iterations):
            if not len(active):
                break
            i = active
            th, li, vi, ni, di, yi, wi = (t[i] for t in (theta, lam, value, n, d, y, w))
            r, jac = _residuals_and_jacobian(th, ni, di, yi)
            hw = wi * torch.where(r.abs() <= HUBER_DELTA, torch.ones_like(r), HUBER_DELTA / r.abs().clamp_min(1e-300))
            jw = jac * hw[..., None]
            hess = jw.transpose(-1, -2) @ jac  # (k, 5, 5)
            grad = (jw * r[..., None]).sum(1)  # (k, 5)
            damp = li[:, None, None] * (torch.diagonal(hess, dim1=-2, dim2=-1)[..., None] * eye + 1e-12 * eye)
            trial = th + torch.linalg.solve(hess + damp, -grad[..., None])[..., 0]
            new = _objective(trial, ni, di, yi, wi)
            better = torch.isfinite(new) & (new < vi)
            theta[i] = torch.where(better[:, None], trial, th)
            value[i] = torch.where(better, new, vi)
            lam[i] = torch.where(better, li / 3, li * 4).clamp(1e-12, 1e12)
            stalled[i] = torch.where(better & (new < vi * (1 - 1e-10)), 0, stalled[i] + 1)
            active = i[stalled[i] < 8]  # 8 tries in a row without moving: converged
        values = torch.where(torch.isfinite(value), value, torch.full_like(value, math.inf)).view(K, keep)
        out.append(theta.view(K, keep, 5)[torch.arange(K), values.argmin(1)])
    return torch.cat(out)


def fit_loss(trials: list[Trial]) -> LossFit:
    return fit(trials, replicates=1).loss


def _as_loss_fit(row: np.ndarray) -> LossFit:
    alpha, beta, e, a, b = row
    return LossFit(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta))


# --- both, with intervals ------------------------------------------------------------------------------------


def bootstrap_weights(n: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial counts: each replicate draws n trials with replacement (the count of each is its weight)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(float)


def fit(trials: list[Trial], *, replicates: int = 200, seed: int = 0, level: float = 0.9) -> ScalingFit:
    """Approaches 2 and 3 on ``trials``, and bootstrap intervals (``replicates`` resamplings of the trials)."""
    return fit_all([trials], replicates=replicates, seed=seed, level=level)[0]


def fit_all(sweeps: list[list[Trial]], *, replicates: int = 200, seed: int = 0, level: float = 0.9) -> list[ScalingFit]:
    """:func:`fit` of several sets of trials (of equal size) at once: their approach-3 problems (each set's central
    fit and replicates) are one batch."""
    rng = np.random.default_rng(seed)
    weights = [np.vstack([np.ones(len(t)), bootstrap_weights(len(t), replicates, rng)]) for t in sweeps]
    t = lambda attr: torch.tensor(np.log([[getattr(x, attr) for x in trials] for trials, w in zip(sweeps, weights)  # noqa: E731
                                          for _ in w]), dtype=torch.float64)
    rows = fit_loss_batched(t("n"), t("d"), t("loss"), torch.tensor(np.vstack(weights), dtype=torch.float64)).numpy()
    out = []
    for i, (trials, w) in enumerate(zip(sweeps, weights)):
        mine = rows[i * len(w):(i + 1) * len(w)]
        out.append(_assemble(trials, w[1:], mine[0], mine[1:], level))
    return out


def _assemble(trials: list[Trial], weights: np.ndarray, central: np.ndarray, rows: np.ndarray,
              level: float) -> ScalingFit:
    minima = isoflop_minima(trials)
    cs = np.array([m.budget for m in minima])
    n_opt = power_law(cs, np.array([m.n for m in minima]))
    d_opt = power_law(cs, np.array([m.d for m in minima]))
    l_opt = power_law(cs, np.array([m.loss for m in minima]))
    loss = _as_loss_fit(central)
    reps: dict[str, list[float]] = {k: [] for k in ("n_k", "n_exp", "d_k", "d_exp", "l_k", "l_exp")}
    for w in weights:
        mins = isoflop_minima(trials, w)
        if len(mins) < 2:
            for k in reps:
                reps[k].append(math.nan)
            continue
        c = np.array([m.budget for m in mins])
        for key, law in (("n", power_law(c, np.array([m.n for m in mins]))),
                         ("d", power_law(c, np.array([m.d for m in mins]))),
                         ("l", power_law(c, np.array([m.loss for m in mins])))):
            reps[f"{key}_k"].append(law.k)
            reps[f"{key}_exp"].append(law.exponent)
    replicates_ = {k: np.array(v) for k, v in reps.items()}
    replicates_.update(alpha=rows[:, 0], beta=rows[:, 1], E=np.exp(rows[:, 2]), A=np.exp(rows[:, 3]),
                       B=np.exp(rows[:, 4]))
    central_values = {"alpha": loss.alpha, "beta": loss.beta, "E": loss.E, "A": loss.A, "B": loss.B,
                      "n_exp": n_opt.exponent, "d_exp": d_opt.exponent, "l_exp": l_opt.exponent}
    intervals = {k: _interval(v, replicates_[k], level) for k, v in central_values.items()}
    residuals = np.log([t.loss for t in trials]) - np.log([loss(t.n, t.d) for t in trials])
    return ScalingFit(minima, n_opt, d_opt, l_opt, loss, intervals, replicates_, residuals)
