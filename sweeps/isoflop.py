"""The scaling ladder: for each compute budget, which model size trains to the lowest loss (IsoFLOP profiles).

Compute budgets × model sizes, each trial's tokens = budget ÷ its size's FLOPs per token (``train.flops``: the trainer
counts 6N + 12·L·H·Q·T per token). Sizes vary the width at a fixed depth and head count under μP
(``model.parametrization="mup"``, tuned at ``model.base_width``): μP carries the learning rate tuned at the base width to
every width (Yang et al. 2021), which it does not do across depth, so one lr serves the whole ladder. The results fit
Hoffmann et al.'s approach 2 (each budget's loss-vs-size minimum → N*(C), D*(C), L*(C)) and approach 3
(L(N, D) = E + A/N^α + B/D^β), with bootstrap intervals; ``python -m lmtune.export RESULTS --for-compute C`` predicts
the run at a larger budget C and ``--verify`` trains it to check the prediction.

Three budgets at least, three sizes at least per budget: fewer cannot place a minimum or fit a power law.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid

sweep = Sweep(
    name="isoflop",
    description=__doc__,
    base={
        "model.parametrization": "mup", "model.base_width": 256, "model.n_layer": 12, "model.n_head": 8,
        "data.dataset": "fineweb-edu", "data.prepared": "auto", "train.schedule": "cosine", "train.warmup_steps": 50,
        "train.lr": 2e-3, "train.eval_interval": 500, "train.eval_sequences": 256,
    },
    space={
        "train.flops": grid([1e17, 3e17, 1e18, 3e18]),
        "model.n_embd": grid([256, 384, 512, 768, 1024, 1536]),
    },
    metric="val_loss", mode="min",
    export=["model.n_embd", "train.flops"],
    # Byte-level models of 8-32 wide: at 2e9 and 6e9 FLOPs the narrowest is best (the minimum is a bound at the
    # grid's edge, as summary.md says), at 1.8e10 the minimum falls between 8 and 16; a grid that brackets every
    # budget's minimum needs narrower models trained for many more steps than a smoke run affords on a CPU.
    smoke=Smoke(
        base={**TINY_CPU, "model.parametrization": "mup", "model.base_width": 16, "model.n_head": 2,
              "train.lr": 1e-2, "train.schedule": "cosine", "train.warmup_steps": 5, "train.eval_interval": 1000,
              "train.measure_interval": 0, "train.checkpoint": False},
        space={"train.flops": grid([2e9, 6e9, 1.8e10]), "model.n_embd": grid([8, 16, 32])},
    ),
)
