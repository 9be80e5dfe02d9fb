"""A model trained by lmtune opens in transformers with the same logits: GPT-2-style as GPT2LMHeadModel, the llama
preset as LlamaForCausalLM; a combination no class represents is refused in one line."""

from __future__ import annotations

import re

import pytest
import torch

from lmtune import config as config_lib
from lmtune.export_hf import main
from lmtune.model import GPT
from lmtune.train import Trainer
from tests.conftest import TINY

transformers = pytest.importorskip("transformers")

BASE = [o for o in TINY if not o.startswith(("model.n_head", "model.n_embd", "data.tokenizer"))]


def trained(tmp_path, *extra: str):
    cfg = config_lib.load(overrides=[*BASE, "model.n_head=4", "model.n_embd=32", "data.tokenizer=gpt2",
                                     "train.steps=6", *extra], locked=False)
    Trainer(cfg, out_dir=tmp_path / "run").fit()
    return cfg


@pytest.mark.parametrize("extra, cls", [
    ([], "GPT2LMHeadModel"),
    (["model.bias=false", "model.tie_embeddings=false", "model.vocab_size=50304"], "GPT2LMHeadModel"),
    (["model.preset=llama"], "LlamaForCausalLM"),
    (["model.preset=llama", "model.n_kv_head=1", "model.rope_theta=500000", "model.bias=true"], "LlamaForCausalLM"),
], ids=["gpt2", "gpt2-nobias-untied-padded", "llama-gqa", "llama-mqa-theta-bias"])
def test_an_exported_model_loads_in_transformers_with_equal_logits(tmp_path, capsys, extra, cls):
    cfg = trained(tmp_path, *extra)
    assert main([str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 0
    assert f"as {cls} to" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf).__name__ == cls
    from lmtune.training.checkpoint import read_checkpoint

    state = read_checkpoint(tmp_path / "run" / "checkpoint")
    ours = GPT(cfg.model, 50257)
    ours.load_state_dict(state["model"])
    ours.eval()
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[0]).abs().max().item()
    assert diff <= 1e-4, diff
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids


@pytest.mark.parametrize("extra, says", [
    (["model.position=alibi"], r"no transformers class represents this model \(position=alibi"),
    (["model.preset=llama", "model.qk_norm=true"], r"\(qk_norm=true\)"),
    (["model.norm_placement=post"], r"\(norm_placement=post\)"),
])
def test_a_combination_no_class_represents_is_one_line_and_exit_2(tmp_path, capsys, extra, says):
    trained(tmp_path, *extra)
    capsys.readouterr()
    assert main([str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(says, err[0]) and "GPT2LMHeadModel" in err[0] and "LlamaForCausalLM" in err[0]
    assert not (tmp_path / "hf").exists()
