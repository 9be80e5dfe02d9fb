"""The checks a sweep file and its command line pass before anything runs (:func:`lmtune.sweep.load.resolve` calls
them): fields, keys, domains, metrics, the frontier, a scaling ladder's budgets and sizes, every grid point and a
define-by-run function's branches, resources, ``--storage`` and ``--address``. Each problem is one
:class:`~lmtune.config.ConfigError` naming what is wrong and what is accepted (exit 2). No ray, optuna or torch.
"""

from __future__ import annotations

import math
import os
import re
import socket
from typing import Any

from lmtune import config as config_lib
from lmtune.cli import check_output_dir
from lmtune.config import ConfigError
from lmtune.contract import (
    BUDGET_KEY,
    LADDER_MIN,
    LAYER_PREFIX,
    MEASURED_EVERY,
    REPORTED_METRICS,
    SIZE_KEYS,
    layer_index,
)
from lmtune.reporting.console import request_text
from lmtune.sweep.domains import Domain, Grid, accepted_domains
from lmtune.sweep.spec import Frontier, Sweep

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def same_validation_text(space: dict[str, Domain], base_overrides: dict[str, Any], workers: int) -> dict[str, Any]:
    """A sweep over the micro-batch scores every trial on the same validation text: unless the sweep sets
    train.eval_sequences, it becomes eval_batches × the largest micro-batch × workers (what the largest
    trial would evaluate anyway). Returns the override to add (``{}`` when none is needed)."""
    d = space.get("train.micro_batch_size")
    if d is None or base_overrides.get("train.eval_sequences"):
        return {}
    eval_batches = config_lib.coerce("train.eval_batches", base_overrides.get("train.eval_batches",
                                                                               config_lib.TrainConfig.eval_batches))
    return {"train.eval_sequences": int(eval_batches) * int(d.largest()) * workers}


def check_fields(s: Sweep, where: str) -> None:
    if not isinstance(s.name, str) or not _NAME.match(s.name):
        raise ConfigError(f"{where}: name={s.name!r} is not accepted: expected a short kebab-case name "
                          f"(lower-case letters, digits, '-' or '_'), e.g. 'norm-warmup'.")
    ints = {"num_samples": (s.num_samples, 1), "workers": (s.workers, 1), "max_failures": (s.max_failures, 0),
            "grace_tokens": (s.grace_tokens, 0), "seed": (s.seed, 0)}
    for name, (v, lo) in ints.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{where}: {name}={v!r} is not accepted: expected an integer >= {lo}.")
    check_resources(s.gpus, s.cpus, where)
    if isinstance(s.reduction_factor, bool) or not isinstance(s.reduction_factor, (int, float)) or s.reduction_factor <= 1:
        raise ConfigError(f"{where}: reduction_factor={s.reduction_factor!r} is not accepted: expected a number > 1.")
    if not isinstance(s.space, dict):
        raise ConfigError(f"{where}: space must be a dict of config key → domain, got {type(s.space).__name__}.")
    if not isinstance(s.base, dict):
        raise ConfigError(f"{where}: base must be a dict of config key → value, got {type(s.base).__name__}.")
    if s.define_by_run is not None and not callable(s.define_by_run):
        raise ConfigError(f"{where}: define_by_run must be a function f(trial) -> dict | None.")
    if not isinstance(s.export, (list, tuple)) or not all(isinstance(k, str) for k in s.export):
        raise ConfigError(f"{where}: export must be a list of config keys, got {s.export!r}.")
    for key in s.export:
        try:
            config_lib.check_key(key)
        except ConfigError as e:
            raise ConfigError(f"{where}: export: {e}") from None


def check_resources(gpus: Any, cpus: Any, where: str) -> None:
    """``gpus``: "auto" or a number >= 0; ``cpus``: a number > 0 (per worker)."""
    if gpus != "auto" and (isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus < math.inf):
        raise ConfigError(f"{where}: gpus={gpus!r} is not accepted: expected 'auto' or a number >= 0 (GPUs per worker).")
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0 < cpus < math.inf:
        raise ConfigError(f"{where}: cpus={cpus!r} is not accepted: expected a number > 0 (CPUs per worker).")


