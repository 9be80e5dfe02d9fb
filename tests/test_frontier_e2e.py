"""The memory frontier end to end on the real stack: sweep → frontier tables → export → trainer, and the README's
first hour, whose demo is that sweep.

* the shipped ``sweeps/memory_frontier.py --smoke`` as ``make demo`` runs it (one run for the module): an emulated
  device limit on CPU that the larger micro-batches really cross; statuses, implied OOMs never launched (counted in
  Tune's trial dirs), frontier table rows equal to the trial results, a PNG, a recommended point; export writes
  locked defaults that the next ``python -m lmtune.train`` uses; an export of other values without --force is
  refused;
* README.md's "A first hour with lmtune", every command of it in its order, as written (the few that cannot run
  here are named with why, and one is shortened, said where): each one's exit code and the files it names;
* a real ``torch.OutOfMemoryError`` raised in the trainer at a chosen micro-batch: oom rows, never retried,
  larger micro-batches implied;
* a frontier sweep stopped with Ctrl-C, resumed, SIGKILLed, resumed again: one row per grid point, and the rows,
  frontier, recommendation and counts of the sweep an uninterrupted driver runs on the same measurements.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, run_module
from tests.frontier_fixtures import B, X
from tests.helpers import only_run, rows, sweep_file

pytestmark = pytest.mark.slow


def _shell(command: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``command`` in a shell as a user types it after ``source .venv/bin/activate``: ``python`` is this
    interpreter, lmtune is this checkout. W&B is off (``WANDB_MODE=disabled``, README's W&B row): an offline run per
    trial costs each trial process seconds of a 2-core machine, and W&B is tested elsewhere."""
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "python").exists(), f"no `python` next to {sys.executable}"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``make demo`` in a fresh directory, once for the module (the Makefile's own recipe; ``-o install`` leaves out
    the environment it would otherwise create first, which is this one): the directory and the run."""
    home = tmp_path_factory.mktemp("first-hour")
    (home / "sweeps").mkdir()
    (home / "sweeps" / "memory_frontier.py").symlink_to(REPO / "sweeps" / "memory_frontier.py")
    proc = _shell(f"make -s -f {REPO / 'Makefile'} -o install demo PY={sys.executable}", home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return home, proc


def _frontier_rows(results):
    with open(results / "frontier.csv", newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def _launched(results) -> set[str]:
    """The trials Ray actually ran: Tune's trial directories."""
    return {p.name for p in (results / "tune").iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_memory_frontier_smoke_then_export_then_train(demo, in_tmp):
    results = only_run(demo[0] / "results")
    table = rows(results)
    ran = {t for t, r in table.items() if r["source"] == "run"}
    implied = {t for t, r in table.items() if r["source"] in ("implied", "predicted")}
    assert ran == _launched(results)  # every row that says it ran did, and nothing else ran
    assert implied and all(table[t]["status"] == "oom" for t in implied)
    assert {r["status"] for r in table.values()} == {"ok", "oom"}
    limit = json.loads((results / "sweep.json").read_text())["memory_limit_gib"]
    for r in table.values():  # the emulated limit was really crossed by what ran as oom, and only by it
        if r["source"] == "run":
            assert (float(r["peak_reserved_gib"]) > limit) == (r["status"] == "oom"), r
    budget_mb = {}
    for r in table.values():
        budget_mb.setdefault(r["train.ac_budget"], []).append((int(r["train.micro_batch_size"]), r["status"]))
    for points in budget_mb.values():  # monotone: nothing ok above an oom at the same budget
        first_oom = min((mb for mb, s in points if s == "oom"), default=None)
        assert first_oom is None or all(s == "oom" for mb, s in points if mb >= first_oom)
    frontier = _frontier_rows(results)
    assert set(frontier) == set(table)
    for t, r in frontier.items():
        for key in ("peak_reserved_gib", "tokens_per_s"):
            if table[t][key]:
                assert float(r[key]) == pytest.approx(float(table[t][key]))
    md = (results / "frontier.md").read_text()
    assert "Recommended operating point:" in md and "OOM (implied)" in md
    assert (results / "plots" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # At every micro-batch both budgets ran at, the lower budget peaked lower (by at least 10%): on CPU the
    # frontier shows what activation checkpointing saves, not only what it costs.
    peaks = {(r["train.ac_budget"], r["train.micro_batch_size"]): float(r["peak_reserved_gib"])
             for r in table.values() if r["source"] == "run" and r["status"] == "ok"}
    both = [mb for (b, mb) in peaks if b == "0.5" and ("1.0", mb) in peaks]
    assert both and all(peaks[("0.5", mb)] < 0.9 * peaks[("1.0", mb)] for mb in both), peaks
    assert "AC mode: blocks" in md and "ac_budget=0.5 (blocks)" in md

    refused = run_module("lmtune.export", str(results), cwd=in_tmp)  # a smoke run: not silently the defaults
    assert refused.returncode == 2 and "a --smoke run" in refused.stderr
    assert not (in_tmp / "lmtune.locked.toml").exists()
    export = run_module("lmtune.export", str(results), "--force", cwd=in_tmp)
    assert export.returncode == 0, export.stderr
    locked = (in_tmp / "lmtune.locked.toml").read_text()
    assert "[provenance.\"train.micro_batch_size\"]" in locked and 'ac_mode = "blocks"' in locked
    train = run_module("lmtune.train", *[a for a in TINY if not a.startswith(("train.micro_batch_size", "train.ac_budget"))],
                       "train.steps=2", "train.eval_interval=2", "--no-wandb", "--out", "after", cwd=in_tmp)
    assert train.returncode == 0, train.stderr
    used = json.loads((in_tmp / "after" / "summary.json").read_text())["config"]
    recommended = json.loads((results / "frontier.json").read_text())["recommended"]
    assert used["train.micro_batch_size"] == recommended["train.micro_batch_size"]
    assert used["train.ac_budget"] == recommended["line"]["train.ac_budget"]  # an eager run: the blocks budget applies
    before = (in_tmp / "lmtune.locked.toml").read_text()
    again = run_module("lmtune.export", str(results), "--to", "lmtune.locked.toml", cwd=in_tmp)
    assert again.returncode == 0 and "unchanged, it already holds these values" in again.stdout  # the same winner
    other = next(t for t, r in table.items() if r["status"] == "ok" and t != recommended["trial_id"])
    changed = run_module("lmtune.export", str(results), "--to", "lmtune.locked.toml", "--trial", other, cwd=in_tmp)
    assert changed.returncode == 2 and "--force" in changed.stderr
    assert (in_tmp / "lmtune.locked.toml").read_text() == before


FIRST_HOUR = [
    # (the command as README.md writes it, what this test does with it)
    ("make demo", "run"),
    ("make test", "skip: it is this test suite"),
    ("make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu", "skip: installs torch; `make demo` runs"),
    ("python -m lmtune.export results/1-memory-frontier-<timestamp> --to smoke.locked.toml", "run"),
    ("python -m lmtune.export results/1-memory-frontier-<timestamp> --to smoke.locked.toml --validate 30", "run"),
    ("python -m lmtune.train --locked smoke.locked.toml model.n_layer=4 model.n_head=4 model.n_embd=128 "
     "model.block_size=128 data.tokenizer=byte data.seq_len=128 train.dtype=float32 train.compile=false "
     "system.device=cpu train.steps=300 --out runs/byte-300", "run: train.steps=5"),
    ("python -m lmtune.train --locked smoke.locked.toml train.compile=false --describe | grep -A1 micro_batch_size",
     "run"),
    ('python -m lmtune.generate --checkpoint runs/byte-300/checkpoint --prompt "The " --max-new-tokens 100', "run"),
    ("python -m lmtune.sweep sweeps/my_optimizer.py --smoke", "run"),
    ("python -m lmtune.sweep sweeps/my_optimizer.py", "skip: the full-size sweep, for GPUs"),
]
"""README's first hour, command by command. "run: a=b" runs it with ``a``'s value replaced by ``b`` (the one
shortening: 300 training steps of the 4×128 model are two minutes on 2 cores, 5 make the same files)."""


def first_hour(readme: str) -> tuple[list[str], dict[str, str]]:
    """The shell commands of README.md's "A first hour with lmtune" (its ```bash blocks, continuation lines joined,
    comments dropped) and the files its ```python blocks say they are (a first line ``# path``)."""
    section = readme.split("## A first hour with lmtune", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line)
            if line.strip():
                commands.append(" ".join(line.split()))
    files = {m.group(1): m.group(2) for m in re.finditer(r"```python\n# (\S+)\n(.*?)```", section, re.S)}
    return commands, files


def test_the_readme_first_hour_runs_as_written(demo):
    """Every command README.md's first hour prints, in its order, as a user pastes them: each exits as the README
    says and leaves the files it names. The README cannot drift from the tools: a changed command fails here first
    (update FIRST_HOUR with it), as does a command that no longer does what the README says."""
    commands, files = first_hour((REPO / "README.md").read_text())
    assert commands == [c for c, _ in FIRST_HOUR], "README.md's first hour changed: update FIRST_HOUR"
    home, made = demo
    ran = {}
    for command, how in FIRST_HOUR:
        if how.startswith("skip"):
            continue
        if command == "make demo":
            ran[command] = made  # the module's run (the frontier test reads it too)
            continue
        if "sweeps/my_optimizer.py" in command:
            (home / "sweeps" / "my_optimizer.py").write_text(files["sweeps/my_optimizer.py"])
        if "<timestamp>" in command:
            (run,) = (home / "results").glob("1-memory-frontier-*")
            command = command.replace("<timestamp>", run.name.removeprefix("1-memory-frontier-"))
        if how.startswith("run: "):
            old, new = how.removeprefix("run: ").split("=", 1)[0], how.removeprefix("run: ")
            command = re.sub(rf"{re.escape(old)}=\S+", new, command)
        ran[command] = _shell(command, home)
        proc = ran[command]
        if "--validate" in command:  # exits 1 and writes nothing when this busy machine's timing drifts
            assert proc.returncode == 0 or (proc.returncode == 1 and "validation FAILED: tokens/s drifted" in proc.stdout
                                            and "keeps what it had" in proc.stdout), (command, proc.stdout, proc.stderr)
        else:
            assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr, (command, proc.stderr)

    # 1. the demo: the frontier's files, and its first lines say what it runs
    out = made.stdout
    (results,) = (home / "results").glob("1-memory-frontier-*")
    for name in ("frontier.md", "frontier.csv", "frontier.json", "summary.md", "report.html", "trials.csv",
                 "plots/frontier.png", "plots/loss_curves.png"):
        assert (results / name).is_file(), name
    assert "each trial: 4 layers × 128 wide (4 heads), seq 128, byte tokens of builtin" in out, out
    assert out.rstrip().splitlines()[-1].startswith("report: ") and "report.html" in out.rstrip().splitlines()[-1]
    # 3. the export writes both files, and the second (validating) one finds them in place
    export, validate = [p for c, p in ran.items() if c.startswith("python -m lmtune.export")]
    assert (home / "smoke.locked.toml").is_file() and (home / "smoke.locked.md").is_file()
    assert export.stdout.startswith("smoke.locked.toml: writing (winner: trial ") and "written: smoke.locked.toml" in export.stdout
    assert validate.stdout.startswith("smoke.locked.toml: unchanged, it already holds these values"), validate.stdout
    assert "writing" not in validate.stdout and "validation: 30 fresh steps of trial" in validate.stdout
    # the trainer command export prints is README step 4's, which adds a length and a directory
    said = export.stdout.rstrip().splitlines()[-1].split()
    assert said[:5] == ["python", "-m", "lmtune.train", "--locked", "smoke.locked.toml"], said
    assert FIRST_HOUR[5][0].startswith(" ".join(said) + " train.steps=300 --out "), (said, FIRST_HOUR[5][0])
    # 4. training with them: the run's files, the locked micro-batch in force, text generated from its checkpoint
    run_dir = home / "runs" / "byte-300"
    for name in ("metrics.jsonl", "summary.json", "samples.txt", "checkpoint"):
        assert (run_dir / name).exists(), name
    locked = __import__("tomllib").loads((home / "smoke.locked.toml").read_text())["train"]
    config = json.loads((run_dir / "summary.json").read_text())["config"]
    assert config["train.micro_batch_size"] == locked["micro_batch_size"] and config["model.n_embd"] == 128
    described = next(p for c, p in ran.items() if "--describe" in c).stdout
    assert re.search(rf"micro_batch_size\b.*\b{locked['micro_batch_size']}\b", described), described
    generated = next(p for c, p in ran.items() if "lmtune.generate" in c).stdout
    assert generated.startswith("The ") and len(generated) > len("The ") + 50, generated
    # 5. your own sweep, at smoke size: lmtune's own words for what it ran, and its results
    mine = next(p for c, p in ran.items() if "my_optimizer.py --smoke" in c)
    assert "sweep my-optimizer (smoke): 6 trial(s), searcher tpe, scheduler asha" in mine.stdout, mine.stdout
    (own,) = (home / "results").glob("1-my-optimizer-*")
    assert len(rows(own)) == 6 and (own / "report.html").is_file() and (own / "optuna.db").is_file()


def test_injected_torch_oom_in_trials_is_a_result(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_FAULT_OOM_MICRO_BATCH", "8")
    f = sweep_file(tmp_path, """
        from lmtune.sweep import Frontier
        sweep = Sweep(
            name="inject-oom",
            base={**TINY_CPU, "train.steps": 4, "train.eval_interval": 4, "train.log_interval": 2},
            space={"train.micro_batch_size": grid([2, 4, 8, 16, 32]), "train.ac_budget": grid([1.0])},
            searcher="frontier", frontier=Frontier(headroom_gib=0.0), metric="tokens_per_s", mode="max",
            max_failures=2,
        )
    """)
    proc = run_module("lmtune.sweep", str(f), "--storage", str(tmp_path / "results"), "--no-wandb", "--no-dashboard",
                      cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = only_run(tmp_path / "results")
    table = rows(results)
    by_mb = {int(r["train.micro_batch_size"]): r for r in table.values()}
    assert [by_mb[mb]["status"] for mb in (2, 4)] == ["ok", "ok"]
    assert by_mb[8]["status"] == "oom" and by_mb[8]["source"] == "run"
    assert "injected" in (results / "trials" / by_mb[8]["trial_id"] / "summary.json").read_text()
    # 16 and 32 were not launched: OOM by implication (never retried, never run)
    assert {by_mb[mb]["source"] for mb in (16, 32)} == {"implied"}
    assert _launched(results) == {by_mb[mb]["trial_id"] for mb in (2, 4, 8)}
    lines = (results / "trials" / by_mb[8]["trial_id"] / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["status"] == "oom" for line in lines) == 1  # one attempt, not retried


# Peaks (tensor bytes, deterministic) of this model: ac_budget 0.5 → 0.012 GiB at mb 16, 0.022 at 32, 0.042 at 64;
# ac_budget 1.0 → 0.014, 0.026, 0.050. Under 0.024 GiB the plan runs 16 on both lines, then 32 at 0.5 (ok: the fit
# through 16 and 32 predicts 64 above the limit, a `predicted` row), then 32 at 1.0 (oom: 64 is `implied`), then
# verifies 64 at 0.5, then the neighbours of the fastest point with headroom: 5 to 7 trials of ~2 s each.
RESUMED_FRONTIER = """
    from lmtune.sweep import Frontier
    sweep = Sweep(
        name="frontier-resume",
        base={**TINY_CPU, "train.steps": 4, "train.eval_interval": 4, "train.log_interval": 2, "train.eval_batches": 1,
              "train.compile_warmup_steps": 1, "train.measure_interval": 0, "system.memory_limit_gib": 0.024},
        space={"train.micro_batch_size": grid([4, 8, 16, 32, 64]), "train.ac_budget": grid([0.5, 1.0])},
        searcher="frontier", frontier=Frontier(headroom_gib=0.002, margin_gib=0.001), metric="tokens_per_s", mode="max",
    )
"""


def _driver(f, storage, *, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "lmtune.sweep", str(f), "--storage", str(storage), "--max-concurrent", "1",
            "--no-wandb", "--no-report", "--no-dashboard", *(["--resume"] if resume else [])]
    return subprocess.Popen(args, cwd=f.parent, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _interrupt(proc: subprocess.Popen, when, sig: int, lines: list[str], timeout: float = 180) -> None:
    """Read the driver's console until ``when(line)``, then send ``sig`` (to the driver alone for Ctrl-C, to its
    process group, the Ray it started included, for SIGKILL: as if the machine went away)."""
    end = time.time() + timeout
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if when(line):
            break
        assert time.time() < end, "\n".join(lines[-30:])
    else:
        raise AssertionError("the sweep ended before it could be interrupted:\n" + "\n".join(lines[-40:]))
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    lines += rest.splitlines()


def _uninterrupted(f, results, tmp_path):
    """The sweep an uninterrupted driver runs when every trial measures what the resumed sweep's trial of the same
    point measured: the real planner on those measurements (simulate), written as a results directory."""
    from lmtune.sweep.load import load_sweep, resolve
    from lmtune.sweep.plan import FrontierPlan, simulate
    from tests.frontier_fixtures import METRIC_COLUMNS, write_results_dir

    rs = resolve(load_sweep(f)[0], f)
    measured = {(float(r[B]), int(r[X])): r for r in rows(results).values() if r["source"] == "run"}

    def measure(cfg):
        point = (cfg[B], cfg[X])
        assert point in measured, f"an uninterrupted sweep runs {point}, which the resumed one never ran"
        r = measured[point]
        return {"status": r["status"], **{k: float(r[k]) for k in METRIC_COLUMNS if r.get(k)}}

    plan = FrontierPlan.from_space(rs.space, rs.frontier, limit_gib=rs.base["system.memory_limit_gib"])
    launched = simulate(plan, measure)
    ran = [{"trial_id": t["trial_id"], "source": "run", **t["config"], **t["result"]} for t in launched]
    sweep = json.loads((results / "sweep.json").read_text())
    return write_results_dir(tmp_path / "uninterrupted", sweep, ran + plan.implied_rows())


def _outcome(results) -> dict:
    """What a frontier sweep found, trial ids aside: each point's row, the frontier per line, the recommended point,
    the counts of the frontier table, the console's count line and summary.md's trials."""
    from lmtune.reporting.render import summary_markdown
    from lmtune.results.kinds.frontier import frontier_report
    from lmtune.results.read import load_results

    loaded = load_results(results)
    rep = frontier_report(loaded)
    table = [r for r in loaded.rows if r.get("status")]
    counts: dict[str, int] = {}
    for r in table:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    trials_section = summary_markdown(loaded).split("## Trials", 1)[1]
    return {
        "rows": sorted((r[B], r[X], r["source"], r["status"]) for r in table),
        "lines": {t.title: ([(r[X], r["status"]) for r in t.rows], t.largest_feasible, t.smallest_oom)
                  for t in rep.tables},
        "recommended": (rep.recommended or {}).get("line"), "at": (rep.recommended or {}).get(X),
        "counts": rep.counts,
        "console": f"{len(table)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        "summary_rows": sum(1 for line in trials_section.splitlines() if line.startswith("| ") and "---" not in line),
    }


def test_a_frontier_sweep_stopped_and_killed_then_resumed_ends_as_the_uninterrupted_one(tmp_path):
    """The issue-23 run: Ctrl-C with the planner's implied and predicted rows in trials.csv, --resume (SIGKILLed as
    its first trial starts), --resume to the end. Every grid point has at most one row, and the sweep is the one an
    uninterrupted driver runs on the same measurements: rows, frontier, recommendation and counts."""
    f = sweep_file(tmp_path, RESUMED_FRONTIER)
    storage = tmp_path / "results"
    lines: list[str] = []
    stopped = _driver(f, storage, resume=False)
    _interrupt(stopped, lambda line: line.startswith("[ 3/") and " start " not in line, signal.SIGINT, lines)
    assert stopped.returncode == 130, "\n".join(lines[-40:])
    results = only_run(storage)
    assert "predicted" in {r["source"] for r in rows(results).values()}, rows(results)  # the planner's rows too
    killed = _driver(f, storage, resume=True)
    _interrupt(killed, lambda line: " start " in line, signal.SIGKILL, lines)
    final = _driver(f, storage, resume=True)
    out, _ = final.communicate(timeout=300)
    lines += out.splitlines()
    assert final.returncode == 0 and "Traceback" not in "\n".join(lines), "\n".join(lines[-60:])
    table = rows(results)
    points = [(r[B], r[X]) for r in table.values()]
    assert len(points) == len(set(points)), table  # one row per grid point
    want = _outcome(_uninterrupted(f, results, tmp_path))
    got = _outcome(results)
    assert got == want
    assert want["console"] in out  # the console's own count line says the same
