"""Model and parallelize parity tests: real forward/backward passes of a tiny GPT on CPU, fp32.

The compile tests share one module-scoped fixture (two inductor compiles, ~10-30 s each on a loaded
2-core CPU); they skip only when inductor finds no C++ compiler.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch._functorch.config
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from lmtune.config import ConfigError, ModelConfig, TrainConfig
from lmtune.device import accelerators
from lmtune.device.accelerators import has_cpp_compiler
from lmtune.model import GPT
from lmtune.training.parallelize import apply_ac, apply_compile, checkpointed_blocks, parallelize

VOCAB = 64
needs_cxx = pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on CPU needs a C++ compiler")


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0), **kw})


def eager(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(compile=False, ac_budget=1.0), **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (4, 17), generator=g)
    return data[:, :-1], data[:, 1:]  # (B, T) inputs and next-token targets


def make(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg, VOCAB)


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def assert_all_close(a: list[torch.Tensor], b: list[torch.Tensor], **tol) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, **tol, msg=lambda m: f"tensor {i}: {m}")


def train_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW(model.optim_groups(0.1) if isinstance(model, GPT) else model.parameters(), lr=lr)
    out = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("norm_placement", ["pre", "post"])
def test_sdpa_and_manual_attention_agree(batch, norm_placement):
    x, y = batch
    sdpa = make(tiny(attention="sdpa", norm_placement=norm_placement))
    manual = make(tiny(attention="manual", norm_placement=norm_placement), seed=123)
    manual.load_state_dict(sdpa.state_dict())  # same keys: the causal-mask buffer is not persistent
    (ls, lo_s), (lm, lo_m) = sdpa(x, y), manual(x, y)
    torch.testing.assert_close(lm, ls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lo_m, lo_s, atol=1e-6, rtol=1e-6)
    lo_s.backward()
    lo_m.backward()
    assert_all_close(grads(manual), grads(sdpa), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_dropout_only_in_training(batch, attention):
    x, _ = batch
    model = make(tiny(attention=attention, dropout=0.3))
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0], atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(x)[0], model(x)[0])


def test_pre_and_post_norm_differ_and_both_train(batch):
    x, y = batch
    pre, post = make(tiny(norm_placement="pre")), make(tiny(norm_placement="post"))
    assert all(torch.equal(a, b) for a, b in zip(pre.state_dict().values(), post.state_dict().values()))
    assert not torch.allclose(pre(x)[0], post(x)[0], atol=1e-3)  # same weights, different function
    for model in (pre, post):
        losses = train_losses(model, x, y, steps=30, lr=3e-3)
        assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)  # near-uniform at init
        assert losses[-1] < 0.6 * losses[0], losses


def test_tied_embeddings_are_one_tensor(batch):
    x, y = batch
    tied, untied = make(tiny(tie_embeddings=True)), make(tiny(tie_embeddings=False))
    assert tied.transformer.wte.weight is tied.lm_head.weight
    assert untied.transformer.wte.weight is not untied.lm_head.weight
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == VOCAB * 32
    # a training step and a state_dict round trip keep the tie (loading copies into the shared tensor)
    train_losses(tied, x, y, steps=1)
    tied.load_state_dict(make(tiny(tie_embeddings=True), seed=5).state_dict())
    assert tied.transformer.wte.weight.data_ptr() == tied.lm_head.weight.data_ptr()
    assert tied.transformer.wte.weight.grad is tied.lm_head.weight.grad


def test_num_params_non_embedding():
    tied, untied = make(tiny(tie_embeddings=True)), make(tiny(tie_embeddings=False))
    wpe, wte = 16 * 32, VOCAB * 32
    assert tied.num_params(non_embedding=False) - tied.num_params() == wpe
    assert untied.num_params(non_embedding=False) - untied.num_params() == wpe + wte
    assert untied.num_params() == tied.num_params()  # N counts the head once, as lm_head


def test_gpt2_init_scales_residual_projections():
    n_layer = 8
    model = make(tiny(n_layer=n_layer, n_embd=64))
    scaled = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(scaled, rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith(".bias") and "ln_" not in name:
            assert torch.all(p == 0), name
    assert torch.all(model.transformer.h[0].ln_1.weight == 1)


def test_optim_groups_split_matrices_from_biases_and_norms():
    model = make(tiny(final_norm=True))
    decay, no_decay = model.optim_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 2)[-2] for p in no_decay["params"]} >= {"ln_1", "ln_2", "ln_f", "c_attn"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_final_norm_off_is_identity():
    model = make(tiny(final_norm=False))
    assert isinstance(model.transformer.ln_f, torch.nn.Identity)
    assert not any("ln_f" in k for k in model.state_dict())


def test_generate_shape_crop_and_top_k():
    model = make(tiny())
    model.train()
    prompt = torch.randint(0, VOCAB, (2, 16))  # already block_size long: every step crops
    out = model.generate(prompt, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 21) and torch.equal(out[:, :16], prompt)
    assert model.training  # mode restored
    greedy = model.generate(prompt[:, :3], 6, temperature=0.0)
    top1 = model.generate(prompt[:, :3], 6, top_k=1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(greedy, top1)
    # every sampled token lies in the top-k of the distribution it was drawn from
    k = 3
    out = model.generate(prompt[:, :3], 8, temperature=2.0, top_k=k, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    allowed = torch.topk(logits[:, 2:], k).indices  # (B, 8, k): positions that predicted new tokens
    assert (allowed == out[:, 3:, None]).any(-1).all()


def test_sequence_longer_than_block_size_is_a_config_error():
    model = make(tiny())
    with pytest.raises(ConfigError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_n_head_must_divide_n_embd():
    with pytest.raises(ConfigError, match="divisible"):
        GPT(tiny(n_head=5), VOCAB)


# ----------------------------------------------------------------------- eager activation checkpointing


def test_checkpointed_blocks_are_evenly_spread():
    assert checkpointed_blocks(12, 1.0) == []
    assert checkpointed_blocks(12, 0.75) == [2, 6, 10]
    assert checkpointed_blocks(12, 0.0) == list(range(12))
    assert checkpointed_blocks(2, 0.75) == [1]  # round half up: 0.5 block -> 1
    assert checkpointed_blocks(2, 0.8) == []


def saved_numel(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Loss and the number of elements autograd keeps for backward (checkpointed regions keep only inputs)."""
    n = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal n
        n += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    return loss, n


