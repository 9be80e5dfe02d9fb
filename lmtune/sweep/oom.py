"""How a trial ended, at the Ray level: OOM (a result about the config) or a genuine error.

The trainer turns CUDA OOM, CPU allocator failures and the emulated ``system.memory_limit_gib`` into a
clean final report with ``status="oom"``. What the trainer cannot see is Ray's memory monitor killing
the process that runs it (``ray.exceptions.OutOfMemoryError``, or an actor death in the monitor's words)
or an OOM raised inside a Ray Train worker and wrapped by Train. :func:`classify` reads any such exception
chain by evidence (exception types, torch's allocator messages, Ray's memory monitor's exact words; never
words that happen to be in a path or a trial's name); the trainable and the driver use it to record ``oom``.
A memory-monitor kill while other trials ran on the node is ``host_oom`` (:data:`lmtune.contract.STATUSES`):
retried, with fewer trials at once, and not told to the searcher as infeasible. The scheduler records what it
reads here in the run's ledger (:mod:`lmtune.sweep.ledger`).
"""

from __future__ import annotations

import re
from typing import Any

RAY_MEMORY_MONITOR = "killed due to the node running low on memory"
"""The words of Ray's memory monitor (raylet) in the error of every worker it kills; matched as Ray writes them,
since a memory-monitor kill can reach the driver as an actor-death error whose type says nothing."""

# What a traceback's last line says when the exception was an OOM, for errors that reach the driver only as text
# (Tune's error file): the exception's type at the start of a line, never words found in paths or names.
_OOM_TYPE_LINE = re.compile(
    r"^(?:[\w.]*\.)?(?:OutOfMemoryError|MemoryError|EmulatedOOM)(?::|$)", re.MULTILINE)

# Ray's message for *any* worker that exited unexpectedly (SIGKILL, segfault, `ray stop --force`) lists
# "killed by the OOM killer" among possible causes: that list says nothing about this failure.
_POSSIBLE_CAUSES = re.compile(r"(Some common causes include|There are some potential root causes)\b.*", re.DOTALL)


def memory_monitor_kill(text: str) -> bool:
    return RAY_MEMORY_MONITOR in _POSSIBLE_CAUSES.sub("", text)


def _oom_text(text: str) -> bool:
    """An error known only as text: an OOM exception's type line, torch's allocator message, or Ray's monitor."""
    from lmtune.training.memory import ALLOCATOR_FAILURES

    text = _POSSIBLE_CAUSES.sub("", text)
    return bool(_OOM_TYPE_LINE.search(text)) or memory_monitor_kill(text) or any(m in text for m in ALLOCATOR_FAILURES)


def _chain(exc: BaseException, limit: int = 32):
    """The exception, its causes/contexts, Ray's wrapped cause, and Train's per-worker failures."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < limit:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        cause = getattr(e, "cause", None)  # RayTaskError.cause
        if isinstance(cause, BaseException):
            todo.append(cause)
        failures = getattr(e, "worker_failures", None)  # Train V2 WorkerGroupError
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
        inner = getattr(e, "controller_failure", None)  # Train V2 ControllerError
        if isinstance(inner, BaseException):
            todo.append(inner)


def is_oom_error(exc: BaseException | None) -> bool:
    """True when ``exc`` (or anything it wraps) is an out-of-memory failure, by evidence: its type
    (torch.OutOfMemoryError, MemoryError and the trainer's emulated limit, ray.exceptions.OutOfMemoryError),
    torch's own allocator messages, or Ray's memory monitor's words; never words in a path or a name."""
    if exc is None:
        return False
    from lmtune.training.memory import is_oom

    try:
        from ray.exceptions import OutOfMemoryError as RayOOM
    except ImportError:  # pragma: no cover - ray is a dependency
        RayOOM = ()  # type: ignore[assignment]
    for e in _chain(exc):
        if is_oom(e) or (RayOOM and isinstance(e, RayOOM)) or memory_monitor_kill(str(e)):
            return True
    return False


def classify(exc: BaseException | None) -> str:
    """``oom`` or ``error`` for a trial that ended with an exception."""
    return "oom" if is_oom_error(exc) else "error"


_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit)\b.*?:")


def first_line(exc: BaseException | str | None, limit: int = 300) -> str:
    """A one-line description of an error for trials.csv and the console.

    Ray wraps a trial's exception in a traceback dump; the line naming the error (``SomeError: …``) is
    picked, the memory monitor's line if there is one (a memory-monitor kill explains itself there)."""
    if exc is None:
        return ""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = _POSSIBLE_CAUSES.sub("", str(text))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Failure #")]
    pick = next((ln for ln in lines if RAY_MEMORY_MONITOR in ln), None)
    if pick is None:
        named = [ln for ln in lines if _ERROR_LINE.match(ln)]
        pick = named[-1] if named else (lines[0] if lines else "")
    return pick[:limit]


def read_trial_error(trial: Any) -> BaseException | str | None:
    """The exception Tune recorded for a failed trial (its pickled error, else the error file's text)."""
    import os

    path = getattr(trial, "pickled_error_file", None)
    if path and os.path.exists(path):
        try:
            import ray.cloudpickle as cloudpickle

            with open(path, "rb") as f:
                return cloudpickle.load(f)
        except Exception:
            pass
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    return None


def classify_trial_error(trial: Any) -> tuple[str, str]:
    """(``oom`` | ``error``, one-line message) for a Tune trial that failed."""
    exc = read_trial_error(trial)
    if isinstance(exc, BaseException):
        return classify(exc), first_line(exc)
    text = exc or ""
    return ("oom" if _oom_text(text) else "error"), first_line(text)


def was_memory_monitor_kill(trial: Any) -> bool:
    """Whether Ray's memory monitor killed the trial (host memory), as opposed to an OOM its own process raised."""
    exc = read_trial_error(trial)
    if isinstance(exc, BaseException):
        try:
            from ray.exceptions import OutOfMemoryError as RayOOM
        except ImportError:  # pragma: no cover
            return False
        return any(isinstance(e, RayOOM) or memory_monitor_kill(str(e)) for e in _chain(exc))
    return memory_monitor_kill(exc or "")
