"""lmtune's GPT as a Hugging Face transformers model: the combinations a transformers class represents, the config
and the weights of that class, written as a model directory that ``AutoModelForCausalLM.from_pretrained`` loads.

Two classes represent lmtune's combinations exactly (same function, so the same logits up to float rounding):

* ``GPT2LMHeadModel``: learned positions, LayerNorm, GELU MLP, multi-head attention (GPT-2, lmtune's default). GPT-2
  keeps its linear weights as ``Conv1D`` (in × out), so each matrix is transposed; lmtune's exact-erf GELU is
  ``activation_function="gelu"``; a model without biases gets zero ones.
* ``LlamaForCausalLM``: RoPE (the rotate-half layout lmtune uses), RMSNorm, SwiGLU, any number of key/value heads
  (``model.preset=llama``); c_attn splits into q/k/v_proj and c_fc into gate/up_proj.

Both need pre-norm blocks with a final norm, no q/k-norm, and the standard parametrization (μP's attention scale and
readout multiplier have no transformers equivalent unless its width multiplier is 1). Anything else is refused in
one line naming what each class represents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmtune.config import ConfigError, ModelConfig

CLASSES = {
    "GPT2LMHeadModel": "model.position=learned, norm=layernorm, mlp=gelu, n_kv_head=0 (lmtune's GPT-2 default)",
    "LlamaForCausalLM": "model.position=rope, norm=rmsnorm, mlp=swiglu, any n_kv_head (model.preset=llama)",
}


def hf_class(m: ModelConfig) -> str:
    """The transformers class that represents ``m``; ConfigError (one line) when none does."""
    common = [(m.norm_placement == "pre", f"norm_placement={m.norm_placement}"),
              (m.final_norm, "final_norm=false"), (not m.qk_norm, "qk_norm=true"),
              (m.width_mult == 1.0, f"parametrization=mup at width multiplier {m.width_mult:g}")]
    if m.position == "learned" and m.norm == "layernorm" and m.mlp == "gelu" and m.kv_heads == m.n_head:
        name = "GPT2LMHeadModel"
    elif m.position == "rope" and m.norm == "rmsnorm" and m.mlp == "swiglu":
        name = "LlamaForCausalLM"
    else:
        name, common = None, [(False, f"position={m.position}, norm={m.norm}, mlp={m.mlp}, "
                                      f"n_kv_head={m.n_kv_head}")]
    unsupported = [why for ok, why in common if not ok]
    if unsupported or name is None:
        offered = "; ".join(f"{k}: {v}" for k, v in CLASSES.items())
        raise ConfigError(f"no transformers class represents this model ({', '.join(unsupported)}); "
                          f"exportable: {offered}, each pre-norm with a final norm, no qk_norm, parametrization=sp.")
    return name


def hf_config(m: ModelConfig, vocab_rows: int) -> Any:
    import transformers

    if hf_class(m) == "GPT2LMHeadModel":
        return transformers.GPT2Config(
            vocab_size=vocab_rows, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
            n_inner=m.mlp_hidden, activation_function="gelu", layer_norm_epsilon=m.norm_eps, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=m.tie_embeddings, bos_token_id=50256,
            eos_token_id=50256)
    return transformers.LlamaConfig(
        vocab_size=vocab_rows, hidden_size=m.n_embd, intermediate_size=m.mlp_hidden, num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads, head_dim=m.head_size, hidden_act="silu",
        max_position_embeddings=m.block_size, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        attention_bias=m.bias, mlp_bias=m.bias, tie_word_embeddings=m.tie_embeddings, bos_token_id=50256,
        eos_token_id=50256)


def hf_state_dict(m: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmtune's state_dict in the names and layouts of :func:`hf_class`'s class."""
    out: dict[str, torch.Tensor] = {}
    C, hs, kv, h = m.n_embd, m.head_size, m.kv_heads, m.mlp_hidden
    if hf_class(m) == "GPT2LMHeadModel":
        zeros = lambda n: torch.zeros(n, dtype=sd["transformer.wte.weight"].dtype)  # noqa: E731 — bias=false
        out["transformer.wte.weight"] = sd["transformer.wte.weight"]
        out["transformer.wpe.weight"] = sd["transformer.wpe.weight"]
        for i in range(m.n_layer):
            src, dst = f"transformer.h.{i}.", f"transformer.h.{i}."
            for name, width in (("ln_1", C), ("ln_2", C)):
                out[f"{dst}{name}.weight"] = sd[f"{src}{name}.weight"]
                out[f"{dst}{name}.bias"] = sd.get(f"{src}{name}.bias", zeros(width))
            for name, width in (("attn.c_attn", 3 * C), ("attn.c_proj", C), ("mlp.c_fc", h), ("mlp.c_proj", C)):
                out[f"{dst}{name}.weight"] = sd[f"{src}{name}.weight"].t().contiguous()  # Conv1D: (in, out)
                out[f"{dst}{name}.bias"] = sd.get(f"{src}{name}.bias", zeros(width))
        out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
        out["transformer.ln_f.bias"] = sd.get("transformer.ln_f.bias", zeros(C))
        out["lm_head.weight"] = sd["lm_head.weight"]
        return out
    out["model.embed_tokens.weight"] = sd["transformer.wte.weight"]
    for i in range(m.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias") if m.bias else ("weight",):
            q, k, v = sd[f"{src}attn.c_attn.{suffix}"].split([C, kv * hs, kv * hs])
            gate, up = sd[f"{src}mlp.c_fc.{suffix}"].split([h, h])
            out.update({f"{dst}self_attn.q_proj.{suffix}": q, f"{dst}self_attn.k_proj.{suffix}": k,
                        f"{dst}self_attn.v_proj.{suffix}": v, f"{dst}mlp.gate_proj.{suffix}": gate,
                        f"{dst}mlp.up_proj.{suffix}": up,
                        f"{dst}self_attn.o_proj.{suffix}": sd[f"{src}attn.c_proj.{suffix}"],
                        f"{dst}mlp.down_proj.{suffix}": sd[f"{src}mlp.c_proj.{suffix}"]})
        out[f"{dst}input_layernorm.weight"] = sd[f"{src}ln_1.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = sd[f"{src}ln_2.weight"]
    out["model.norm.weight"] = sd["transformer.ln_f.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def export(m: ModelConfig, state_dict: dict[str, torch.Tensor], vocab_rows: int, tokenizer: str, to: Path) -> str:
    """Write the transformers model directory ``to`` (config.json, model.safetensors and, for GPT-2 tokens, the
    tokenizer's files); returns the class name."""
    import transformers

    name = hf_class(m)
    config = hf_config(m, vocab_rows)
    model = getattr(transformers, name)(config)
    weights = hf_state_dict(m, state_dict)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (m.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a mapping bug, never bad input
        raise RuntimeError(f"weights that do not map onto {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(to)
    if tokenizer == "gpt2":
        from lmtune.data.tokenizers import gpt2_files

        files = gpt2_files()
        vocab = json.loads((files / "encoder.json").read_text())
        merges = [tuple(line.split()) for line in (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
                  if line.strip()]  # the first line is "#version: 0.2"
        transformers.GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(to)
    (to / "lmtune.json").write_text(json.dumps({"model": {k: getattr(m, k) for k in m.__dataclass_fields__},
                                                "class": name, "tokenizer": tokenizer}, indent=1, default=str))
    return name
