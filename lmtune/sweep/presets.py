"""Config presets that sweep files share, so each file states only what its experiment changes."""

TINY_CPU = {
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 64,
    "model.block_size": 64,
    "data.dataset": "builtin",
    "data.tokenizer": "byte",
    "data.seq_len": 64,
    "train.micro_batch_size": 8,
    "train.steps": 30,
    "train.eval_interval": 10,
    "train.eval_batches": 4,
    "train.log_interval": 5,
    "train.measure_interval": 10,
    "train.dtype": "float32",
    "train.compile": False,
    "train.ac_budget": 1.0,
    "train.compile_warmup_steps": 2,
    "system.device": "cpu",
}
"""A model and run small enough for a smoke sweep on 2 CPUs: byte tokens of the built-in corpus, float32,
eager, 30 steps with a validation pass (and checkpoint) every 10. No activation checkpointing unless the sweep
sweeps ``train.ac_budget`` (in eager mode a budget checkpoints whole blocks: ac_mode "blocks")."""
