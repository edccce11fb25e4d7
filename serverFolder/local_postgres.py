"""A throw-away PostgreSQL server on 127.0.0.1, for trying the shared-server setup on one machine.

    python serverFolder/local_postgres.py --root /tmp/pg --port 5432 mlflow basic_auth
    export PGPASSFILE=/tmp/pg/pgpass          # the line it prints: where the password is
    python serverFolder/local_postgres.py --root /tmp/pg --stop

It needs the Debian package (`apt-get install postgresql`), runs the server as the `postgres`
account when started as root (PostgreSQL refuses root), and creates the databases named. --root
must be a new or empty folder, since the postgres account takes it over (run as root, one it can
reach, e.g. under /tmp, not inside another root-only one). Connections need the password of the
`postgres` user (scram-sha-256): PGPASSWORD when it is set, else a new random one written to
<root>/pgpass (owner-only, the format libpq reads through PGPASSFILE). It is never on a command
line, and the URLs printed, one SQLAlchemy URL per database (the form MLflow's
--backend-store-uri and Optuna's storage take), carry none: libpq finds it in PGPASSWORD or
PGPASSFILE. Tests and bench/server_load.py use it too.
"""
import argparse
import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

from local_server import folder, port_number
from mnistflow.errors import ConfigError
from mnistflow.flags import OneLineParser

USER = "postgres"


def binary(name: str) -> str | None:
    # Debian keeps the server programs out of PATH, under /usr/lib/postgresql/<version>/bin.
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


def available() -> bool:
    return bool(binary("initdb") and binary("pg_ctl"))


def _as_server_user() -> list[str]:
    return ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []


def start(root: str, port: int, databases: list[str], password: str) -> list[str]:
    """Create a cluster in root/data whose `postgres` user has `password`, start it on
    127.0.0.1:port and create `databases`; their URLs (without the password)."""
    if os.path.isdir(root) and os.listdir(root):  # before the folder is handed to the server's account
        raise ConfigError(f"--root {root} is not empty; give a new or empty folder for the cluster")
    if not available():
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    os.makedirs(root, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, USER)
    # initdb reads the password from a file only the server's account can read, removed at once.
    with tempfile.NamedTemporaryFile("w", dir=root, prefix="pw-") as pwfile:
        pwfile.write(password + "\n")
        pwfile.flush()
        if os.geteuid() == 0:
            shutil.chown(pwfile.name, USER)
        _run([binary("initdb"), "-D", os.path.join(root, "data"), "-U", USER, "--auth=scram-sha-256",
              f"--pwfile={pwfile.name}", "-E", "UTF8"], as_server=True)
    try:
        _run([binary("pg_ctl"), "-D", os.path.join(root, "data"), "-w", "-l", os.path.join(root, "log"), "-o",
              f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], as_server=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} (the server's log: {os.path.join(root, 'log')})") from None
    return [create_database(port, name, password) for name in databases]


def _run(command: list[str], as_server: bool = False, env: dict | None = None) -> None:
    """Run a PostgreSQL program; RuntimeError naming it, with the last line it printed, when it fails."""
    done = subprocess.run([*(_as_server_user() if as_server else []), *command], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"{os.path.basename(command[0])} failed: {last_line}")


def create_database(port: int, name: str, password: str) -> str:
    """Create database `name` in the cluster on `port`; its SQLAlchemy URL (without the password).
    createdb quotes the name itself: no SQL is built here."""
    _run([binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, "--", name],
         env={**os.environ, "PGPASSWORD": password})
    return f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/{urllib.parse.quote(name, safe='')}"


def write_pgpass(root: str, port: int, password: str) -> str:
    """<root>/pgpass, owner-only, for PGPASSFILE."""
    path = os.path.join(root, "pgpass")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f"127.0.0.1:{port}:*:{USER}:{password}\n")
    return path


def stop(root: str) -> None:
    subprocess.run([*_as_server_user(), binary("pg_ctl"), "-D", os.path.join(root, "data"), "-m", "fast", "stop"],
                   capture_output=True)  # a cluster that is not running is already stopped


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("databases", nargs="*", default=["mlflow"])
    parser.add_argument("--root", type=folder, required=True, help="directory for the cluster and its log")
    parser.add_argument("--port", type=port_number, default=5432)
    parser.add_argument("--stop", action="store_true", help="stop the cluster in --root")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    if args.stop:
        stop(root)
        return
    # A generated password has no ':' or '\\', which the pgpass format would need escaped.
    password = os.environ.get("PGPASSWORD") or secrets.token_urlsafe(24)
    try:
        urls = start(root, args.port, args.databases, password)
    except ConfigError as exc:
        parser.error(str(exc))
    except RuntimeError as exc:
        sys.exit(f"local_postgres: {exc}")
    print("\n".join(urls))
    if not os.environ.get("PGPASSWORD"):
        print(f"export PGPASSFILE={write_pgpass(root, args.port, password)}")


if __name__ == "__main__":
    main()
