"""Memory frontier: micro-batch × activation-checkpointing budget, compiled, at the phase-0 study's model size.

The phase-0 study (docs/phase0.md, "Memory & Compute", A100 40GB, d_model=768, seq_len=1024, n_layers=12): without AC,
mb 28 peaked at 38.1 GiB and mb 32 ran out of memory; with AC budget 0.75, mb 32 peaked at 34.2 GiB,
the fastest point with "6 GiB headroom" of a nominal 40 GB, which became the recommended operating point.
An A100-40GB reports 39.4 GiB to torch, so that point keeps 5.2 GiB free: the sweep keeps 5 GiB, the
headroom with which it recommends what the phase-0 study did. Peak memory is
monotone in the micro-batch at a fixed budget (a larger mb after an OOM is recorded as OOM without
running) but not across budgets, so each budget is its own line. Timing excludes the compile warmup
steps and peak memory is measured after them (the phase-0 study's fix for JIT bleed).

Budgets here are the compile partitioner's (ac_mode "budget", per compiled block). The smoke variant runs
eager on CPU, where a budget checkpoints whole blocks (ac_mode "blocks": 0.5 = 2 of 4 blocks), and
emulates a small device (system.memory_limit_gib, enforced on the peak of live tensor bytes): the larger
micro-batches cross it and end as OOM, so the frontier, the implied OOM rows and the recommendation all
show up, and the lower budget peaks lower at every micro-batch.
"""

from lmtune.sweep import TINY_CPU, Frontier, Smoke, Sweep, grid

sweep = Sweep(
    name="memory-frontier",
    description=__doc__,
    base={
        "model.n_layer": 12, "model.n_embd": 768, "model.n_head": 12, "model.block_size": 1024,
        "data.dataset": "wikitext-2-raw-v1", "data.seq_len": 1024,
        "train.dtype": "bfloat16", "train.compile": True, "train.compile_mode": "default",
        "train.compile_warmup_steps": 3, "train.steps": 30, "train.eval_interval": 30, "train.measure_interval": 0,
    },
    space={
        "train.micro_batch_size": grid([8, 12, 16, 20, 24, 28, 32, 36, 40]),
        "train.ac_budget": grid([0.12, 0.38, 0.75, 1.0]),
    },
    searcher="frontier",
    frontier=Frontier(x="train.micro_batch_size", budget="train.ac_budget", headroom_gib=5.0),
    metric="tokens_per_s", mode="max",
    export=["train.micro_batch_size", "train.ac_budget"],
    smoke=Smoke(
        base={
            **TINY_CPU, "model.n_layer": 4, "model.n_embd": 128, "model.n_head": 4, "model.block_size": 128,
            "data.seq_len": 128, "train.steps": 6, "train.eval_interval": 6, "train.compile_warmup_steps": 2,
            "train.measure_interval": 0, "train.log_interval": 2, "system.memory_limit_gib": 0.42,
            "train.eval_sequences": 64,  # the same 64 validation windows for every trial
        },
        space={"train.micro_batch_size": grid([8, 16, 32, 64, 96, 128]), "train.ac_budget": grid([0.5, 1.0])},
        frontier=Frontier(x="train.micro_batch_size", budget="train.ac_budget", headroom_gib=0.1, margin_gib=0.02),
    ),
)
