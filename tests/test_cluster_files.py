"""Every ``cluster*.yaml`` at the repository root passes the checks ``ray up`` runs before it touches a machine.

What ``ray up`` does first (ray 2.60, ``ray/autoscaler/_private/commands.py``: ``create_or_update_cluster`` then
``_bootstrap_config``):

1. ``yaml.safe_load`` the file; the provider type must be one the launcher knows (``_NODE_PROVIDERS``).
2. ``util.prepare_config``: merge the provider's ``defaults.yaml`` (``fillout_defaults``), prepend
   ``setup_commands`` to the head/worker setup (``merge_setup_commands``), check the docker section, give every
   node type its min/max workers. For ``provider: local``, ``prepare_local`` first builds the single node type
   from ``head_ip``/``worker_ips`` and refuses node types written in the file.
3. ``provider.fillout_available_node_types_resources``: on AWS this asks EC2 for instance types (a cloud call).
4. ``util.validate_config``: ``ray-schema.json`` through jsonschema (unknown keys and wrong types are refused),
   then head type / min-max consistency.
5. ``provider.bootstrap_config``: on AWS, IAM role, key pair, subnets, security groups (cloud calls).

For a local-provider file no step leaves this machine, so Ray's own ``_bootstrap_config`` runs end to end. For a
cloud file we run 1, 2 and 4, plus ``check_legacy_fields`` (the first, offline step of ``bootstrap_aws``), and skip
3 and 5. The cloud files declare every node type's CPU and GPU ``resources``, so the autoscaler's plan does not
depend on step 3 (which would only add ``memory`` and ``accelerator_type:*``).
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Callable

import click
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))


def launcher_checks(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's pre-provider checks on a loaded cluster config; returns the prepared config (or raises)."""
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

    config = copy.deepcopy(config)
    if config.get("provider", {}).get("type") == "local":
        return _bootstrap_config(config, no_config_cache=True)
    prepared = prepare_config(config)  # refuses an unknown provider type (NotImplementedError)
    validate_config(prepared)
    check_legacy_fields(prepared)
    return prepared


def load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def is_local(config: dict[str, Any]) -> bool:
    return config["provider"]["type"] == "local"


def ray_start_params(commands: list[str]) -> list[dict[str, Any]]:
    """Every ``ray start`` in a list of shell commands, parsed by Ray's own CLI (an unknown flag raises)."""
    from ray.scripts.scripts import start

    found = []
    for command in commands:
        for segment in re.split(r";|&&|\|\|", command):
            tokens = shlex.split(segment)
            if tokens[:2] == ["ray", "start"]:
                found.append(start.make_context("ray start", tokens[2:]).params)
    return found


@pytest.fixture(scope="module", params=CLUSTER_FILES, ids=lambda p: p.name)
def cluster_file(request) -> tuple[Path, dict[str, Any]]:
    """A cluster file and its config as ``ray up`` prepares it."""
    return request.param, launcher_checks(load(request.param))


def test_both_cluster_files_exist():
    assert {"cluster.yaml", "cluster-local.yaml"} <= {p.name for p in CLUSTER_FILES}


def test_passes_ray_launcher_checks(cluster_file):
    path, config = cluster_file
    assert config["available_node_types"], path.name
    assert config["head_node_type"] in config["available_node_types"]


