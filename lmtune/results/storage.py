"""Where a sweep's results go: a local directory, or a URI (``s3://``, ``gs://``, …) that pyarrow opens, which
Tune and Ray Train write to directly and the driver's own files are uploaded to when the sweep ends."""

from __future__ import annotations

import os
from pathlib import Path

from lmtune.contract import TRAIN_DIR, TUNE_DIR


def uri_join(base: str, *parts: str) -> str:
    """``base/part/…`` for a directory or a URI; a URI's query (``s3://b/p?endpoint_override=…``, which
    pyarrow reads for the filesystem's options) stays at the end."""
    head, sep, query = base.partition("?") if "://" in base else (base, "", "")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


def resolve_storage(storage: str) -> tuple[Path, str | None]:
    """(local directory for the driver's files, remote URI or None)."""
    if "://" in storage:
        return Path("results").resolve(), storage
    return Path(storage).expanduser().resolve(), None


def upload(results_dir: Path, uri: str) -> None:
    """With a remote --storage: the driver's files (trials.csv, optuna.db, reports, …) next to Tune's and
    Train's. Symlinks (logs/ray-session → the Ray session's logs) are not followed."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    local = pyarrow.fs.LocalFileSystem()
    for dirpath, dirnames, filenames in os.walk(results_dir):
        dirnames[:] = [d for d in dirnames if d != TUNE_DIR and d != TRAIN_DIR
                       and not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            src = Path(dirpath, name)
            if src.is_symlink():
                continue
            dest = f"{root}/{src.relative_to(results_dir).as_posix()}"
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            pyarrow.fs.copy_files(str(src), dest, source_filesystem=local, destination_filesystem=fs)


