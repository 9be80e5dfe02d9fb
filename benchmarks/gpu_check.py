"""GPU acceptance run: ``make gpu-check`` (``PYTHONPATH=. python benchmarks/gpu_check.py``).

On a machine with one CUDA GPU, in under 8 minutes, it runs the code paths that only a GPU exercises and
writes ``benchmarks/results/gpu_check.json`` and ``.md``, exiting 1 when a check fails:

(a) ``seed_model``: the phase-0 model (12 layers × 768, 12 heads, seq 1024, a 50,304-row vocabulary, bf16,
    compiled) for a few dozen steps: tokens/s, MFU, peak reserved/allocated after the warmup reset, and zero
    graphs compiled after warmup;
(b) ``frontier``: ac_budget {1.0, 0.5} × micro-batches under a memory limit that makes the largest micro-batch
    a real CUDA OOM (``torch.cuda.set_per_process_memory_fraction``): classified ``oom``, never retried, the
    larger points implied. Through ``python -m lmtune.sweep`` where Ray and Optuna are importable, else through
    the frontier planner (Ray-free) with one ``python -m lmtune.train`` process per point;
(c) ``kill_resume``: a training process SIGKILLed after its first checkpoint, resumed with
    ``--resume DIR/checkpoint``, reproduces the uninterrupted run's losses (dropout on: the RNG state too);
(d) ``parity``: SDPA vs manual attention and compiled vs eager, loss and gradients on the same weights.

Without CUDA it says so in one line and exits 0 having run nothing. It needs only torch (any 2.x with
``torch.compiler.set_stance``), numpy and tiktoken, from the source tree, no network (byte-level tokens of
the built-in corpus, padded to GPT-2's vocabulary size). ``--rehearse-on-cpu`` runs the same checks at tiny
sizes on the CPU (an emulated limit instead of a CUDA OOM) to test this script where there is no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
BYTES = ["data.dataset=builtin", "data.tokenizer=byte"]


class Sizes:
    """Model and run sizes per mode: the phase-0 study's on a GPU, tiny on the CPU rehearsal."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = "cpu" if cpu else "cuda"
        if cpu:
            self.seed = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                         "data.seq_len=64", "model.vocab_size=512", "train.micro_batch_size=8", "train.steps=12",
                         "train.compile_warmup_steps=3", "train.dtype=float32"]
            self.frontier_model = ["model.n_layer=4", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                                   "data.seq_len=64", "train.dtype=float32"]
            self.frontier_xs = [2, 4, 8, 16, 24, 32]
            self.small = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                          "data.seq_len=64", "train.micro_batch_size=4"]
        else:
            self.seed = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024",
                         "data.seq_len=1024", "model.vocab_size=50304", "train.micro_batch_size=16", "train.steps=40",
                         "train.compile_warmup_steps=5", "train.dtype=bfloat16"]
            self.frontier_model = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024",
                                   "data.seq_len=1024", "model.vocab_size=50304", "train.dtype=bfloat16"]
            self.frontier_xs = [2, 4, 8, 12, 16, 24]
            self.small = ["model.n_layer=6", "model.n_head=8", "model.n_embd=256", "model.block_size=256",
                          "data.seq_len=256", "train.micro_batch_size=8"]


