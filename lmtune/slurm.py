"""A sweep on a Slurm allocation: one batch job starts Ray across its nodes, runs the sweep against it, stops Ray.

    python -m lmtune.slurm SWEEP.py [--nodes N] [--gpus-per-node G] [--cpus-per-node C] [--time HH:MM:SS]
                                    [--partition P] [--storage DIR|URI] [--requeue] [--resume] [--smoke]
                                    [--sbatch=--OPTION=VALUE …] [--dry-run] [section.key=value …]

The batch script it writes (and submits with ``sbatch``; ``--dry-run`` prints it) follows Ray's "deploying on Slurm"
recipe: a Ray head on the allocation's first node and a worker on every other node (``srun``, one Ray node per Slurm
node, ``ray start --block`` so Slurm tracks and ends them, resources from the allocation, Ray's temp dir on each
node's local disk); it waits until every node has joined, then runs ``python -m lmtune.sweep … --address HEAD``
from the batch shell, and stops Ray at the end. The results go to ``--storage``: a directory every node sees (NFS,
Lustre, … ; a node's /tmp is its own) or an object store.

A job that reaches its time limit or is preempted: ``--signal=B:TERM@SECONDS`` has Slurm send SIGTERM to the batch
shell ahead of the kill; the shell hands it to the sweep's driver, which saves the sweep's state exactly as Ctrl-C
does, and the job's log ends with the command that continues it. With ``--requeue`` the job then submits the same
script again with ``--resume``, and so on until the sweep is done: the next job continues where this one stopped (no
finished trial is rerun, interrupted ones continue from their checkpoints).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from lmtune.cli import parse_command_line, user_errors_exit_2
from lmtune.config import ConfigError

SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs", "fuse.glusterfs",
                      "panfs", "wekafs", "cifs", "smb3", "fuse.sshfs", "virtiofs", "9p", "afs", "orangefs")
"""Filesystem types every node of a cluster can mount as the same tree."""
RESUME_ENV = "LMTUNE_SLURM_RESUME"
"""Set by a requeued job: the sweep continues with --resume."""
MAX_REQUEUES = 50


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lmtune.slurm", description=__doc__.splitlines()[0])
    p.add_argument("sweep_file", metavar="SWEEP.py")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--nodes", type=int, default=1, help="Slurm nodes (one Ray node each; default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    p.add_argument("--cpus-per-node", type=int, default=0, help="CPUs per node (default: what Slurm gives)")
    p.add_argument("--time", default="04:00:00", help="the job's time limit, [D-]HH:MM:SS (default 04:00:00)")
    p.add_argument("--partition", help="the Slurm partition (default: the cluster's default)")
    p.add_argument("--storage", default="results", metavar="DIR|URI",
                   help="where the results go: a directory on a shared filesystem, or s3://… (default ./results)")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="SIGTERM this many seconds before the time limit, to save the sweep (default 120)")
    p.add_argument("--requeue", action="store_true", help="an interrupted job submits the sweep again with --resume")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted run of this sweep")
    p.add_argument("--smoke", action="store_true", help="the sweep file's smoke variant")
    p.add_argument("--no-wandb", action="store_true", help="no W&B runs")
    p.add_argument("--sbatch", action="append", default=[], metavar="--OPTION=VALUE",
                   help="an sbatch option passed on as it is (e.g. --sbatch=--account=lab); repeatable")
    p.add_argument("--ray-start", default="", metavar="ARGS", help="more `ray start` arguments for every node")
    p.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    return p


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise ConfigError(f"`{' '.join(cmd)}` failed: {detail.strip().splitlines()[-1] if detail.strip() else e}") \
            from None


def _partitions() -> dict[str, list[str]]:
    """Partition → its nodes (``sinfo``); the default partition's name carries no ``*`` here."""
    out: dict[str, list[str]] = {}
    for line in _run(["sinfo", "-h", "-N", "-o", "%P|%N"]).splitlines():
        partition, _, node = line.strip().partition("|")
        if partition:
            out.setdefault(partition.rstrip("*"), []).append(node)
    return out


def _default_partition() -> str | None:
    return next((p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split() if p.endswith("*")), None)


def _node_addresses(nodes: list[str]) -> set[str]:
    addresses = set()
    for node in nodes:
        m = re.search(r"NodeAddr=(\S+)", _run(["scontrol", "show", "node", node]))
        addresses.add(m.group(1) if m else node)
    return addresses


