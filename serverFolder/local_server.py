"""Start (or stop) an MLflow tracking server for one machine: SQLite backend, proxied artifacts.

    python serverFolder/local_server.py                   # 127.0.0.1:5000, stores in serverFolder/local/
    python serverFolder/local_server.py --port 5001 --root /data/mlflow --workers 2
    python serverFolder/local_server.py --stop            # the one started with the same --root

It starts `mlflow server` in the background, waits until /health answers, and prints the
MLFLOW_TRACKING_URI to export. The server writes its log to <root>/server.log, its process id
to <root>/server.pid and when that process started to <root>/server.started: --stop ends that
process only, never another that got the same id later. Clients never touch <root>: artifacts
go through the server (--artifacts-destination), so the same setup works when the server is on
another machine.
"""
import argparse
import math
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request

import psutil

from mnistflow.config import LOOPBACK_HOSTS, is_host
from mnistflow.flags import OneLineParser

HERE = os.path.dirname(os.path.abspath(__file__))
# The steps need no server-side jobs; without them the server starts faster and runs no user code.
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# Registry webhooks to this machine (the serve step's, docs/serving.md): MLflow sends them only to
# public https addresses unless told otherwise, and looks its webhooks up again every 60 s.
LOOPBACK_WEBHOOKS = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                     "MLFLOW_WEBHOOK_CACHE_TTL": "2"}


def port_number(text: str) -> int:
    if not (text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"port {text!r} is not allowed; give a number from 1 to 65535")
    return int(text)


def address(text: str) -> str:
    """HOST:PORT, checked (tls_proxy.py's --listen and --upstream); an IPv6 host in brackets."""
    host, _, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (is_host(bare) and (":" in bare) == (bare != host)):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give HOST:PORT, e.g. 127.0.0.1:8443")
    port_number(port)
    return text


def positive(kind: type, noun: str):
    """An argparse type: `kind` of `text`, finite and above 0 (`noun` says what, for the message)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give {noun} above 0")
        return value
    return parse


def folder(text: str) -> str:
    """An argparse type for --root: a folder, or a path where one can be made."""
    existing = os.path.abspath(text)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; this user cannot write in {existing}")
    return text


def server_parser(description: str, root: str, workers: int) -> argparse.ArgumentParser:
    """The options local_server.py and shared_server.py share."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1 = this machine only)")
    parser.add_argument("--port", type=port_number, default=5000)
    parser.add_argument("--root", type=folder, default=root, help="directory for the log, pid and default stores")
    parser.add_argument("--backend-store-uri", default="",
                        help="runs and models; default $MLFLOW_BACKEND_STORE_URI, else sqlite:///<root>/mlflow.db")
    parser.add_argument("--artifacts-destination", default="", help="default <root>/artifacts; or s3://bucket/path")
    parser.add_argument("--workers", type=positive(int, "a whole number"), default=workers)
    parser.add_argument("--timeout", type=positive(float, "a number of seconds"), default=90, help="seconds to wait for /health")
    parser.add_argument("--stop", action="store_true", help="stop the server started with this --root")
    return parser


def healthy(url: str, host: str = "", cafile: str = "") -> bool:
    """Whether /health answers 200. `host`: the Host header to send to a server that allows only
    some; `cafile`: the CA to verify an https URL with."""
    request = urllib.request.Request(f"{url}/health", headers={"Host": host} if host else {})
    context = ssl.create_default_context(cafile=cafile or None) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def launch(name: str, command: list[str], root: str, url: str, timeout: float, env: dict | None = None,
           host: str = "", cafile: str = "") -> None:
    """Start `command` (a server) in the background, logging to <root>/server.log, and wait until
    <url>/health answers (see `healthy` for host and cafile)."""
    if healthy(url, host, cafile):
        sys.exit(f"{name}: something already answers at {url}; pick another --port")
    with open(os.path.join(root, "server.log"), "ab") as log:
        # A session of its own: the server outlives this script and a Ctrl-C in its terminal.
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    write_pid(root, server.pid)
    deadline = time.monotonic() + timeout
    while not healthy(url, host, cafile):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server.pid)
            remove_pid(root)  # no stale pid for a later --stop to signal
            sys.exit(f"{name}: the server did not come up at {url}; see {root}/server.log")
        time.sleep(0.5)
    print(f"{name}: up at {url} (pid {server.pid}; files in {root})")


