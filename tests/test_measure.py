"""Known answers for the measurements, and for each a deliberately wrong variant that the check must catch.

Every ``check_*`` function holds the assertions of one measurement; the test runs it on lmtune's code and,
parametrized, on broken variants of it, where it must fail (a check that cannot fail is a defect).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmtune.device import TensorMemory, peak_flops_for
from lmtune.training.measure import (
    GradientNoise,
    StepTimer,
    flops_per_token,
    grad_coherence,
    grad_norm_spread,
    noise_estimates,
)
from lmtune.training.memory import is_oom

# --- grad_norm_spread --------------------------------------------------------------------------------


def check_spread(spread) -> None:
    assert spread([1.0, 10.0, 100.0]) == pytest.approx(2.0)  # two orders of magnitude
    assert spread([3.0, 3.0]) == 0.0
    assert spread([1e-5, 0.0, 1.0, float("inf")]) == pytest.approx(5.0)  # zero and inf left out
    assert spread([4.0]) == 0.0


def test_grad_norm_spread_known_answers():
    check_spread(grad_norm_spread)


@pytest.mark.parametrize("broken", [
    lambda norms: math.log(max(norms) / min(norms)),  # natural log, zeros not left out
    lambda norms: math.log(max(n for n in norms if n > 0) / min(n for n in norms if n > 0)),  # natural log
    lambda norms: math.log10(max(norms) - min(norms) + 1),  # a difference, not a ratio
], ids=["ln-no-filter", "ln", "difference"])
def test_spread_check_catches_a_wrong_spread(broken):
    with pytest.raises((AssertionError, ValueError, ZeroDivisionError)):
        check_spread(broken)


# --- gradient coherence ------------------------------------------------------------------------------


def _sums(samples: np.ndarray) -> tuple[float, int, float]:
    """Σ|g_i|², n and |mean g_i|² of sample vectors (rows)."""
    return float((samples**2).sum()), len(samples), float((samples.mean(0) ** 2).sum())


def check_coherence(coherence) -> None:
    g = np.array([1.0, -2.0, 0.5])
    assert coherence(*_sums(np.stack([g, g, g]))) == pytest.approx(1.0)  # all samples agree
    assert coherence(*_sums(np.eye(4) * 3.0)) == pytest.approx(0.0, abs=1e-12)  # orthogonal: pure noise
    assert coherence(*_sums(np.stack([g, -g]))) == pytest.approx(-1.0)  # opposite
    a, b = np.array([1.0, 0.0]), np.array([1.0, 1.0])  # cos 45°, |a|²=1, |b|²=2: a·b / mean|g|² = 1/1.5
    assert coherence(*_sums(np.stack([a, b]))) == pytest.approx(1 / 1.5)


def test_grad_coherence_known_answers():
    check_coherence(grad_coherence)


@pytest.mark.parametrize("broken", [
    lambda sum_sq, n, big: (n * n * big - sum_sq) / sum_sq,  # pairs not counted (no n-1)
    lambda sum_sq, n, big: n * big / (sum_sq / n),  # |G|² over mean |g_i|²: not a pairwise mean
], ids=["no-pair-count", "ratio-of-norms"])
def test_coherence_check_catches_a_wrong_formula(broken):
    with pytest.raises(AssertionError):
        check_coherence(broken)


# --- noise scale (McCandlish et al. 2018, App. A.1) -------------------------------------------------


def check_unbiased(estimates, draws: int = 4000) -> None:
    """Synthetic gradients with known |G|² and tr(Σ): per-sequence gradients G + ε, ε ~ N(0, diag σ²); a
    sample averages b_small sequences. The mean estimate over many draws must be within 4 standard errors
    of the truth (and the truth within 3% there), for several sample counts and sizes."""
    rng = np.random.default_rng(0)
    d = 40
    G = rng.normal(size=d) * 0.3
    sigma = rng.uniform(0.5, 2.0, size=d)
    true_g2, true_trace = float((G**2).sum()), float((sigma**2).sum())
    for n, b_small in ((2, 4), (4, 8), (2, 1)):
        est = []
        for _ in range(draws):
            eps = rng.normal(size=(n, b_small, d)) * sigma
            samples = G + eps.mean(axis=1)  # (n, d)
            est.append(estimates(*_sums(samples), b_small))
        est = np.array(est)
        for j, truth in enumerate((true_g2, true_trace)):
            mean, se = est[:, j].mean(), est[:, j].std(ddof=1) / math.sqrt(draws)
            assert abs(mean - truth) < 4 * se + 0.03 * abs(truth), (n, b_small, j, mean, truth, se)


def test_noise_estimates_are_unbiased():
    check_unbiased(noise_estimates)


def _naive(sum_sq, n, big, b_small):
    """|G_big|² taken as |G|² (biased by tr(Σ)/B_big) and B_small·(|G_small|² − |G_big|²) as tr(Σ)."""
    return big, b_small * (sum_sq / n - big)


def _swapped(sum_sq, n, big, b_small):
    """The two batch sizes exchanged in the |G|² estimate."""
    small, b_big = sum_sq / n, n * b_small
    return (b_small * big - b_big * small) / (b_small - b_big), (small - big) / (1 / b_small - 1 / b_big)


@pytest.mark.parametrize("broken", [_naive, _swapped], ids=["naive", "swapped-batch-sizes"])
def test_unbiasedness_check_catches_a_biased_estimator(broken):
    with pytest.raises(AssertionError):
        check_unbiased(broken, draws=1500)


def test_gradient_noise_bookkeeping_recovers_the_samples_from_accumulated_grads():
    """observe() sees only the accumulated p.grad after each weighted backward; it must recover each sample."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    g1, g2 = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), torch.tensor([3.0, -1.0, 1.0], dtype=torch.float64)
    for w1, w2 in ((0.5, 0.5), (0.6, 0.4)):  # equal micro-batches, and the odd-sized halves of a split
        noise = GradientNoise([p])
        noise.begin()
        p.grad = w1 * g1.clone()
        noise.observe(w1)
        p.grad += w2 * g2
        noise.observe(w2)
        out = noise.finish(b_small=2)
        samples = np.stack([g1.numpy(), g2.numpy()])
        sum_sq = float((samples**2).sum())
        big = float(((w1 * g1 + w2 * g2) ** 2).sum())
        assert out["grad_coherence"] == pytest.approx(grad_coherence(sum_sq, 2, big))
        g2_est, trace = noise_estimates(sum_sq, 2, big, 2)
        assert noise.g2_ema == pytest.approx(g2_est) and noise.s_ema == pytest.approx(trace)


