"""The configuration's schema: one dataclass per section, and the rules between fields (:func:`validate`).

Every field is documented by the string literal under it (read back by :func:`lmtune.config.describe`),
and every value is validated before any work starts: a bad key, type or range raises :class:`ConfigError`,
which the command-line entry points turn into one message and exit code 2. A single value is checked as it
is set (:mod:`lmtune.config.keys`: ``section.key`` names, :func:`~lmtune.config.keys.coerce`,
:func:`~lmtune.config.keys.apply`), the rules between fields by :func:`validate`.

This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """Bad user input: reported as one line and exit code 2, never as a traceback."""


def _range(*, ge: float | None = None, gt: float | None = None, le: float | None = None) -> dict:
    return {"ge": ge, "gt": gt, "le": le}


@dataclass
class ModelConfig:
    n_layer: int = field(default=12, metadata=_range(ge=1))
    """Number of transformer blocks."""
    n_head: int = field(default=12, metadata=_range(ge=1))
    """Attention heads per block; must divide n_embd."""
    n_embd: int = field(default=768, metadata=_range(ge=1))
    """Residual stream width (d_model)."""
    block_size: int = field(default=1024, metadata=_range(ge=1))
    """Maximum context length (size of the learned position embedding)."""
    norm_placement: Literal["pre", "post"] = "pre"
    """LayerNorm before each sub-layer (pre-LN, GPT-2) or after the residual add (post-LN, Vaswani et al.)."""
    final_norm: bool = True
    """LayerNorm on the residual stream before the LM head (ln_f)."""
    attention: Literal["sdpa", "manual"] = "sdpa"
    """Causal attention kernel: torch's scaled_dot_product_attention, or an explicit masked softmax."""
    dropout: float = field(default=0.0, metadata=_range(ge=0.0, le=1.0))
    """Dropout on embeddings, attention weights and residual branches."""
    bias: bool = True
    """Bias terms in Linear and LayerNorm layers (GPT-2 has them)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head (Press & Wolf 2017)."""
    vocab_size: int = field(default=0, metadata=_range(ge=0))
    """Rows of the embedding and the LM head; 0 = the tokenizer's ids. A larger value pads them (nanoGPT pads
    GPT-2's 50257 to 50304, a multiple of 64) or gives a byte-level model the GPT-2 model's size."""
    parametrization: Literal["sp", "mup"] = "sp"
    """`sp`: GPT-2's standard parametrization, N(0, 0.02) init, one lr for every parameter. `mup`: the Maximal
    Update Parametrization (Yang et al. 2021, "Tensor Programs V"; the `mup` package's conventions), so that the
    hyper-parameters tuned at base_width hold at any n_embd, with width multiplier m = n_embd / base_width:
    hidden matrices (c_attn, both c_proj, c_fc) start at std 0.02/sqrt(m) (residual projections keep their
    1/sqrt(2·n_layer) on top; variance ∝ 1/fan_in, Table 8); the LM head sees its input times 1/m (mup's
    MuReadout/MuSharedReadout; output weights' 1/fan_in² of Table 8); attention logits are q·k·sqrt(d₀)/d for
    head size d and base head size d₀ = base_width/n_head (1/d instead of 1/sqrt(d), section 4; the same as
    GPT-2 at m = 1: this assumes n_head held fixed across widths, so that d grows with n_embd);
    lr per group (mup's MuAdam / MuSGD; Tables 3 and 8): with adam/adamw hidden matrices lr/m and everything
    else (embeddings, the tied or untied LM head, biases, LayerNorm) lr; with sgd hidden matrices lr and
    everything else lr·m. Each group's weight decay is divided by its lr multiplier as mup does (lr·decay is
    width-independent); what is decayed is as under sp. Embeddings, biases and LayerNorm start as under sp;
    the query projection and the readout are not zero-initialized. At m = 1 mup is sp: the same init draws,
    lrs and (to rounding) forward."""
    base_width: int = field(default=0, metadata=_range(ge=0))
    """With parametrization=mup: the n_embd at which the hyper-parameters are tuned (the width multiplier is
    n_embd / base_width); 0 = this model's own n_embd (multiplier 1). Ignored with parametrization=sp, so one
    sweep file can set it for both."""
    position: Literal["learned", "rope", "alibi", "none"] = "learned"
    """How attention knows order: a learned position embedding added to the tokens (GPT-2; Radford et al. 2018),
    rotary embeddings of q and k (RoPE; Su et al. 2021, "RoFormer"), linear biases on the attention logits by distance
    (ALiBi; Press et al. 2022, "Train Short, Test Long"), or nothing but the causal mask (NoPE; Kazemnejad et al. 2023)."""
    rope_theta: float = field(default=10000.0, metadata=_range(gt=0.0))
    """RoPE's base: pair i of a head rotates by position·theta^(-2i/hs) (Su et al. 2021, eq. 15; transformers'
    rope_theta)."""
    n_kv_head: int = field(default=0, metadata=_range(ge=0))
    """Key/value heads: grouped-query attention (GQA; Ainslie et al. 2023) shares each key/value head among
    n_head/n_kv_head query heads; 1 is multi-query attention (Shazeer 2019); 0 = n_head (multi-head attention)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019: x / rms(x) · g, no centring, no bias)."""
    norm_eps: float = field(default=1e-5, metadata=_range(gt=0.0))
    """The norms' epsilon (torch's LayerNorm default; transformers' layer_norm_epsilon / rms_norm_eps)."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """GELU MLP with a 4·n_embd hidden layer (GPT-2), or SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"):
    (silu(x W_gate) * x W_up) W_down with a hidden size of 8·n_embd/3 rounded up to a multiple of 32, the same
    parameter count as the GELU MLP's up to that rounding (LLaMA; Touvron et al. 2023, section 2.2)."""
    qk_norm: bool = False
    """Normalize each head's queries and keys (with model.norm, over the head size) before the dot product
    (Dehghani et al. 2023; OLMo 2): bounded attention logits, a stabler high-lr run."""
    preset: Literal["gpt2", "llama"] = "gpt2"
    """A named architecture that fills the model keys not given explicitly (on the command line or in a config
    file): gpt2 = the defaults above; llama = position=rope, norm=rmsnorm, mlp=swiglu, bias=false, n_kv_head =
    n_head/4 where n_head is a multiple of 4 (GQA, as Llama 3), else n_head."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 4·n_embd (gelu), ceil(8·n_embd/3 / 32)·32 (swiglu)."""
        return 4 * self.n_embd if self.mlp == "gelu" else -(-8 * self.n_embd // 96) * 32  # ceil(8C/3/32)·32

    @property
    def width_mult(self) -> float:
        """μP's width multiplier m = n_embd / base_width; 1.0 under sp or with base_width 0."""
        if self.parametrization != "mup" or not self.base_width:
            return 1.0
        return self.n_embd / self.base_width


@dataclass
class DataConfig:
    dataset: str = "builtin"
    """`builtin` (real English shipped with Python), `files`, or a Hugging Face hub name
    such as `wikitext-2-raw-v1`, `wikitext-103-raw-v1`, `openwebtext`, `fineweb-edu`."""
    files: list[str] = field(default_factory=list)
    """Training text for dataset=files: paths or globs of .txt, .jsonl (a "text" field) or .parquet files."""
    val_files: list[str] = field(default_factory=list)
    """Validation text for dataset=files; when empty, the last val_fraction of the training text."""
    tokenizer: Literal["gpt2", "byte"] = "gpt2"
    """GPT-2 BPE (tiktoken, 50257 ids) or raw UTF-8 bytes (256 ids)."""
    seq_len: int = field(default=1024, metadata=_range(ge=1))
    """Tokens per training sequence; at most model.block_size."""
    fraction: float = field(default=1.0, metadata=_range(gt=0.0, le=1.0))
    """Use only the first fraction of the corpus (the phase-0 study's data_fraction)."""
    val_fraction: float = field(default=0.1, metadata=_range(gt=0.0, le=0.5))
    """Share of the text held out for validation when no validation split exists."""
    cache_dir: str = ""
    """Where tokenized arrays are cached; empty means $LMTUNE_CACHE or ~/.cache/lmtune."""
    prepared: str = ""
    """Token shards prepared once (`python -m lmtune.data prepare DATASET --out DIR`, or llm.c's / modded-nanogpt's
    .bin shards): a directory or an object-store URI (s3://…, copied once per node). Every run reads them memory-mapped
    and never tokenizes; data.dataset, files, fraction and val_fraction are then the prepare's business. `auto`:
    data.dataset is prepared once (into the cache; a sweep's driver prepares it into its storage before any trial)."""
    limit_tokens: int = field(default=0, metadata=_range(ge=0))
    """With data.prepared: train on the first N tokens of the training shards only (a data-constrained study repeats
    epochs over a fixed subset); 0 = all."""
    val_tokens: int = field(default=10_000_000, metadata=_range(ge=1))
    """Validation tokens a prepare holds out at most (from the validation split, or documents held out by hash)."""


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019), Adam (L2 penalty), or SGD with momentum."""
    lr: float = field(default=6e-4, metadata=_range(gt=0.0))
    """Peak learning rate at base_batch_tokens (scaled by lr_scaling to the effective batch)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale lr with effective batch / base_batch_tokens: linear (Goyal et al. 2017) or sqrt (McCandlish et al. 2018)."""
    base_batch_tokens: int = field(default=0, metadata=_range(ge=0))
    """Effective batch (tokens) at which lr was tuned; 0 means the first configured effective batch."""
    warmup_steps: int = field(default=0, metadata=_range(ge=0))
    """Linear warmup from 0 to the peak lr over this many optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: hold the peak lr, or cosine-decay it to min_lr_ratio·lr at the last step."""
    min_lr_ratio: float = field(default=0.1, metadata=_range(ge=0.0, le=1.0))
    """Floor of the cosine schedule as a fraction of the peak lr."""
    weight_decay: float = field(default=0.0, metadata=_range(ge=0.0))
    """Weight decay on matrices (embeddings and Linear weights); biases and norms are never decayed."""
    momentum: float = field(default=0.9, metadata=_range(ge=0.0, le=1.0))
    """SGD momentum."""
    beta1: float = field(default=0.9, metadata=_range(ge=0.0, le=1.0))
    """Adam β1."""
    beta2: float = field(default=0.95, metadata=_range(ge=0.0, le=1.0))
    """Adam β2."""
    micro_batch_size: int = field(default=32, metadata=_range(ge=1))
    """Sequences per forward/backward pass (per worker)."""
    accumulation_steps: int = field(default=1, metadata=_range(ge=1))
    """Micro-batches accumulated per optimizer step; effective batch = micro_batch_size·accumulation_steps·workers."""
    steps: int = field(default=1000, metadata=_range(ge=1))
    """Optimizer steps to run (ignored when epochs is set)."""
    epochs: float = field(default=0.0, metadata=_range(ge=0.0))
    """When > 0, train for this many passes over the training tokens instead of `steps`."""
    flops: float = field(default=0.0, metadata=_range(ge=0.0))
    """When > 0, the run's compute budget in training FLOPs: tokens = flops ÷ the model's FLOPs per token (the trainer's
    count, lmtune.training.measure.flops_per_token), then as train.tokens (an IsoFLOP sweep gives every size the same
    budget); wins over tokens, epochs and steps."""
    tokens: int = field(default=0, metadata=_range(ge=0))
    """When > 0, the run's length in training tokens (all workers): ceil(tokens / tokens per optimizer step) steps,
    over which the lr schedule warms up and decays; wins over epochs and steps (a compute budget's runs: tokens =
    FLOPs ÷ FLOPs per token)."""
    eval_interval: int = field(default=100, metadata=_range(ge=1))
    """Optimizer steps between validation passes (and checkpoints); the last step is always evaluated."""
    eval_batches: int = field(default=20, metadata=_range(ge=1))
    """Micro-batches per validation pass (when eval_sequences is 0)."""
    eval_sequences: int = field(default=0, metadata=_range(ge=0))
    """Validation sequences per pass: the first ones of the validation split, the same text for every
    micro-batch size and worker count (run in micro-batches, the last one padded with ignored targets).
    0 = eval_batches·micro_batch_size·workers, which changes with the micro-batch; a sweep over the
    micro-batch sets it, so that all its trials are scored on the same text."""
    log_interval: int = field(default=10, metadata=_range(ge=1))
    """Optimizer steps between training metric reports (loss, lr, tokens_per_s, grad norms)."""
    measure_interval: int = field(default=50, metadata=_range(ge=0))
    """Optimizer steps between gradient-coherence / noise-scale measurements; 0 turns them off."""
    sample_interval: int = field(default=0, metadata=_range(ge=0))
    """Optimizer steps between generated text samples; 0 means only at the end."""
    grad_clip: float = field(default=1.0, metadata=_range(ge=0.0))
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    seed: int = 1337
    """Seed for parameters, data order and dropout."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Autocast dtype for forward/backward (parameters and optimizer state stay float32)."""
    compile: bool = True
    """Wrap the model in torch.compile."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode."""
    ac_budget: float = field(default=1.0, metadata=_range(ge=0.0, le=1.0))
    """Activation-memory budget (1 = keep every activation, no recomputation), applied in ac_mode: with
    compile ("budget") it is the partitioner's torch._functorch.config.activation_memory_budget for each
    compiled block; without ("blocks") round((1-ac_budget)·n_layer) blocks are checkpointed. A locked value
    measured in one mode is not applied in the other (the run keeps 1.0 and --describe says why)."""
    compile_warmup_steps: int = field(default=3, metadata=_range(ge=0))
    """Leading steps excluded from avg_step_time_ms; peak memory is reset after them."""
    divergence_factor: float = field(default=3.0, metadata=_range(gt=1.0))
    """End the run as diverged when the loss is non-finite or exceeds this multiple of its first value."""
    checkpoint: bool = True
    """Save a checkpoint at every eval (needs an output directory)."""

    @property
    def ac_mode(self) -> Literal["budget", "blocks"]:
        """How ac_budget is applied (lmtune.training.parallelize): the compile partitioner's memory ``budget``, or
        eager checkpointed ``blocks``. Derived from compile; reported with every budget."""
        return "budget" if self.compile else "blocks"


