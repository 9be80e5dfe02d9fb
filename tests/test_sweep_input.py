"""Sweep files and the sweep command's bad input: one `error:` line, exit code 2, no traceback, no Ray.

Fast: nothing here starts Ray (the command is run in-process with a guard that fails if ray is imported,
and once as a real subprocess).
"""

from __future__ import annotations

import socket
import sys

import pytest

from lmtune.config import ConfigError
from lmtune.sweep import TINY_CPU, Smoke, Sweep, grid, loguniform
from lmtune.sweep.__main__ import main
from lmtune.sweep.load import load_sweep, resolve
from tests.conftest import REPO, run_module
from tests.helpers import GOOD_SWEEP as GOOD
from tests.helpers import write


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything imports ray or one of its submodules (what an earlier test imported is taken out
    of sys.modules for the test; a fresh process checks the same without that caveat, see below)."""
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)

    class Guard:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise AssertionError(f"{name} imported while checking bad input")
            return None

    monkeypatch.setattr(sys, "meta_path", [Guard(), *sys.meta_path])


def refused(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    "missing file": (None, ["{dir}/nope.py"], "sweep file not found"),
    "not a python file": ("# lmtune\n\nRun LM-pretraining experiments as short sweep files.\n", [],
                          "README.md is not a sweep file"),
    "syntax error": ("sweep = Sweep(name='x'\n", [], "syntax error"),
    "error while loading": ("from lmtune.sweep import Sweep\nsweep = Sweep(name='x', spce={})\n", [], "TypeError"),
    "no sweep object": ("x = 1\n", [], "defines no Sweep object"),
    "several sweeps": (GOOD + "other = Sweep(name='other', space={'train.lr': grid([1e-3])})\n", [],
                       "several Sweep objects"),
    "unknown key in base": (GOOD.replace("base={**TINY_CPU}", "base={**TINY_CPU, 'train.lrr': 1}"), [],
                            "unknown config key 'train.lrr'"),
    "unknown key in space": (GOOD.replace('"train.lr": loguniform', '"train.learning_rate": loguniform'), [],
                             "unknown config key 'train.learning_rate'"),
    "unknown key in smoke": (GOOD.replace('Smoke(base={"train.steps": 10}', 'Smoke(base={"train.stepz": 10}'),
                             ["--smoke"], "smoke.base: unknown config key 'train.stepz'"),
    "unknown key in export": (GOOD.replace('export=["train.lr"]', 'export=["train.rl"]'), [],
                              "export: unknown config key 'train.rl'"),
    "unknown key on the command line": (GOOD, ["train.nope=3"], "unknown config key 'train.nope'"),
    "bad value on the command line": (GOOD, ["train.steps=-3"], "train.steps=-3 is not accepted"),
    "override of an axis": (GOOD, ["train.lr=0.1"], "is an axis of the sweep's space"),
    "empty space": (GOOD.replace('space={"train.lr": loguniform(1e-4, 1e-2), "model.norm_placement": grid(["pre", "post"])}',
                                 "space={}"), [], "search space is empty"),
    "value out of range in space": (GOOD.replace('grid(["pre", "post"])', 'grid(["pre", "middle"])'), [],
                                    "model.norm_placement=middle is not accepted"),
    "unknown metric": (GOOD.replace('metric="val_loss"', 'metric="val_los"'), [], "never reported by the trainer"),
    "invalid trial config": (GOOD.replace('"model.norm_placement": grid(["pre", "post"])', '"model.n_head": grid([2, 3])'),
                             [], "model.n_embd=64 must be divisible by model.n_head=3"),
    "frontier without Frontier": (GOOD.replace('num_samples=2,', 'num_samples=2, searcher="frontier",'), [],
                                  "needs frontier=Frontier"),
    "asha with two metrics": (GOOD.replace('metric="val_loss", mode="min"',
                                           'metric=["val_loss", "tokens_per_s"], mode=["min", "max"], scheduler="asha"'),
                              [], "scheduler='asha' stops trials on one metric"),
    "unreachable address": (GOOD, ["--address", "127.0.0.1:{port}"], "no Ray cluster answers there"),
    "bad address": (GOOD, ["--address", "nohostport"], "--address nohostport"),
    "no dashboard on a cluster": (GOOD, ["--address", "auto", "--no-dashboard"], "applies to the embedded Ray only"),
    "resume with nothing to resume": (GOOD, ["--resume", "--storage", "{dir}/empty"], "no earlier run"),
    "unknown option": (GOOD, ["--bogus"], "unrecognized arguments"),
    "bad key in Frontier": (GOOD.replace('num_samples=2,', 'num_samples=2, searcher="frontier", frontier=Frontier('
                                         'x="train.micro_batch_sz"),').replace("import TINY_CPU,", "import TINY_CPU, Frontier,"),
                            [], "frontier.x: unknown config key 'train.micro_batch_sz'"),
    "negative headroom in Frontier": (GOOD.replace('num_samples=2,', 'num_samples=2, frontier=Frontier(x="train.lr", '
                                                   'headroom_gib=-1),').replace("import TINY_CPU,", "import TINY_CPU, Frontier,"),
                                      [], "frontier.headroom_gib=-1 is not accepted: expected a number >= 0"),
    "nan on the command line": (GOOD, ["train.weight_decay=nan"], "expected a finite number (>= 0.0)"),
    "bad --gpus": (GOOD, ["--gpus", "many"], "--gpus many is not accepted: expected 'auto' or a number >= 0"),
    "negative --cpus": (GOOD, ["--cpus", "-1"], "cpus=-1.0 is not accepted: expected a number > 0"),
    "gpus=0 with device cuda": (GOOD.replace("base={**TINY_CPU}", "base={**TINY_CPU, 'system.device': 'cuda'}, gpus=0"),
                                [], "system.device='cuda' but the trials ask for gpus=0"),
    "storage below a file": (GOOD, ["--storage", "{dir}/s.py/results"], "is a file, so no directory can be made"),
    "storage is a file": (GOOD, ["--storage", "{dir}/s.py"], "is a file; expected a directory"),
}


ACCEPTED = {
    'missing file': 'expected a Python file that defines a Sweep',
    'not a python file': 'expected a Python file (.py) that defines a Sweep',
    'syntax error': 'syntax error',
    'error while loading': 'Sweep accepts: name, space, base,',
    'no sweep object': 'declare one, e.g. `sweep = Sweep(',
    'several sweeps': 'keep one per file',
    'unknown key in base': 'Keys of [train]: optimizer, lr,',
    'unknown key in space': 'Keys of [train]: optimizer, lr,',
    'unknown key in smoke': 'Keys of [train]: optimizer, lr,',
    'unknown key in export': 'Keys of [train]: optimizer, lr,',
    'unknown key on the command line': 'Keys of [train]: optimizer, lr,',
    'bad value on the command line': 'expected an integer (>= 1)',
    'override of an axis': 'or override a base key',
    'empty space': 'give at least one axis',
    'value out of range in space': "expected one of 'pre', 'post'",
    'unknown metric': 'Reported: val_loss, val_ppl',
    'invalid trial config': 'must be divisible by',
    'frontier without Frontier': 'needs frontier=Frontier(x=..., budget=...)',
    'asha with two metrics': "Use scheduler='none'",
    'unreachable address': 'leave --address out for an embedded local Ray',
    'bad address': 'expected auto, HOST:PORT',
    'no dashboard on a cluster': 'accepted: --no-dashboard without --address',
    'resume with nothing to resume': 'run it without --resume first',
    'unknown option': 'accepted: SWEEP.py, section.key=value overrides and the options --smoke, --address',
    'bad key in Frontier': 'Keys of [train]:',
    'negative headroom in Frontier': 'expected a number >= 0',
    'nan on the command line': 'expected a finite number (>= 0.0)',
    'bad --gpus': "expected 'auto' or a number >= 0",
    'negative --cpus': 'expected a number > 0',
    'gpus=0 with device cuda': "use gpus='auto' or a number >= 1",
    'storage below a file': 'expected a directory (it is created if missing)',
    'storage is a file': 'expected a directory (it is created if missing)',
}
"""What each message says is accepted (beside naming what is wrong, CASES)."""


def _name(case: str) -> str:
    return "README.md" if case == "not a python file" else "s.py"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_without_ray(case, tmp_path, capsys, no_ray):
    text, extra, expected = CASES[case]
    path = write(tmp_path, text, _name(case)) if text is not None else tmp_path / "nope.py"
    argv = [str(path)] + [a.format(dir=tmp_path, port=closed_port()) for a in extra]
    if case == "missing file":
        argv = argv[1:]
    line = refused(argv, capsys)
    assert expected in line and ACCEPTED[case] in line, line


FRESH_PROCESS = """
import contextlib, io, json, socket, sys
sys.path.insert(0, {repo!r})
from lmtune.sweep.__main__ import main
from tests.helpers import GOOD_SWEEP as GOOD
from tests.helpers import write
results = {{}}
for case, argv in json.loads({cases!r}).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results[case] = [code, err.getvalue()]
print(json.dumps({{"results": results, "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))}}))
"""


def test_no_bad_input_imports_any_ray_module_in_a_fresh_process(tmp_path):
    """Every case above, in one new interpreter: none of them imports ray or any of its submodules (a guard in
    this test process would miss what earlier tests imported)."""
    import json
    import subprocess

    cases = {}
    for case, (text, extra, expected) in CASES.items():
        case_dir = tmp_path / f"case{len(cases)}"
        case_dir.mkdir()
        path = write(case_dir, text, _name(case)) if text is not None else case_dir / "nope.py"
        argv = [str(path)] + [a.format(dir=case_dir, port=closed_port()) for a in extra]
        cases[case] = argv[1:] if case == "missing file" else argv
    code = FRESH_PROCESS.format(repo=str(REPO), cases=json.dumps(cases))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ray"] == []
    for case, (code, err) in report["results"].items():
        assert code == 2, (case, err)
        assert len(err.strip().splitlines()) == 1 and CASES[case][2] in err, (case, err)


def test_bad_input_as_a_real_command(tmp_path):
    """The same contract seen by a user: a subprocess, stderr one line, exit 2, and ray never imported."""
    bad = write(tmp_path, GOOD.replace('metric="val_loss"', 'metric="accuracy"'))
    proc = run_module("lmtune.sweep", str(bad), "--smoke", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "accuracy" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "results").exists()


def test_every_shipped_sweep_resolves_with_and_without_smoke():
    files = sorted((REPO / "sweeps").glob("*.py"))
    assert {f.stem for f in files} >= {"norm_warmup", "batch_lr_scaling", "memory_frontier", "optimizer", "weight_decay"}
    for f in files:
        sweep, path = load_sweep(f)
        for smoke in (False, True):
            rs = resolve(sweep, path, smoke=smoke)
            assert rs.export, f"{f.name} declares no export keys"
            assert rs.num_trials >= 1
        smoke_rs = resolve(sweep, path, smoke=True)
        assert smoke_rs.base["data.dataset"] == "builtin" and smoke_rs.base["train.dtype"] == "float32", f.name
        # a few minutes on 2 CPUs (width_batch's 24 short trials, enough for TPE to learn where memory runs out)
        assert smoke_rs.num_trials <= 24, f"{f.name}: the smoke variant runs {smoke_rs.num_trials} trials"
        assert smoke_rs.num_trials * smoke_rs.base["train.steps"] <= 24 * 30, f.name


def test_resolve_applies_smoke_and_overrides():
    sweep = Sweep(name="t", base={**TINY_CPU, "train.steps": 100},
                  space={"train.lr": loguniform(1e-4, 1e-2), "model.norm_placement": grid(["pre", "post"])},
                  num_samples=3, smoke=Smoke(base={"train.steps": 7}, space={"model.norm_placement": grid(["post"])},
                                             num_samples=2))
    rs = resolve(sweep, "t.py", smoke=True, overrides=["train.seed=5"])
    assert rs.base["train.steps"] == 7 and rs.base["train.seed"] == 5
    assert rs.space["model.norm_placement"].values == ("post",)
    assert rs.searcher == "tpe" and rs.num_trials == 2  # one grid point × 2 samples
    full = resolve(sweep, "t.py")
    assert full.num_trials == 6 and full.base["train.steps"] == 100
    # The locked defaults are the first point where they lie in the space (pre-LN is locked).
    assert full.defaults_point() == {"model.norm_placement": "pre", "train.lr": 6e-4}


def test_smoke_of_a_file_without_a_smoke_variant_is_cpu_sized_and_says_so():
    """The three-line sweep README step 5 invites: --smoke used to apply nothing and run GPT-2 small, 16 trials."""
    from lmtune.reporting.console import trial_text
    from lmtune.sweep.runner import _smoke_label

    plain = Sweep(name="nosmoke", space={"train.lr": loguniform(1e-4, 1e-2), "train.seed": grid([1, 2])},
                  metric="val_loss", mode="min")
    rs = resolve(plain, "nosmoke.py", smoke=True)
    assert rs.smoke_default and {k: rs.base[k] for k in TINY_CPU} == TINY_CPU
    assert rs.num_trials == 2 * 2  # the seed grid kept, 2 samples per point instead of 16
    assert "no smoke= variant, so lmtune's default: base TINY_CPU" in _smoke_label(rs)
    assert trial_text(rs.base, list(rs.space)).startswith("2 layers × 64 wide (2 heads), seq 64, byte tokens of builtin")
    full = resolve(plain, "nosmoke.py")
    assert not full.smoke_default and full.num_trials == 32 and _smoke_label(full) == ""
    assert trial_text(full.base).startswith("12 layers × 768 wide (12 heads), seq 1024, gpt2 tokens")
    # A file's own variant is its own, however small its change.
    own = resolve(Sweep(name="own", space={"train.lr": loguniform(1e-4, 1e-2)}, smoke=Smoke(num_samples=1)),
                  "own.py", smoke=True)
    assert not own.smoke_default and own.base["model.n_layer"] == 12 and _smoke_label(own) == " (smoke)"
    # A problem the default variant causes says where it comes from.
    with pytest.raises(ConfigError, match=r"lmtune's default, base TINY_CPU.*model.n_embd=64 must be divisible"):
        resolve(Sweep(name="h", space={"model.n_head": grid([3])}), "h.py", smoke=True)


def test_several_metrics_use_nsga2_and_grid_only_spaces_use_the_grid_sampler():
    s = Sweep(name="p", base=dict(TINY_CPU), space={"train.lr": loguniform(1e-4, 1e-2)},
              metric=["val_loss", "tokens_per_s"], mode=["min", "max"])
    assert resolve(s, "p.py").searcher == "nsga2"
    g = Sweep(name="g", base=dict(TINY_CPU), space={"train.lr": grid([1e-3, 3e-3]), "train.seed": grid([1, 2, 3])})
    rs = resolve(g, "g.py")
    assert rs.searcher == "grid" and rs.num_trials == 6


def test_a_searcher_standing_in_for_the_one_asked_says_why_in_the_first_line():
    """tpe becomes nsga2 for several metrics and grid for a space of grid axes only: the sweep's first line says
    which it runs and why; a searcher that is the one asked is said plainly."""
    space = {"train.lr": loguniform(1e-4, 1e-2)}
    pareto = resolve(Sweep(name="p", base=dict(TINY_CPU), space=space, metric=["val_loss", "tokens_per_s"],
                           mode=["min", "max"]), "p.py")
    assert pareto.searcher_text == "nsga2 (instead of tpe: 2 metrics, a Pareto front)"
    every_grid = resolve(Sweep(name="g", base=dict(TINY_CPU), space={"train.seed": grid([1, 2])}), "g.py")
    assert every_grid.searcher_text == "grid (instead of tpe: every axis is a grid)"
    asked = resolve(Sweep(name="a", base=dict(TINY_CPU), space={"train.seed": grid([1, 2])}, searcher="grid"), "a.py")
    assert asked.searcher_text == "grid" and resolve(Sweep(name="t", base=dict(TINY_CPU), space=space), "t.py"
                                                     ).searcher_text == "tpe"


def test_define_by_run_is_dry_run_at_validation():
    def space(trial):
        opt = trial.suggest_categorical("train.optimizer", ["adamw", "sgd"])
        if opt == "sgd":
            trial.suggest_float("train.momentum", 0.8, 0.99)
        return {"train.lr": 1e-3}

    s = Sweep(name="d", base=dict(TINY_CPU), define_by_run=space, num_samples=2)
    rs = resolve(s, "d.py")
    assert set(rs.define_by_run_keys) == {"train.optimizer", "train.momentum", "train.lr"}

    def bad(trial):
        trial.suggest_float("train.momentumm", 0.8, 0.99)

    with pytest.raises(ConfigError, match="unknown config key 'train.momentumm'"):
        resolve(Sweep(name="d", base=dict(TINY_CPU), define_by_run=bad), "d.py")


def test_resume_refuses_a_changed_sweep(tmp_path, capsys, no_ray):
    """--resume continues the latest run of the same sweep; other overrides would mix two configs."""
    from lmtune.results.layout import new_results_dir, write_json
    from lmtune.sweep.record import sweep_json

    path = write(tmp_path, GOOD)
    sweep, _ = load_sweep(path)
    storage = tmp_path / "results"
    run_dir = new_results_dir(storage, "tiny")
    assert run_dir.name.startswith("1-tiny-")
    write_json(run_dir / "sweep.json", sweep_json(resolve(sweep, path), run_dir))
    (run_dir / "tune").mkdir()
    line = refused([str(path), "--resume", "--storage", str(storage), "train.seed=7"], capsys)
    assert "was started with a different sweep (train.seed changed)" in line
    assert new_results_dir(storage, "tiny").name.startswith("2-tiny-")  # the run counter goes on
