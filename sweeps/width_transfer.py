"""Tune small, use large: the best learning rate across widths, under μP and under the standard parametrization.

Width × learning rate (a log grid) × parametrization, on real text (Yang et al. 2021, "Tensor Programs V", Fig. 1):
under the standard parametrization (``sp``, GPT-2 as it is) the learning rate at each width's optimum moves as the
model widens, so a value tuned small does not hold large; under μP (``model.parametrization="mup"``, tuned at
``model.base_width``, the narrowest width here) it stays put. ``summary.md`` tables each width's optimum and how far
it moves; ``plots/width_transfer.png`` draws the curves, one panel per parametrization. Export the μP winner for a
larger model with ``python -m lmtune.export RESULTS --for-width N``.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid

sweep = Sweep(
    name="width-transfer",
    description=__doc__,
    base={
        "model.n_layer": 8, "model.n_head": 8, "model.base_width": 256,
        "data.dataset": "wikitext-2-raw-v1", "data.seq_len": 512, "model.block_size": 512,
        "train.steps": 1000, "train.eval_interval": 250, "train.warmup_steps": 100, "train.schedule": "cosine",
    },
    space={
        "model.parametrization": grid(["sp", "mup"]),
        "model.n_embd": grid([256, 512, 1024, 2048]),
        "train.lr": grid([2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]),
    },
    metric="val_loss", mode="min",
    export=["train.lr"],
    smoke=Smoke(
        base={**TINY_CPU, "model.n_head": 4, "model.base_width": 32, "train.steps": 40, "train.eval_interval": 20,
              "train.measure_interval": 0, "train.checkpoint": False},
        space={
            "model.parametrization": grid(["sp", "mup"]),
            "model.n_embd": grid([32, 128]),
            "train.lr": grid([1e-3, 4e-3, 1.6e-2]),
        },
    ),
)
