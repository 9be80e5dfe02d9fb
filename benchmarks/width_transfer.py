"""Tune small, use large: the optimum learning rate across widths under μP and under the standard parametrization.

Targets (issue 13): at CPU scale on WikiText-2 text (byte level), widths 64 → 512 (×8), the same lr grid for both
parametrizations, the spread of the optimum lr across widths (log2 of the largest argmin lr over the smallest) is at
most one grid step under μP and larger under SP (the paper's Fig. 1), and the widest width trained at the lr locked
at the narrowest is within 2% of that width's own best val_loss under μP. The baseline is SP, measured in the same
run with the same grid, data, steps and seeds.

    python benchmarks/width_transfer.py [--files ../shared/data/wikitext-2/valid.txt] [--steps 120]

Every run is a real Trainer run in this process (no Ray): 2 layers, head size 16, seq 32, micro-batch 8, AdamW,
warmup then cosine. The runs land in a results directory written through lmtune's results layout, so the table
and the plot are the ones ``python -m lmtune.report`` draws for a width-transfer sweep.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmtune import config as config_lib  # noqa: E402
from lmtune.reporting import render  # noqa: E402
from lmtune.results.kinds.width import transfer  # noqa: E402
from lmtune.results.layout import csv_columns, write_json, write_trials_csv  # noqa: E402
from lmtune.results.read import load_results  # noqa: E402
from lmtune.training import Trainer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
WIDTHS = (64, 128, 256, 512)
LRS = tuple(2.0 ** e for e in range(-13, -5))  # 1.2e-4 … 1.6e-2, one step = ×2
SPACE = ("model.parametrization", "model.n_embd", "train.lr")


def run_config(kind: str, width: int, lr: float, files: list[str], steps: int) -> config_lib.Config:
    data = (["data.dataset=files", "data.files=" + files[0], "data.val_files=" + ",".join(files[1:] or files[:1])]
            if files else ["data.dataset=builtin"])
    return config_lib.load(overrides=[
        *data, "data.tokenizer=byte", "data.seq_len=32", "model.block_size=32", "model.n_layer=2",
        f"model.n_embd={width}", f"model.n_head={width // 16}", f"model.parametrization={kind}",
        *([f"model.base_width={WIDTHS[0]}"] if kind == "mup" else []), "model.dropout=0.0",
        "train.micro_batch_size=8", f"train.steps={steps}", f"train.lr={lr}", f"train.warmup_steps={steps // 10}",
        "train.schedule=cosine", "train.optimizer=adamw", "train.weight_decay=0.0", "train.eval_interval=" + str(steps),
        "train.eval_sequences=128", "train.measure_interval=0", "train.checkpoint=false", "train.compile=false",
        "train.dtype=float32", "system.device=cpu",
    ], locked=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="*", default=[str(SHARED / "valid.txt"), str(SHARED / "test.txt")])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "width_transfer"))
    args = ap.parse_args(argv)
    files = [f for f in args.files if Path(f).is_file()]
    torch.set_num_threads(2)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows, t0 = [], time.perf_counter()
    for kind in ("sp", "mup"):
        for width in WIDTHS:
            for lr in LRS:
                summary = Trainer(run_config(kind, width, lr, files, args.steps)).fit()
                val = summary.get("val_loss") if summary["status"] == "ok" else None
                val = val if isinstance(val, float) and math.isfinite(val) else None
                rows.append({"trial_id": f"{kind}-{width}-{LRS.index(lr)}", "status": "ok" if val is not None else
                             summary["status"], "source": "run", "model.parametrization": kind, "model.n_embd": width,
                             "train.lr": lr, "val_loss": val})
                print(f"{kind:>3} width {width:>3} lr {lr:.2e}: val_loss {val if val is None else round(val, 4)}",
                      flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    write_json(out / "sweep.json", {
        "name": "width-transfer-benchmark", "group": out.name, "metric": "val_loss", "mode": "min", "searcher": "grid",
        "space": {"model.parametrization": {"type": "grid", "values": ["sp", "mup"]},
                  "model.n_embd": {"type": "grid", "values": list(WIDTHS)},
                  "train.lr": {"type": "grid", "values": list(LRS)}},
        "base": {"model.n_layer": 2, "model.base_width": WIDTHS[0], "train.steps": args.steps}, "export": ["train.lr"]})
    write_trials_csv(out / "trials.csv", csv_columns(SPACE), rows)
    render(out)
    found = {t.parametrization: t for t in transfer(load_results(out))}
    sp, mup = found["sp"], found["mup"]
    ok = (mup.spread_steps is not None and mup.spread_steps <= 1.0 and sp.spread_steps is not None
          and sp.spread_steps > mup.spread_steps and mup.narrow_to_wide is not None and mup.narrow_to_wide <= 1.02)
    lines = [
        "# Width transfer: μP vs SP (benchmarks/width_transfer.py)", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Date: {datetime.date.today().isoformat()}. Commit: {commit}. Data: {', '.join(files) or 'builtin'}; "
        f"{args.steps} steps per run, {len(rows)} runs in {time.perf_counter() - t0:.0f} s.", "",
        f"Optimum lr per width: SP {dict(sorted(sp.best_lr.items()))}; μP {dict(sorted(mup.best_lr.items()))}.", "",
        f"Spread of the optimum across widths {WIDTHS[0]}–{WIDTHS[-1]} (log2 max/min, = grid steps): "
        f"**μP {mup.spread_log2:.2f}**, SP {sp.spread_log2:.2f} (target: μP ≤ 1 step, SP larger).", "",
        f"Width {WIDTHS[-1]} at the lr locked at width {WIDTHS[0]}, over its own best val_loss: "
        f"**μP {mup.narrow_to_wide:.4f}×**, SP {sp.narrow_to_wide:.4f}× (target: μP ≤ 1.02).", "",
        f"Acceptance: **{'PASS' if ok else 'FAIL'}**. Table: `summary.md`; plot: `plots/width_transfer.png`.", ""]
    (out / "RESULT.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
