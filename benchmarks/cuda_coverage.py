"""How much of lmtune's CUDA-only code the CPU test suite executes: ``make cuda-coverage``.

lmtune's CUDA-only lines are its device layer's CUDA parts (a test checks that no module outside ``lmtune/device/``
calls ``torch.cuda``): the :class:`~lmtune.device.CUDAAccelerator` (every decision that differs on a GPU), the
allocator meter :class:`~lmtune.device.CudaMemory`, and :class:`~lmtune.device.TorchCuda` (the real backend). The
tests run the first two through the validating fake backend (``tests/test_device.py``); this script runs those tests
under coverage.py, restricted to these regions, prints the share of their statements that ran, and lists every one
that did not with why only a GPU can run it. It exits 1 when the share is under 90% or a statement that did not run
has no reason below (a CUDA line that ships unexecuted must say why).

Measured in the pytest process only: the two-rank test runs the same lines again in processes of its own, which
coverage does not follow here, so the figure is a lower bound.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

REGIONS = {
    "lmtune/device/accelerators.py": ("CUDAAccelerator", "TorchCuda"),
    "lmtune/device/memory.py": ("CudaMemory",),
}
"""The CUDA-only code: the methods of these classes of these files."""

WHY_ONLY_A_GPU = {
    "TorchCuda.to_device": "pins host memory for an asynchronous copy: pinning needs the CUDA runtime (a CPU build of "
                           "torch raises), and the copy needs a device",
    "TorchCuda.get_per_process_memory_fraction": "reads the caching allocator's fraction, which initializes CUDA",
}
"""Why a method's statements cannot run without a GPU, by ``Class.method`` (its lines are listed when not run)."""

TESTS = ["tests/test_device.py"]
TARGET = 0.90


def method_bodies(path: Path, names: tuple[str, ...]) -> dict[str, set[int]]:
    """The lines of each method body (``Class.method``) of the named classes in ``path``: what runs when the code is
    used (a ``def`` line, or a class attribute, runs at import and proves nothing)."""
    tree = ast.parse(path.read_text())
    return {f"{node.name}.{f.name}": set(range(f.body[0].lineno, f.end_lineno + 1))
            for node in tree.body if isinstance(node, ast.ClassDef) and node.name in names
            for f in node.body if isinstance(f, ast.FunctionDef)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", nargs="*", default=TESTS, help="pytest arguments (default: %(default)s)")
    args = ap.parse_args(argv)
    import coverage

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / ".coverage"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}", "--source=lmtune.device",
                               "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *args.tests],
                              cwd=REPO, env=env, capture_output=True, text=True)
        print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:])
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
            return 1
        cov = coverage.Coverage(data_file=str(data))
        cov.load()
        total = executed = 0
        missing: list[tuple[str, str, int, str]] = []
        for rel, names in REGIONS.items():
            path = REPO / rel
            _, statements, _, not_run, _ = cov.analysis2(str(path))
            lines = path.read_text().splitlines()
            per_class: dict[str, list[int]] = {}
            for method, body in method_bodies(path, names).items():
                inside = [n for n in statements if n in body]
                gone = [n for n in not_run if n in body]
                total += len(inside)
                executed += len(inside) - len(gone)
                missing += [(rel, method, n, lines[n - 1].strip()) for n in gone]
                counts = per_class.setdefault(method.split(".")[0], [0, 0])
                counts[0] += len(inside) - len(gone)
                counts[1] += len(inside)
            for name, (ran, of) in per_class.items():
                print(f"{rel}:{name}: {ran}/{of} statements run")
    share = executed / total
    print(f"\nCUDA-only statements executed by {' '.join(args.tests)}: {executed}/{total} = {share:.1%} "
          f"(target ≥ {TARGET:.0%})")
    unexplained = [m for m in missing if m[1] not in WHY_ONLY_A_GPU]
    for name in sorted({m[1] for m in missing}):
        print(f"\nnot run, {name}: {WHY_ONLY_A_GPU.get(name, 'NO REASON GIVEN: a test should run it')}")
        for rel, _, n, text in (m for m in missing if m[1] == name):
            print(f"  {rel}:{n}  {text}")
    return 0 if share >= TARGET and not unexplained else 1


if __name__ == "__main__":
    sys.exit(main())
