"""The metric table (lmtune.contract.METRICS): every list of metrics is a view of it, and the views say what the
sweep directories' files and the tables have always held."""

from __future__ import annotations

import re

from lmtune.contract import METRICS, REPORTED_METRICS, SUMMARY_METRICS, TRIAL_METRICS, TRIALS_TABLE
from lmtune.results.format import fmt
from lmtune.results.layout import csv_columns
from tests.conftest import REPO


def test_trials_csv_columns_are_the_documented_ones_in_their_order():
    doc = (REPO / "docs" / "CONTRACTS.md").read_text()
    listed = re.search(r"final metrics \(`([^`]+)`", doc).group(1)
    assert TRIAL_METRICS == tuple(re.split(r",\s+", listed))
    assert csv_columns(["train.lr"])[:5] == ["trial_id", "status", "source", "train.lr", "val_loss"]
    assert TRIALS_TABLE == ("val_loss", "loss", "tokens", "tokens_per_s", "peak_reserved_gib", "wall_clock_s",
                            "device_hours")


def test_one_record_per_metric_and_the_views_hold_only_its_names():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    assert {"flops", "flops_per_token", "data_source"} <= set(names) and "flops" in TRIAL_METRICS
    assert set(REPORTED_METRICS) | set(SUMMARY_METRICS) | set(TRIAL_METRICS) <= set(names)
    assert "flops_per_token" not in TRIAL_METRICS + REPORTED_METRICS


def test_a_cell_shows_a_metric_as_its_record_says():
    assert [fmt(1234567.0, m) for m in ("tokens", "tokens_per_s")] == ["1,234,567"] * 2
    assert fmt(0.5, "peak_reserved_gib") == "0.500" and fmt(12.3456, "avg_step_time_ms") == "12.3"
    assert fmt(1234.5678, "val_loss") == "1235" and fmt(3, "step") == "3" and fmt("budget", "ac_mode") == "budget"
    assert fmt(2.0, "relative_throughput") == "2.00" and fmt(0.25, "headroom_gib") == "0.250"  # not metrics: by name