def test_declares_gpu_workers(cluster_file):
    path, config = cluster_file
    if not is_local(config):
        # Cloud: the autoscaler launches nodes from these declarations, so a GPU worker type must say so.
        workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
        gpu_types = [n for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
        assert gpu_types, f"{path.name}: no worker node type declares resources GPU >= 1"
        assert all(workers[n]["max_workers"] >= 1 for n in gpu_types), f"{path.name}: GPU types capped at 0"
    # Both kinds: a worker on which torch sees no CUDA device fails setup instead of joining. For the local
    # provider this is the declaration, since Ray refuses node types there and detects GPUs per machine.
    checks = [c for c in config["worker_setup_commands"] if "torch.cuda.device_count()" in c and "assert" in c]
    assert checks, f"{path.name}: worker setup does not require a CUDA device"
    assert all(p["num_gpus"] != 0 for p in ray_start_params(config["worker_start_ray_commands"])), path.name


def test_setup_installs_lmtune_and_its_torch(cluster_file):
    path, config = cluster_file
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_req = next(Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "torch")
    mounts = {remote.rstrip("/"): local for remote, local in config["file_mounts"].items()}
    for role in ("head_setup_commands", "worker_setup_commands"):
        setup = " && ".join(config[role])
        # lmtune itself: the checkout that `ray up` (run from the repo root) copies over, installed editable,
        # or a git URL.
        editable = re.findall(r"pip install (?:-e|--editable) (\S+)", setup)
        from_mount = [p for p in editable if p.rstrip("/") in mounts
                      and (REPO / mounts[p.rstrip("/")]).resolve() == REPO]
        from_git = re.findall(r"lmtune @ git\+\S+", setup)
        assert from_mount or from_git, f"{path.name}: {role} does not install lmtune: {config[role]}"
        # torch: a pinned version inside the range pyproject.toml allows (else pip would replace it).
        pins = re.findall(r"pip install [^&;]*\btorch==([0-9][\w.+]*)", setup)
        assert pins, f"{path.name}: {role} does not pin torch"
        assert all(torch_req.specifier.contains(v, prereleases=True) for v in pins), (
            f"{path.name}: torch=={pins} outside pyproject's {torch_req}"
        )


def test_ray_start_commands_parse_and_serve_the_dashboard(cluster_file):
    """Every `ray start` flag exists in this Ray (parsed by Ray's own CLI), and the head serves the dashboard
    where `ray dashboard CLUSTER.yaml` forwards to by default."""
    from ray.scripts.scripts import dashboard

    path, config = cluster_file
    head = ray_start_params(config["head_start_ray_commands"])
    workers = ray_start_params(config["worker_start_ray_commands"])
    assert len(head) == 1 and head[0]["head"], f"{path.name}: head must run one `ray start --head`"
    assert head[0]["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert head[0]["include_dashboard"] is not False
    forwarded = next(p.default for p in dashboard.params if p.name == "remote_port")
    assert head[0]["dashboard_port"] == forwarded, f"{path.name}: dashboard not on {forwarded}"
    assert len(workers) == 1 and workers[0]["address"] == f"$RAY_HEAD_IP:{head[0]['port']}"


# --- the checks are real: broken copies of the files are refused -----------------------------------------


def _first_worker_type(c: dict) -> dict:
    return next(t for n, t in c["available_node_types"].items() if n != c["head_node_type"])


def _set_min_workers_above_max(c: dict) -> None:
    _first_worker_type(c)["min_workers"] = c["max_workers"] + 1


BROKEN: list[tuple[str, str, Callable[[dict], None], type[Exception], str]] = [
    ("cluster.yaml", "typo'd top-level key",
     lambda c: c.__setitem__("idle_timeout_minute", c.pop("idle_timeout_minutes")),
     jsonschema.ValidationError, "idle_timeout_minute"),
    ("cluster.yaml", "max_workers not an integer",
     lambda c: c.__setitem__("max_workers", "ten"), jsonschema.ValidationError, "'ten'"),
    ("cluster.yaml", "typo'd node-type key",
     lambda c: _first_worker_type(c).__setitem__("resource", _first_worker_type(c).pop("resources")),
     jsonschema.ValidationError, "resources"),
    ("cluster.yaml", "fractional GPU count",
     lambda c: _first_worker_type(c)["resources"].__setitem__("GPU", 0.5), jsonschema.ValidationError, "0.5"),
    ("cluster.yaml", "head type not among the node types",
     lambda c: c.__setitem__("head_node_type", "hed"), ValueError, "head_node_type"),
    ("cluster.yaml", "min_workers above max_workers", _set_min_workers_above_max, ValueError, "max_workers"),
    ("cluster.yaml", "unknown provider type",
     lambda c: c["provider"].__setitem__("type", "amazon"), NotImplementedError, "amazon"),
    ("cluster-local.yaml", "negative idle timeout",
     lambda c: c.__setitem__("idle_timeout_minutes", -1), jsonschema.ValidationError, "less than the minimum"),
    ("cluster-local.yaml", "typo'd worker_ips",
     lambda c: c["provider"].__setitem__("worker_ip", c["provider"].pop("worker_ips")), click.ClickException,
     "worker_ips"),
    ("cluster-local.yaml", "node types in a local config",
     lambda c: c.__setitem__("available_node_types", {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}),
     click.ClickException, "not supported for on-premise"),
]


@pytest.mark.parametrize("name, what, breakage, error, message", BROKEN, ids=[f"{b[0]}: {b[1]}" for b in BROKEN])
def test_broken_file_is_refused(name, what, breakage, error, message):
    config = load(REPO / name)
    launcher_checks(config)  # the intact file passes: the failure below is the breakage's
    breakage(config)
    with pytest.raises(error, match=re.escape(message)):
        launcher_checks(config)
