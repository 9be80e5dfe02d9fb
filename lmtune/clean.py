"""Remove what lmtune and Ray leave behind that can be made again: ``python -m lmtune.clean [--dry-run]``.

* Ray's session directories (``$RAY_TMPDIR`` or /tmp/ray, ``session_*``: logs of every worker, hundreds of MB
  after a few sweeps); the session of a Ray cluster still running on this machine is kept. The
  ``logs/ray-session`` links of results directories point there and dangle afterwards: they are removed too.
* lmtune's token cache (``data.cache_dir``, ``$LMTUNE_CACHE`` or ~/.cache/lmtune): the next run tokenizes again.

Never touched: results directories, training runs (checkpoints, metrics), locked defaults and W&B runs; the
command says where they are and how big, so that deleting them is a decision (``wandb sync`` offline runs
first if they should reach W&B).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from lmtune.cli import parse_command_line, user_errors_exit_2


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def _ray_running() -> bool:
    """Whether a Ray cluster's processes run on this machine (their session is then in use)."""
    for status in Path("/proc").glob("[0-9]*/comm"):
        try:
            if status.read_text().strip() in ("raylet", "gcs_server"):
                return True
        except OSError:
            continue
    return False


def ray_sessions() -> list[Path]:
    """Session directories that no running cluster uses."""
    root = Path(os.environ.get("RAY_TMPDIR") or "/tmp/ray")
    if not root.is_dir():
        return []
    latest = (root / "session_latest").resolve() if (root / "session_latest").exists() else None
    keep = latest if latest is not None and _ray_running() else None
    return sorted(p for p in root.glob("session_*") if p.is_dir() and not p.is_symlink() and p.resolve() != keep)


def dangling_links(results: Path) -> list[Path]:
    return sorted(p for p in results.glob("*/logs/ray-session") if p.is_symlink() and not p.exists())


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmtune.clean", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    ap.add_argument("--results", default="results", help="the results root whose dangling links to remove")
    args = parse_command_line(ap, argv)
    from lmtune.config import DataConfig
    from lmtune.data import cache_root

    targets = ray_sessions()
    cache = cache_root(DataConfig()) / "tokens"
    if cache.is_dir():
        targets.append(cache)
    links = dangling_links(Path(args.results)) if not args.dry_run else []
    total = 0
    for path in targets:
        size = _size(path)
        total += size
        print(f"{'would remove' if args.dry_run else 'removing'} {path} ({_mb(size)})")
        if not args.dry_run:
            shutil.rmtree(path, ignore_errors=True)
    for link in links:
        link.unlink()
    if not args.dry_run and (targets or links):
        links_text = f", {len(links)} dangling logs/ray-session link(s)" if links else ""
        print(f"removed {_mb(total)}{links_text}")
    elif not targets:
        print("nothing to remove")
    kept = [(p, _size(p)) for p in (Path(args.results), Path("runs")) if p.is_dir()]
    for path, size in kept:
        print(f"kept: {path}/ ({_mb(size)}: results, checkpoints and W&B offline runs; delete them yourself)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
