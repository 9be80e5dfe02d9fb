"""The best model that fits: width × micro-batch at a fixed number of steps, under the device's memory.

A wider model and a larger micro-batch (more tokens per step) both lower the loss after a fixed number of
steps, and both cost memory, so the best configs sit on the edge of what fits and part of the space runs out
of memory. TPE learns that edge: every trial records its peak memory against the limit as an Optuna
constraint (``memory_gib`` = peak − limit, positive = infeasible; an OOM is infeasible), so after its first
random trials it stops proposing configs that do not fit. The sweep's summary prints how many trials ran out
of memory in its first and second half; optuna-dashboard shows the constraints in ``optuna.db``.

The heads stay at 12 (head size = width / 12, as GPT-2 small's 768 / 12 = 64; 4 in the smoke variant). The smoke variant emulates a
48 MiB device on CPU (system.memory_limit_gib, enforced on the peak of live tensor bytes), where widths above
128 with the larger micro-batches do not fit; ``benchmarks/oom_aware_search.py`` runs it against a TPE that
is told OOMs as failures.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, choice, randint

sweep = Sweep(
    name="width-batch",
    description=__doc__,
    base={
        "model.n_layer": 12, "model.n_head": 12, "model.block_size": 1024,
        "data.dataset": "wikitext-2-raw-v1", "data.seq_len": 1024,
        "train.dtype": "bfloat16", "train.compile": True, "train.lr": 6e-4,
        "train.steps": 600, "train.eval_interval": 200, "train.warmup_steps": 60,
    },
    space={
        "model.n_embd": choice([384, 576, 768, 1152, 1536]),
        "train.micro_batch_size": randint(4, 64, log=True),
    },
    metric="val_loss", mode="min", num_samples=32,
    export=["model.n_embd", "model.n_head", "train.micro_batch_size"],
    smoke=Smoke(
        base={
            **TINY_CPU, "model.n_head": 4, "train.lr": 3e-3, "train.steps": 30, "train.eval_interval": 30,
            "train.measure_interval": 0, "train.checkpoint": False, "system.memory_limit_gib": 0.047,
        },
        space={
            "model.n_embd": choice([32, 64, 96, 128, 160, 192, 224, 256]),
            "train.micro_batch_size": randint(4, 64, log=True),
        },
        num_samples=24,
    ),
)