@dataclass
class SystemConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks CUDA when available."""
    memory_limit_gib: float = field(default=0.0, metadata=_range(ge=0.0))
    """Emulate a smaller device (0 = off): CUDA via per-process memory fraction, CPU by ending the probed step whose
    peak of live tensor bytes crosses it as an OOM."""
    threads: int = field(default=0, metadata=_range(ge=0))
    """torch intra-op threads on CPU; 0 leaves torch's default."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every key."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def get(self, key: str) -> Any:
        """The value of ``section.key``; ConfigError for a name that is not one (the message names the keys:
        :func:`lmtune.config.check_key` checks a key on its own)."""
        section, _, name = key.partition(".")
        part = getattr(self, section, None) if section in SECTIONS else None
        if part is None or name not in {f.name for f in dataclasses.fields(part)}:
            raise ConfigError(f"unknown config key '{key}': keys are section.key with sections {', '.join(SECTIONS)} "
                              f"(python -m lmtune.train --describe lists them).")
        return getattr(part, name)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "system": SystemConfig}


def validate(cfg: Config) -> None:
    """Cross-field checks (single fields are checked as they are set)."""
    m, d = cfg.model, cfg.data
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}.")
    if m.n_head % m.kv_heads:
        raise ConfigError(f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head} (each key/value head "
                          f"serves n_head/n_kv_head query heads); accepted: 0 (= n_head) or a divisor of {m.n_head}.")
    if m.position == "rope" and m.head_size % 2:
        raise ConfigError(f"model.position='rope' rotates pairs of a head's dimensions, but the head size "
                          f"n_embd/n_head = {m.n_embd}/{m.n_head} = {m.head_size} is odd; accepted: an even head size.")
    if m.parametrization == "mup" and m.base_width % m.n_head:
        # The base model is this one at n_embd=base_width with the same heads (the attention scale needs its head size).
        raise ConfigError(f"model.base_width={m.base_width} must be divisible by model.n_head={m.n_head} with "
                          f"model.parametrization='mup'; accepted: 0 (this model's n_embd) or a multiple of "
                          f"{m.n_head}.")
    if d.seq_len > m.block_size:
        raise ConfigError(f"data.seq_len={d.seq_len} is above model.block_size={m.block_size}; "
                          f"accepted: data.seq_len <= model.block_size.")
    if d.dataset == "files" and not d.files:
        raise ConfigError("data.dataset='files' needs data.files (paths or globs of .txt/.jsonl/.parquet files).")
    if d.dataset != "files" and (d.files or d.val_files):
        raise ConfigError(f"data.files/data.val_files are only read with data.dataset='files' (got '{d.dataset}').")