def train(args: list[str], out: Path, *, timeout: float = 600) -> dict[str, Any]:
    """``python -m lmtune.train ARGS --out OUT --no-wandb`` in a fresh process (memory figures per process);
    returns its summary.json (with ``returncode`` and the tail of stderr when it failed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "lmtune.train", *args, "--out", str(out), "--no-wandb"],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    summary["returncode"] = proc.returncode
    if proc.returncode not in (0, 1):
        summary["stderr"] = proc.stderr[-2000:]
    return summary


def common(sizes: Sizes) -> list[str]:
    return [*BYTES, f"system.device={sizes.device}", "train.checkpoint=false", "train.measure_interval=0",
            "train.eval_sequences=8"]


# --- (a) the phase-0 study's model -------------------------------------------------------------------------


def check_seed_model(sizes: Sizes, work: Path) -> dict[str, Any]:
    steps = next(int(a.split("=")[1]) for a in sizes.seed if a.startswith("train.steps="))
    s = train([*common(sizes), *sizes.seed, "train.compile=true", "train.ac_budget=1.0", f"train.eval_interval={steps}",
               f"train.log_interval={max(1, steps // 4)}"], work / "seed")
    figures = {k: s.get(k) for k in ("status", "tokens_per_s", "mfu", "avg_step_time_ms", "peak_reserved_gib",
                                     "peak_allocated_gib", "alloc_retries", "compiles_after_warmup", "device_name",
                                     "device_memory_gib", "val_loss")}
    problems = []
    if s.get("status") != "ok":
        problems.append(f"status {s.get('status')} (returncode {s['returncode']}): {s.get('stderr', '')[-300:]}")
    if s.get("compiles_after_warmup") != 0:
        problems.append(f"{s.get('compiles_after_warmup')} graph(s) compiled after warmup")
    if not sizes.cpu and not s.get("mfu"):
        problems.append("no MFU (device not in the peak-FLOPs table?)")
    for key in ("peak_reserved_gib", "peak_allocated_gib", "tokens_per_s"):
        if not s.get(key):
            problems.append(f"no {key}")
    return {"ok": not problems, "problems": problems, "figures": figures}


# --- (b) a small frontier with a real OOM -----------------------------------------------------------


def calibrate_limit(sizes: Sizes, work: Path) -> tuple[float, dict[int, float]]:
    """Peaks at the two smallest micro-batches (budget 1.0), and a limit half-way between the peaks of the third and
    the second largest grid points (memory is linear in the micro-batch): the second largest is a real OOM at
    budget 1.0, the largest then OOM by implication."""
    xs = sizes.frontier_xs
    peaks = {}
    for mb in xs[:2]:
        s = train([*common(sizes), *sizes.frontier_model, "train.compile=false", "train.ac_budget=1.0",
                   f"train.micro_batch_size={mb}", "train.steps=4", "train.compile_warmup_steps=1",
                   "train.eval_interval=4", "train.log_interval=1"], work / f"calibrate-{mb}")
        if s.get("status") != "ok":
            raise RuntimeError(f"calibration run at micro-batch {mb} ended {s.get('status')}: {s.get('stderr', '')[-300:]}")
        peaks[mb] = s["peak_reserved_gib"]
    slope = (peaks[xs[1]] - peaks[xs[0]]) / (xs[1] - xs[0])
    at = lambda x: peaks[xs[0]] + slope * (x - xs[0])  # noqa: E731
    return at(xs[-3]) + (at(xs[-2]) - at(xs[-3])) * 0.5, peaks


def frontier_through_trainer(sizes: Sizes, work: Path, limit: float) -> list[dict[str, Any]]:
    from lmtune.sweep.plan import FrontierPlan, simulate

    plan = FrontierPlan(sizes.frontier_xs, [{"train.ac_budget": 1.0}, {"train.ac_budget": 0.5}], limit_gib=limit,
                        headroom_gib=0.0, predict=False, confirm_throughput=False)

    def measure(cfg: dict[str, Any]) -> dict[str, Any]:
        mb, budget = cfg["train.micro_batch_size"], cfg["train.ac_budget"]
        s = train([*common(sizes), *sizes.frontier_model, "train.compile=false", f"train.ac_budget={budget}",
                   f"train.micro_batch_size={mb}", "train.steps=4", "train.compile_warmup_steps=1",
                   "train.eval_interval=4", "train.log_interval=1", f"system.memory_limit_gib={limit}"],
                  work / f"point-{budget}-{mb}")
        return s

    launched = simulate(plan, measure)
    rows = [{"trial_id": t["trial_id"], "source": "run", **t["config"], "status": t["result"].get("status", "error"),
             "oom_reason": t["result"].get("oom_reason", ""), "peak_reserved_gib": t["result"].get("peak_reserved_gib")}
            for t in launched]
    return rows + plan.implied_rows()


SWEEP_FILE = '''
from lmtune.sweep import Frontier, Sweep, grid

sweep = Sweep(
    name="gpu-check-frontier",
    base={base!r},
    space={{"train.micro_batch_size": grid({xs!r}), "train.ac_budget": grid([0.5, 1.0])}},
    searcher="frontier", metric="tokens_per_s", mode="max", gpus={gpus!r},
    # margin_gib: no point is skipped on a prediction, so the largest micro-batch really runs (and OOMs)
    frontier=Frontier(x="train.micro_batch_size", budget="train.ac_budget", headroom_gib=0.0, margin_gib=1000.0),
)
'''


def frontier_through_sweep(sizes: Sizes, work: Path, limit: float) -> list[dict[str, Any]]:
    import csv

    base = {}
    for arg in [*common(sizes), *sizes.frontier_model, "train.compile=false", "train.steps=4",
                "train.compile_warmup_steps=1", "train.eval_interval=4", "train.log_interval=1",
                f"system.memory_limit_gib={limit}"]:
        key, _, value = arg.partition("=")
        base[key] = value
    from lmtune import config as config_lib

    base = {k: config_lib.coerce(k, v) for k, v in base.items()}
    path = work / "gpu_check_frontier.py"
    path.write_text(SWEEP_FILE.format(base=base, xs=sizes.frontier_xs, gpus=0 if sizes.cpu else 1))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "lmtune.sweep", str(path), "--storage", str(work / "sweep"),
                           "--no-wandb", "--no-report"], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"lmtune.sweep exited {proc.returncode}: {proc.stderr[-500:] or proc.stdout[-500:]}")
    (run_dir,) = (work / "sweep").glob("*-gpu-check-frontier-*")
    with open(run_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["train.micro_batch_size"] = int(r["train.micro_batch_size"])
        r["train.ac_budget"] = float(r["train.ac_budget"])
        r["oom_reason"] = r.get("error", "")
    return rows


FRONTIER_THROUGH = ["auto"]


def check_frontier(sizes: Sizes, work: Path) -> dict[str, Any]:
    limit, peaks = calibrate_limit(sizes, work)
    through = FRONTIER_THROUGH[0]
    if through == "auto":
        through = "sweep" if all(importlib.util.find_spec(m) for m in ("ray", "optuna")) else "trainer"
    rows = (frontier_through_sweep if through == "sweep" else frontier_through_trainer)(sizes, work, limit)
    ran = [r for r in rows if r.get("source", "run") == "run"]
    largest, ooms = sizes.frontier_xs[-1], sizes.frontier_xs[-2]
    full = {r["train.micro_batch_size"]: r for r in rows if r["train.ac_budget"] == 1.0}
    problems = []
    real = [r for r in ran if r["status"] == "oom"]
    if not real:
        problems.append("no trial ran out of memory")
    expected = "emulated" if sizes.cpu else "CUDA out of memory"
    wrong = [r for r in real if expected.lower() not in str(r.get("oom_reason", "")).lower()
             and not (sizes.cpu and "memory_limit_gib" in str(r.get("oom_reason", "")))]
    if wrong:
        problems.append(f"OOM reasons not from the allocator: {[r.get('oom_reason') for r in wrong]}")
    points = [(r["train.ac_budget"], r["train.micro_batch_size"]) for r in ran]
    if len(points) != len(set(points)):
        problems.append(f"a point ran twice (retried?): {points}")
    if full.get(ooms, {}).get("status") != "oom" or full.get(ooms, {}).get("source", "run") != "run":
        problems.append(f"micro-batch {ooms} at ac_budget 1.0 is {full.get(ooms, {}).get('status')} "
                        f"({full.get(ooms, {}).get('source')}), not a real OOM")
    if full.get(largest, {}).get("source") != "implied":
        problems.append(f"micro-batch {largest} at ac_budget 1.0 is {full.get(largest, {}).get('source')}, not implied")
    first_oom = min((x for x, r in full.items() if r["status"] == "oom" and r.get("source", "run") == "run"),
                    default=None)
    above = [r for x, r in full.items() if first_oom is not None and x > first_oom]
    if any(r.get("source") != "implied" for r in above):
        problems.append(f"points above the first OOM ({first_oom}) were launched: "
                        f"{[(r['train.micro_batch_size'], r.get('source')) for r in above]}")
    figures = {"through": through, "limit_gib": round(limit, 3), "calibration_peaks_gib": peaks,
               "points": [{k: r.get(k) for k in ("train.ac_budget", "train.micro_batch_size", "status", "source",
                                                 "peak_reserved_gib")} for r in rows]}
    return {"ok": not problems, "problems": problems, "figures": figures}


# --- (c) kill and resume ----------------------------------------------------------------------------


def reports(run: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except OSError:
        return []


def check_kill_resume(sizes: Sizes, work: Path) -> dict[str, Any]:
    args = [*BYTES, *sizes.small, f"system.device={sizes.device}", "train.dtype=float32", "train.compile=false",
            "model.attention=manual", "model.dropout=0.1", "train.steps=60", "train.eval_interval=20",
            "train.log_interval=5", "train.measure_interval=0", "train.eval_sequences=16"]
    full = train(args, work / "uninterrupted")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = work / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lmtune.train", *args, "--out", str(killed), "--no-wandb"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=work)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "checkpoint" / "checkpoint.pt").is_file() and any(r["step"] >= 25 for r in reports(killed)):
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        return {"ok": False, "problems": [f"the run ended (exit {proc.returncode}) before it could be killed"],
                "figures": {}}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in reports(killed))
    resumed = subprocess.run([sys.executable, "-m", "lmtune.train", "--resume", str(killed / "checkpoint"),
                              "--no-wandb"], capture_output=True, text=True, env=env, cwd=work, timeout=600)
    problems = []
    if resumed.returncode != 0:
        problems.append(f"--resume exited {resumed.returncode}: {resumed.stderr[-500:]}")
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
    if summary.get("val_loss") is None or full.get("val_loss") is None:
        problems.append("no final val_loss")
    else:
        worst = max(worst, abs(summary["val_loss"] - full["val_loss"]) / full["val_loss"])
    if worst > 1e-4:
        problems.append(f"losses differ from the uninterrupted run by up to {worst:.2e} (relative)")
    return {"ok": not problems, "problems": problems,
            "figures": {"killed_after_step": killed_at, "max_relative_loss_difference": worst,
                        "final_val_loss": summary.get("val_loss"), "uninterrupted_val_loss": full.get("val_loss")}}


# --- (d) parity ----------------------------------------------------------------------------------


def check_parity(sizes: Sizes, work: Path) -> dict[str, Any]:
    from lmtune import config as config_lib
    from lmtune.model import GPT
    from lmtune.training.parallelize import parallelize

    device = torch.device(sizes.device)
    dtype = torch.float32 if sizes.cpu else torch.bfloat16
    overrides = [*sizes.small, "train.ac_budget=1.0"]
    cfg = config_lib.load(overrides=overrides, locked=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, cfg.data.seq_len + 1), generator=gen)
    x, y = x[:, :-1].to(device), x[:, 1:].to(device)

    def run(attention: str, compile_: bool) -> tuple[float, torch.Tensor]:
        c = config_lib.load(overrides=[*overrides, f"model.attention={attention}", f"train.compile={str(compile_).lower()}"],
                            locked=False)
        torch.manual_seed(0)
        model = GPT(c.model, 256).to(device)
        model = parallelize(model, c.train)
        # A few steps first: at initialisation attention is nearly uniform and every kernel agrees trivially.
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(x, y)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        loss.backward()
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
    return {"ok": not problems, "problems": problems, "figures": out}


# --- the run --------------------------------------------------------------------------------------


CHECKS: dict[str, Callable[[Sizes, Path], dict[str, Any]]] = {
    "seed_model": check_seed_model, "frontier": check_frontier, "kill_resume": check_kill_resume, "parity": check_parity,
}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"{report['date']}, torch {report['torch']}, Python {report['python']}, "
             f"{'rehearsal on CPU (tiny sizes)' if report['rehearsal'] else 'one CUDA GPU'}; "
             f"{report['seconds']:.0f} s in all. Result: **{'pass' if report['ok'] else 'FAIL'}**.", "",
             "| check | result | figures |", "|---|---|---|"]
    for name, c in report["checks"].items():
        result = "skipped: " + c["skipped"] if c.get("skipped") else ("pass" if c["ok"] else "FAIL: " + "; ".join(c["problems"]))
        figures = json.dumps(c.get("figures", {}), default=str)
        lines.append(f"| {name} | {result} ({c.get('seconds', 0):.0f} s) | `{figures[:900]}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rehearse-on-cpu", action="store_true", help="run every check at tiny sizes on the CPU")
    ap.add_argument("--only", nargs="*", choices=list(CHECKS), help="run these checks only")
    ap.add_argument("--out", default=str(RESULTS), help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--frontier-through", choices=["auto", "sweep", "trainer"], default="auto",
                    help="(b) through python -m lmtune.sweep or the planner and trainer (auto: sweep when Ray is there)")
    args = ap.parse_args(argv)
    FRONTIER_THROUGH[0] = args.frontier_through
    if not args.rehearse_on_cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA device present; nothing run (use --rehearse-on-cpu to test the script itself).")
        return 0
    sizes = Sizes(cpu=args.rehearse_on_cpu)
    device = "cpu (rehearsal)" if sizes.cpu else torch.cuda.get_device_name(0)
    report: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "rehearsal": sizes.cpu, "checks": {}}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lmtune-gpu-check-") as tmp:
        for name, check in CHECKS.items():
            if args.only and name not in args.only:
                continue
            work = Path(tmp) / name
            work.mkdir()
            started = time.monotonic()
            print(f"gpu-check: {name} …", flush=True)
            try:
                result = check(sizes, work)
            except Exception as exc:  # noqa: BLE001 — a check that crashes is a failed check, with its reason
                result = {"ok": False, "problems": [f"{type(exc).__name__}: {exc}"],
                          "figures": {"traceback": traceback.format_exc()[-1500:]}}
            result["seconds"] = time.monotonic() - started
            report["checks"][name] = result
            print(f"gpu-check: {name} {'pass' if result['ok'] else 'FAIL ' + '; '.join(result['problems'])} "
                  f"({result['seconds']:.0f} s)", flush=True)
    report["seconds"] = time.monotonic() - t0
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_rehearsal" if sizes.cpu else "gpu_check"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(report))
    print(textwrap.dedent(f"""
        gpu-check: {'pass' if report['ok'] else 'FAIL'} in {report['seconds']:.0f} s; {out / (stem + '.md')}"""))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
