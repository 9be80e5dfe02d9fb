"""The phase-1 architecture ablation the study names: positions (learned, RoPE, ALiBi) × attention (MHA, GQA).

The phase-0 study (docs/phase0.md, "What Doesn't Work"): WikiText-2 is too small for these differences to surface, so
this runs on FineWeb-Edu (prepared once into token shards by the sweep's driver: data.prepared=auto). Where FineWeb-Edu
cannot be read (no network and no mirror under $LMTUNE_HUB_ROOT), give data.dataset=wikitext-103-raw-v1.
Three seeds per arm: the results read them as replicates, and an arm whose difference from the baseline (learned
positions, MHA: GPT-2's) lies within the seed-to-seed spread says so instead of ranking a lucky seed.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid

sweep = Sweep(
    name="architecture",
    description=__doc__,
    base={
        "data.dataset": "fineweb-edu", "data.prepared": "auto",
        "train.steps": 4000, "train.eval_interval": 250, "train.schedule": "cosine", "train.warmup_steps": 100,
        "train.eval_sequences": 256,
    },
    space={
        "model.position": grid(["learned", "rope", "alibi"]),
        "model.n_kv_head": grid([0, 4]),  # 0: one key/value head per query head (MHA); 4 of 12: GQA
        "train.seed": grid([1337, 1338, 1339]),
    },
    metric="val_loss", mode="min",
    export=["model.position", "model.n_kv_head"],
    smoke=Smoke(
        base={**TINY_CPU, "model.n_head": 4, "train.steps": 40, "train.lr": 3e-3},
        space={"model.position": grid(["learned", "rope", "alibi"]), "model.n_kv_head": grid([0, 2]),
               "train.seed": grid([1, 2, 3])},
    ),
)
