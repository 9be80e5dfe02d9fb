"""report.html: one self-contained page with every table, plot and trial, checked in headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmtune.reporting import render
from lmtune.results.kinds.trials import cost
from lmtune.results.read import load_results
from tests.frontier_fixtures import frontier_results, norm_results


def test_the_page_holds_every_table_plot_trial_evidence_cost_and_the_export(tmp_path):
    d, _ = frontier_results(tmp_path / "f", xs=tuple(range(1, 25)))
    written = render(d)
    page = (d / "report.html").read_text()
    assert d / "report.html" in written
    # every markdown table of frontier.md and summary.md, as a table
    md_tables = sum(text.count("\n|---") for text in ((d / "frontier.md").read_text(), (d / "summary.md").read_text()))
    assert page.count("<table>") >= md_tables > 0
    # every plot, embedded as a PNG that decodes
    pngs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(pngs) == len([p for p in written if p.suffix == ".png"]) > 0
    assert all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    # every trial, with its evidence, and a learning curve for those that ran
    results = load_results(d)
    for r in results.rows:
        assert f"<h3>{r['trial_id']} " in page
    assert "implied by an OOM at a smaller micro-batch (never ran)" in page and "ran out of memory" in page
    assert page.count("aria-label='loss against tokens'") == sum(1 for r in results.rows if r["source"] == "run")
    total, unit, n = cost(results)
    assert unit == "CPU-hours" and n > 0 and f"Cost: {total:.3g} CPU-hours" in page
    assert "Locked defaults an export would write" in page and "<th>Parameter</th>" in page
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)


def test_a_norm_sweep_page_draws_each_trials_layer_norms(tmp_path):
    d = norm_results(tmp_path / "n")
    render(d)
    page = (d / "report.html").read_text()
    assert page.count("aria-label='gradient norm per layer'") == 4
    assert "Norm placement × warmup" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _load(browser: str, page: Path, shot: Path) -> list[str]:
    """Open ``page`` headless, screenshot it; the console messages it logged."""
    proc = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(_chromium() is None, reason="no headless browser here: `apt-get install chromium` "
                                                "(Debian) makes this test run")
def test_the_page_loads_in_headless_chromium_without_console_errors_and_is_not_blank(tmp_path):
    import matplotlib.image

    browser = _chromium()
    d, _ = frontier_results(tmp_path / "f", xs=tuple(range(1, 25)))
    render(d)
    messages = _load(browser, d / "report.html", tmp_path / "shot.png")
    assert messages == []
    pixels = matplotlib.image.imread(tmp_path / "shot.png")
    assert pixels.shape[0] >= 2000 and pixels[..., :3].std() > 0.05  # tables and plots, not an empty page
    # the same check sees a broken page
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefined_function()</script></body></html>")
    assert any("Uncaught" in m for m in _load(browser, broken, tmp_path / "broken.png"))
    blank = matplotlib.image.imread(tmp_path / "broken.png")
    assert blank[..., :3].std() < 0.01


def test_the_report_is_made_of_the_kinds_each_sweep_holds_and_a_new_kind_plugs_in(tmp_path, monkeypatch):
    from lmtune.results import kinds
    from tests.frontier_fixtures import batch_results, pareto_results

    held = {name: [k.name for k in kinds.applicable(load_results(make(tmp_path / name)))]
            for name, make in (("norm", norm_results), ("batch", batch_results), ("pareto", pareto_results),
                               ("frontier", lambda p: frontier_results(p, xs=(1, 2, 3))[0]))}
    assert held == {"norm": ["trials", "norm", "replicates"], "batch": ["trials", "batch", "replicates"],
                    "pareto": ["trials", "pareto"], "frontier": ["frontier", "trials"]}

    def plot(results, plots):
        (plots / "extra.png").write_bytes((plots / "loss_curves.png").read_bytes())
        return [plots / "extra.png"]

    extra = kinds.Kind("extra", 99, applies=lambda results: "model.norm_placement" in results.space_keys,
                       tables=lambda results: ["## Extra table", "", "| a |", "|---|", "| 1 |", ""], plots=plot,
                       html=lambda results: ["<h2>Extra section</h2>"], studied=("noise_scale",))
    every = (*kinds.registered(), extra)
    monkeypatch.setattr(kinds, "registered", lambda: every)
    d = norm_results(tmp_path / "n2")
    written = render(d)
    page = (d / "report.html").read_text()
    assert "## Extra table" in (d / "summary.md").read_text() and d / "plots" / "extra.png" in written
    assert "<h3>Extra table</h3>" in page and "<h2>Extra section</h2>" in page and "alt='extra.png'" in page
    assert kinds.studied(load_results(d)) == ["grad_norm_spread", "noise_scale"]
