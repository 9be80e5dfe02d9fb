"""Activation checkpointing and torch.compile, applied to a GPT from outside the model.

The split and the order follow torchtitan (``parallelize_llama``: activation checkpointing, then
compile): :mod:`lmtune.model` stays plain math, and everything here changes how the model runs, never
what it computes or what its state_dict holds.

``train.ac_budget`` (1 = keep every activation) means one of two things:

* compile on: the min-cut partitioner's activation memory budget,
  ``torch._functorch.config.activation_memory_budget`` (PyTorch PR #126320; blog post
  "Current and New Activation Checkpointing Techniques in PyTorch", 2025). 1.0 is the default runtime-optimal saved
  set, 0.0 recomputes everything recomputable, in between a knapsack picks the cheapest recomputation
  (by FLOPs) that keeps the saved bytes under that fraction. This is what the seed's frontier swept.
* compile off: round((1 - ac_budget) * n_layer) blocks, evenly spread, run under non-reentrant
  ``torch.utils.checkpoint`` (whole-block recomputation; Chen et al. 2016).

Both keep the endpoints (1.0 recomputes nothing; 0.0 recomputes as much as the mechanism can), but the
same value in between saves different amounts of memory: compare budgets within one mode.
"""

from __future__ import annotations

import math
import shutil

import torch
import torch._functorch.config  # not imported by `import torch`
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from lmtune.config import ConfigError, TrainConfig
from lmtune.model import GPT


def checkpointed_blocks(n_layer: int, ac_budget: float) -> list[int]:
    """Indices of the blocks that eager AC recomputes: k = round((1 - ac_budget) * n_layer) (half up, so
    0.75 of 2 layers checkpoints 1, where Python's banker's round would give 0), each at the centre of
    one of k equal runs of layers, so the saved activations are spread over the depth."""
    k = math.floor((1.0 - ac_budget) * n_layer + 0.5 + 1e-9)
    return [(2 * i + 1) * n_layer // (2 * k) for i in range(k)]


def apply_ac(model: GPT, train: TrainConfig) -> None:
    """Activation checkpointing for ``train.ac_budget``, in place (see the module docstring).

    With compile it sets ``torch._functorch.config.activation_memory_budget``, which is process-global
    and read when AOTAutograd partitions the joint forward/backward graph: at the first training forward
    of the compiled model and at every recompile, not at ``torch.compile()``. So: one budget per process
    (a trial), set before the first step and left alone. It is set even for 1.0, so that an earlier
    model's budget cannot leak into this one. (The compiled-artifact caches key on this config.)

    Without compile it wraps blocks in torch's ``checkpoint_wrapper`` (what torchtitan uses):
    ``use_reentrant=False`` and ``preserve_rng_state=True``, so recomputed dropout draws the same masks.
    The wrapper's state_dict hooks strip its ``_checkpoint_wrapped_module.`` prefix, so state_dict keys
    (checkpoints) are the same with and without AC; ``named_parameters()`` names do carry the prefix.
    """
    if train.compile:
        torch._functorch.config.activation_memory_budget = train.ac_budget
        return
    blocks = model.transformer.h
    for i in checkpointed_blocks(len(blocks), train.ac_budget):
        if not isinstance(blocks[i], CheckpointWrapper):  # idempotent
            blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                           preserve_rng_state=True)


def has_cpp_compiler() -> bool:
    """Whether inductor finds a C++ compiler (it needs one for CPU kernels)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return bool(get_cpp_compiler())
    except ImportError:  # a torch without this helper: the usual names
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    except Exception:  # inductor's search raises when it finds none
        return False


def apply_compile(model: GPT, train: TrainConfig) -> nn.Module:
    """``torch.compile`` the whole model in place (``nn.Module.compile``) and return the same object.

    Whole model, not per block as torchtitan does: the seed's budgets were measured on one graph that
    includes the LM head and the loss, whose (B, T, V) logits are the largest activation, and a single
    graph lets the partitioner trade memory across all of it. Per-block compile would compile faster
    (identical blocks share one graph) but leave the head out of the budget.

    In place, not ``torch.compile(model)``: there is no ``_orig_mod`` wrapper, so ``model.state_dict()``
    keys, ``isinstance(model, GPT)`` and its methods are unchanged; ``model(...)`` runs compiled and
    ``model.forward(...)`` runs eager (``generate`` uses it, so sampling never recompiles).
    """
    if not train.compile:
        return model
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not has_cpp_compiler():
        raise ConfigError("train.compile=true needs a C++ compiler for torch.compile on CPU "
                          "(install g++ or set CXX), or set train.compile=false.")
    model.compile(mode=train.compile_mode)
    return model


def parallelize(model: GPT, train: TrainConfig) -> nn.Module:
    """Apply activation checkpointing, then compile (torchtitan's order). Returns ``model`` itself."""
    apply_ac(model, train)
    return apply_compile(model, train)