def worker_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """What one worker of a trial asks Ray for (the trial's own process when it has one worker)."""
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def worker_slots(nodes: list[dict[str, float]], bundle: dict[str, float], *, counts: list[int] | None = None) -> float:
    """How many workers of ``bundle`` the ``nodes`` (each one's total resources) hold at once, every worker on one
    node as Ray places a trial's process or a Ray Train worker. ``counts``: how many of each node there are (-1: no
    limit, an autoscaler's node type); the answer is then ``math.inf`` when an unlimited type holds one."""
    total: float = 0
    for i, node in enumerate(nodes):
        per = min((node.get(r, 0.0) / a for r, a in bundle.items() if a > 0), default=math.inf)
        per = math.floor(per + 1e-9) if per != math.inf else per
        n = counts[i] if counts is not None else 1
        if per >= 1:
            total += math.inf if n < 0 else per * n
    return total


def _amount(n: float, what: str) -> str:
    return f"{n:g} {what}{'s' if n != 1 else ''}" if n else f"no {what}"


def node_text(resources: dict[str, float]) -> str:
    """``2 CPUs, no GPU``."""
    return f"{_amount(resources.get('CPU', 0.0), 'CPU')}, {_amount(resources.get('GPU', 0.0), 'GPU')}"


def nodes_text(nodes: list[dict[str, float]]) -> str:
    """``1 node: 2 CPUs, no GPU`` / ``3 nodes, at most 8 CPUs, 1 GPU`` (each resource's largest, over the nodes)."""
    if not nodes:
        return "no node"
    most = {r: max(n.get(r, 0.0) for n in nodes) for r in ("CPU", "GPU")}
    return f"{'1 node:' if len(nodes) == 1 else f'{len(nodes)} nodes, at most'} {node_text(most)}"


def unplaceable(bundle: dict[str, float], workers: int, nodes: list[dict[str, float]], cluster: str) -> str:
    """The one line that refuses a sweep whose trials no node of the cluster can ever hold."""
    asked = request_text(bundle["CPU"], bundle.get("GPU", 0), workers)
    if workers > 1 and worker_slots(nodes, bundle) >= 1:
        why = f"the cluster ({cluster}, {nodes_text(nodes)}) holds {worker_slots(nodes, bundle):g} such workers at once"
    else:
        why = f"no node of the cluster ({cluster}, {nodes_text(nodes)}) has that much"
    return (f"each trial asks for {asked}, but {why}: no trial could ever start. Ask for less (--cpus/--gpus, or the "
            f"sweep file's cpus=/gpus=/workers=), or run it on a cluster that has it (--address).")


