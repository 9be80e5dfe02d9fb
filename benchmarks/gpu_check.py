"""GPU acceptance run: ``make gpu-check`` (``PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR]``).

On a machine with one CUDA GPU, in under 8 minutes, it runs the paths that only a GPU exercises and holds their
figures against the phase-0 study's A100 table (docs/phase0.md), each figure printed next to its band:

0. ``preflight``: a CUDA device, torch's version, a C compiler and Python's headers (Triton builds kernels with
   them at run time), free device memory; what is missing is named in one line before anything runs.
1. ``seed_model``: the study's model (12 layers × 768, 12 heads, seq 1024, a 50,304-row vocabulary, bf16, compiled,
   AC budget 1.0) at micro-batch 16: peak_reserved within ±20% of the A100's 22.5 GiB, MFU ≥ 0.35 on an H100/H200,
   no graph compiled after warmup.
2. ``ac_budget``: the same model compiled at micro-batch 32 with the partitioner's activation budget 0.75 peaks
   below budget 1.0 (the study's central memory claim: 34.2 GiB at 0.75, an OOM at 1.0 on the A100).
3. ``a100_frontier``: no AC (budget 1.0), compiled, under a memory fraction that emulates a 40 GB A100 (39.4 GiB
   usable), micro-batches 24–36 planned by the frontier planner: the study's boundary (28 fits, 32 is a real CUDA
   OOM) within one grid step, each OOM classified ``oom``, never retried, the larger points implied; a point whose
   process crashed counts as an error. Through ``python -m lmtune.sweep`` where Ray and Optuna are importable,
   else through the planner (Ray-free) with one ``python -m lmtune.train`` process per point.
4. ``kill_resume``: a training process SIGKILLed after its first checkpoint, resumed with ``--resume``, reproduces
   the uninterrupted run's losses (dropout on: the RNG states too).
5. ``parity``: SDPA vs manual attention and compiled vs eager, loss and gradients on the same weights.

Results go to ``--out`` (default benchmarks/results) after every check, so a hang loses only the check it hung in;
every run that failed, or left no summary, keeps the tail of its output in the report. Each process runs under a
timeout, and a check that would start after the time budget (``--budget-s``) is skipped, said so.

Without CUDA it says so in one line and exits 0 having run nothing. It needs only torch (2.5 or newer, for
``torch.compiler.set_stance``), numpy and tiktoken, from the source tree, no network (byte-level tokens of the
built-in corpus, padded to GPT-2's vocabulary size). ``--rehearse-on-cpu`` runs the same checks at tiny sizes on the
CPU (an emulated limit instead of a CUDA OOM; the phase-0 bands are a GPU's and are printed, not applied).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmtune.config import ConfigError  # noqa: E402 — after the source tree is on the path
from lmtune.device import accelerator  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BYTES = ["data.dataset=builtin", "data.tokenizer=byte"]
GPT2_SMALL = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024", "data.seq_len=1024",
              "model.vocab_size=50304", "train.dtype=bfloat16"]
A100_USABLE_GIB = 39.4
"""What torch reports of an A100 40 GB: the phase-0 study's device."""


@dataclass(frozen=True)
class Band:
    """A figure's accepted range, and where it comes from."""

    low: float | None
    high: float | None
    source: str
    applies: bool = True

    def holds(self, value: float | None) -> bool:
        if not self.applies:
            return True
        return value is not None and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def text(self, value: float | None, unit: str = "") -> str:
        shown = "—" if value is None else f"{value:.3g}{unit}"
        lo = "" if self.low is None else f"{self.low:.3g}"
        hi = "" if self.high is None else f"{self.high:.3g}"
        rng = f"≥ {lo}" if self.high is None else f"≤ {hi}" if self.low is None else f"{lo}–{hi}"
        verdict = ("in band" if self.holds(value) else "OUT OF BAND") if self.applies else "band not applied"
        return f"{shown} (band {rng}{unit}; {self.source}; {verdict})"


