"""μP (model.parametrization="mup"): sp unchanged, mup equal to sp at its base width, the coordinate check of
the mup authors on real text, and the per-group learning rates through the trainer's schedule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmtune import config as config_lib
from lmtune.config import Config, ConfigError, ModelConfig, TrainConfig
from lmtune.data import corpora
from lmtune.model import GPT, HIDDEN
from lmtune.train import Trainer
from lmtune.training.optim import build_optimizer, lr_at, set_lr
from tests.conftest import TINY

VOCAB = 64


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0), **kw})


def make(cfg: ModelConfig, seed: int = 0, vocab: int = VOCAB) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg, vocab)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (4, 17), generator=g)
    return data[:, :-1], data[:, 1:]


def config(model: ModelConfig, **train) -> Config:
    return Config(model=model, train=TrainConfig(**train))


def lr_of(opt: torch.optim.Optimizer) -> dict[int, tuple[float, float]]:
    """id(parameter) -> (lr, weight_decay) of its group."""
    return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def by_name(model: GPT, opt: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    by_id = lr_of(opt)
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def groups_without_params(opt: torch.optim.Optimizer) -> list[dict]:
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [id(p) for p in g["params"]]}
            for g in opt.param_groups]


# ------------------------------------------------------------------------------------- sp is unchanged


GOLDEN_SP_LOSS = 4.173721790313721
"""tiny() at seed 0 on the batch fixture, measured on the commit before μP was added (89ced83): the same
init draws and forward give the same loss."""


@pytest.mark.parametrize("base_width", [0, 8, 64])
def test_sp_is_todays_model_whatever_base_width(batch, base_width):
    x, y = batch
    plain = make(tiny())  # never mentions the parametrization
    sp = make(tiny(parametrization="sp", base_width=base_width))
    assert sp.cfg.width_mult == 1.0
    for (n, a), (m, b) in zip(plain.state_dict().items(), sp.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b), n
    (la, loss_a), (lb, loss_b) = plain(x, y), sp(x, y)
    assert torch.equal(la, lb) and torch.equal(loss_a, loss_b)
    assert loss_a.item() == pytest.approx(GOLDEN_SP_LOSS, rel=1e-5)
    for optimizer in ("adamw", "adam", "sgd"):
        a = build_optimizer(plain, config(plain.cfg, optimizer=optimizer, weight_decay=0.1), 1e-3)
        b = build_optimizer(sp, config(sp.cfg, optimizer=optimizer, weight_decay=0.1), 1e-3)
        ga, gb = groups_without_params(a), groups_without_params(b)
        assert [len(g["params"]) for g in ga] == [len(g["params"]) for g in gb]
        for g, h in zip(ga, gb):  # the two groups of nanoGPT, all at the optimizer's lr, no multipliers
            assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
            assert "lr_mult" not in h and h["lr"] == 1e-3
        assert [g["weight_decay"] for g in gb] == [0.1, 0.0]


@pytest.mark.parametrize("tie", [True, False])
def test_mup_at_its_base_width_is_sp(batch, tie):
    """m = 1: the same weights (the same draws), the same lrs, the same forward up to the attention scale's
    rounding (sqrt(hs)/hs against 1/sqrt(hs))."""
    x, y = batch
    sp = make(tiny(tie_embeddings=tie))
    for base_width in (0, 32):
        mup = make(tiny(tie_embeddings=tie, parametrization="mup", base_width=base_width))
        for (n, a), b in zip(sp.state_dict().items(), mup.state_dict().values(), strict=True):
            assert torch.equal(a, b), n
        torch.testing.assert_close(mup(x, y)[0], sp(x, y)[0])
        opt = build_optimizer(mup, config(mup.cfg, weight_decay=0.1), 1e-3)
        assert {g["lr"] for g in opt.param_groups} == {1e-3}
        sp_opt = build_optimizer(sp, config(sp.cfg, weight_decay=0.1), 1e-3)
        assert by_name(mup, opt) == by_name(sp, sp_opt)


def test_mup_sdpa_and_manual_attention_agree(batch):
    x, y = batch
    sdpa = make(tiny(n_embd=64, parametrization="mup", base_width=16))
    manual = make(tiny(n_embd=64, parametrization="mup", base_width=16, attention="manual"), seed=3)
    manual.load_state_dict(sdpa.state_dict())
    assert sdpa.transformer.h[0].attn.scale == pytest.approx((16 / 4) ** 0.5 / (64 / 4))
    torch.testing.assert_close(manual(x, y)[0], sdpa(x, y)[0])


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_mup_attention_scales_logits_by_one_over_head_size(attention):
    """Both kernels compute softmax(q·k·sqrt(hs0)/hs) v (hs = 32 at n_embd 128, hs0 = 8 at base width 32),
    not GPT-2's softmax(q·k/sqrt(hs)) v."""
    model = make(tiny(n_embd=128, parametrization="mup", base_width=32, attention=attention))
    attn = model.transformer.h[0].attn
    x = 20 * torch.randn(2, 16, 128)  # large enough that the scale visibly changes the softmax
    q, k, v = attn.c_attn(x).split(128, dim=2)
    q, k, v = (t.view(2, 16, 4, 32).transpose(1, 2) for t in (q, k, v))
    causal = torch.ones(16, 16, dtype=torch.bool).tril()

    def reference(scale: float) -> torch.Tensor:
        att = (q @ k.transpose(-2, -1) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
        return attn.c_proj((att @ v).transpose(1, 2).reshape(2, 16, 128))

    with torch.no_grad():
        got = attn(x)
        torch.testing.assert_close(got, reference(8 ** 0.5 / 32))
        assert (got - reference(1 / 32 ** 0.5)).abs().max() > 0.1 * got.abs().max()


def test_mup_init_scales_hidden_matrices_only():
    """std of every parameter at m = 16 against m = 1: hidden matrices 1/sqrt(m) (c_proj's 1/sqrt(2·n_layer)
    on top), embeddings 0.02 as GPT-2's."""
    big = make(tiny(n_embd=512, parametrization="mup", base_width=32))
    for name, p in big.named_parameters():
        if name.endswith(HIDDEN):
            want = 0.02 / 4 / (2 ** 1 if name.endswith("c_proj.weight") else 1)
            assert p.std().item() == pytest.approx(want, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name


# ---------------------------------------------------------------------------------------- coordinate check

WIDTHS = (32, 64, 128, 256)


def real_text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 windows of 32 bytes of the built-in English corpus (byte tokens, 256 ids)."""
    text = "".join(corpora.builtin_documents()).encode()
    data = torch.tensor(list(text[: 8 * 33]), dtype=torch.long).view(8, 33)
    return data[:, :-1], data[:, 1:]


def coordinate_check(parametrization: str, steps: int = 5, lr: float = 1e-2) -> dict[str, list[float]]:
    """Yang et al. 2021 (section 5 / Appendix D.1; mup's get_coord_data): for each width, with n_head = 4
    fixed (head size 8 to 64, so that the attention scale matters), ``steps`` AdamW steps at one lr on one
    batch from the base width's hyper-parameters: the mean |x| of the last block's MLP pre-activation (c_fc's
    output) at init, and after the steps of the last block's output and of the logits."""
    x, y = real_text_batch()
    out: dict[str, list[float]] = {"fc_init": [], "logits": [], "block": []}
    for width in WIDTHS:
        cfg = ModelConfig(n_layer=2, n_head=4, n_embd=width, block_size=32, parametrization=parametrization,
                          base_width=WIDTHS[0])
        model = make(cfg, vocab=256)
        fc = model.transformer.h[-1].mlp.c_fc.register_forward_hook(
            lambda mod, inp, o: out["fc_init"].append(o.abs().mean().item()))
        with torch.no_grad():
            model(x)
        fc.remove()
        opt = build_optimizer(model, config(cfg, optimizer="adamw", weight_decay=0.0), lr)
        for _ in range(steps):
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seen: list[float] = []
        hook = model.transformer.h[-1].register_forward_hook(lambda mod, inp, o: seen.append(o.abs().mean().item()))
        with torch.no_grad():
            logits, _ = model(x)
        hook.remove()
        out["logits"].append(logits.abs().mean().item())
        out["block"].append(seen[0])
    return out


def spread(values: list[float]) -> float:
    return max(values) / min(values)


def test_coordinate_check_mup_is_flat_across_width_sp_is_not():
    """Measured (torch 2.13 CPU), widths 32, 64, 128, 256, spread = max/min:
    mean |logits| after 5 steps: sp 1.23, 2.39, 2.59, 6.57 (5.4x); mup 1.23, 1.25, 1.14, 1.21 (1.09x).
    the last block's output: sp 0.78, 3.31, 7.31, 41.7 (54x); mup 0.78, 0.73, 0.64, 0.97 (1.5x).
    c_fc's output at init: sp 0.090, 0.128, 0.181, 0.253 (2.8x, sqrt(m)); mup 0.090 at every width (1.01x).
    Without the readout's 1/m the mup logits spread 4.1x, without the lr multipliers the block output 61x,
    without the init scaling c_fc at init 2.8x: each fails this test."""
    sp, mup = coordinate_check("sp"), coordinate_check("mup")
    assert sp["logits"][0] == pytest.approx(mup["logits"][0])  # the same model at the base width
    assert spread(mup["logits"]) < 1.5, mup
    assert spread(mup["block"]) < 2.5, mup
    assert spread(mup["fc_init"]) < 1.3, mup
    assert spread(sp["logits"]) > 3.0 and sp["logits"][-1] > 3.0 * sp["logits"][0], sp
    assert spread(sp["block"]) > 10.0, sp
    assert spread(sp["fc_init"]) > 2.0, sp


# ---------------------------------------------------------------------------------------- learning rates


@pytest.mark.parametrize("tie", [True, False])
def test_mup_adamw_groups_hidden_lr_over_m_vector_lr(tie):
    model = make(tiny(n_embd=128, parametrization="mup", base_width=32, tie_embeddings=tie))  # m = 4
    cfg = config(model.cfg, optimizer="adamw", weight_decay=0.1, warmup_steps=3, schedule="cosine")
    opt = build_optimizer(model, cfg, 1e-3)
    for lr in (1e-3, lr_at(0, 1e-3, 10, cfg), lr_at(7, 1e-3, 10, cfg)):  # at build, then as the trainer sets it
        set_lr(opt, lr)
        by_id = lr_of(opt)
        for name, p in model.named_parameters():
            got_lr, got_wd = by_id[id(p)]
            if name.endswith(HIDDEN):
                assert (got_lr, got_wd) == pytest.approx((lr / 4, 0.1 * 4)), name
            elif p.dim() == 2:  # wte, wpe, an untied lm_head: vector-like, decayed
                assert (got_lr, got_wd) == pytest.approx((lr, 0.1)), name
            else:  # biases, LayerNorm
                assert (got_lr, got_wd) == pytest.approx((lr, 0.0)), name
    assert len(lr_of(opt)) == len(list(model.parameters()))


def test_mup_sgd_groups_vector_lr_times_m():
    model = make(tiny(n_embd=128, parametrization="mup", base_width=32, tie_embeddings=False))
    opt = build_optimizer(model, config(model.cfg, optimizer="sgd", weight_decay=0.1), 1e-2)
    by_id = lr_of(opt)
    for name, p in model.named_parameters():
        want = (1e-2, 0.1) if name.endswith(HIDDEN) else (4e-2, 0.1 / 4 if p.dim() == 2 else 0.0)
        assert by_id[id(p)] == pytest.approx(want), name


def test_trainer_schedule_keeps_the_mup_multipliers():
    cfg = config_lib.load(overrides=[*TINY, "train.steps=4", "train.warmup_steps=2", "train.schedule=cosine",
                                     "train.log_interval=1", "train.measure_interval=0", "train.eval_interval=4",
                                     "model.parametrization=mup", "model.base_width=16"], locked=False)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["status"] == "ok"
    last_lr = cfg.train.min_lr_ratio * trainer.plan.peak_lr  # the cosine's floor, at the last step (by hand)
    assert summary["lr"] == pytest.approx(last_lr)
    by_id = lr_of(trainer.optimizer)
    for name, p in trainer.raw_model.named_parameters():
        assert by_id[id(p)][0] == pytest.approx(last_lr / 2 if name.endswith(HIDDEN) else last_lr), name


# ---------------------------------------------------------------------------------------- configuration


def test_mup_config_keys_are_validated():
    cfg = config_lib.load(overrides=[*TINY, "model.parametrization=mup", "model.base_width=16"], locked=False)
    assert cfg.model.width_mult == 2.0
    with pytest.raises(ConfigError, match="model.base_width=15 must be divisible by model.n_head=2"):
        config_lib.load(overrides=[*TINY, "model.parametrization=mup", "model.base_width=15"], locked=False)
    sp = config_lib.load(overrides=[*TINY, "model.base_width=15"], locked=False)  # ignored under sp
    assert sp.model.width_mult == 1.0
    with pytest.raises(ConfigError, match="one of 'sp', 'mup'"):
        config_lib.load(overrides=[*TINY, "model.parametrization=ntk"], locked=False)
    assert dataclasses.replace(cfg.model, base_width=0).width_mult == 1.0
