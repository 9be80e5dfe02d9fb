"""Which optimizer, each at its own best learning rate.

The phase-0 study (docs/phase0.md, "Training Recipe"): AdamW won the optimizer sweep. Adam applies weight decay as an
L2 term in the gradient, AdamW decouples it (Loshchilov & Hutter 2019), SGD uses momentum 0.9. Each
optimizer gets num_samples learning rates from TPE; ASHA (on tokens) stops the clearly worse ones early.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid, loguniform

sweep = Sweep(
    name="optimizer",
    description=__doc__,
    base={
        "data.dataset": "wikitext-2-raw-v1",
        "train.steps": 2000, "train.eval_interval": 100, "train.weight_decay": 0.1, "train.schedule": "cosine",
        "train.warmup_steps": 100,
    },
    space={
        "train.optimizer": grid(["adamw", "adam", "sgd"]),
        "train.lr": loguniform(1e-4, 3e-2),
    },
    metric="val_loss", mode="min", num_samples=6,
    scheduler="asha",
    export=["train.optimizer", "train.lr"],
    smoke=Smoke(base={**TINY_CPU, "train.warmup_steps": 0}, num_samples=2),
)
