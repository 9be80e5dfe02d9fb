"""`python -m lmtune.export`: locked defaults from a sweep's winner, read back by the trainer's config."""

from __future__ import annotations

import json
import tomllib

import pytest

from lmtune import config as config_lib
from lmtune import export as export_command
from lmtune import exporting as export
from lmtune.results.read import load_results
from tests.conftest import run_module
from tests.frontier_fixtures import B, X, frontier_results, frontier_sweep_json, norm_results, write_results_dir


def test_frontier_export_round_trip(tmp_path):
    d, _ = frontier_results(tmp_path / "r")
    rec = json.loads(__import__("lmtune.reporting", fromlist=["render"]).render(d) and (d / "frontier.json").read_text())[
        "recommended"]
    out = tmp_path / "locked" / "frontier.toml"
    plan = export.export(d, out)
    assert plan.values == {X: rec[X], B: rec["line"][B]}
    cfg = config_lib.load(locked=out)  # what the trainer resolves with this file
    assert cfg.train.micro_batch_size == rec[X] and cfg.train.ac_budget == rec["line"][B]
    prov = config_lib.provenance(out)
    for key in (X, B):
        p = prov[key]
        assert p["sweep"] == "memory-frontier" and p["group"].startswith("1-memory-frontier-")
        assert p["metric"] == "tokens_per_s" and p["value"] == pytest.approx(rec["tokens_per_s"])
        assert p["trial_id"] == rec["trial_id"] and len(p["date"]) == 10
        assert p["source"].startswith("memory-frontier frontier (1-memory-frontier-")
    md = out.with_suffix(".md").read_text()
    assert "| Parameter | Value | Source |" in md
    assert f"| micro_batch_size | {rec[X]} | memory-frontier frontier (" in md


def test_best_trial_export_skips_non_ok_trials(tmp_path):
    d = norm_results(tmp_path / "n")
    out = tmp_path / "norm.toml"
    plan = export.export(d, out)
    assert plan.values == {"model.norm_placement": "pre", "train.warmup_steps": 0}  # t0: val_loss 3.1, ok
    cfg = config_lib.load(locked=out)
    assert (cfg.model.norm_placement, cfg.train.warmup_steps) == ("pre", 0)
    assert config_lib.provenance(out)["model.norm_placement"]["value"] == 3.1
    md = out.with_suffix(".md").read_text()
    assert "## Architecture" in md and "## Training recipe" in md


def test_default_target_is_the_projects_locked_file_the_trainer_picks_up(tmp_path, in_tmp):
    d, _ = frontier_results(tmp_path / "r", smoke=False, limit=None, device=20.0)  # a real device's frontier
    assert export_command.main([str(d)]) == 0
    assert (in_tmp / "lmtune.locked.toml").is_file() and (in_tmp / "lmtune.locked.md").is_file()
    winner = export.winner(load_results(d))
    assert config_lib.PROJECT_LOCKED.resolve() in config_lib.locked_files()
    cfg = config_lib.load()  # no --locked: the project's file is in force
    assert {k: cfg.get(k) for k in winner.values} == winner.values


def test_overwrite_refused_without_force_and_file_unchanged(tmp_path, capsys):
    d, _ = frontier_results(tmp_path / "r")
    out = tmp_path / "locked.toml"
    out.write_text('[train]\nmicro_batch_size = 7\nweight_decay = 0.1\n\n[provenance."train.weight_decay"]\nsource = "by hand"\n')
    before = out.read_bytes()
    assert export_command.main([str(d), "--to", str(out)]) == 2
    captured = capsys.readouterr()
    assert out.read_bytes() == before and not out.with_suffix(".md").exists()
    assert "train.micro_batch_size: 7 → " in captured.out  # what would change
    assert "train.weight_decay: 0.1 (kept)" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out} exists; nothing written")
    assert export_command.main([str(d), "--to", str(out), "--force"]) == 0
    doc = tomllib.loads(out.read_text())
    assert doc["train"]["weight_decay"] == 0.1 and doc["provenance"]["train.weight_decay"]["source"] == "by hand"  # kept
    assert doc["train"]["micro_batch_size"] != 7
    assert doc["provenance"]["train.ac_budget"]["ac_mode"] == "budget"  # the frontier ran compiled
    cfg = config_lib.load(locked=out)
    assert cfg.train.weight_decay == 0.1 and cfg.train.micro_batch_size == doc["train"]["micro_batch_size"]


