"""A throw-away one-node Slurm cluster on this machine, for trying `tune --launcher slurm` without a cluster.

    python serverFolder/local_slurm.py --root /tmp/slurm       # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
    export SLURM_CONF=/tmp/slurm/slurm.conf                    # sbatch, squeue, scancel now use it
    python serverFolder/local_slurm.py --root /tmp/slurm --stop

It needs Debian's packages (`apt-get install slurm-wlm munge`) and starts, as the user running it,
a munge daemon with its own key and socket, slurmctld and slurmd, all under --root: free ports,
one node (this machine, every CPU core), one partition `debug`, no cgroups, no accounting
database. Jobs run as that user. Tests use it (tests/test_slurm.py) as they use local_postgres.py.
"""
import argparse
import getpass
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time

from local_server import folder

from mnistflow.flags import OneLineParser

PARTITION = "debug"
# slurm.conf ends a value at a space or '#', and munged's and slurmd's options hold the same paths:
# the folder they are under is kept to these characters.
SLURM_PATH = re.compile(r"[\w./@+-]+")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def binary(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-root PATH may leave out.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def available() -> bool:
    return all(binary(name) for name in PROGRAMS)


def free_port() -> int:
    """A port no process listens on now, as the kernel picks one for a socket bound to port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def config(root: str) -> str:
    """A minimal slurm.conf: this machine as the one node, its daemons' files under root."""
    user, host = getpass.getuser(), socket.gethostname()
    return "\n".join([
        "ClusterName=mnistflow",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge.socket",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        # No cgroups: processes are tracked through /proc and tasks are not bound to cores.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",  # each task its own cores, so an array's tasks run side by side
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "KillWait=5",
        "MinJobAge=300",  # finished jobs stay visible to scontrol for 5 minutes
        "MpiDefault=none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def start(root: str) -> str:
    """Start munged, slurmctld and slurmd under root; the path of the slurm.conf to put in SLURM_CONF,
    returned once the node takes jobs."""
    if not available():
        raise RuntimeError("Slurm is not installed: apt-get install slurm-wlm munge")
    for folder in ("state", "spool"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    os.chmod(root, 0o755)  # munged refuses a key or socket in a folder others may write to
    key = os.path.join(root, "munge.key")
    with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(secrets.token_bytes(1024))
    _run([binary("munged"), "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
          f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"])
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write(config(root))
    env = {**os.environ, "SLURM_CONF": conf}
    _run([binary("slurmctld"), "-c"], env)  # -c: a clean start, no jobs of an earlier cluster
    _run([binary("slurmd")], env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run([binary("sinfo") or "sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        if state.stdout.strip() == "idle":
            return conf
        time.sleep(0.5)
    raise RuntimeError(f"the Slurm node did not come up within 60 s (its logs: {root}/slurmctld.log, slurmd.log)")


def _run(command: list[str], env: dict | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"{os.path.basename(command[0])} failed: {last_line}")


def stop(root: str) -> None:
    """Stop the daemons started under root (each by the pid file it wrote), slurmd first."""
    for name in ("slurmd", "slurmctld", "munged"):
        try:
            with open(os.path.join(root, f"{name}.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue  # never started, or already stopped
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def root_folder(text: str) -> str:
    """An argparse type for --root: a folder (or where one can be made) that slurm.conf can name."""
    if not SLURM_PATH.fullmatch(os.path.abspath(folder(text))):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; slurm.conf takes a path of letters, digits "
                                         "and _ . - / + @ only")
    return text


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=root_folder, required=True, help="directory for the cluster's config, state and logs")
    parser.add_argument("--stop", action="store_true", help="stop the cluster in --root")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    if args.stop:
        stop(root)
        return
    try:
        conf = start(root)
    except RuntimeError as exc:
        stop(root)
        sys.exit(f"local_slurm: {exc}")
    print(f"export SLURM_CONF={conf}")


if __name__ == "__main__":
    main()
