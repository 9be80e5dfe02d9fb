"""The GPU acceptance script (benchmarks/gpu_check.py) tells the truth on the CPU rehearsal: a trainer run that
crashes fails its check with the crashed process's own output, in the console and in the report written to --out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO


def test_a_crashed_trainer_run_fails_the_check_with_its_stderr_shown(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    # Every process started with this on its path dies where the trainer builds its optimizer.
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import torch

        def refuse(*args, **kwargs):
            raise RuntimeError("injected crash: AdamW refused")

        torch.optim.AdamW.__init__ = refuse
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--rehearse-on-cpu", "--only",
                           "seed_model", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("gpu-check: seed_model FAIL"))
    assert "status error (exit 1)" in line and "RuntimeError: injected crash: AdamW refused" in line
    report = json.loads((out / "gpu_check_rehearsal.json").read_text())
    assert report["result"] == "FAIL" and report["checks"]["preflight"]["ok"]
    assert "injected crash" in report["checks"]["seed_model"]["problems"][0]
    assert "injected crash" in (out / "gpu_check_rehearsal.md").read_text()
