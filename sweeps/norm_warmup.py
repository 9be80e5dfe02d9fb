"""Pre-LN vs post-LN, with and without LR warmup, on a deep model.

The phase-0 study (docs/phase0.md, "Norm placement"): post-LN needs warmup and shows ~10 orders of magnitude between
per-layer gradient norms on deep models without it; pre-LN with a final LayerNorm converges without
warmup, its layer norms O(1) apart from a spike at layer 0. Compare val_loss and grad_norm_spread
(log10 max/min of the per-layer gradient norms) across the grid; plots/grad_norm_layers.png shows them.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid

sweep = Sweep(
    name="norm-warmup",
    description=__doc__,
    base={
        "model.n_layer": 24, "model.final_norm": True,
        "data.dataset": "wikitext-2-raw-v1",
        "train.steps": 2000, "train.eval_interval": 200, "train.log_interval": 10,
        "train.schedule": "cosine", "train.lr": 6e-4,
    },
    space={
        "model.norm_placement": grid(["pre", "post"]),
        "train.warmup_steps": grid([0, 100, 500]),
    },
    metric="val_loss", mode="min",
    export=["model.norm_placement", "train.warmup_steps"],
    smoke=Smoke(
        base={**TINY_CPU, "model.n_layer": 6, "train.lr": 3e-3, "train.log_interval": 5},
        space={"train.warmup_steps": grid([0, 10])},
    ),
)
