"""How much logging can a tracking server take? SQLite vs. PostgreSQL as its backend store.

    python bench/server_load.py [--clients 4] [--seconds 10] [--rounds 3] [--workers 4]

Starts two `mlflow server`s with serverFolder/local_server.py on free ports of 127.0.0.1, one on
SQLite and one on a throw-away PostgreSQL (serverFolder/local_postgres.py; needs
`apt-get install postgresql`). Then, in rounds that alternate the two so that a noisy moment
hits both alike, several client processes each log batches of metrics to a run of their own,
as fast as they can for a fixed time (what many training jobs logging at once look like).
Prints one table: requests per second and metric values per second (medians over rounds),
p50 / p95 request latency, the error count, and PostgreSQL's rate as a ratio of SQLite's.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import contextlib
import io
import multiprocessing
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_FOLDER = os.path.join(os.path.dirname(HERE), "serverFolder")
sys.path.insert(0, SERVER_FOLDER)
import local_postgres  # noqa: E402  (a script, not a package)
from local_server import positive  # noqa: E402
from mlflow.utils import find_free_port  # noqa: E402
from mnistflow.flags import OneLineParser  # noqa: E402

BATCH = 50  # metric values per request: an epoch's worth of step-level metrics


def start_server(root: str, backend: str, workers: int) -> str:
    port = find_free_port()
    started = subprocess.run([sys.executable, os.path.join(SERVER_FOLDER, "local_server.py"), "--root", root,
                              "--port", str(port), "--workers", str(workers), "--backend-store-uri", backend],
                             capture_output=True, text=True)
    if started.returncode != 0:
        sys.exit(started.stderr.strip())
    return f"http://127.0.0.1:{port}"


def log_for(url: str, seconds: float, client: int) -> tuple[int, int, list[float]]:
    """One client: log batches to a run of its own until time is up; (requests, errors, latencies)."""
    import mlflow
    from mlflow.entities import Metric

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # count a refused request, don't hide it in retries
    client_api = mlflow.MlflowClient(url)
    run_id = client_api.create_run("0", run_name=f"client-{client}").info.run_id
    requests, errors, latencies, step = 0, 0, [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = int(time.time() * 1000)
        metrics = [Metric("loss", 1.0 / (step + i + 1), now, step + i) for i in range(BATCH)]
        start = time.perf_counter()
        try:
            client_api.log_batch(run_id, metrics=metrics)
        except Exception:  # noqa: BLE001  any failure is what this bench counts
            errors += 1
        latencies.append(time.perf_counter() - start)
        requests += 1
        step += BATCH
    with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a link for every finished run
        client_api.set_terminated(run_id)
    return requests, errors, latencies


def load_round(url: str, clients: int, seconds: float) -> tuple[float, int, list[float]]:
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        results = pool.starmap(log_for, [(url, seconds, i) for i in range(clients)])
    requests = sum(r for r, _, _ in results)
    return requests / seconds, sum(e for _, e, _ in results), [t for _, _, ts in results for t in ts]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = OneLineParser(prog="server_load", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    whole_number, seconds = positive(int, "a whole number"), positive(float, "a number of seconds")
    parser.add_argument("--clients", type=whole_number, default=4)
    parser.add_argument("--seconds", type=seconds, default=10, help="length of one round")
    parser.add_argument("--rounds", type=whole_number, default=3)
    parser.add_argument("--workers", type=whole_number, default=4, help="the servers' worker processes")
    args = parser.parse_args()
    if not local_postgres.available():
        sys.exit("server_load: PostgreSQL is not installed (apt-get install postgresql)")

    root = tempfile.mkdtemp(prefix="server-load-")
    # A directory of its own: the postgres account (when run as root) cannot enter `root`.
    pg_root, pg_port = tempfile.mkdtemp(prefix="server-load-pg-"), find_free_port()
    # The servers this script starts find the password where libpq looks: PGPASSWORD.
    os.environ["PGPASSWORD"] = secrets.token_urlsafe(24)
    [pg_url] = local_postgres.start(pg_root, pg_port, ["mlflow"], os.environ["PGPASSWORD"])
    servers = {}
    try:
        servers["sqlite"] = (os.path.join(root, "sqlite"),
                             start_server(os.path.join(root, "sqlite"), f"sqlite:///{root}/sqlite.db", args.workers))
        servers["postgresql"] = (os.path.join(root, "pg"), start_server(os.path.join(root, "pg"), pg_url, args.workers))
        rates = {name: [] for name in servers}
        errors = {name: 0 for name in servers}
        latencies = {name: [] for name in servers}
        for round_ in range(args.rounds):
            for name, (_, url) in servers.items():
                rate, failed, times = load_round(url, args.clients, args.seconds)
                rates[name].append(rate)
                errors[name] += failed
                latencies[name] += times
                print(f"round {round_ + 1}/{args.rounds} {name:<10} {rate:7.1f} req/s  {failed} errors", flush=True)
    finally:
        for server_root, _ in servers.values():
            subprocess.run([sys.executable, os.path.join(SERVER_FOLDER, "local_server.py"), "--root", server_root,
                            "--stop"], capture_output=True)
        local_postgres.stop(pg_root)
        for directory in (root, pg_root):
            shutil.rmtree(directory, ignore_errors=True)

    print(f"\n{args.clients} clients, log_batch of {BATCH} metric values, {args.rounds} rounds of {args.seconds:g} s, "
          f"{args.workers} server workers, {os.cpu_count()} CPUs")
    print(f"{'backend':<12}{'req/s':>9}{'values/s':>11}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}")
    for name in servers:
        rate = statistics.median(rates[name])
        print(f"{name:<12}{rate:>9.1f}{rate * BATCH:>11.0f}{percentile(latencies[name], 50) * 1000:>9.1f}"
              f"{percentile(latencies[name], 95) * 1000:>9.1f}{errors[name]:>8}")
    print(f"postgresql / sqlite requests per second: "
          f"{statistics.median(rates['postgresql']) / statistics.median(rates['sqlite']):.2f}")


if __name__ == "__main__":
    main()