def server_command(args: argparse.Namespace, root: str, *options: str) -> list[str]:
    """`mlflow server` with the options of `server_parser`; its stores come from `store_env`."""
    return [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", *options,
            "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]


def store_env(args: argparse.Namespace, root: str) -> dict:
    """The stores, defaulting to files in root, as the environment variables `mlflow server` reads:
    a database password in a URI stays off the command line, which every user of the machine sees."""
    backend = args.backend_store_uri or os.environ.get("MLFLOW_BACKEND_STORE_URI") or f"sqlite:///{root}/mlflow.db"
    return {"MLFLOW_BACKEND_STORE_URI": backend,
            "MLFLOW_ARTIFACTS_DESTINATION": args.artifacts_destination or os.path.join(root, "artifacts"),
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": webhook_key(root)}


def webhook_key(root: str) -> str:
    """The key the server encrypts registry webhooks' secrets with, kept owner-only in root: without
    one, each server process makes its own, and a secret stored by one cannot be read by another,
    nor after a restart."""
    path = os.path.join(root, "webhook.key")
    if not os.path.exists(path):
        from cryptography.fernet import Fernet

        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(Fernet.generate_key().decode())
    with open(path) as f:
        return f.read().strip()


def start(args: argparse.Namespace) -> None:
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    url = f"http://{args.host}:{args.port}"
    launch("local_server", server_command(args, root), root, url, args.timeout,
           env={**os.environ, **NO_JOBS, **(LOOPBACK_WEBHOOKS if args.host in LOOPBACK_HOSTS else {}), **store_env(args, root)})
    print(f"export MLFLOW_TRACKING_URI={url}")


def stop_process(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # the server and its worker processes
    except ProcessLookupError:
        pass


# <root>/server.pid: the server's process id, which is also its process group's (a session of its own).
# <root>/server.started: when that process started; a pid alone may name another process once it ended.
PID_FILES = ("server.pid", "server.started")


def started(pid: int) -> str:
    """When process `pid` started, a value no later change of the clock moves; "" when there is no such process."""
    try:
        if sys.platform == "linux":  # psutil's time adds the boot time, which moves with the clock
            with open(f"/proc/{pid}/stat") as f:
                # Field 22, clock ticks from boot to the start; the command name before ')' may hold spaces.
                return f.read().rpartition(")")[2].split()[19]
        return repr(psutil.Process(pid).create_time())  # macOS: the start time the kernel keeps
    except (OSError, psutil.Error):
        return ""


def write_pid(root: str, pid: int) -> None:
    for name, value in zip(PID_FILES, (str(pid), started(pid))):
        with open(os.path.join(root, name), "w") as f:
            f.write(value)


def remove_pid(root: str) -> None:
    for name in PID_FILES:
        if os.path.exists(os.path.join(root, name)):
            os.remove(os.path.join(root, name))


def recorded(root: str, name: str) -> str:
    """What the file <root>/<name> holds; "" when there is none."""
    try:
        with open(os.path.join(root, name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def stop(name: str, root: str) -> None:
    """Stop the server whose pid is in <root>/server.pid, if that process is still the one launched there."""
    root = os.path.abspath(root)
    pid, start_time = (recorded(root, file) for file in PID_FILES)
    if not pid.isdigit():
        sys.exit(f"{name}: no server.pid in {root}; nothing to stop")
    if not start_time or started(int(pid)) != start_time:
        sys.exit(f"{name}: pid {pid} in {root}/server.pid is not the server started there (it ended, or the "
                 "pid now names another process); nothing stopped")
    stop_process(int(pid))
    remove_pid(root)
    print(f"stopped the server with pid {pid}")


if __name__ == "__main__":
    arguments = server_parser(__doc__, os.path.join(HERE, "local"), workers=1).parse_args()
    stop("local_server", arguments.root) if arguments.stop else start(arguments)
