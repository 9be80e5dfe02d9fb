"""Activation checkpointing, torch.compile and DDP, applied to a GPT from outside the model; the data-parallel
group's own steps (rank 0 first, gradient sync across micro-batches).

The split and the order follow torchtitan (``parallelize_llama``: activation checkpointing, then
compile, then data parallelism): :mod:`lmtune.model` stays plain math, and everything here changes how
the model runs, never what it computes or what its state_dict holds.

``train.ac_budget`` (1 = keep every activation) is applied in one of two modes, named by
``TrainConfig.ac_mode`` and reported with every budget (summary.json, trials.csv, frontier tables,
export provenance), because the same number saves different amounts of memory in each:

* ``budget`` (compile on): the min-cut partitioner's activation memory budget,
  ``torch._functorch.config.activation_memory_budget`` (PyTorch PR #126320; blog post
  "Current and New Activation Checkpointing Techniques in PyTorch", 2025), applied to each compiled
  region (every block, and the final norm + LM head + loss). 1.0 is the default runtime-optimal saved
  set, 0.0 saves only each region's inputs, in between a knapsack picks the cheapest recomputation
  (by FLOPs) that keeps the saved bytes under that fraction. This is what the phase-0 study's frontier swept.
* ``blocks`` (compile off): round((1 - ac_budget) * n_layer) blocks, evenly spread, run under non-reentrant
  ``torch.utils.checkpoint`` (whole-block recomputation; Chen et al. 2016).

Both keep the endpoints (1.0 recomputes nothing; 0.0 recomputes as much as the mechanism can).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Iterable, TypeVar

import torch
import torch._functorch.config  # not imported by `import torch`
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from lmtune.config import ConfigError, TrainConfig
from lmtune.device import Accelerator, accelerator
from lmtune.model import GPT

T = TypeVar("T")


def checkpointed_blocks(n_layer: int, ac_budget: float) -> list[int]:
    """Indices of the blocks that eager AC recomputes: k = round((1 - ac_budget) * n_layer) (half up, so
    0.75 of 2 layers checkpoints 1, where Python's banker's round would give 0), each at the centre of
    one of k equal runs of layers, so the saved activations are spread over the depth."""
    k = math.floor((1.0 - ac_budget) * n_layer + 0.5 + 1e-9)
    return [(2 * i + 1) * n_layer // (2 * k) for i in range(k)]


def apply_ac(model: GPT, train: TrainConfig) -> None:
    """Activation checkpointing for ``train.ac_budget`` in ``train.ac_mode``, in place (module docstring).

    ``budget``: sets ``torch._functorch.config.activation_memory_budget``, which is process-global and read
    when AOTAutograd partitions a joint forward/backward graph: at the first training forward of each
    compiled region and at every recompile, not at ``torch.compile()``. So: one budget per process (a
    trial), set before the first step and left alone. It is set even for 1.0, so that an earlier model's
    budget cannot leak into this one; when it changes, dynamo's in-memory cache of compiled code is reset (the
    on-disk compiled-artifact caches key on this config, dynamo's guards do not).

    ``blocks``: wraps blocks in torch's ``checkpoint_wrapper`` (what torchtitan uses): ``use_reentrant=False``
    and ``preserve_rng_state=True``, so recomputed dropout draws the same masks. The wrapper's state_dict
    hooks strip its ``_checkpoint_wrapped_module.`` prefix, so state_dict keys (checkpoints) are the same
    with and without AC; ``named_parameters()`` names do carry the prefix.
    """
    if train.ac_mode == "budget":
        if torch._functorch.config.activation_memory_budget != train.ac_budget:
            # Code compiled under another budget stays in dynamo's in-memory cache, whose guards do not look at
            # this config: a later model of the same class would run it with the old partition. Drop it.
            torch._dynamo.reset()
        torch._functorch.config.activation_memory_budget = train.ac_budget
        return
    blocks = model.transformer.h
    for i in checkpointed_blocks(len(blocks), train.ac_budget):
        if not isinstance(blocks[i], CheckpointWrapper):  # idempotent
            blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                           preserve_rng_state=True)


def apply_compile(model: GPT, train: TrainConfig, accel: Accelerator | None = None) -> GPT:
    """``torch.compile`` each block and the head (final norm, LM head, loss) in place; returns ``model``.

    Per region, as torchtitan compiles per block, and not the whole model as one graph: measured on CPU
    (4×128 GPT, mb 32; BENCHMARKS.md, "CPU memory model"), one whole-model graph at ac_budget 0.0 peaks as
    high as at 1.0 (158 MiB both; 119 at 0.5), because the partitioner then saves only the graph's inputs
    and the single backward graph recomputes the whole forward before it can start; per block, 0.0
    recomputes one block at a time and the peak falls monotonically with the budget (158 → 96 → 62 MiB for
    1.0 → 0.5 → 0.0). Identical blocks share one compiled graph, so compiling is faster too. The head is its
    own region so that the largest activation, the (B, T, V) logits, stays under the budget as well.

    In place (``nn.Module.compile`` on each block, a compiled ``logits_and_loss`` on the instance): there
    is no ``_orig_mod`` wrapper, so ``model.state_dict()`` keys, ``isinstance(model, GPT)`` and its methods
    are unchanged. Code that runs the model at varying lengths (sampling) runs it under
    ``torch.compiler.set_stance("force_eager")`` instead of recompiling.

    What the compiler needs on ``accel`` (by default the device of the model's parameters) is checked first, so that
    a machine without it gets one line instead of an inductor traceback at the first step.
    """
    if not train.compile:
        return model
    accel = accel or accelerator(device=next(model.parameters()).device)
    missing = accel.compile_missing()
    if missing:
        raise ConfigError(f"train.compile=true needs {missing} on this machine, or set train.compile=false.")
    for block in model.transformer.h:
        block.compile(mode=train.compile_mode)
    model.logits_and_loss = torch.compile(model.logits_and_loss, mode=train.compile_mode)
    return model


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def apply_ddp(model: GPT, accel: Accelerator) -> nn.Module:
    """DistributedDataParallel over the initialized process group (gloo on CPU, NCCL on CUDA), with the
    accelerator's device ids and gradients as views into the all-reduce buckets."""
    return nn.parallel.DistributedDataParallel(model, **accel.ddp_kwargs())


def parallelize(model: GPT, train: TrainConfig, *, accel: Accelerator | None = None, world_size: int = 1) -> nn.Module:
    """Activation checkpointing, then compile (torchtitan's order), then DDP when ``world_size > 1``.
    Returns ``model`` itself on a single process, its DDP wrapper otherwise. ``accel``: where it trains (by default
    the device of its parameters)."""
    accel = accel or accelerator(device=next(model.parameters()).device)
    apply_ac(model, train)
    apply_compile(model, train, accel)
    if world_size > 1:
        return apply_ddp(model, accel)
    return model


# --- the data-parallel group ---------------------------------------------------------------------


def rank_zero_first(load: Callable[[], T], *, is_main: bool, world_size: int) -> T:
    """``load()`` on rank 0 first (it tokenizes, or finds the cache), then on the others (they hit the cache)."""
    if is_main:
        out = load()
    if world_size > 1:
        dist.barrier()
    if not is_main:
        out = load()
    return out


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def grad_sync(model: nn.Module, sync: bool) -> ContextManager:
    """Around one micro-batch's backward: DDP's ``no_sync()`` unless this backward all-reduces the gradients."""
    return model.no_sync() if is_ddp(model) and not sync else contextlib.nullcontext()


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean of ``value`` over the ranks (``value`` itself alone); ``value`` is left as it is."""
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return value


def average_gradients(params: Iterable[nn.Parameter], world_size: int) -> None:
    """The mean gradient over ranks, in place (after micro-batches run without DDP's sync)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def gather_objects(obj: T, world_size: int) -> list[T]:
    """``obj`` of every rank, rank 0's first (``[obj]`` alone); every rank must call it."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
