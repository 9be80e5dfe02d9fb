"""Tune's saved state of a sweep in its storage (``tune/``): kept whole while the sweep runs, checked before a resume.

Tune writes ``tuner.pkl`` when a Tuner is made or restored, and at every experiment snapshot copies its whole
staging directory into the storage, every driver session's files again, several at once (pyarrow
``copy_files``). A driver killed in the middle leaves files cut short: an empty ``tuner.pkl``, a searcher state of
4096 bytes, on which Tune's restore fails and it starts the sweep over (step 2 of :mod:`lmtune.sweep.resume`). Here:

* :func:`keep_tuner_file` keeps a copy of the last complete ``tuner.pkl`` (its content does not change over a
  sweep), and :func:`repair_tuner_file` puts it back when the one there does not load;
* :func:`repair_snapshot` resumes the newest session whose experiment state is whole: the files of newer sessions, and a
  family's newest files that are cut short, are set aside (renamed, never deleted), so that Tune takes each
  family's newest whole file;
* :func:`files` and :func:`set_aside` let the runner put aside what a failed restore wrote.

Local paths and storage URIs alike (pyarrow filesystems); ray is imported only when a function runs.
"""

from __future__ import annotations

import json
import logging
import pickletools
from pathlib import Path
from typing import Iterable, TextIO

from lmtune.config import ConfigError

TUNER_FILE, TUNER_COPY = "tuner.pkl", "tuner.pkl.lmtune-copy"
CUT_SHORT = ".lmtune-cut-short"
"""Suffix of a snapshot file the interruption cut short (or newer than the session resumed)."""
FAILED_RESUME = ".lmtune-failed-resume"
"""Suffix of what Tune wrote when it could not restore and started over (the runner stops it)."""


def _filesystem(uri_or_path: str):
    """(pyarrow filesystem, path in it) of a storage URI or a local path."""
    import pyarrow.fs

    if "://" in uri_or_path:
        return pyarrow.fs.FileSystem.from_uri(uri_or_path)
    return pyarrow.fs.LocalFileSystem(), str(Path(uri_or_path).resolve())


def keep_tuner_file(tune_path: str) -> None:
    import pyarrow.fs

    fs, path = _filesystem(tune_path)
    try:
        fs.copy_file(f"{path}/{TUNER_FILE}", f"{path}/{TUNER_COPY}.tmp")
        fs.move(f"{path}/{TUNER_COPY}.tmp", f"{path}/{TUNER_COPY}")
    except (OSError, pyarrow.lib.ArrowException) as e:  # a missing copy only matters to a later resume: say so there
        logging.getLogger("lmtune").warning("could not keep a copy of %s: %s", TUNER_FILE, e)


def repair_tuner_file(tune_path: str, out: TextIO) -> None:
    """Before a resume: a ``tuner.pkl`` that does not load is replaced by the copy :func:`keep_tuner_file` kept."""
    import pyarrow.fs
    import ray.cloudpickle

    fs, path = _filesystem(tune_path)
    try:
        with fs.open_input_file(f"{path}/{TUNER_FILE}") as f:
            ray.cloudpickle.loads(f.readall())
        return
    except Exception as e:
        broken = f"{type(e).__name__}: {e}"
    try:
        fs.copy_file(f"{path}/{TUNER_COPY}", f"{path}/{TUNER_FILE}")
    except (OSError, pyarrow.lib.ArrowException):
        raise ConfigError(f"--resume: {tune_path}/{TUNER_FILE} cannot be read ({broken}) and lmtune kept no copy "
                          f"of it; the sweep cannot be resumed (its trials so far are in the results directory).")
    print(f"resume: {TUNER_FILE} was cut short by the interruption ({broken}); put back lmtune's copy", file=out)


def _families() -> list[tuple[str, str, str]]:
    """One file of each family per driver session (``<prefix><session><suffix>``, the session a start timestamp):
    (prefix, suffix, format) from Tune's own templates (:func:`lmtune.sweep.compat.snapshot_templates`)."""
    from lmtune.sweep import compat

    return [(t.split("{}")[0], t.split("{}")[1], fmt) for t, fmt in compat.snapshot_templates()]


def _whole(data: bytes, fmt: str) -> bool:
    """Whether a snapshot file is complete: JSON that parses, or a pickle whose opcodes run to its STOP at the
    very end (read with pickletools, which builds no object)."""
    if fmt == "json":
        try:
            json.loads(data)
            return True
        except ValueError:
            return False
    try:
        last = None
        for last in pickletools.genops(data):
            pass
    except Exception:
        return False
    return last is not None and last[0].name == "STOP" and last[2] == len(data) - 1


def _listed(fs, path: str, families: list[tuple[str, str, str]]) -> set[str]:
    import pyarrow.fs

    return {i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path)) if i.type == pyarrow.fs.FileType.File
            and any(i.base_name.startswith(p) and i.base_name.endswith(x) for p, x, _ in families)}


def files(tune_path: str) -> set[str]:
    """The snapshot files in ``tune_path`` (every session's)."""
    fs, path = _filesystem(tune_path)
    return _listed(fs, path, _families())


def set_aside(tune_path: str, names: Iterable[str], suffix: str) -> list[str]:
    """Rename ``names`` to ``name + suffix`` (out of Tune's sight, nothing deleted); returns them, sorted."""
    fs, path = _filesystem(tune_path)
    names = sorted(names)
    for n in names:
        fs.move(f"{path}/{n}", f"{path}/{n}{suffix}")
    return names


def repair_snapshot(tune_path: str, out: TextIO) -> None:
    """Before a resume: the newest session whose experiment state is whole is the one resumed (newer files, and
    cut-short newest files of a family, set aside), said in one console line."""
    fs, path = _filesystem(tune_path)
    families = _families()
    names = sorted(_listed(fs, path, families), reverse=True)

    def of(prefix: str, suffix: str) -> list[str]:
        return [n for n in names if n.startswith(prefix) and n.endswith(suffix)]

    def whole(name: str, fmt: str) -> bool:
        with fs.open_input_file(f"{path}/{name}") as f:
            return _whole(f.readall(), fmt)

    (prefix, suffix, fmt), *_ = families
    kept = next((n[len(prefix):-len(suffix)] for n in of(prefix, suffix) if whole(n, fmt)), None)
    if kept is None:
        return  # nothing to choose from: Tune says what it cannot restore
    aside = []
    for prefix, suffix, fmt in families:
        for n in of(prefix, suffix):  # newest first
            if n[len(prefix):-len(suffix)] <= kept and whole(n, fmt):
                break
            aside.append(n)
    if aside:
        set_aside(tune_path, aside, CUT_SHORT)
        print(f"resume: the interruption cut Tune's snapshot short; resuming from the whole one of session {kept} "
              f"(set aside as *{CUT_SHORT}: {', '.join(aside)})", file=out)
