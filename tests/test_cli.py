"""Every command takes its options, config files, ``section.key=value`` overrides and results directory in any
order, as people type them, and refuses an unknown option in one line with exit code 2 (lmtune.cli's
``parse_command_line``, which all of them use).

Each command runs for real here (a 3-step trainer, a results directory of simulated trials); none starts Ray.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from lmtune import clean, export, generate, report, train
from lmtune.sweep import __main__ as sweep
from tests.conftest import TINY, run_module
from tests.frontier_fixtures import B, X, frontier_results
from tests.helpers import GOOD_SWEEP as GOOD
from tests.helpers import one_error_line, write

TINY_FAST = [a for a in TINY if not a.startswith(("train.steps", "train.eval_interval"))]


def test_train_takes_overrides_after_an_option(in_tmp):
    """The issue's own line: `python -m lmtune.train model.n_layer=2 --no-wandb train.steps=3` stopped with
    'unrecognized arguments: train.steps=3' and argparse's usage."""
    proc = run_module("lmtune.train", TINY_FAST[0], "--no-wandb", *TINY_FAST[1:], "--out", "run", "train.steps=3",
                      "train.eval_interval=3", cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((in_tmp / "run" / "summary.json").read_text())["config"]
    assert config["train.steps"] == 3 and config["model.n_layer"] == 2 and config["train.eval_interval"] == 3


def test_sweep_takes_its_file_and_overrides_after_options(tmp_path, capsys):
    """The overrides after the options reach the sweep's checks: a good one passes them (the run is then refused
    only for having nothing to resume), a bad one is named."""
    f = write(tmp_path, GOOD)
    empty = tmp_path / "empty"
    assert sweep.main(["--no-wandb", str(f), "--storage", str(empty), "train.steps=3", "--resume"]) == 2
    assert "no earlier run of sweep 'tiny'" in one_error_line(capsys.readouterr().err)
    assert sweep.main(["--no-wandb", str(f), "--storage", str(empty), "train.stepz=3", "--resume"]) == 2
    assert "unknown config key 'train.stepz'" in one_error_line(capsys.readouterr().err)


def test_export_takes_its_results_directory_between_options(tmp_path, capsys):
    d, _ = frontier_results(tmp_path / "r")
    out = tmp_path / "locked.toml"
    assert export.main(["--to", str(out), str(d), "--force"]) == 0
    from lmtune.results.kinds.frontier import frontier_report
    from lmtune.results.read import load_results

    locked = tomllib.loads(out.read_text())["train"]
    recommended = frontier_report(load_results(d)).recommended
    assert (locked["micro_batch_size"], locked["ac_budget"]) == (recommended[X], recommended["line"][B])


def test_report_takes_its_results_directory_and_refuses_an_option_it_has_not(tmp_path, capsys):
    """report has no option of its own: its results directory works alone, and an option before it is refused in
    one line (not argparse's usage)."""
    d, _ = frontier_results(tmp_path / "r")
    assert report.main(["--tables-only", str(d)]) == 2
    assert "unrecognized arguments: --tables-only; accepted: RESULTS_DIR (" in one_error_line(capsys.readouterr().err)
    assert report.main([str(d)]) == 0 and (d / "frontier.md").is_file()


def test_generate_takes_its_options_in_any_order(in_tmp, capsys):
    assert train.main([*TINY_FAST, "train.steps=2", "train.eval_interval=2", "--no-wandb", "--out", "run"]) == 0
    capsys.readouterr()
    one = ["--checkpoint", "run/checkpoint", "--prompt", "The ", "--max-new-tokens", "8", "--seed", "3"]
    assert generate.main(one) == 0
    first = capsys.readouterr().out
    assert generate.main(["--seed", "3", "--max-new-tokens", "8", "--prompt", "The ", "--checkpoint",
                          "run/checkpoint"]) == 0
    assert capsys.readouterr().out == first and first.startswith("The ")


def test_clean_takes_its_options_in_any_order(in_tmp, capsys):
    assert clean.main(["--results", "nowhere", "--dry-run"]) == 0
    first = capsys.readouterr().out
    assert clean.main(["--dry-run", "--results", "nowhere"]) == 0
    assert capsys.readouterr().out == first


COMMANDS = {  # each with a positional it accepts where it needs one, and a shortened option of its own
    "train": (train.main, ["--describe"], "--no-w"), "sweep": (sweep.main, ["s.py"], "--no-dash"),
    "export": (export.main, ["results"], "--valid"), "report": (report.main, ["results"], "--he"),
    "generate": (generate.main, ["--checkpoint", "run/checkpoint"], "--max"), "clean": (clean.main, [], "--dry"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unknown_or_shortened_option_is_one_line_and_exit_2(command, capsys, in_tmp):
    """Refused before any work, in one line naming what the command accepts; a prefix of an option is not taken
    for it (`--no-w` was --no-wandb to argparse)."""
    main, positional, short = COMMANDS[command]
    for bad in ("--bogus", short):
        assert main([*positional, bad]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"unrecognized arguments: {bad}; accepted: " in line and f"(python -m lmtune.{command} --help)" in line


def test_the_data_and_export_hf_commands_take_options_in_any_order(tmp_path, capsys):
    from lmtune.data.__main__ import main as data_main
    from lmtune.export_hf import main as export_hf_main

    out = tmp_path / "p"
    assert data_main(["prepare", "--tokenizer", "byte", "builtin", "--shard-tokens", "50000", "--out", str(out)]) == 0
    assert (out / "index.json").is_file()
    assert data_main(["split", "builtin"]) == 2
    assert "'split' is not a command; accepted: prepare" in capsys.readouterr().err
    assert export_hf_main(["--to", str(tmp_path / "hf"), str(tmp_path / "no-run")]) == 2  # positional after option
    assert "no checkpoint there" in capsys.readouterr().err