# --- FLOPs, MFU table -----------------------------------------------------------------------------


def check_flops(count) -> None:
    """2 layers, d=32, 2 heads, vocab 256 (tied), T=16, with biases; N excludes the position embedding."""
    from lmtune import config as config_lib
    from lmtune.model import GPT

    cfg = config_lib.load(overrides=["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
                                     "data.seq_len=16"],
                          locked=False)
    block = (32 + 32) + (32 * 96 + 96) + (32 * 32 + 32) + (32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)  # 12,704
    n = 2 * block + (32 + 32) + 256 * 32  # blocks, ln_f, wte = lm_head: 33,664
    assert GPT(cfg.model, 256).num_params() == n == 33_664
    assert count(n, n_layer=2, n_head=2, head_dim=16, seq_len=16) == 6 * 33_664 + 12 * 2 * 2 * 16 * 16
    assert count(n, 2, 2, 16, 16) == 214_272


def test_flops_per_token_by_hand_for_a_small_gpt():
    check_flops(flops_per_token)


@pytest.mark.parametrize("broken", [
    lambda n, n_layer, n_head, head_dim, seq_len: 6 * n,  # no attention term
    lambda n, n_layer, n_head, head_dim, seq_len: 2 * n + 4 * n_layer * n_head * head_dim * seq_len,  # forward only
], ids=["no-attention-term", "forward-only"])
def test_the_flops_check_catches_a_wrong_count(broken):
    with pytest.raises(AssertionError):
        check_flops(broken)


def test_a_token_budget_sets_the_runs_length_and_the_summary_its_compute():
    from lmtune import config as config_lib
    from lmtune.train import Trainer
    from tests.conftest import TINY

    cfg = config_lib.load(overrides=[*TINY, "train.tokens=2000", "train.schedule=cosine"], locked=False)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["step"] == 16  # ceil(2000 / (4 sequences × 32 tokens))
    assert summary["flops_per_token"] == trainer.throughput.flops_per_token
    assert summary["flops"] == trainer.throughput.flops_per_token * 16 * 128
    assert summary["params"] == trainer.raw_model.num_params()  # N, what 6N counts (the scaling ladder's size)
    from lmtune.training.measure import model_size

    assert model_size(cfg) == (summary["params"], summary["flops_per_token"])  # counted before a run, on meta
    lrs = [r["lr"] for r in trainer.history if "lr" in r]
    assert lrs[-1] == pytest.approx(0.1 * 3e-3)  # the schedule decayed to its floor over exactly those steps


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA GeForce RTX 3090", 71e12),
    ("Tesla T4", 65e12), ("Some Future GPU", None),
])
def test_peak_flops_matches_whole_names(name, flops):
    assert peak_flops_for(name) == flops


