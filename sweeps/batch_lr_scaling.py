"""Effective batch via gradient accumulation × the LR scaling rule, at a fixed token budget.

The phase-0 study (docs/phase0.md, "Gradient accumulation"; group 4-effective-batch-fixed-lr-20260316-151845-575080):
on wikitext-2, gradient coherence stayed > 0.999 at every effective batch and the critical batch
(McCandlish et al. 2018, B_simple = noise_scale) was below mb=28, so accumulation bought no quality.
Loss-vs-tokens comparisons across batch sizes are only fair with the LR co-scaled: none (fixed LR),
linear (Goyal et al. 2017) or sqrt (McCandlish et al. 2018). One epoch each, so every trial sees the
same tokens; grad_coherence and noise_scale are measured every measure_interval steps.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid

sweep = Sweep(
    name="batch-lr-scaling",
    description=__doc__,
    base={
        "data.dataset": "wikitext-2-raw-v1",
        "train.micro_batch_size": 16, "train.base_batch_tokens": 16 * 1024,
        "train.epochs": 1.0, "train.eval_interval": 50, "train.measure_interval": 10,
        "train.schedule": "cosine",
    },
    space={
        "train.accumulation_steps": grid([1, 2, 4, 8]),
        "train.lr_scaling": grid(["none", "linear", "sqrt"]),
    },
    metric="val_loss", mode="min",
    export=["train.accumulation_steps", "train.lr_scaling"],
    smoke=Smoke(
        base={**TINY_CPU, "train.base_batch_tokens": 8 * 64, "train.lr": 1e-3, "train.epochs": 0.05,
              "train.eval_interval": 5, "train.measure_interval": 4, "train.log_interval": 4},
        space={"train.accumulation_steps": grid([1, 4])},
    ),
)
