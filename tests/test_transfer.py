"""Width-transfer results (lmtune.results.kinds.width): the optimum lr per width and parametrization, from a results
directory whose losses are known: under μP every width's optimum is the same lr, under SP it halves per doubling
of the width (one step of the lr grid), as in Yang et al. 2021, Fig. 1."""

from __future__ import annotations

import math

import pytest

from lmtune.reporting import render
from lmtune.results.kinds.width import curves, transfer
from lmtune.results.read import load_results
from tests.frontier_fixtures import write_results_dir

WIDTHS = (64, 128, 256)
LRS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)


def loss(kind: str, width: int, lr: float) -> float:
    """A bowl in log2(lr) whose bottom is at 1e-3 for μP at every width, and moves down a grid step per
    doubling for SP; wider is better at its own optimum."""
    best = 1e-3 if kind == "mup" else 2e-3 * 64 / width
    return 3.0 - 0.1 * math.log2(width / 64) + 0.05 * math.log2(lr / best) ** 2


def width_results(root):
    space = {"model.n_embd": {"type": "grid", "values": list(WIDTHS)}, "train.lr": {"type": "grid", "values": list(LRS)},
             "model.parametrization": {"type": "grid", "values": ["sp", "mup"]}}
    sweep = {"name": "width-transfer", "group": "1-width-transfer-20260101-000000-000000", "metric": "val_loss",
             "mode": "min", "searcher": "grid", "space": space, "export": ["train.lr"],
             "base": {"model.n_layer": 2, "model.n_head": 4, "model.base_width": 64}}
    rows = [{"trial_id": f"t{i:02d}", "status": "ok", "source": "run", "model.n_embd": w, "train.lr": lr,
             "model.parametrization": kind, "val_loss": loss(kind, w, lr)}
            for i, (kind, w, lr) in enumerate((k, w, lr) for k in ("sp", "mup") for w in WIDTHS for lr in LRS)]
    rows.append({"trial_id": "oom", "status": "oom", "source": "run", "model.n_embd": 256, "train.lr": 4e-3,
                 "model.parametrization": "mup", "val_loss": 0.1})  # not ok: never an optimum
    return write_results_dir(root, sweep, rows)


def test_the_optimum_lr_per_width_and_how_far_it_moves(tmp_path):
    results = load_results(width_results(tmp_path / "r"))
    assert [(c.parametrization, c.width, len(c.points)) for c in curves(results)] == [
        ("mup", 64, 5), ("mup", 128, 5), ("mup", 256, 5), ("sp", 64, 5), ("sp", 128, 5), ("sp", 256, 5)]
    sp, mup = transfer(results)
    assert (sp.parametrization, mup.parametrization) == ("sp", "mup")
    assert mup.best_lr == {64: 1e-3, 128: 1e-3, 256: 1e-3} and mup.spread_log2 == 0 and mup.spread_steps == 0
    assert sp.best_lr == {64: 2e-3, 128: 1e-3, 256: 5e-4}
    assert sp.spread_log2 == pytest.approx(2.0) and sp.spread_steps == pytest.approx(2.0)
    assert mup.narrow_to_wide == pytest.approx(1.0)  # the narrowest's optimum is the widest's
    wide_at_narrow = loss("sp", 256, 2e-3) / loss("sp", 256, 5e-4)
    assert sp.narrow_to_wide == pytest.approx(wide_at_narrow) and sp.narrow_to_wide > 1.01


def test_the_report_has_the_width_transfer_table_and_plot(tmp_path):
    d = width_results(tmp_path / "r")
    written = render(d)
    assert d / "plots" / "width_transfer.png" in written
    assert (d / "plots" / "width_transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (d / "summary.md").read_text()
    assert "## Width transfer" in md
    assert "- sp: across widths 64–256 the optimum lr moves by 2.00 in log2 (2.0 steps of the lr grid)" in md
    assert "- mup: across widths 64–256 the optimum lr moves by 0.00 in log2 (0.0 steps of the lr grid)" in md
    assert "| mup | 256 | 0.001 |" in md


def test_export_for_a_wider_model_carries_the_mup_winner_and_refuses_sp(tmp_path, capsys):
    """The best μP trial (width 256, lr 1e-3) is exported for a 1024-wide model: its lr, μP and the width it was
    tuned at relative to (base_width 64) are locked with the new width, the provenance says so, and the trainer
    resolves exactly that. The overall best trial is an SP one, and an SP trial cannot be carried: refused, one line."""
    import tomllib

    from lmtune import config as config_lib
    from lmtune import export as export_command

    d = width_results(tmp_path / "r")
    out = tmp_path / "wide.toml"
    assert export_command.main([str(d), "--to", str(out), "--for-width", "1024"]) == 0
    doc = tomllib.loads(out.read_text())
    assert doc["model"] == {"n_embd": 1024, "parametrization": "mup", "base_width": 64, "n_head": 4, "n_layer": 2}
    assert doc["train"] == {"lr": 1e-3}
    record = doc["provenance"]["train.lr"]
    assert (record["transfer"], record["tuned_width"], record["transferred_to"]) == ("mup", 256, 1024)
    assert "tuned at width 256, transferred to width 1024 by μP (model.base_width=64)" in record["source"]
    cfg = config_lib.load(locked=out)
    assert (cfg.model.n_embd, cfg.model.parametrization, cfg.model.base_width, cfg.train.lr) == (1024, "mup", 64, 1e-3)
    assert cfg.model.width_mult == 16
    assert "transferred to width 1024" in (tmp_path / "wide.md").read_text()
    capsys.readouterr()

    sp_best = min((r for r in load_results(d).rows if r["model.parametrization"] == "sp"), key=lambda r: r["val_loss"])
    assert export_command.main([str(d), "--to", str(tmp_path / "sp.toml"), "--for-width", "1024",
                                "--trial", sp_best["trial_id"]]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model.parametrization=sp" in line and "best learning rate moves with the width" in line
    assert "model.parametrization=mup" in line and not (tmp_path / "sp.toml").exists()
    assert export_command.main([str(d), "--to", str(tmp_path / "odd.toml"), "--for-width", "1030"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--for-width 1030" in line and "model.n_head=4" in line