class Sizes:
    """Model and run sizes per mode: the phase-0 study's on a GPU, tiny on the CPU rehearsal."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = "cpu" if cpu else "cuda"
        tiny = ["model.n_layer=4", "model.n_head=2", "model.n_embd=64", "model.block_size=64", "data.seq_len=64",
                "model.vocab_size=512", "train.dtype=float32"]
        self.model = tiny if cpu else GPT2_SMALL
        self.seed_mb, self.budget_mb = (8, 16) if cpu else (16, 32)
        self.steps, self.warmup = (12, 3) if cpu else (30, 5)
        self.frontier_xs = [8, 16, 24, 32] if cpu else [24, 28, 32, 36]
        self.frontier_compile = not cpu  # the study's frontier was compiled; on 2 CPU cores it would take minutes
        self.small = ["model.n_layer=2" if cpu else "model.n_layer=6", "model.n_head=2" if cpu else "model.n_head=8",
                      "model.n_embd=64" if cpu else "model.n_embd=256", "model.block_size=64" if cpu else
                      "model.block_size=256", "data.seq_len=64" if cpu else "data.seq_len=256",
                      "train.micro_batch_size=4" if cpu else "train.micro_batch_size=8"]
        self.timeout = 300 if cpu else 420

    def common(self) -> list[str]:
        return [*BYTES, f"system.device={self.device}", "train.checkpoint=false", "train.measure_interval=0",
                "train.eval_sequences=8"]


# --- processes that keep what they said ------------------------------------------------------------------


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def spawn(args: list[str], log: Path, *, cwd: Path) -> subprocess.Popen:
    """``python ARGS`` in a process group of its own, stdout and stderr into ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """The process's exit code; past ``timeout`` its whole group is killed and the code is -9."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


def train(args: list[str], out: Path, *, timeout: float) -> dict[str, Any]:
    """``python -m lmtune.train ARGS --out OUT --no-wandb`` in a fresh process (memory figures per process); returns
    its summary.json. A run that failed or left no summary carries its exit code and the tail of its output; one
    that left no status (it crashed before writing one) is ``status: error``."""
    log = out.with_suffix(".log")
    code = finish(spawn(["-m", "lmtune.train", *args, "--out", str(out), "--no-wandb"], log, cwd=out.parent), timeout)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    summary["returncode"] = code
    summary.setdefault("status", "error")
    if code != 0 or summary["status"] not in ("ok", "oom"):
        summary["output"] = ("timed out after %.0f s\n" % timeout if code == -9 else "") + tail(log)
    return summary


def why(summary: dict[str, Any]) -> str:
    """A failed run in one problem line: its status, exit code and the last lines it printed."""
    lines = [ln for ln in summary.get("output", "").strip().splitlines() if ln.strip()][-6:]
    return f"status {summary.get('status')} (exit {summary.get('returncode')}): " + " | ".join(lines)


def run_args(sizes: Sizes, mb: int, budget: float, *, compile_: bool, steps: int, warmup: int,
             limit_gib: float = 0.0) -> list[str]:
    args = [*sizes.common(), *sizes.model, f"train.compile={str(compile_).lower()}", f"train.ac_budget={budget}",
            f"train.micro_batch_size={mb}", f"train.steps={steps}", f"train.compile_warmup_steps={warmup}",
            f"train.eval_interval={steps}", f"train.log_interval={max(1, steps // 4)}"]
    return args + ([f"system.memory_limit_gib={limit_gib}"] if limit_gib else [])


def result(problems: list[str], figures: dict[str, Any], bands: dict[str, str] | None = None) -> dict[str, Any]:
    return {"ok": not problems, "problems": problems, "figures": figures, "bands": bands or {}}


# --- 0. preflight --------------------------------------------------------------------------------------


def preflight(sizes: Sizes) -> list[str]:
    """What the checks need and the machine lacks, each in words (empty: nothing)."""
    missing = []
    if not hasattr(torch.compiler, "set_stance"):
        missing.append(f"torch {torch.__version__} is too old (2.5 or newer: torch.compiler.set_stance)")
    accel = accelerator(sizes.device)
    needs = accel.compile_missing()
    if needs:
        missing.append(needs)
    free = accel.free_memory_gib()
    need = 1.0 if sizes.cpu else 45.0  # the largest run: GPT-2 small at micro-batch 36 without AC, about 45 GiB
    if free < need:
        missing.append(f"{free:.1f} GiB of device memory free, {need:.0f} GiB needed (other processes on the GPU?)")
    return missing


# --- 1. the phase-0 study's model --------------------------------------------------------------------------


def check_seed_model(sizes: Sizes, work: Path) -> dict[str, Any]:
    s = train(run_args(sizes, sizes.seed_mb, 1.0, compile_=True, steps=sizes.steps, warmup=sizes.warmup),
              work / "seed", timeout=sizes.timeout)
    figures = {k: s.get(k) for k in ("status", "tokens_per_s", "mfu", "avg_step_time_ms", "peak_reserved_gib",
                                     "peak_allocated_gib", "alloc_retries", "compiles_after_warmup", "device_name",
                                     "device_memory_gib", "val_loss")}
    if s["status"] != "ok":
        return result([why(s)], figures)
    name = str(s.get("device_name", ""))
    hopper = bool(re.search(r"\bH(100|200)\b", name))
    peak_band = Band(22.5 * 0.8, 22.5 * 1.2, "phase-0 A100: 22.5 GiB ±20%", applies=not sizes.cpu)
    mfu_band = Band(0.35, None, "H100/H200 target", applies=hopper)
    bands = {"peak_reserved_gib": peak_band.text(s.get("peak_reserved_gib"), " GiB"),
             "mfu": mfu_band.text(s.get("mfu"))}
    problems = []
    if not peak_band.holds(s.get("peak_reserved_gib")):
        problems.append(f"peak_reserved_gib {bands['peak_reserved_gib']}")
    if not mfu_band.holds(s.get("mfu")):
        problems.append(f"mfu {bands['mfu']}")
    if not sizes.cpu and not s.get("mfu"):
        problems.append(f"no MFU: {name!r} is not in lmtune.device.specs.PEAK_BF16_FLOPS")
    if s.get("compiles_after_warmup") != 0:
        problems.append(f"{s.get('compiles_after_warmup')} graph(s) compiled after warmup")
    problems += [f"no {k}" for k in ("peak_reserved_gib", "peak_allocated_gib", "tokens_per_s") if not s.get(k)]
    return result(problems, figures, bands)


# --- 2. the activation budget --------------------------------------------------------------------------


def check_ac_budget(sizes: Sizes, work: Path) -> dict[str, Any]:
    peaks, problems = {}, []
    for budget in (1.0, 0.75):
        s = train(run_args(sizes, sizes.budget_mb, budget, compile_=True, steps=max(8, sizes.warmup + 4),
                           warmup=sizes.warmup), work / f"budget-{budget}", timeout=sizes.timeout)
        if s["status"] != "ok":
            problems.append(f"ac_budget {budget}: {why(s)}")
        peaks[budget] = s.get("peak_reserved_gib")
    figures = {f"peak_reserved_gib_at_budget_{b}": p for b, p in peaks.items()}
    figures["phase0_a100"] = "budget 0.75 at mb 32: 34.2 GiB; budget 1.0 at mb 32: OOM (> 39.4 GiB)"
    bands = {}
    if not problems:
        bands["peak_reserved_gib_at_budget_0.75"] = Band(None, peaks[1.0], "below budget 1.0's peak").text(
            peaks[0.75], " GiB")
        if not peaks[0.75] < peaks[1.0]:
            problems.append(f"budget 0.75 peaks at {peaks[0.75]:.3f} GiB, not below budget 1.0's {peaks[1.0]:.3f}")
    return result(problems, figures, bands)


# --- 3. the A100 frontier, emulated -----------------------------------------------------------------------


def frontier_limit(sizes: Sizes, work: Path) -> float:
    """39.4 GiB on a GPU. On the CPU a limit that puts the boundary inside the grid as the A100's is in the study's
    (between the second and third points), from the peaks of the first two points (memory is linear in the mb)."""
    if not sizes.cpu:
        return A100_USABLE_GIB
    xs, peaks = sizes.frontier_xs, {}
    for mb in xs[:2]:
        s = train(run_args(sizes, mb, 1.0, compile_=False, steps=4, warmup=1), work / f"calibrate-{mb}",
                  timeout=sizes.timeout)
        if s["status"] != "ok":
            raise RuntimeError(f"calibration at micro-batch {mb}: {why(s)}")
        peaks[mb] = s["peak_reserved_gib"]
    slope = (peaks[xs[1]] - peaks[xs[0]]) / (xs[1] - xs[0])
    return peaks[xs[0]] + slope * ((xs[1] + xs[2]) / 2 - xs[0])


def frontier_through_trainer(sizes: Sizes, work: Path, limit: float) -> list[dict[str, Any]]:
    from lmtune.sweep.plan import FrontierPlan, simulate

    plan = FrontierPlan(sizes.frontier_xs, [{"train.ac_budget": 1.0}], limit_gib=limit, headroom_gib=0.0,
                        predict=False, confirm_throughput=False)

    def measure(cfg: dict[str, Any]) -> dict[str, Any]:
        mb = cfg["train.micro_batch_size"]
        return train(run_args(sizes, mb, 1.0, compile_=sizes.frontier_compile, steps=6, warmup=3, limit_gib=limit),
                     work / f"point-{mb}", timeout=sizes.timeout)

    rows = [{"source": "run", **t["config"], "status": t["result"]["status"],
             "oom_reason": t["result"].get("oom_reason", ""), "peak_reserved_gib": t["result"].get("peak_reserved_gib"),
             "output": t["result"].get("output", "")} for t in simulate(plan, measure)]
    return rows + plan.implied_rows()


SWEEP_FILE = '''
from lmtune.sweep import Frontier, Sweep, grid

sweep = Sweep(
    name="gpu-check-frontier",
    base={base!r},
    space={{"train.micro_batch_size": grid({xs!r}), "train.ac_budget": grid([1.0])}},
    searcher="frontier", metric="tokens_per_s", mode="max", gpus={gpus!r},
    # margin_gib: no point is skipped on a prediction, so the points above the boundary really run (and OOM)
    frontier=Frontier(x="train.micro_batch_size", budget="train.ac_budget", headroom_gib=0.0, margin_gib=1000.0),
)
'''


def frontier_through_sweep(sizes: Sizes, work: Path, limit: float) -> list[dict[str, Any]]:
    from lmtune import config as config_lib

    base = dict(a.split("=", 1) for a in run_args(sizes, 0, 1.0, compile_=sizes.frontier_compile, steps=6, warmup=3,
                                                   limit_gib=limit) if not a.startswith("train.micro_batch_size="))
    base = {k: config_lib.coerce(k, v) for k, v in base.items()}
    path = work / "gpu_check_frontier.py"
    path.write_text(SWEEP_FILE.format(base=base, xs=sizes.frontier_xs, gpus=0 if sizes.cpu else 1))
    log = work / "sweep.log"
    code = finish(spawn(["-m", "lmtune.sweep", str(path), "--storage", str(work / "sweep"), "--no-wandb",
                         "--no-report", "--no-dashboard"], log, cwd=work), 3 * sizes.timeout)
    if code != 0:
        raise RuntimeError(f"lmtune.sweep exited {code}: {tail(log, 800)}")
    (run_dir,) = (work / "sweep").glob("*-gpu-check-frontier-*")
    with open(run_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["train.micro_batch_size"] = int(r["train.micro_batch_size"])
        r["oom_reason"] = r.get("error", "")
    return rows


def check_a100_frontier(sizes: Sizes, work: Path, through: str = "auto") -> dict[str, Any]:
    limit = frontier_limit(sizes, work)
    if through == "auto":
        through = "sweep" if all(importlib.util.find_spec(m) for m in ("ray", "optuna")) else "trainer"
    rows = (frontier_through_sweep if through == "sweep" else frontier_through_trainer)(sizes, work, limit)
    by_x = {r["train.micro_batch_size"]: r for r in rows}
    ran = [r for r in rows if r.get("source", "run") == "run"]
    problems = [f"micro-batch {r['train.micro_batch_size']}: {why(r)}" for r in ran if r["status"] not in ("ok", "oom")]
    xs = sizes.frontier_xs
    fits = [x for x in xs if by_x.get(x, {}).get("status") == "ok"]
    ooms = [x for x in xs if by_x.get(x, {}).get("status") == "oom"]
    largest_fit, first_oom = max(fits, default=None), min(ooms, default=None)
    expected_fit = xs[1]  # the study: 28 fits, 32 is an OOM (on the CPU, where the calibrated limit puts it)
    step = xs[1] - xs[0]
    tolerance = Band(expected_fit - step, expected_fit + step, f"phase-0 A100: {expected_fit} fits, "
                     f"{expected_fit + step} OOM; one grid step of tolerance")
    bands = {"largest_feasible_micro_batch": tolerance.text(largest_fit)}
    if not tolerance.holds(largest_fit) or first_oom != (largest_fit or 0) + step:
        problems.append(f"boundary: largest feasible {largest_fit}, smallest OOM {first_oom} "
                        f"({bands['largest_feasible_micro_batch']})")
    expected = "memory_limit_gib" if sizes.cpu else "CUDA out of memory"
    real = [r for r in ran if r["status"] == "oom"]
    if not real:
        problems.append("no trial ran out of memory")
    problems += [f"micro-batch {r['train.micro_batch_size']}: OOM reason not the allocator's: {r.get('oom_reason')!r}"
                 for r in real if expected.lower() not in str(r.get("oom_reason", "")).lower()]
    points = [r["train.micro_batch_size"] for r in ran]
    if len(points) != len(set(points)):
        problems.append(f"a point ran twice (retried?): {points}")
    launched_above = [x for x in points if first_oom is not None and x > first_oom]
    if launched_above:
        problems.append(f"points above the first OOM ({first_oom}) were launched: {launched_above}")
    figures = {"through": through, "limit_gib": round(limit, 4), "compiled": sizes.frontier_compile,
               "points": [{k: r.get(k) for k in ("train.micro_batch_size", "status", "source", "peak_reserved_gib")}
                          for r in sorted(rows, key=lambda r: r["train.micro_batch_size"])]}
    return result(problems, figures, bands)


# --- 4. kill and resume -----------------------------------------------------------------------------------


def reports(run: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except OSError:
        return []


def check_kill_resume(sizes: Sizes, work: Path) -> dict[str, Any]:
    args = [*BYTES, *sizes.small, f"system.device={sizes.device}", "train.dtype=float32", "train.compile=false",
            "model.attention=manual", "model.dropout=0.1", "train.steps=60", "train.eval_interval=20",
            "train.log_interval=5", "train.measure_interval=0", "train.eval_sequences=16"]
    full = train(args, work / "uninterrupted", timeout=sizes.timeout)
    if full["status"] != "ok":
        return result([f"uninterrupted run: {why(full)}"], {})
    killed = work / "killed"
    proc = spawn(["-m", "lmtune.train", *args, "--out", str(killed), "--no-wandb"], work / "killed.log", cwd=work)
    deadline = time.monotonic() + sizes.timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "checkpoint" / "checkpoint.pt").is_file() and any(r["step"] >= 25 for r in reports(killed)):
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        return result([f"the run ended (exit {proc.returncode}) before it could be killed: "
                       f"{tail(work / 'killed.log', 600)}"], {})
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in reports(killed))
    log = work / "resumed.log"
    code = finish(spawn(["-m", "lmtune.train", "--resume", str(killed / "checkpoint"), "--no-wandb"], log, cwd=work),
                  sizes.timeout)
    problems = [] if code == 0 else [f"--resume exited {code}: {tail(log, 800)}"]
    a = {(r["step"], "val_loss" in r): r for r in reports(work / "uninterrupted") if r["status"] == "running"}
    b = {(r["step"], "val_loss" in r): r for r in reports(killed) if r["status"] == "running"}
    if set(a) != set(b):
        problems.append(f"report steps differ: {sorted(set(a) ^ set(b))}")
    worst = 0.0
    for key in sorted(set(a) & set(b)):
        for m in ("loss", "val_loss"):
            if m in a[key] and m in b[key]:
                worst = max(worst, abs(a[key][m] - b[key][m]) / abs(a[key][m]))
    summary = json.loads((killed / "summary.json").read_text()) if (killed / "summary.json").is_file() else {}
    if summary.get("val_loss") is None:
        problems.append("no final val_loss after the resume")
    else:
        worst = max(worst, abs(summary["val_loss"] - full["val_loss"]) / full["val_loss"])
    if worst > 1e-4:
        problems.append(f"losses differ from the uninterrupted run by up to {worst:.2e} (relative)")
    return result(problems, {"killed_after_step": killed_at, "max_relative_loss_difference": worst,
                             "final_val_loss": summary.get("val_loss"), "uninterrupted_val_loss": full.get("val_loss")})


# --- 5. parity ----------------------------------------------------------------------------------------


def check_parity(sizes: Sizes, work: Path) -> dict[str, Any]:
    from lmtune import config as config_lib
    from lmtune.model import GPT
    from lmtune.training.parallelize import parallelize

    accel = accelerator(sizes.device)
    dtype = torch.float32 if sizes.cpu else torch.bfloat16
    overrides = [*sizes.small, "train.ac_budget=1.0"]
    cfg = config_lib.load(overrides=overrides, locked=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, cfg.data.seq_len + 1), generator=gen)
    x, y = x[:, :-1].to(accel.device), x[:, 1:].to(accel.device)

    def run(attention: str, compile_: bool) -> tuple[float, torch.Tensor]:
        c = config_lib.load(overrides=[*overrides, f"model.attention={attention}",
                                       f"train.compile={str(compile_).lower()}"], locked=False)
        torch.manual_seed(0)
        model = parallelize(GPT(c.model, 256).to(accel.device), c.train, accel=accel)
        # A few steps first: at initialisation attention is nearly uniform and every kernel agrees trivially.
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for i in range(7):  # six updates, then the gradients compared
            opt.zero_grad(set_to_none=True)
            with torch.autocast(accel.device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(x, y)
            loss.backward()
            if i < 6:
                opt.step()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        return float(loss.detach()), grads

    base_loss, base_grads = run("sdpa", False)
    out, problems = {}, []
    for name, (attention, compile_) in {"manual_vs_sdpa": ("manual", False), "compiled_vs_eager": ("sdpa", True)}.items():
        loss, grads = run(attention, compile_)
        cos = float(torch.nn.functional.cosine_similarity(grads, base_grads, dim=0))
        rel = abs(loss - base_loss) / abs(base_loss)
        out[name] = {"relative_loss_difference": rel, "gradient_cosine": cos}
        loss_tol, cos_tol = (1e-4, 0.9999) if dtype == torch.float32 else (2e-2, 0.99)
        if rel > loss_tol or cos < cos_tol:
            problems.append(f"{name}: loss differs by {rel:.2e}, gradient cosine {cos:.6f}")
    torch._dynamo.reset()
    return result(problems, out)


# --- the run --------------------------------------------------------------------------------------


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {
    "seed_model": check_seed_model, "ac_budget": check_ac_budget, "a100_frontier": check_a100_frontier,
    "kill_resume": check_kill_resume, "parity": check_parity,
}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"{report['date']}, torch {report['torch']}, Python {report['python']}, "
             f"{'rehearsal on CPU (tiny sizes)' if report['rehearsal'] else 'one CUDA GPU'}, commit {report['commit']}; "
             f"{report['seconds']:.0f} s so far. Result: **{report['result']}**.", "",
             "| check | result | against the phase-0 table | figures |", "|---|---|---|---|"]
    for name, c in report["checks"].items():
        verdict = ("skipped: " + c["skipped"] if c.get("skipped") else
                   "pass" if c["ok"] else "FAIL: " + "; ".join(c["problems"]).replace("|", "/"))
        bands = "; ".join(f"{k} {v}" for k, v in c.get("bands", {}).items()) or "—"
        figures = json.dumps(c.get("figures", {}), default=str)
        lines.append(f"| {name} | {verdict} ({c.get('seconds', 0):.0f} s) | {bands} | `{figures[:900]}` |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path, stem: str) -> None:
    """The report as it stands: written after every check, so that a hang loses only the check it hung in."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(report))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rehearse-on-cpu", action="store_true", help="run every check at tiny sizes on the CPU")
    ap.add_argument("--only", nargs="*", choices=list(CHECKS), help="run these checks only")
    ap.add_argument("--out", default=str(RESULTS), help="directory for gpu_check.{json,md} (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=480, help="no check starts after this many seconds")
    ap.add_argument("--frontier-through", choices=["auto", "sweep", "trainer"], default="auto",
                    help="a100_frontier through python -m lmtune.sweep or the planner and trainer "
                         "(auto: sweep where Ray is installed)")
    args = ap.parse_args(argv)
    sizes = Sizes(cpu=args.rehearse_on_cpu)
    try:
        accel = accelerator(sizes.device)
    except ConfigError:
        print("gpu-check: no CUDA device present; nothing run (use --rehearse-on-cpu to test the script itself).")
        return 0
    device = "cpu (rehearsal)" if sizes.cpu else str(accel.info()["device_name"])
    stem = "gpu_check_rehearsal" if sizes.cpu else "gpu_check"
    out = Path(args.out)
    report: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit(), "rehearsal": sizes.cpu,
                              "checks": {}, "seconds": 0.0, "result": "running"}
    t0 = time.monotonic()
    missing = preflight(sizes)
    report["checks"]["preflight"] = result(missing, {"torch": torch.__version__, "cc": shutil.which("cc") or "",
                                                     "device_memory_free_gib": round(accel.free_memory_gib(), 2)})
    if missing:
        print(f"gpu-check: preflight: missing {'; '.join(missing)}; nothing run.")
        report["result"] = "FAIL (preflight)"
        write(report, out, stem)
        return 1
    with tempfile.TemporaryDirectory(prefix="lmtune-gpu-check-") as tmp:
        for name, check in CHECKS.items():
            if args.only and name not in args.only:
                continue
            elapsed = time.monotonic() - t0
            if elapsed > args.budget_s:
                report["checks"][name] = {"ok": True, "skipped": f"the time budget ({args.budget_s:.0f} s) was spent",
                                          "problems": []}
                print(f"gpu-check: {name} skipped: {elapsed:.0f} s spent of {args.budget_s:.0f}", flush=True)
                continue
            work = Path(tmp) / name
            work.mkdir()
            started = time.monotonic()
            print(f"gpu-check: {name} …", flush=True)
            try:
                kwargs = {"through": args.frontier_through} if name == "a100_frontier" else {}
                outcome = check(sizes, work, **kwargs)
            except Exception as exc:
                outcome = result([f"{type(exc).__name__}: {exc}"], {"traceback": traceback.format_exc()[-1500:]})
            outcome["seconds"] = time.monotonic() - started
            report["checks"][name] = outcome
            report["seconds"] = time.monotonic() - t0
            write(report, out, stem)
            for band in outcome.get("bands", {}).items():
                print(f"  {band[0]}: {band[1]}", flush=True)
            print(f"gpu-check: {name} {'pass' if outcome['ok'] else 'FAIL: ' + '; '.join(outcome['problems'])} "
                  f"({outcome['seconds']:.0f} s)", flush=True)
    report["seconds"] = time.monotonic() - t0
    ok = all(c["ok"] for c in report["checks"].values())
    report["result"] = "pass" if ok else "FAIL"
    write(report, out, stem)
    print(f"\ngpu-check: {report['result']} in {report['seconds']:.0f} s; {out / (stem + '.md')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
