"""The scaling ladder at CPU size on real text: the smallest ladder whose fit says something, in minutes on 2 cores.

Byte-level models two layers deep, 32 to 128 wide, under μP tuned at width 32 (``model.base_width``), so one lr
serves every width (sweeps/isoflop.py says why width, not depth, varies); three compute budgets a factor ~3 apart;
each trial's tokens = its budget ÷ its FLOPs per token (``train.flops``). The data is the built-in corpus (CPython's
documentation); ``benchmarks/scaling_ladder.py`` runs it on WikiText-2 instead, fits it, and verifies the prediction
at three times the largest budget:

    python -m lmtune.sweep sweeps/isoflop_cpu.py data.dataset=files data.files=wikitext-2/valid.txt \\
        data.val_files=wikitext-2/test.txt
    python -m lmtune.export results/1-isoflop-cpu-... --for-compute 9e11 --verify

Its ``--smoke`` variant keeps the base and shrinks the budgets: nine runs in about a minute.
"""

from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid

sweep = Sweep(
    name="isoflop-cpu",
    description=__doc__,
    base={**TINY_CPU, "model.parametrization": "mup", "model.base_width": 32, "model.n_head": 2, "train.lr": 1e-2,
          "train.schedule": "cosine", "train.warmup_steps": 20, "train.eval_interval": 1_000_000,
          "train.eval_sequences": 256, "train.measure_interval": 0, "train.log_interval": 100, "train.checkpoint": False},
    space={"train.flops": grid([2e11, 6e11, 1.8e12]), "model.n_embd": grid([24, 32, 48, 64, 96, 128])},
    metric="val_loss", mode="min",
    export=["model.n_embd", "train.flops"],
    smoke=Smoke(space={"train.flops": grid([2e9, 6e9, 1.8e10]), "model.n_embd": grid([16, 32, 64])}),
)
