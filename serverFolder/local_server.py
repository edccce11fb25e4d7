"""Start (or stop) an MLflow tracking server for one machine: SQLite backend, proxied artifacts.

    python serverFolder/local_server.py                   # 127.0.0.1:5000, stores in serverFolder/local/
    python serverFolder/local_server.py --port 5001 --root /data/mlflow --workers 2
    python serverFolder/local_server.py --stop            # the one started with the same --root

It starts `mlflow server` in the background, waits until /health answers, and prints the
MLFLOW_TRACKING_URI to export. The server writes its log to <root>/server.log and its process
id to <root>/server.pid. Clients never touch <root>: artifacts go through the server
(--artifacts-destination), so the same setup works when the server is on another machine.
"""
import argparse
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request

from mnistflow.config import OneLineParser

HERE = os.path.dirname(os.path.abspath(__file__))
# The steps need no server-side jobs; without them the server starts faster and runs no user code.
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def port_number(text: str) -> int:
    if not (text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"port {text!r} is not allowed; give a number from 1 to 65535")
    return int(text)


def address(text: str) -> str:
    """HOST:PORT, checked (tls_proxy.py's --listen and --upstream)."""
    host, _, port = text.rpartition(":")
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give HOST:PORT, e.g. 127.0.0.1:8443")
    port_number(port)
    return text


def positive(kind: type, noun: str):
    """An argparse type: `kind` of `text`, above 0 (`noun` says what, for the message)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give {noun} above 0")
        return value
    return parse


def server_parser(description: str, root: str, workers: int) -> argparse.ArgumentParser:
    """The options local_server.py and shared_server.py share."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1 = this machine only)")
    parser.add_argument("--port", type=port_number, default=5000)
    parser.add_argument("--root", default=root, help="directory for the log, pid and default stores")
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
    pid_file = os.path.join(root, "server.pid")
    with open(pid_file, "w") as f:
        f.write(str(server.pid))
    deadline = time.monotonic() + timeout
    while not healthy(url, host, cafile):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server.pid)
            os.remove(pid_file)  # no stale pid for a later --stop to signal
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
            "MLFLOW_ARTIFACTS_DESTINATION": args.artifacts_destination or os.path.join(root, "artifacts")}


def start(args: argparse.Namespace) -> None:
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    url = f"http://{args.host}:{args.port}"
    launch("local_server", server_command(args, root), root, url, args.timeout,
           env={**os.environ, **NO_JOBS, **store_env(args, root)})
    print(f"export MLFLOW_TRACKING_URI={url}")


def stop_process(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # the server and its worker processes
    except ProcessLookupError:
        pass


def stop(name: str, root: str) -> None:
    """Stop the server whose pid is in <root>/server.pid."""
    pid_file = os.path.join(os.path.abspath(root), "server.pid")
    try:
        with open(pid_file) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        sys.exit(f"{name}: no server.pid in {os.path.abspath(root)}; nothing to stop")
    stop_process(pid)
    os.remove(pid_file)
    print(f"stopped the server with pid {pid}")


if __name__ == "__main__":
    arguments = server_parser(__doc__, os.path.join(HERE, "local"), workers=1).parse_args()
    stop("local_server", arguments.root) if arguments.stop else start(arguments)
