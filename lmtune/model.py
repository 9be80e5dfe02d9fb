"""GPT-2-style decoder (Radford et al. 2019), after nanoGPT's model.py, with the modern-minimal axes of phase 1.

The defaults are GPT-2 (learned positions, LayerNorm, GELU MLP, multi-head attention), bit for bit. The other axes,
each a config key documented with its paper (lmtune.config.ModelConfig): RoPE, ALiBi or no positions
(``model.position``), grouped-query attention (``model.n_kv_head``), RMSNorm (``model.norm``), SwiGLU
(``model.mlp``), query/key normalization (``model.qk_norm``); ``model.preset=llama`` names Llama's combination.

Plain math only: torch.compile and activation checkpointing are applied from outside by
:mod:`lmtune.training.parallelize` (torchtitan's split), so this file reads top to bottom as the model.
Parameter names follow GPT-2 (``transformer.wte``, ``transformer.h.{i}.attn.c_attn``, ``lm_head``).
Shapes: B batch, T sequence, C = n_embd, nh = n_head, hs = C // nh, V vocabulary.

``model.parametrization="mup"`` (Yang et al. 2021, "Tensor Programs V"; the ``mup`` package's conventions for
GPT-2) changes four things, each marked "μP" below, with m = ``cfg.width_mult`` = n_embd / base_width: the
attention scale (:class:`CausalSelfAttention`), the hidden matrices' init (:meth:`GPT._init_std`), the LM
head's input multiplier (:meth:`GPT.logits_and_loss`) and the per-group learning rates
(:meth:`GPT.optim_groups`). Under ``"sp"`` none of them runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from lmtune.config import ConfigError, ModelConfig

HIDDEN = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""μP's hidden (matrix-like) weights, by name suffix: both of their dimensions grow with width (under every variant:
GQA's narrower key/value part and SwiGLU's fused gate|up grow with it too). Every other parameter (embeddings, the
LM head, biases, norm gains, q/k-norm gains) is vector-like: one dimension grows."""


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """``model.norm`` over the last ``dim`` features: LayerNorm (GPT-2) or RMSNorm (Zhang & Sennrich 2019)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cos_sin(block_size: int, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, hs) of RoPE (Su et al. 2021) in the rotate-half layout transformers' Llama uses:
    dimension i and i + hs/2 form pair i, rotated by position·theta^(-2i/hs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by its positions: x·cos + rotate_half(x)·sin, rotate_half(a, b) = (-b, a)."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al. 2022, section 3 and their reference code): for n a power of two the
    geometric sequence 2^(-8/n), 2^(-16/n), …, 2^(-8); otherwise the n' = 2^floor(log2 n) slopes, then every other
    slope of the 2n' sequence until there are n."""
    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = powers(closest) + powers(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hs, kv = cfg.head_size, cfg.kv_heads
        # q of every head, then k and v of the key/value heads, in one matmul (3·n_embd wide for multi-head attention)
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * kv) * hs, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # residual projection (scaled init)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_kv_head, self.dropout, self.attention = cfg.n_head, kv, cfg.dropout, cfg.attention
        self.position, self.qk_norm = cfg.position, cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, hs), make_norm(cfg, hs)
        # Non-persistent buffers (as the mask below): rebuilt from the config, never in a state_dict.
        if cfg.position == "rope":
            cos, sin = rope_cos_sin(cfg.block_size, hs, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_head), persistent=False)
        # None: 1/sqrt(hs), GPT-2's (and SDPA's default). μP: sqrt(hs0)/hs, hs0 = the base width's head size
        # (n_head fixed across widths): 1/hs up to a width-independent constant, 1/sqrt(hs) at m = 1. After
        # training q and k are correlated, so q·k grows like hs, not sqrt(hs) (Yang et al. 2021, section 4).
        self.scale: float | None = None
        if cfg.parametrization == "mup":
            hs, hs0 = cfg.n_embd // cfg.n_head, (cfg.base_width or cfg.n_embd) / cfg.n_head
            self.scale = math.sqrt(hs0) / hs
        if cfg.attention == "manual":
            # Non-persistent: sdpa and manual models have the same state_dict keys, and it is rebuilt, not loaded.
            mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
            self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """RoPE on queries and keys (never values: the scores then depend on relative positions only)."""
        if self.position != "rope":
            return q, k, v
        T = q.size(2)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """GQA: (B, nkv, T, hs) → (B, nh, T, hs), query head h reading key/value head h // (nh/nkv), as transformers'
        repeat_kv (each key/value head serves a run of consecutive query heads)."""
        if self.n_kv_head == self.n_head:
            return x
        return x.repeat_interleave(self.n_head // self.n_kv_head, dim=1)

    def alibi(self, T: int) -> torch.Tensor:
        """ALiBi's biases (1, nh, T, T): -slope_h·(i - j) for key j at or before query i (Press et al. 2022, eq. 1)."""
        pos = torch.arange(T, device=self.alibi_slopes.device)
        distance = (pos[:, None] - pos[None, :]).clamp(min=0).float()  # (T, T)
        return (-self.alibi_slopes[:, None, None] * distance).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        hs, kv = C // self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([C, kv * hs, kv * hs], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, kv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, kv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.rotate(q, k, v)
        k, v = self.repeat_kv(k), self.repeat_kv(v)  # (B, nh, T, hs)
        bias = self.alibi(T).to(q.dtype) if self.position == "alibi" else None
        if self.attention == "sdpa":
            # Fused kernel (flash / memory-efficient on CUDA): never materializes the (T, T) matrix without ALiBi.
            dropout_p = self.dropout if self.training else 0.0
            if bias is not None:  # ALiBi's biases and the causal mask as one additive mask
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                bias = bias.masked_fill(~causal, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=bias is None,
                                               scale=self.scale)  # (B, nh, T, hs)
        else:
            # softmax(q k^T / sqrt(hs)) v with future positions masked (Vaswani et al. 2017, eq. 1).
            scale = 1.0 / math.sqrt(k.size(-1)) if self.scale is None else self.scale
            att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
            if bias is not None:
                att = att + bias
            att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
            # Softmax in fp32 as the fused kernels do; CPU autocast would otherwise run it in bf16.
            att = F.softmax(att.float(), dim=-1).to(v.dtype)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU: c_proj(gelu(c_fc(x))), 4x expansion (Vaswani et al. 2017). SwiGLU (Shazeer 2020): c_fc computes the
    gate and the up projection side by side (one matmul), c_proj(silu(gate) * up)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden, self.swiglu = cfg.mlp_hidden, cfg.mlp == "swiglu"
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * hidden, bias=cfg.bias)
        self.gelu = nn.GELU()  # exact erf GELU (Hendrycks & Gimpel 2016); GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)  # residual projection (scaled init)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden) or, SwiGLU, (B, T, 2·hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(self.gelu(h)))  # (B, T, C) out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        self.pre_norm = cfg.norm_placement == "pre"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block on the residual stream x (B, T, C).

        pre-LN (GPT-2; Xiong et al. 2020): the residual path is never normalized, so gradients reach
        early layers undamped and training is stable without warmup.

            x --+-------------------(+)--+------------------(+)--> out
                |                    ^   |                   ^
                +--> ln_1 --> attn --+   +--> ln_2 --> mlp --+

        post-LN (Vaswani et al. 2017): every sum is normalized, so the residual stream itself passes
        through each LayerNorm; needs warmup (Xiong et al. 2020, section 3).

            x --+-----------(+)--> ln_1 --+----------(+)--> ln_2 --> out
                |            ^            |           ^
                +--> attn ---+            +--> mlp ---+
        """
        if self.pre_norm:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"model.n_embd={cfg.n_embd} must be divisible by model.n_head={cfg.n_head}.")
        if cfg.vocab_size and cfg.vocab_size < vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.vocab_size} is below the tokenizer's {vocab_size} ids; "
                              f"accepted: 0 (the tokenizer's) or at least {vocab_size}.")
        # vocab_size: the tokenizer's ids; padded_vocab: rows of the embedding (nanoGPT pads GPT-2's 50257 to
        # 50304, a multiple of 64, for faster matmuls). Padded rows are never targets and never sampled.
        self.cfg, self.vocab_size = cfg, vocab_size
        self.padded_vocab = cfg.vocab_size or vocab_size
        modules = dict(wte=nn.Embedding(self.padded_vocab, cfg.n_embd))
        if cfg.position == "learned":
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned positions (Radford et al. 2018)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=make_norm(cfg, cfg.n_embd) if cfg.final_norm else nn.Identity(),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, self.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            # One matrix embeds tokens and scores them (Press & Wolf 2017); saves V*C parameters.
            self.transformer.wte.weight = self.lm_head.weight
        hidden = {id(p) for name, p in self.named_parameters() if name.endswith(HIDDEN)}
        self.apply(lambda module: self._init_weights(module, hidden))
        # GPT-2 (Radford et al. 2019, section 2.3): each of the 2*n_layer residual branches adds to the
        # stream's variance, so the projections that write into it start at std 0.02/sqrt(2*n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=self._init_std(0.02 / math.sqrt(2 * cfg.n_layer), hidden=True))

    def _init_std(self, std: float, hidden: bool) -> float:
        """GPT-2's ``std``; μP: a hidden matrix's divided by sqrt(m), so that its variance goes as 1/fan_in
        (Yang et al. 2021, Table 8; mup.init.normal_) and it is GPT-2's at the base width."""
        if self.cfg.parametrization == "mup" and hidden:
            return std / math.sqrt(self.cfg.width_mult)
        return std

    def _init_weights(self, module: nn.Module, hidden: set[int]) -> None:
        # GPT-2 / nanoGPT: N(0, 0.02) for every matrix and embedding, zero biases; LayerNorm stays (1, 0).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self._init_std(0.02, id(module.weight) in hidden))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), the mean cross-entropy."""
        B, T = idx.size()
        if T > self.cfg.block_size:
            raise ConfigError(f"a sequence of {T} tokens is longer than model.block_size={self.cfg.block_size}.")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # rope and alibi act inside attention, none never
            x = x + self.transformer.wpe(torch.arange(T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        return self.logits_and_loss(x, targets)

    def logits_and_loss(self, x: torch.Tensor, targets: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final norm, LM head and loss: x (B, T, C) -> logits (B, T, V) and the mean cross-entropy over the
        targets (B, T) that are not -100 (F.cross_entropy's ignore_index: how the trainer leaves a sequence
        out without changing the batch's shape)."""
        x = self.transformer.ln_f(x)
        if self.cfg.parametrization == "mup":
            # μP readout (mup's MuReadout / MuSharedReadout, output_mult 1): x·W^T/m, W at width-independent std.
            x = x * (1.0 / self.cfg.width_mult)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:  # autocast runs cross_entropy in fp32 on CPU and CUDA
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (shared tensors once). non_embedding drops the position embedding and, when untied,
        the token embedding: the N of Kaplan et al. 2020. A tied wte counts as lm_head, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def optim_groups(self, weight_decay: float, optimizer: str = "adamw") -> list[dict]:
        """Optimizer parameter groups: weight decay on matrices and embeddings (dim >= 2), none on biases and
        LayerNorm weights (nanoGPT's configure_optimizers; decaying gains and offsets only shrinks them).

        μP splits them further by learning-rate multiplier, ``lr_mult`` in each group (the optimizer's lr times
        it is the group's lr; :func:`lmtune.training.optim.build_optimizer` and the trainer's schedule apply
        it), as mup's MuAdam / MuSGD do (Yang et al. 2021, Tables 3 and 8): for ``adam``/``adamw`` hidden
        matrices 1/m, the rest 1; for ``sgd`` hidden matrices 1 (fan_in and fan_out grow together), the rest m
        (the tied embedding counts as an input weight, as MuSharedReadout; an untied LM head is vector-like
        too, its 1/m being in the forward). A group's weight decay is divided by its multiplier (mup: lr times
        decay stays width-independent). Under sp: the two groups above, no ``lr_mult``.
        """
        if self.cfg.parametrization != "mup":
            params = [p for p in self.parameters() if p.requires_grad]
            return [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        m = self.cfg.width_mult
        hidden_mult, vector_mult = (1.0, m) if optimizer == "sgd" else (1.0 / m, 1.0)

        def group(params: list, lr_mult: float, decay: bool = True) -> dict:
            return {"params": params, "lr_mult": lr_mult, "weight_decay": weight_decay / lr_mult if decay else 0.0}

        groups = [
            group([p for n, p in named if n.endswith(HIDDEN)], hidden_mult),
            group([p for n, p in named if p.dim() >= 2 and not n.endswith(HIDDEN)], vector_mult),
            group([p for _, p in named if p.dim() < 2], vector_mult, decay=False),
        ]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        The context is cropped to the last block_size tokens; temperature 0 is greedy; top_k keeps the k most
        likely tokens. Runs without dropout and restores the previous train/eval mode.
        """
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits, _ = self.forward(idx[:, -self.cfg.block_size:])
                logits = logits[:, -1, : self.vocab_size].float()  # (B, V), padded rows left out
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
                idx = torch.cat((idx, nxt), dim=1)
        finally:
            self.train(was_training)
        return idx
