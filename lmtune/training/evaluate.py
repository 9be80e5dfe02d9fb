"""What the trainer asks of its model besides training: the validation loss and a text sample."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmtune.config import Config
from lmtune.data import Tokenizer, eval_batches
from lmtune.model import GPT


@torch.no_grad()
def validation_loss(model: nn.Module, val: np.ndarray, cfg: Config, sequences: int, *, device: torch.device,
                    autocast: contextlib.AbstractContextManager, rank: int = 0, world: int = 1,
                    limit: int | None = None, before_forward: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Mean loss over the validation set: the first ``sequences`` windows of ``val``, in micro-batches of
    ``train.micro_batch_size`` that the ranks stride over, so N workers at micro-batch m and one worker at N·m (or
    any micro-batch) are scored on the same text. ``limit``: only that many micro-batches on every rank, nothing
    returned (compiling the graphs). ``before_forward``: called before each forward (a CUDA-graph step marker)."""
    model.eval()
    batches = eval_batches(val, cfg.data.seq_len, cfg.train.micro_batch_size, sequences)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (x, y, valid) in enumerate(batches):
        if limit is not None:  # every rank compiles: no striding, no reduction
            if i >= limit:
                break
        elif i % world != rank:
            continue
        before_forward()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total[0] += loss.double() * valid  # the loss is the mean over the valid rows' tokens
        total[1] += valid
    if limit is not None:
        model.train()
        return {}
    if world > 1:
        dist.all_reduce(total)
    model.train()
    val_loss = float(total[0] / total[1])
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


@torch.no_grad()
def sample_text(model: GPT, tokenizer: Tokenizer, *, device: torch.device, seed: int,
                autocast: contextlib.AbstractContextManager, max_new_tokens: int = 64) -> str:
    """``max_new_tokens`` sampled from the start of a document (top-k 50, a generator seeded with ``seed``)."""
    tok = tokenizer
    start = [tok.eot] if getattr(tok, "eot", None) is not None else tok.encode("\n")
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([start], dtype=torch.long, device=device)
    model.eval()
    # The length grows every token: compiled regions would recompile for each; sampling is not the hot path.
    with torch.compiler.set_stance("force_eager"), autocast:
        out = model.generate(idx, max_new_tokens, temperature=1.0, top_k=50, generator=gen)
    model.train()
    return tok.decode(out[0, len(start):].tolist())
