"""A throw-away PostgreSQL server on 127.0.0.1, for trying the shared-server setup on one machine.

    python serverFolder/local_postgres.py --root /tmp/pg --port 5432 mlflow basic_auth
    python serverFolder/local_postgres.py --root /tmp/pg --stop

It needs the Debian package (`apt-get install postgresql`), runs the server as the `postgres`
account when started as root (PostgreSQL refuses root), trusts local connections (no password:
loopback only, for tests and benchmarks, never for a real shared server) and creates the
databases named (run as root, --root must be a directory the postgres account can reach,
e.g. under /tmp, not inside another root-only one). It prints one SQLAlchemy URL per database,
the form MLflow's --backend-store-uri and Optuna's storage take. Tests and bench/server_load.py
use it too.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys


def binary(name: str) -> str | None:
    # Debian keeps the server programs out of PATH, under /usr/lib/postgresql/<version>/bin.
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


def available() -> bool:
    return bool(binary("initdb") and binary("pg_ctl"))


def _as_server_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def start(root: str, port: int, databases: list[str]) -> list[str]:
    """Create a cluster in root/data, start it on 127.0.0.1:port and create `databases`."""
    if not available():
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    os.makedirs(root, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = os.path.join(root, "data")
    _run([binary("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"], as_server=True)
    try:
        _run([binary("pg_ctl"), "-D", data, "-w", "-l", os.path.join(root, "log"), "-o",
              f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], as_server=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} (the server's log: {os.path.join(root, 'log')})") from None
    return [create_database(port, name) for name in databases]


def _run(command: list[str], as_server: bool = False) -> None:
    """Run a PostgreSQL program; RuntimeError naming it, with the last line it printed, when it fails."""
    done = subprocess.run([*(_as_server_user() if as_server else []), *command], capture_output=True, text=True)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"{os.path.basename(command[0])} failed: {last_line}")


def create_database(port: int, name: str) -> str:
    """Create database `name` in the cluster on `port`; its SQLAlchemy URL."""
    _run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {name}"])
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"


def stop(root: str) -> None:
    subprocess.run([*_as_server_user(), binary("pg_ctl"), "-D", os.path.join(root, "data"), "-m", "fast", "stop"],
                   capture_output=True)  # a cluster that is not running is already stopped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("databases", nargs="*", default=["mlflow"])
    parser.add_argument("--root", required=True, help="directory for the cluster and its log")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--stop", action="store_true", help="stop the cluster in --root")
    args = parser.parse_args(argv)
    if args.stop:
        stop(args.root)
        return
    try:
        urls = start(os.path.abspath(args.root), args.port, args.databases)
    except RuntimeError as exc:
        sys.exit(f"local_postgres: {exc}")
    print("\n".join(urls))


if __name__ == "__main__":
    main()