def _this_host() -> set[str]:
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
    try:
        names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` (or its nearest existing parent) is on, from /proc/mounts."""
    p = path.expanduser().resolve()
    while not p.exists():
        p = p.parent
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1].replace("\\040", " ")
        if (str(p) == mount or str(p).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


def check(args: argparse.Namespace, partition: str | None) -> str:
    """Everything about the allocation that would fail later, in one line each (ConfigError), before sbatch; returns
    the partition."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        raise ConfigError("no Slurm here: sbatch and sinfo are not on PATH (run this on a Slurm login node).")
    if args.nodes < 1 or args.gpus_per_node < 0 or args.cpus_per_node < 0 or args.signal_seconds < 0:
        raise ConfigError("--nodes must be >= 1, and --gpus-per-node, --cpus-per-node and --signal-seconds >= 0.")
    if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}|\d+", args.time):
        raise ConfigError(f"--time {args.time} is not accepted: expected [D-]HH:MM:SS or minutes.")
    partitions = _partitions()
    name = partition or _default_partition()
    if name not in partitions:
        raise ConfigError(f"partition {name!r} does not exist; this cluster's partitions: {', '.join(partitions)}.")
    if args.nodes > len(partitions[name]):
        raise ConfigError(f"--nodes {args.nodes} is more than partition {name!r} has ({len(partitions[name])} node(s): "
                          f"{', '.join(partitions[name])}).")
    if args.nodes > 1 and "://" not in args.storage:
        kind = filesystem_type(Path(args.storage))
        one_host = _node_addresses(partitions[name]) <= _this_host()
        if kind not in SHARED_FILESYSTEMS and not one_host:
            raise ConfigError(f"--storage {args.storage} is on a {kind or 'local'} filesystem, which the other nodes do "
                              f"not see; with --nodes > 1 give a directory on a shared filesystem "
                              f"({', '.join(SHARED_FILESYSTEMS[:6])}, …) or an object store (s3://…).")
    return name


def sweep_args(args: argparse.Namespace) -> list[str]:
    """The sweep command's arguments, as the batch script passes them (its own --address and --resume besides)."""
    out = [str(Path(args.sweep_file).resolve()), *args.overrides,
           "--storage", args.storage if "://" in args.storage else str(Path(args.storage).resolve())]
    out += ["--smoke"] if args.smoke else []
    out += ["--no-wandb"] if args.no_wandb else []
    return out


_WAIT_FOR_NODES = '''import sys, time, ray
address, want = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
while True:
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        break
    except Exception:
        if time.monotonic() > deadline:
            sys.exit("lmtune.slurm: the Ray head did not start")
        time.sleep(2)
while sum(n["Alive"] for n in ray.nodes()) < want:
    if time.monotonic() > deadline:
        sys.exit(f"lmtune.slurm: {sum(n['Alive'] for n in ray.nodes())} of {want} Ray nodes joined in 300 s")
    time.sleep(1)
print(f"lmtune.slurm: {want} Ray node(s) up at {address}; dashboard: ssh -L 8265:127.0.0.1:8265 <head node>, "
      f"then http://127.0.0.1:8265")
'''
"""The script's wait for its Ray nodes (Python, run on the first node)."""


def script(args: argparse.Namespace, partition: str, name: str, log_dir: Path, again: str) -> str:
    """The batch script (bash): its directives and set-up, a Ray node on every node of the job, the sweep, and
    what follows a stop."""
    py = sys.executable
    ray = str(Path(py).with_name("ray"))
    directives = [f"--job-name=lmtune-{name}", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--time={args.time}",
                  f"--partition={partition}", f"--output={log_dir}/%x-%j.out", "--open-mode=append",
                  f"--signal=B:TERM@{args.signal_seconds}"]
    directives += [f"--cpus-per-task={args.cpus_per_node}"] if args.cpus_per_node else []
    directives += [f"--gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []
    directives += args.sbatch
    resume = "1" if args.resume else ""
    return f"""#!/bin/bash
{chr(10).join(f"#SBATCH {d}" for d in directives)}
# Written by python -m lmtune.slurm ({time.strftime('%Y-%m-%d %H:%M')}): a Ray cluster across this job's nodes, then
# the sweep against it. Submit it again with {RESUME_ENV}=1 in its environment to continue an interrupted sweep.
set -u
PY={shlex.quote(py)}
RAY={shlex.quote(ray)}
export PYTHONPATH={shlex.quote(os.environ.get("PYTHONPATH", ""))}
RESUME=${{{RESUME_ENV}:-{resume}}}
# Ray's token authentication, as `ray up` sets it: one secret for this job's nodes and driver (srun passes the
# environment on), never written to the shared filesystem.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=${{RAY_AUTH_TOKEN:-$("$PY" -c 'import secrets; print(secrets.token_hex(32))')}}
ATTEMPT=${{LMTUNE_SLURM_ATTEMPT:-1}}
# SIGTERM from Slurm ahead of the time limit (--signal=B:TERM) may come while Ray starts: remember it, and once the
# sweep's driver runs, hand it over (the driver saves the sweep as Ctrl-C does).
stop=""
driver=""
trap 'echo "lmtune.slurm: SIGTERM (the time limit or a preemption is near): stopping the sweep"; stop=1;
      [ -n "$driver" ] && kill -TERM "$driver"' TERM
echo "lmtune.slurm: job $SLURM_JOB_ID, attempt $ATTEMPT, nodes $SLURM_JOB_NODELIST, $(date -Is)"
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${{nodes[0]}}
cpus=${{SLURM_CPUS_ON_NODE:-1}}
""" + _ray_nodes(args) + _sweep_then_requeue(args, again)


def _ray_nodes(args: argparse.Namespace) -> str:
    """The script's Ray cluster: a head on the job's first node, a worker on each other one, and a wait until all
    have joined."""
    gpus = f"--num-gpus={args.gpus_per_node}" if args.gpus_per_node else "--num-gpus=0"
    return f"""head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{{print $1}}')
port=$(srun --nodes=1 --ntasks=1 -w "$head" "$PY" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
steps=()
# One Ray node per Slurm node, its temp dir on that node's local disk; --block keeps it a Slurm step that the job ends.
srun --nodes=1 --ntasks=1 -w "$head" "$RAY" start --head --block --node-ip-address="$head_ip" --port="$port" \\
    --num-cpus="$cpus" {gpus} --temp-dir="/tmp/ray-$SLURM_JOB_ID-0" --dashboard-host=127.0.0.1 {args.ray_start} &
steps+=($!)
sleep 5
for i in $(seq 1 $(( ${{#nodes[@]}} - 1 ))); do
    srun --nodes=1 --ntasks=1 -w "${{nodes[$i]}}" "$RAY" start --block --address="$head_ip:$port" \\
        --num-cpus="$cpus" {gpus} --temp-dir="/tmp/ray-$SLURM_JOB_ID-$i" {args.ray_start} &
    steps+=($!)
done
"$PY" - "$head_ip:$port" "${{#nodes[@]}}" <<'WAIT'
{_WAIT_FOR_NODES}WAIT
"""


def _sweep_then_requeue(args: argparse.Namespace, again: str) -> str:
    """The script's sweep against that cluster, and after it: Ray stopped, and a stopped sweep requeued (or how to
    continue it)."""
    sweep = " ".join(shlex.quote(a) for a in sweep_args(args))
    return f"""rc=$?
if [ -n "$stop" ]; then
    rc=143  # stopped before the sweep began: the next job starts it
elif [ "$rc" = 0 ]; then
    "$PY" -m lmtune.sweep {sweep} --address "$head_ip:$port" ${{RESUME:+--resume}} &
    driver=$!
    wait "$driver"; rc=$?
    while kill -0 "$driver" 2>/dev/null; do wait "$driver"; rc=$?; done  # a signal ends `wait`, not the driver
fi
trap - TERM
kill -TERM "${{steps[@]}}" 2>/dev/null; wait "${{steps[@]}}" 2>/dev/null
if [ "$rc" = 143 ] || [ "$rc" = 130 ]; then
    if [ {"1" if args.requeue else "0"} = 1 ] && [ "$ATTEMPT" -lt {MAX_REQUEUES} ]; then
        next=$(LMTUNE_SLURM_ATTEMPT=$((ATTEMPT + 1)) {RESUME_ENV}=1 sbatch --parsable --export=ALL "$0")
        echo "lmtune.slurm: the sweep's state is saved; requeued as job $next, which continues it with --resume"
    else
        echo "lmtune.slurm: the sweep's state is saved; continue it with: {again} --resume"
    fi
elif [ "$rc" = 0 ]; then
    echo "lmtune.slurm: the sweep is done"
fi
exit $rc
"""




@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command_line(_parser(), argv, "SWEEP.py, section.key=value overrides")
    from lmtune.sweep.checks import check_storage
    from lmtune.sweep.load import load_sweep, resolve

    sweep, path = load_sweep(args.sweep_file)  # the sweep file and its overrides are checked here, before sbatch
    rs = resolve(sweep, path, smoke=args.smoke, overrides=args.overrides)
    check_storage(args.storage)
    partition = check(args, args.partition)
    local = Path("results" if "://" in args.storage else args.storage).resolve()
    log_dir = local / "slurm"
    again = "python -m lmtune.slurm " + " ".join(shlex.quote(a) for a in argv if a not in ("--resume", "--dry-run"))
    text = script(args, partition, rs.name, log_dir, again)
    if args.dry_run:
        print(text, end="")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{rs.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(text)
    path.chmod(0o755)
    job = _run(["sbatch", "--parsable", str(path)]).strip().split(";")[0]
    said = {"script": path, "log": f"{log_dir}/lmtune-{rs.name}-{job}.out (tail -f it; squeue -j {job})",
            "results": args.storage}
    print(f"submitted job {job}: {args.nodes} node(s) of partition {partition}, time limit {args.time}")
    print("\n".join(f"  {what + ':':<8} {where}" for what, where in said.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