def test_a_budget_is_not_exported_into_a_file_of_the_other_ac_mode(tmp_path, capsys):
    """The frontier's budgets are compile-partitioner budgets; a file that turns compile off would never apply them."""
    d, _ = frontier_results(tmp_path / "r")
    out = tmp_path / "locked.toml"
    out.write_text('[train]\ncompile = false\n')
    before = out.read_bytes()
    assert export_command.main([str(d), "--to", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "measured with ac_mode=budget" in err[0] and "train.compile=false" in err[0]
    assert out.read_bytes() == before


def test_a_second_export_of_the_same_winner_changes_nothing_and_another_one_needs_force(tmp_path):
    """README step 3 runs `--to smoke.locked.toml`, then the same with `--validate 30`: the second used to stop with
    "exists; nothing written. Rerun with --force to apply the changes above" above no change at all."""
    d, _ = frontier_results(tmp_path / "r")
    out = tmp_path / "l.toml"
    first = run_module("lmtune.export", str(d), "--to", str(out))
    assert first.returncode == 0, first.stderr
    assert f"{out}: writing (winner: " in first.stdout
    assert "(not set; default " in first.stdout and "written:" in first.stdout
    before = out.read_bytes()
    second = run_module("lmtune.export", str(d), "--to", str(out))
    assert second.returncode == 0 and second.stderr == "", second.stderr
    assert f"{out}: unchanged, it already holds these values (winner: " in second.stdout
    assert "writing" not in second.stdout and "(unchanged)" in second.stdout
    assert f"nothing to write: {out} already holds these values" in second.stdout and out.read_bytes() == before
    # another ok trial: a change, refused without --force, and the header says so (not "writing")
    winner = export.winner(load_results(d)).row["trial_id"]
    other = next(r["trial_id"] for r in load_results(d).rows if r["status"] == "ok" and r["trial_id"] != winner)
    third = run_module("lmtune.export", str(d), "--to", str(out), "--trial", str(other))
    assert third.returncode == 2 and third.stderr.startswith(f"error: {out} exists; nothing written"), third.stderr
    assert f"{out}: would change (chosen: trial {other}" in third.stdout and " → " in third.stdout, third.stdout
    assert out.read_bytes() == before


def test_a_smoke_or_emulated_limit_run_needs_force_to_become_the_projects_defaults(tmp_path, in_tmp, capsys):
    """The demo's winner was measured on a CPU-sized model under an emulated limit: locking it into
    ./lmtune.locked.toml would silently change every later run here."""
    d, _ = frontier_results(tmp_path / "r")  # smoke, emulated 20 GiB limit
    assert export_command.main([str(d)]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("lmtune.locked.toml: would write (winner: ") and "writing" not in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "a --smoke run (a CPU-sized model) and run under an emulated 20 GiB memory limit" in err[0]
    assert "--to FILE" in err[0] and "--force" in err[0]
    assert not (in_tmp / "lmtune.locked.toml").exists()
    assert export_command.main([str(d), "--to", "smoke.toml"]) == 0  # elsewhere: written, and it says what it is
    prov = config_lib.provenance(in_tmp / "smoke.toml")
    assert prov[X]["measured_on"].startswith("a --smoke run") and "[a --smoke run" in prov[X]["source"]
    assert export_command.main([str(d), "--force"]) == 0 and (in_tmp / "lmtune.locked.toml").is_file()


def _all_oom(tmp_path):
    sweep = frontier_sweep_json([1, 2], [1.0])
    rows = [{"trial_id": f"t{x}", "status": "oom", "source": "run", X: x, B: 1.0, "peak_reserved_gib": 20.0} for x in (1, 2)]
    return write_results_dir(tmp_path / "oom", sweep, rows)


def _no_export_keys(tmp_path):
    d = norm_results(tmp_path / "n")
    sweep = json.loads((d / "sweep.json").read_text())
    sweep["export"] = []
    (d / "sweep.json").write_text(json.dumps(sweep))
    return d


def _no_ok_trial(tmp_path):
    d = norm_results(tmp_path / "n2")
    text = (d / "trials.csv").read_text().replace(",ok,", ",error,")
    (d / "trials.csv").write_text(text)
    return d


@pytest.mark.parametrize("case, message", [
    (lambda p: p / "missing", "results directory not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "is not a results directory"),
    (_all_oom, "No recommended operating point"),
    (_no_ok_trial, "no trial ended ok"),
    (_no_export_keys, "exports no keys"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case, message):
    target = case(tmp_path)
    assert export_command.main([str(target), "--to", str(tmp_path / "out.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out.toml").exists()


def test_a_pareto_sweep_is_exported_by_choosing_a_trial_of_its_front(tmp_path, capsys):
    from tests.frontier_fixtures import pareto_results

    d = pareto_results(tmp_path / "p")
    out = tmp_path / "locked.toml"
    assert export_command.main([str(d), "--to", str(out)]) == 2
    err = capsys.readouterr().err
    assert "several metrics has no single winner" in err and "--trial ID" in err and "b (val_loss=3.2" in err
    assert not out.exists()
    assert export_command.main([str(d), "--to", str(out), "--trial", "e"]) == 2  # oom: not a config to lock
    assert "ended oom, not ok" in capsys.readouterr().err
    assert export_command.main([str(d), "--to", str(out), "--trial", "b"]) == 0
    assert config_lib.load(locked=out).train.lr == pytest.approx(2e-3)
    assert "trial b chosen (on the Pareto front)" in config_lib.provenance(out)["train.lr"]["source"]


@pytest.mark.parametrize("to, message", [
    ("{tmp}", "is a directory; expected a file path"),
    ("{tmp}/afile/locked.toml", "afile is a file, so no directory can be made below it"),
])
def test_a_to_path_that_cannot_be_a_file_is_refused_before_anything_is_read(tmp_path, capsys, to, message):
    (tmp_path / "afile").write_text("x")
    assert export_command.main([str(tmp_path / "missing"), "--to", to.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --to ") and message in err[0], err


def _tiny_sweep(root, *, tokens_per_s: float, peak: float, limit: float = 0.0):
    """A finished one-trial sweep whose winner is a tiny real config (the validation run trains it)."""
    from tests.conftest import TINY

    base = {k: config_lib.coerce(k, v) for k, v in (a.split("=", 1) for a in TINY)}
    base.update({"train.checkpoint": False, "system.memory_limit_gib": limit})
    sweep = {"name": "tiny", "group": "1-tiny-20260101-000000-000000", "metric": "val_loss", "mode": "min",
             "searcher": "grid", "export": ["train.lr"], "frontier": None, "memory_limit_gib": limit, "base": base,
             "space": {"train.lr": {"type": "grid", "values": [3e-3]}}}
    row = {"trial_id": "t0", "status": "ok", "source": "run", "train.lr": 3e-3, "val_loss": 3.0,
           "tokens_per_s": tokens_per_s, "peak_reserved_gib": peak}
    return write_results_dir(root, sweep, [row])


def test_validate_runs_the_winner_fresh_and_writes_only_when_it_agrees(tmp_path, capsys):
    out = tmp_path / "v.toml"
    # the sweep "measured" an impossible throughput: the fresh run drifts, nothing is written, exit 1
    d = _tiny_sweep(tmp_path / "fast", tokens_per_s=1e12, peak=0.001)
    assert export_command.main([str(d), "--to", str(out), "--validate", "12"]) == 1
    text = capsys.readouterr().out
    assert "| tokens_per_s | 1,000,000,000,000 |" in text and "validation FAILED: tokens/s drifted -100.0%" in text
    assert f"nothing written ({out} was not made)" in text and "keeps what it had" not in text
    assert not out.exists()
    assert export_command.main([str(d), "--to", str(out), "--validate", "12", "--tolerance", "0.001"]) == 1
    assert "(tolerance ±0.1%)" in capsys.readouterr().out  # it said ±0%
    # with a tolerance that admits the drift: the same comparison, then the file is written
    assert export_command.main([str(d), "--to", str(out), "--validate", "12", "--tolerance", "9.99"]) == 0
    text = capsys.readouterr().out
    assert "validation passed" in text and text.index("validation passed") < text.index("written: ")
    assert tomllib.loads(out.read_text())["train"]["lr"] == 3e-3


def test_validate_fails_when_the_headroom_is_gone_and_refuses_bad_steps(tmp_path, capsys):
    d = _tiny_sweep(tmp_path / "tight", tokens_per_s=1.0, peak=0.001, limit=1e-4)  # the fresh run cannot fit
    assert export_command.main([str(d), "--to", str(tmp_path / "v.toml"), "--validate", "12", "--tolerance", "9.99"]) == 1
    assert "validation FAILED: the validation run ended oom" in capsys.readouterr().out
    assert not (tmp_path / "v.toml").exists()
    assert export_command.main([str(d), "--to", str(tmp_path / "v.toml"), "--validate", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--validate 2: expected more steps than train.compile_warmup_steps + 1" in err[0]


def test_tolerance_without_validate_is_refused(tmp_path, capsys):
    d = _tiny_sweep(tmp_path / "t", tokens_per_s=1.0, peak=0.001)
    assert export_command.main([str(d), "--to", str(tmp_path / "v.toml"), "--tolerance", "0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tolerance 0.05: it is the drift --validate allows, and there is no --validate" in err[0]
    assert not (tmp_path / "v.toml").exists()


def test_the_printed_trainer_command_trains_the_model_the_values_were_measured_on(tmp_path, in_tmp, capsys):
    """Export ended with `python -m lmtune.train --locked smoke.locked.toml`: GPT-2 small with a micro-batch
    measured on a 4×128 byte model (an OOM at step 0). The line now carries the winner's model and settings."""
    import shlex

    d = _tiny_sweep(tmp_path / "t", tokens_per_s=1.0, peak=0.001)
    assert export_command.main([str(d), "--to", "tiny.toml"]) == 0
    out = capsys.readouterr().out.splitlines()
    said = out.index(next(line for line in out if line.startswith("the trainer now uses them")))
    assert "on the model and settings they were measured with" in out[said] and "12 layers × 768" in out[said]
    argv = shlex.split(out[said + 1])
    assert argv[:5] == ["python", "-m", "lmtune.train", "--locked", "tiny.toml"], argv
    cfg = config_lib.load(locked="tiny.toml", overrides=config_lib.parse_overrides(argv[5:])).flat()
    winner = load_results(d).config_of(export.winner(load_results(d)).row)
    for key in [k for k in winner if k.startswith("model.") or k in export_command.MEASURED_WITH]:
        assert cfg[key] == config_lib.coerce(key, winner[key]), key
    assert cfg["train.lr"] == 3e-3  # the exported value, from the file
    assert "model.n_embd=32" in argv and "train.compile=false" in argv and "train.steps=20" not in argv
