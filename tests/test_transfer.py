"""Width-transfer results (lmtune.results.transfer): the optimum lr per width and parametrization, from a results
directory whose losses are known: under μP every width's optimum is the same lr, under SP it halves per doubling
of the width (one step of the lr grid), as in Yang et al. 2021, Fig. 1."""

from __future__ import annotations

import math

import pytest

from lmtune.results.read import load_results
from lmtune.results.report import render
from lmtune.results.transfer import curves, transfer
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
             "mode": "min", "searcher": "grid", "space": space, "base": {"model.n_layer": 2}, "export": ["train.lr"]}
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