@pytest.mark.parametrize("ac_budget", [0.5, 0.0])
def test_eager_ac_gives_same_gradients_with_dropout(batch, ac_budget):
    x, y = batch
    cfg = tiny(n_layer=4, dropout=0.2)  # dropout: recomputation must redraw the same masks
    ref, ac = make(cfg), make(cfg)
    apply_ac(ac, eager(ac_budget=ac_budget))
    wrapped = [i for i, b in enumerate(ac.transformer.h) if isinstance(b, CheckpointWrapper)]
    assert wrapped == checkpointed_blocks(4, ac_budget) and len(wrapped) == round((1 - ac_budget) * 4)
    torch.manual_seed(42)
    loss_ref, n_ref = saved_numel(ref, x, y)
    torch.manual_seed(42)
    loss_ac, n_ac = saved_numel(ac, x, y)
    assert n_ac < n_ref  # activations of wrapped blocks are really dropped
    torch.testing.assert_close(loss_ac, loss_ref, atol=0, rtol=0)
    loss_ref.backward()
    loss_ac.backward()
    assert_all_close(grads(ac), grads(ref), atol=1e-6, rtol=1e-5)


def test_bf16_autocast_attention_and_eager_ac(batch):
    """The locked default dtype: both kernels agree to bf16 precision, the loss is fp32, and recomputation
    under autocast reproduces the bf16 forward exactly."""
    x, y = batch
    losses, all_grads = {}, {}
    for name, attention, ac_budget in [("sdpa", "sdpa", 1.0), ("manual", "manual", 1.0), ("sdpa_ac", "sdpa", 0.0)]:
        model = make(tiny(attention=attention, n_layer=3))
        apply_ac(model, eager(ac_budget=ac_budget))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        assert loss.dtype == torch.float32
        loss.backward()
        losses[name], all_grads[name] = loss.detach(), grads(model)
    torch.testing.assert_close(losses["manual"], losses["sdpa"], atol=2e-2, rtol=0)
    torch.testing.assert_close(losses["sdpa_ac"], losses["sdpa"], atol=0, rtol=0)
    assert_all_close(all_grads["sdpa_ac"], all_grads["sdpa"], atol=1e-6, rtol=1e-5)