def check_placeable(bundle: dict[str, float], workers: int, nodes: list[dict[str, float]], cluster: str, *,
                    node_types: list[tuple[str, dict[str, float] | None, int]] | None = None,
                    can_grow: bool = False) -> str | None:
    """Refuse (ConfigError) a sweep whose trials no node of the cluster can ever hold, before any trial starts; a
    line for the console when only nodes the cluster does not have yet could hold them, else None.

    Tune would keep such a trial PENDING forever without a word. A trial needs each of its ``workers`` (the trial
    process itself when it has one) on one node, all of them at once: the check is on the ``nodes``' total
    resources, so a trial that fits but waits for busy ones is left to run (the progress block says what it waits
    for). A cluster that cannot grow (``can_grow=False``: an embedded Ray is this machine) is refused at once. One
    that can (a joined cluster) is refused only when its autoscaler's ``node_types`` (name, resources of one node or
    None when left to detection, most nodes, -1 for no limit) cannot hold the trial either; when it has no known
    autoscaler (``node_types`` None) the sweep goes on with a warning, since a node may still be started by hand."""
    if worker_slots(nodes, bundle) >= workers:
        return None
    if not can_grow:
        raise ConfigError(unplaceable(bundle, workers, nodes, cluster))
    asked = request_text(bundle["CPU"], bundle.get("GPU", 0), workers)
    if node_types is None:
        return (f"warning: each trial asks for {asked}, which no node of the cluster has ({nodes_text(nodes)}) and no "
                f"autoscaler is known to add: the trials wait until such a node joins (Ctrl-C stops the sweep, its "
                f"state saved).")
    known = [(name, res, count) for name, res, count in node_types if res is not None]
    undetected = [name for name, res, count in node_types if res is None and count != 0]
    more = worker_slots([res for _, res, _ in known], bundle, counts=[count for _, _, count in known])
    if undetected or worker_slots(nodes, bundle) + more >= workers:
        which = undetected + [name for name, res, count in known if count != 0 and worker_slots([res], bundle) >= 1]
        return (f"note: each trial asks for {asked}, which no node of the cluster has now ({nodes_text(nodes)}); its "
                f"autoscaler may add such nodes (node types: {', '.join(which)}): the trials wait for them.")
    kinds = "; ".join(f"{name}: {node_text(res)}" for name, res, _ in known)
    raise ConfigError(f"{unplaceable(bundle, workers, nodes, cluster)} Its autoscaler's node types cannot either "
                      f"({kinds}).")


def check_keys(d: dict, where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a dict of config key → value, got {type(d).__name__}.")
    for key in d:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys are 'section.key' strings, got {key!r}.")
        try:
            config_lib.check_key(key)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def to_domain(key: str, d: Any, where: str) -> Domain:
    """Check a domain's shape and that its values are accepted by the key (a list or tuple is a grid)."""
    if isinstance(d, (list, tuple)):
        d = Grid(tuple(d))
    if not isinstance(d, Domain):
        raise ConfigError(f"{where}: space[{key!r}]={d!r} is not a domain; use {accepted_domains()} (constants go in "
                          f"base).")
    try:
        return d.checked(key)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_metrics(metrics: list[str], modes: list[str], base: dict[str, Any], where: str) -> None:
    if not metrics:
        raise ConfigError(f"{where}: metric is empty; name one the trainer reports, e.g. 'val_loss'.")
    if len(modes) != len(metrics):
        raise ConfigError(f"{where}: {len(metrics)} metric(s) but {len(modes)} mode(s); give one mode per metric.")
    for m in modes:
        if m not in ("min", "max"):
            raise ConfigError(f"{where}: mode={m!r} is not accepted: expected 'min' or 'max'.")
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"{where}: metric names a metric twice: {metrics}.")
    for m in metrics:
        layer = layer_index(m) if isinstance(m, str) else None
        if layer is not None:
            if layer >= base["model.n_layer"]:
                raise ConfigError(f"{where}: metric {m!r} names a layer the model does not have "
                                  f"(model.n_layer={base['model.n_layer']}).")
            continue
        if m not in REPORTED_METRICS:
            import difflib

            close = difflib.get_close_matches(str(m), REPORTED_METRICS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: metric {m!r} is never reported by the trainer.{hint} "
                              f"Reported: {', '.join(REPORTED_METRICS)}, {LAYER_PREFIX}{{i}}.")
        if m in MEASURED_EVERY and base["train.measure_interval"] == 0:
            raise ConfigError(f"{where}: metric {m!r} needs train.measure_interval > 0 (it is 0 in the base config).")
        if m == "mfu" and base["system.device"] == "cpu":
            raise ConfigError(f"{where}: metric 'mfu' is reported on GPU only (system.device='cpu').")


