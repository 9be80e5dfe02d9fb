"""Sample text from a checkpoint.

    python -m lmtune.generate --checkpoint runs/x/checkpoint --prompt "The meaning of" --max-new-tokens 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lmtune import config as config_lib
from lmtune.cli import parse_command_line, user_errors_exit_2
from lmtune.config import ConfigError
from lmtune.contract import CHECKPOINT_CONFIG, CHECKPOINT_FILE
from lmtune.data import get_tokenizer
from lmtune.device import accelerator
from lmtune.model import GPT
from lmtune.training.checkpoint import read_checkpoint


def load_model(checkpoint: str | Path, device: str = "auto") -> tuple[GPT, config_lib.Config]:
    """The model of a checkpoint directory written by the trainer, in eval mode."""
    path = Path(checkpoint)
    if not (path / CHECKPOINT_FILE).is_file() or not (path / CHECKPOINT_CONFIG).is_file():
        raise ConfigError(f"{path} is not a checkpoint directory (expected {CHECKPOINT_FILE} and {CHECKPOINT_CONFIG}; "
                          "the trainer writes them to OUT/checkpoint).")
    cfg = config_lib.from_flat(json.loads((path / CHECKPOINT_CONFIG).read_text()))
    dev = accelerator(device).device
    state = read_checkpoint(path)
    model = GPT(cfg.model, state["vocab_size"]).to(dev)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def generate(checkpoint: str | Path, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0, device: str = "auto") -> str:
    model, cfg = load_model(checkpoint, device)
    tok = get_tokenizer(cfg.data.tokenizer)
    ids = tok.encode(prompt) or ([tok.eot] if tok.eot is not None else tok.encode("\n"))
    dev = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tok.decode(out[0].tolist())


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmtune.generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (OUT/checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = parse_command_line(p, argv)
    if a.temperature <= 0:
        raise ConfigError(f"--temperature={a.temperature} is not accepted: expected a number > 0.")
    print(generate(a.checkpoint, a.prompt, a.max_new_tokens, a.temperature, a.top_k or None, a.seed, a.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
