"""Phase-1 architecture axes: known answers for each (RoPE, ALiBi, GQA, RMSNorm, SwiGLU, QK-norm, the llama preset),
each check run on lmtune's code and, parametrized, on a deliberately broken variant it must catch; every combination
trains, samples and agrees between SDPA and the manual path; parameter counts and FLOPs by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lmtune import config as config_lib
from lmtune.config import ModelConfig
from lmtune.model import GPT, MLP, CausalSelfAttention, alibi_slopes, apply_rope, make_norm, rope_cos_sin

C, NH, T = 32, 4, 16


def model_cfg(**kw) -> ModelConfig:
    cfg = config_lib.load(overrides=[f"model.{k}={v}" for k, v in {"n_layer": 2, "n_head": NH, "n_embd": C,
                                                                   "block_size": 32, **kw}.items()]
                          + ["data.seq_len=16"], locked=False)
    return cfg.model


def attention(seed: int = 0, **kw) -> CausalSelfAttention:
    torch.manual_seed(seed)
    module = CausalSelfAttention(model_cfg(**kw))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module.eval()


# --- RoPE: attention depends on relative positions only -------------------------------------------------


def check_rope_is_relative(module: CausalSelfAttention) -> None:
    """Shifting every position by s (RoPE's tables rolled by s) leaves the attention output unchanged; and RoPE's
    rotation changes it at all (it is not the identity)."""
    x = torch.randn(2, T, C)
    with torch.no_grad():
        before = module(x)
        cos, sin = module.rope_cos.clone(), module.rope_sin.clone()
        module.rope_cos.copy_(torch.roll(cos, -5, dims=0))
        module.rope_sin.copy_(torch.roll(sin, -5, dims=0))
        after = module(x)
        module.rope_cos.copy_(cos)
        module.rope_sin.copy_(sin)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    c, s = rope_cos_sin(8, 8, 10000.0)
    q0, k3 = apply_rope(q, c[:2], s[:2]), apply_rope(k, c[3:5], s[3:5])
    assert not torch.allclose(q0 @ k3.transpose(-1, -2), q @ k.transpose(-1, -2))


def test_rope_scores_depend_on_relative_position_only():
    check_rope_is_relative(attention(position="rope"))
    q, k = torch.randn(8), torch.randn(8)
    c, s = rope_cos_sin(32, 8, 10000.0)
    score = lambda i, j: float(apply_rope(q, c[i], s[i]) @ apply_rope(k, c[j], s[j]))  # noqa: E731
    assert score(7, 3) == pytest.approx(score(20, 16), abs=1e-5) == pytest.approx(score(4, 0), abs=1e-5)


def _rope_on_values(self, q, k, v):
    T_ = q.size(2)
    cos, sin = self.rope_cos[:T_], self.rope_sin[:T_]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), apply_rope(v, cos, sin)


def _rope_on_queries_only(self, q, k, v):
    T_ = q.size(2)
    return apply_rope(q, self.rope_cos[:T_], self.rope_sin[:T_]), k, v


@pytest.mark.parametrize("broken", [_rope_on_values, _rope_on_queries_only], ids=["on-values", "queries-only"])
def test_the_rope_check_catches_rope_in_the_wrong_place(broken, monkeypatch):
    monkeypatch.setattr(CausalSelfAttention, "rotate", broken)
    with pytest.raises(AssertionError):
        check_rope_is_relative(attention(position="rope"))


# --- ALiBi: the paper's slopes and biases ------------------------------------------------------------------


def check_alibi(slopes_of, module: CausalSelfAttention) -> None:
    assert slopes_of(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])  # Press et al. 2022, section 3
    # 12 heads: the 8 of 2^(-8/8·i), then every other one of the 16-head sequence 2^(-0.5·i): 2^-0.5, 2^-1.5, …
    assert slopes_of(12).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)] +
                                                   [2 ** -(0.5 + i) for i in range(4)])
    bias = module.alibi(5)[0]  # (nh, T, T): -m_h·(i - j) at and below the diagonal
    m = slopes_of(NH)
    assert torch.allclose(bias[:, 4, 1], -3 * m) and torch.allclose(bias[:, 2, 2], torch.zeros(NH))


def test_alibi_slopes_and_biases_are_the_papers():
    check_alibi(alibi_slopes, attention(position="alibi"))


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_the_alibi_check_catches_slopes_off_by_a_factor(factor, monkeypatch):
    import lmtune.model as model

    wrong = lambda n: alibi_slopes(n) * factor  # noqa: E731
    monkeypatch.setattr(model, "alibi_slopes", wrong)
    with pytest.raises(AssertionError):
        check_alibi(wrong, attention(position="alibi"))


# --- GQA ---------------------------------------------------------------------------------------------------


def as_mha(gqa: CausalSelfAttention) -> CausalSelfAttention:
    """The multi-head module whose key/value heads are ``gqa``'s, each repeated for its query heads."""
    mha = attention(seed=1)
    hs, kv = C // NH, gqa.n_kv_head
    w, b = gqa.c_attn.weight.data, gqa.c_attn.bias.data
    q, k, v = w.split([C, kv * hs, kv * hs])
    qb, kb, vb = b.split([C, kv * hs, kv * hs])
    rep = lambda t: t.view(kv, hs, *t.shape[1:]).repeat_interleave(NH // kv, dim=0).reshape(NH * hs, *t.shape[1:])  # noqa: E731
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        mha.c_attn.bias.copy_(torch.cat([qb, rep(kb), rep(vb)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
    return mha


def check_gqa(make) -> None:
    x = torch.randn(2, T, C)
    mha, same = attention(), make(n_kv_head=NH)
    same.load_state_dict(mha.state_dict())
    assert torch.allclose(mha(x), same(x))  # n_kv_head = n_head is multi-head attention, weights and all
    for kv in (1, 2):
        gqa = make(n_kv_head=kv)
        assert gqa.c_attn.weight.shape == (C + 2 * kv * C // NH, C)
        assert torch.allclose(gqa(x), as_mha(gqa)(x), atol=1e-5)


def test_gqa_is_mha_with_each_key_value_head_repeated():
    check_gqa(lambda **kw: attention(**kw))


def _tiled(self, x):  # head h reading key/value head h % nkv: the wrong order
    return x if self.n_kv_head == self.n_head else x.repeat(1, self.n_head // self.n_kv_head, 1, 1)


def test_the_gqa_check_catches_heads_repeated_in_the_wrong_order(monkeypatch):
    monkeypatch.setattr(CausalSelfAttention, "repeat_kv", _tiled)
    with pytest.raises(AssertionError):
        check_gqa(lambda **kw: attention(**kw))


# --- RMSNorm, SwiGLU, QK-norm ------------------------------------------------------------------------------


def check_rmsnorm(norm) -> None:
    x = torch.randn(3, 7, C) * 3 + 1
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, C))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight  # Zhang & Sennrich 2019, eq. 4
    assert torch.allclose(norm(x), expected, atol=1e-5)


def test_rmsnorm_is_its_one_line_definition():
    check_rmsnorm(make_norm(model_cfg(norm="rmsnorm"), C))
    assert not hasattr(make_norm(model_cfg(norm="rmsnorm"), C), "bias") or make_norm(model_cfg(norm="rmsnorm"), C).bias is None


def test_the_rmsnorm_check_catches_a_layernorm():
    with pytest.raises(AssertionError):
        check_rmsnorm(torch.nn.LayerNorm(C, bias=False))


def check_swiglu(mlp: MLP) -> None:
    x = torch.randn(2, 5, C)
    hidden = mlp.c_proj.in_features
    assert hidden == 96  # ceil(8·32/3 / 32)·32
    gate, up = mlp.c_fc.weight[:hidden], mlp.c_fc.weight[hidden:]
    z = x @ gate.T
    expected = (z * torch.sigmoid(z) * (x @ up.T)) @ mlp.c_proj.weight.T  # Shazeer 2020, eq. 6: Swish_1(xW) ⊗ xV
    assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_swiglu_is_its_one_line_definition():
    check_swiglu(MLP(model_cfg(mlp="swiglu", bias=False)).eval())
    assert model_cfg(mlp="swiglu", n_embd=768, n_head=12).mlp_hidden == 2048  # Llama's 8/3·4096 rule at 768: 2048


def test_the_swiglu_check_catches_a_gelu_gate(monkeypatch):
    monkeypatch.setattr(F, "silu", F.gelu)
    with pytest.raises(AssertionError):
        check_swiglu(MLP(model_cfg(mlp="swiglu", bias=False)).eval())


def test_qk_norm_bounds_the_attention_logits_whatever_the_scale_of_q_and_k():
    module = attention(qk_norm="true", norm="rmsnorm")
    q = torch.randn(1, NH, T, C // NH) * 100
    assert module.q_norm(q).pow(2).mean(-1).sqrt().max() < 2.0  # unit rms up to the gain (0.3-std init around 0)


# --- the model as a whole ----------------------------------------------------------------------------------

AXES = {"position": ["learned", "rope", "alibi", "none"], "n_kv_head": [0, 2], "norm": ["layernorm", "rmsnorm"],
        "mlp": ["gelu", "swiglu"], "qk_norm": ["false", "true"]}
COMBOS = [dict(zip(AXES, values)) for values in itertools.product(*AXES.values())]


@pytest.mark.parametrize("combo", COMBOS[::3] + [COMBOS[-1]], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_combination_agrees_between_sdpa_and_manual_and_generates(combo):
    x = torch.randint(0, 256, (2, T))
    outs = []
    for attention_kind in ("sdpa", "manual"):
        torch.manual_seed(0)
        model = GPT(model_cfg(**combo, attention=attention_kind), 256).eval()
        outs.append(model(x, x)[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    out = model.generate(x[:1, :4], 40, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 44)  # past block_size 32: the context is cropped, positions start again


def test_parameter_counts_by_hand():
    V, L, hs = 256, 2, C // NH
    ln = 2 * C  # LayerNorm weight and bias
    gpt2 = L * (C * 3 * C + 3 * C + C * C + C + C * 4 * C + 4 * C + 4 * C * C + C + 2 * ln) + ln + V * C + 32 * C
    assert GPT(model_cfg(), V).num_params(non_embedding=False) == gpt2
    h = 96  # swiglu hidden
    kv = 1
    llama_block = C * (C + 2 * kv * hs) + C * C + C * 2 * h + h * C + 2 * C  # no biases, two RMSNorm gains
    llama = GPT(model_cfg(preset="llama", n_kv_head=kv, position="rope", norm="rmsnorm", mlp="swiglu", bias="false"), V)
    assert llama.num_params(non_embedding=False) == L * llama_block + C + V * C  # final norm, tied embedding
    assert llama.num_params() == L * llama_block + C + V * C  # no position table to leave out


def test_flops_per_token_count_each_variants_own_matmuls():
    from lmtune.training.measure import Throughput

    cfg = config_lib.load(overrides=["model.n_layer=2", f"model.n_head={NH}", f"model.n_embd={C}",
                                     "model.block_size=32", "data.seq_len=16", "model.n_kv_head=1",
                                     "model.mlp=swiglu", "model.position=rope"], locked=False)
    model = GPT(cfg.model, 256)
    n = model.num_params()  # the matmuls' weights (and the tied LM head), nothing for rope
    thr = Throughput.of(model, cfg, __import__("lmtune.device", fromlist=["CPUAccelerator"]).CPUAccelerator(), 1)
    assert thr.flops_per_token == 6 * n + 12 * 2 * NH * (C // NH) * 16
    assert n < GPT(model_cfg(), 256).num_params()  # fewer key/value weights than multi-head attention


def test_the_llama_preset_fills_what_was_not_given_and_explicit_keys_win():
    cfg, sources = config_lib.resolve(overrides=["model.preset=llama", "model.n_head=8", "model.norm=layernorm"],
                                      locked=False)
    m = cfg.model
    assert (m.position, m.mlp, m.bias, m.n_kv_head, m.norm) == ("rope", "swiglu", False, 2, "layernorm")
    assert sources["model.position"] == "preset llama" and sources["model.norm"] == "command line"
    assert config_lib.load(overrides=["model.preset=llama", "model.n_head=6", "model.n_embd=384"],
                           locked=False).model.n_kv_head == 0  # 6 heads: no n_head/4, multi-head attention


def test_gpt2_defaults_are_unchanged():
    m = model_cfg()
    assert (m.position, m.norm, m.mlp, m.kv_heads, m.qk_norm, m.preset) == ("learned", "layernorm", "gelu", NH, False,
                                                                            "gpt2")
    sd = GPT(m, 256).state_dict()
    assert "transformer.wpe.weight" in sd and sd["transformer.h.0.attn.c_attn.weight"].shape == (3 * C, C)


@pytest.mark.parametrize("override, says", [
    ("model.position=sinusoidal", r"model.position=sinusoidal is not accepted: expected one of 'learned', 'rope'"),
    ("model.n_kv_head=3", r"model.n_kv_head=3 must divide model.n_head=4"),
    ("model.n_embd=36", r"head size n_embd/n_head = 36/4 = 9 is odd"),
])
def test_bad_architecture_keys_are_one_line_and_exit_2(override, says, capsys, tmp_path):
    import re

    from lmtune.train import main

    extra = ["model.position=rope"] if "n_embd=36" in override else []
    assert main(["model.n_layer=2", f"model.n_head={NH}", f"model.n_embd={C}", "model.block_size=32",
                 "data.seq_len=16", *extra, override, "--no-wandb", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(says, err[0]), err


@pytest.mark.parametrize("combo", [dict(position="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias="false"),
                                   dict(position="alibi", qk_norm="true")], ids=["llama-like", "alibi-qknorm"])
def test_a_variant_trains_with_activation_checkpointing_and_mup(combo):
    from lmtune.train import Trainer
    from tests.conftest import TINY

    base = [o for o in TINY if not o.startswith(("model.n_head", "model.n_embd"))]
    over = [f"model.{k}={v}" for k, v in combo.items()]
    plain = Trainer(config_lib.load(overrides=[*base, "model.n_head=4", "model.n_embd=32", *over, "train.steps=6"],
                                    locked=False)).fit()
    ac = Trainer(config_lib.load(overrides=[*base, "model.n_head=4", "model.n_embd=32", *over, "train.steps=6",
                                            "train.ac_budget=0.0"], locked=False)).fit()
    assert ac["loss"] == pytest.approx(plain["loss"], rel=1e-5)  # recomputation changes memory, not the math
    mup = Trainer(config_lib.load(overrides=[*base, "model.n_head=4", "model.n_embd=32", *over, "train.steps=6",
                                             "model.parametrization=mup", "model.base_width=16"], locked=False)).fit()
    assert mup["status"] == "ok" and math.isfinite(mup["loss"])


@pytest.mark.slow
def test_a_variant_compiled_per_block_trains_as_it_does_eagerly():
    """One combination with every non-GPT-2 axis but RoPE (one compile is costly on 2 cores; ALiBi's additive mask
    through the compiled SDPA is the riskier position path, RoPE's rotation element-wise): GQA, RMSNorm, SwiGLU,
    q/k-norm, under the partitioner's activation budget."""
    combo = dict(position="alibi", n_kv_head=2, norm="rmsnorm", mlp="swiglu", qk_norm="true")
    from lmtune.device.accelerators import has_cpp_compiler
    from lmtune.train import Trainer
    from tests.conftest import TINY

    if not has_cpp_compiler():
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    base = [o for o in TINY if not o.startswith(("model.n_head", "model.n_embd"))]
    over = [*base, "model.n_head=4", "model.n_embd=32", *(f"model.{k}={v}" for k, v in combo.items()),
            "train.steps=4", "train.measure_interval=0"]
    eager = Trainer(config_lib.load(overrides=over, locked=False)).fit()
    compiled = Trainer(config_lib.load(overrides=[*over, "train.compile=true", "train.ac_budget=0.5"],
                                       locked=False)).fit()
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4) and compiled["compiles_after_warmup"] == 0
