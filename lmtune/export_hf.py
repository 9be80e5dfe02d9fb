"""Export a trained model as a Hugging Face transformers model directory.

    python -m lmtune.export_hf RUN_DIR|CHECKPOINT --to DIR [--force]

RUN_DIR is a trainer's ``--out`` (its ``checkpoint/``) or a sweep trial's directory; CHECKPOINT a checkpoint directory.
DIR then opens with ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` (GPT2LMHeadModel or LlamaForCausalLM,
:mod:`lmtune.hf`) and evaluates with lm-eval-harness (``lm_eval --model hf --model_args pretrained=DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmtune import config as config_lib
from lmtune.cli import check_output_dir, parse_command_line, user_errors_exit_2
from lmtune.config import ConfigError
from lmtune.contract import CHECKPOINT_CONFIG, CHECKPOINT_DIR


def find_checkpoint(path: Path) -> Path:
    """The checkpoint directory of a run directory, a trial directory or the checkpoint itself."""
    from lmtune.training.checkpoint import checkpoint_file

    for candidate in (path, path / CHECKPOINT_DIR, path / "trainer" / CHECKPOINT_DIR):
        file = checkpoint_file(candidate)
        if file.is_file() and (file.parent / CHECKPOINT_CONFIG).is_file():
            return file.parent
    raise ConfigError(f"{path}: no checkpoint there (expected RUN_DIR/checkpoint or a checkpoint directory holding "
                      f"checkpoint.pt and {CHECKPOINT_CONFIG}).")


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmtune.export_hf", description=__doc__.splitlines()[0])
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--to", required=True, metavar="DIR", help="the transformers model directory to write")
    p.add_argument("--force", action="store_true", help="write into a DIR that already holds files")
    a = parse_command_line(p, argv)
    to = Path(a.to)
    check_output_dir(to, "--to")
    if to.is_dir() and any(to.iterdir()) and not a.force:
        raise ConfigError(f"--to {to} already holds files; nothing written. Choose a new directory or add --force.")
    checkpoint = find_checkpoint(Path(a.run))
    cfg = config_lib.from_flat(json.loads((checkpoint / CHECKPOINT_CONFIG).read_text()))
    from lmtune.hf import export, hf_class
    from lmtune.training.checkpoint import read_checkpoint

    hf_class(cfg.model)  # a model no class represents is refused before the checkpoint is read
    state = read_checkpoint(checkpoint)
    rows = state["model"]["transformer.wte.weight"].shape[0]
    to.mkdir(parents=True, exist_ok=True)
    name = export(cfg.model, state["model"], rows, cfg.data.tokenizer, to)
    note = "" if cfg.data.tokenizer == "gpt2" else f" (data.tokenizer={cfg.data.tokenizer}: no tokenizer files written)"
    for line in (f"exported {checkpoint} (step {state['step']}) as {name} to {to}{note}",
                 f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(to)!r})",
                 f"evaluate it: lm_eval --model hf --model_args pretrained={to} --tasks hellaswag"):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
