"""Weight decay on the matrices (embeddings and Linear weights; biases and norms never decayed).

The phase-0 study (docs/phase0.md, "Training Recipe"): weight_decay = 0 at phase-0 scale, to be revisited at phase-1
scale. Two seeds per value, so a difference smaller than the seed-to-seed spread reads as none.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid

sweep = Sweep(
    name="weight-decay",
    description=__doc__,
    base={
        "data.dataset": "wikitext-2-raw-v1",
        "train.optimizer": "adamw", "train.steps": 2000, "train.eval_interval": 100, "train.schedule": "cosine",
    },
    space={
        "train.weight_decay": grid([0.0, 0.01, 0.1, 0.3]),
        "train.seed": grid([1337, 1338]),
    },
    metric="val_loss", mode="min",
    export=["train.weight_decay"],
    smoke=Smoke(
        base={**TINY_CPU, "train.lr": 3e-3},
        space={"train.weight_decay": grid([0.0, 0.1]), "train.seed": grid([1337, 1338])},
    ),
)
