"""The device a run trains on, its seeds, its optimizer and learning-rate schedule, and how long it runs."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from lmtune.config import Config, ConfigError
from lmtune.device import Accelerator, accelerator
from lmtune.model import GPT


def set_up_device(cfg: Config, device: torch.device | str | None = None) -> Accelerator:
    """The accelerator to train on (``device``, else ``system.device``), with ``system.threads`` CPU threads. The
    device is made current when the run's session starts (:meth:`~lmtune.device.Accelerator.session`)."""
    accel = accelerator(cfg.system.device, device)
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    return accel


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def effective_lr(cfg: Config, batch_tokens: int) -> float:
    """Peak lr scaled from ``base_batch_tokens`` to this run's effective batch.

    linear: Goyal et al. 2017 ("Accurate, Large Minibatch SGD"); sqrt: the square-root rule that
    McCandlish et al. 2018 derive for Adam-like optimizers below the critical batch.
    """
    t = cfg.train
    base = t.base_batch_tokens or batch_tokens
    ratio = batch_tokens / base
    return t.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[t.lr_scaling]


def lr_at(step: int, peak: float, total: int, cfg: Config) -> float:
    """The lr of optimizer step ``step`` (0-based) of ``total``: linear warmup to ``peak`` over warmup_steps,
    then constant, or cosine down to exactly min_lr_ratio·peak at the last step (total - 1)."""
    t = cfg.train
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    last = total - 1
    if t.schedule == "constant" or last <= t.warmup_steps:
        return peak
    progress = min(1.0, (step - t.warmup_steps) / (last - t.warmup_steps))
    floor = t.min_lr_ratio * peak
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: GPT, cfg: Config, lr: float, *, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer over ``model.optim_groups``; a group with an ``lr_mult`` (μP) starts at lr·lr_mult, and
    the trainer's schedule keeps that multiplier (:func:`set_lr`). ``fused``: one fused kernel for every parameter
    (the accelerator's choice: on CUDA, where the per-parameter kernel launches of foreach cost real time)."""
    t = cfg.train
    groups = model.optim_groups(t.weight_decay, t.optimizer)
    fused_kw = {"fused": True} if fused else {}  # absent, not False: torch then keeps its own default (foreach)
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(t.beta1, t.beta2), **fused_kw)
    elif t.optimizer == "adam":  # weight decay as an L2 penalty in the gradient (the non-decoupled form)
        optimizer = torch.optim.Adam(groups, lr=lr, betas=(t.beta1, t.beta2), **fused_kw)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=t.momentum, **fused_kw)
    set_lr(optimizer, lr)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group of ``optimizer`` to ``lr`` times its ``lr_mult`` (μP's per-group multipliers; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


@dataclass(frozen=True)
class Plan:
    """A run's size: tokens per optimizer step (all ranks), its peak lr, its steps, and its validation set."""

    batch_tokens: int
    peak_lr: float
    total_steps: int
    eval_sequences: int
    """Validation windows scored at each eval, the same for every micro-batch size and world size."""

    @classmethod
    def of(cls, cfg: Config, train_tokens: int, world_size: int, flops_per_token: float = 0.0) -> Plan:
        """For ``cfg`` on ``world_size`` ranks over a training split of ``train_tokens`` tokens (``train.flops``,
        ``train.tokens`` and ``train.epochs`` turn into steps here; ``train.flops`` needs the model's
        ``flops_per_token``)."""
        t = cfg.train
        batch_tokens = t.micro_batch_size * t.accumulation_steps * world_size * cfg.data.seq_len
        windows_per_step = t.micro_batch_size * t.accumulation_steps * world_size
        n_windows = (train_tokens - 1) // cfg.data.seq_len
        if t.flops:
            if t.flops < flops_per_token * batch_tokens:
                raise ConfigError(f"train.flops={t.flops:.3g} is less than one optimizer step of this model "
                                  f"({flops_per_token * batch_tokens:.3g} FLOPs: {flops_per_token:.3g} per token × "
                                  f"{batch_tokens:,} tokens); accepted: at least that, or a smaller model or batch.")
            total_steps = max(1, round(t.flops / flops_per_token / batch_tokens))
        elif t.tokens:
            total_steps = max(1, math.ceil(t.tokens / batch_tokens))
        elif t.epochs:
            total_steps = max(1, math.ceil(t.epochs * n_windows / windows_per_step))
        else:
            total_steps = t.steps
        return cls(batch_tokens=batch_tokens, peak_lr=effective_lr(cfg, batch_tokens), total_steps=total_steps,
                   eval_sequences=t.eval_sequences or t.eval_batches * t.micro_batch_size * world_size)