def test_eager_ac_keeps_state_dict_keys_and_loads_both_ways(batch):
    x, _ = batch
    plain, ac = make(tiny()), make(tiny(), seed=9)
    parallelize(ac, eager(ac_budget=0.0))
    assert all(isinstance(b, CheckpointWrapper) for b in ac.transformer.h)
    assert list(ac.state_dict()) == list(plain.state_dict())
    ac.load_state_dict(plain.state_dict())  # strict
    torch.testing.assert_close(ac(x)[0], plain(x)[0])
    fresh = make(tiny(), seed=3)
    fresh.load_state_dict(ac.state_dict())
    torch.testing.assert_close(fresh(x)[0], plain(x)[0])


def test_budget_one_without_compile_changes_nothing():
    model = make(tiny())
    assert parallelize(model, eager(ac_budget=1.0)) is model
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())


def test_compile_without_cpp_compiler_is_a_config_error(monkeypatch):

    monkeypatch.setattr(accelerators, "has_cpp_compiler", lambda: False)
    with pytest.raises(ConfigError, match="train.compile"):
        apply_compile(make(tiny()), TrainConfig(compile=True))


# ----------------------------------------------------------------------------------------- compile


def compiled_saved_numel(loss: torch.Tensor) -> int:
    """Elements saved for backward by the compiled graph(s) behind ``loss``."""
    total, seen, stack = 0, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CompiledFunctionBackward":
            total += sum(t.numel() for t in node.saved_tensors)
        stack.extend(f for f, _ in node.next_functions)
    return total


@pytest.fixture(scope="module")
def compiled_runs():
    """Eager and compiled (ac_budget 1.0 and 0.0) runs of the same tiny model: first-step gradients, saved
    elements, and the losses of 3 AdamW steps. Two inductor compiles in all."""
    data = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    x, y = data[:, :-1], data[:, 1:]
    runs = {}
    try:
        for name, train in [("eager", eager()), ("budget1", TrainConfig(compile=True, ac_budget=1.0)),
                            ("budget0", TrainConfig(compile=True, ac_budget=0.0))]:
            torch._dynamo.reset()
            model = parallelize(make(tiny()), train)
            _, loss = model(x, y)
            saved = compiled_saved_numel(loss)
            loss.backward()
            first_grads = grads(model)
            model.zero_grad(set_to_none=True)
            runs[name] = dict(model=model, grads=first_grads, saved=saved, losses=train_losses(model, x, y, steps=3))
    finally:
        torch._functorch.config.activation_memory_budget = 1.0  # process-global: don't leak into other tests
        torch._dynamo.reset()
    return runs


@needs_cxx
def test_compiled_matches_eager_training(compiled_runs):
    eager_losses, compiled_losses = compiled_runs["eager"]["losses"], compiled_runs["budget1"]["losses"]
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert compiled_losses[-1] < compiled_losses[0]
    assert_all_close(compiled_runs["budget1"]["grads"], compiled_runs["eager"]["grads"], atol=1e-5, rtol=1e-4)


@needs_cxx
def test_compiled_ac_budget_recomputes_and_keeps_gradients(compiled_runs):
    full, low = compiled_runs["budget1"], compiled_runs["budget0"]
    assert 0 < low["saved"] < 0.5 * full["saved"], (low["saved"], full["saved"])  # the partitioner recomputes
    assert_all_close(low["grads"], full["grads"], atol=1e-5, rtol=1e-4)
    assert_all_close(low["grads"], compiled_runs["eager"]["grads"], atol=1e-5, rtol=1e-4)
    assert low["losses"] == pytest.approx(full["losses"], abs=1e-4)


@needs_cxx
def test_compiled_model_is_the_same_module(compiled_runs):
    model, plain = compiled_runs["budget1"]["model"], make(tiny())
    assert isinstance(model, GPT)
    assert list(model.state_dict()) == list(plain.state_dict())  # no _orig_mod. prefix
    plain.load_state_dict(model.state_dict())