def check_ladder(space: dict[str, Domain], points: list[dict[str, Any]], where: str) -> None:
    """A sweep over compute budgets (``train.flops`` a grid axis) is a scaling ladder: it needs
    :data:`~lmtune.contract.LADDER_MIN` budgets with as many model sizes each (``model.n_embd``/``model.n_layer``),
    else no budget's minimum can be placed and no power law in C fitted. ``points``: the grid's points."""
    d = space.get(BUDGET_KEY)
    if d is None or not d.crossed:
        return
    sizes: dict[Any, set] = {}
    for p in points:
        sizes.setdefault(p.get(BUDGET_KEY), set()).add(tuple(p.get(k) for k in SIZE_KEYS))
    fewest = min((len(s) for s in sizes.values()), default=0)
    if len(sizes) < LADDER_MIN or fewest < LADDER_MIN:
        varied = [k for k in SIZE_KEYS if k in space] or ["no size axis"]
        raise ConfigError(f"{where}: a sweep over {BUDGET_KEY} is a scaling ladder and needs {LADDER_MIN} budgets at "
                          f"least with {LADDER_MIN} model sizes at least each ({' or '.join(SIZE_KEYS)}); it has "
                          f"{len(sizes)} budget(s) and {fewest} size(s) per budget ({', '.join(varied)}): fewer cannot "
                          f"place a budget's minimum or fit a power law in C.")


def check_frontier(f: Frontier, space: dict[str, Domain], where: str) -> None:
    if not isinstance(f, Frontier):
        raise ConfigError(f"{where}: frontier must be Frontier(x=..., budget=...), got {f!r}.")
    for name in ("x", "budget"):
        try:
            config_lib.check_key(getattr(f, name))
        except ConfigError as e:
            raise ConfigError(f"{where}: frontier.{name}: {e}") from None
    if f.x not in space:
        raise ConfigError(f"{where}: frontier.x={f.x!r} is not an axis of the space.")
    for name in ("headroom_gib", "margin_gib"):
        v = getattr(f, name)
        if v is None and name == "margin_gib":
            continue  # 5% of the limit
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{where}: frontier.{name}={v!r} is not accepted: expected a number >= 0.")


def absolute_paths(flat: dict[str, Any]) -> dict[str, Any]:
    """Trials run in other processes (other nodes); paths given relative to the cwd are made absolute."""
    out = dict(flat)
    for key in ("data.files", "data.val_files"):
        out[key] = [p if os.path.isabs(p) or "://" in p else os.path.abspath(p) for p in out.get(key) or []]
    for key in ("data.cache_dir", "data.prepared"):
        value = out.get(key)
        if value and value != "auto" and "://" not in value and not os.path.isabs(value):
            out[key] = os.path.abspath(value)
    return out


def check_storage(storage: str) -> None:
    """``--storage``: a URI (checked by its filesystem when the sweep starts), or a directory that exists or can be
    created: no file in its place or above it, and writable where it would be created."""
    if "://" not in storage:
        check_output_dir(storage, "--storage")


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """``--address``: ``auto`` or ``[ray://]HOST:PORT``; a concrete address must accept a TCP connection.

    ``auto`` is left to Ray (it reads the running cluster's address file); a GCS address that refuses
    the connection is bad input, reported before Ray is imported.
    """
    if address is None or address in ("auto", "local"):
        return
    addr = address
    scheme = ""
    if "://" in addr:
        scheme, _, addr = addr.partition("://")
        if scheme not in ("ray", "http", "https"):
            raise ConfigError(f"--address {address}: unknown scheme '{scheme}://'; expected auto, HOST:PORT or ray://HOST:PORT.")
    host, colon, port_s = addr.rpartition(":")
    if not colon or not host or not port_s.isdigit():
        raise ConfigError(f"--address {address}: expected auto, HOST:PORT (the head's GCS, port 6379 by default) "
                          f"or ray://HOST:PORT.")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port_s)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}). "
                          f"Start one with `ray start --head` or `ray up cluster.yaml`, or leave --address out "
                          f"for an embedded local Ray.") from None