# --- step timing ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_step_timer_leaves_out_its_own_warmup_and_excluded_steps():
    clock = FakeClock()
    timer = StepTimer(warmup=3, clock=clock)
    for i in range(10):
        if i == 6:
            with timer.excluded():
                clock.t += 5.0  # a profiled or measured step: not timed
        else:
            clock.t += 2.0 if i < 3 else 0.010  # warmup steps compile: slow
        timer.step()
    out = timer.read()
    assert out["avg_step_time_ms"] == pytest.approx(10.0)
    # A resumed process warms up again: its first 3 steps are out too, whatever the run's global step.
    resumed = StepTimer(warmup=3, clock=clock)
    for i in range(6):
        clock.t += 2.0 if i < 3 else 0.020
        resumed.step()
    assert resumed.read()["avg_step_time_ms"] == pytest.approx(20.0)


# --- memory -----------------------------------------------------------------------------------------


def test_tensor_memory_counts_live_bytes_and_what_a_probed_step_allocates(tmp_path):
    kept = torch.zeros(2**18)  # 1 MiB alive at the step's start
    meter = TensorMemory(lambda: [kept, kept], clear_refs=tmp_path / "clear_refs")  # the same storage twice: once
    meter.begin_window(step=0)
    with meter.probe():
        a = torch.ones(2**19)  # +2 MiB
        b = a * 2  # +2 MiB: peak 1 + 4 MiB
        del a, b
        c = torch.ones(2**18)  # +1 MiB after the frees
        del c
    assert meter.peak()["peak_allocated_gib"] * 2**30 == pytest.approx(5 * 2**20, abs=1024)  # + a scalar or two
    assert meter.peak()["peak_reserved_gib"] == meter.peak()["peak_allocated_gib"]
    assert meter.summary()["peak_rss_scope"] == "window"


def test_tensor_memory_says_when_the_rss_peak_covers_the_whole_process(tmp_path):
    meter = TensorMemory(lambda: [], clear_refs=tmp_path / "no-such-dir" / "clear_refs")
    meter.begin_window(step=0)
    assert meter.summary()["peak_rss_scope"] == "process"


def test_oom_is_decided_by_type_and_torchs_own_allocator_messages():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(MemoryError())
    try:
        torch.empty(2**52, dtype=torch.uint8)  # the CPU allocator really fails
    except RuntimeError as exc:
        assert is_oom(exc)
    else:  # pragma: no cover - 4 PiB cannot be allocated
        pytest.fail("allocation of 4 PiB succeeded")
    assert not is_oom(FileNotFoundError("/data/runs/3-oom-probe/out of memory/metrics.jsonl"))
    assert not is_oom(RuntimeError("cannot open /runs/oom-sweep/trial OOM-1: out of memory? no such file"))


def test_a_compute_budget_trains_each_size_for_its_share_of_tokens(capsys, tmp_path):
    """train.flops = C: tokens = C ÷ FLOPs per token, so a wider model trains on fewer tokens for the same compute;
    a budget under one optimizer step is one line, exit 2."""
    from lmtune import config as config_lib
    from lmtune.train import Trainer, main
    from tests.conftest import TINY

    budget = 3e9
    runs = {}
    for width in (32, 64):
        cfg = config_lib.load(overrides=[*TINY, f"model.n_embd={width}", f"train.flops={budget}"], locked=False)
        trainer = Trainer(cfg)
        runs[width] = trainer.fit()
        steps = round(budget / trainer.throughput.flops_per_token / trainer.plan.batch_tokens)
        assert runs[width]["step"] == steps
        assert runs[width]["flops"] == pytest.approx(budget, rel=0.5 * trainer.plan.batch_tokens
                                                     * trainer.throughput.flops_per_token / budget)
    assert runs[64]["step"] < runs[32]["step"]
    assert main([*TINY, "train.flops=1000", "--no-wandb", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.flops=1e+03 is less than one optimizer step of this model" in err[0]
