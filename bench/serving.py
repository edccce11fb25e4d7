"""How the serve step follows the registry under load, and what its serving path costs.

    python bench/serving.py --data_dir ../shared/data [--repeats 5] [--users 4]

Trains two models on real MNIST alike (1 epoch, 5000 images, one seed) and registers them as
versions 1 and 2 of MNIST_CNN, in a SQLite store and in a tracking server on loopback
(serverFolder/local_server.py). For each store it serves MNIST_CNN@production with the serve
step, puts a steady Locust load on /predict (bench/locustfile.py, one picture a request), and:
  - moves the alias --repeats times each way, each once the spare processes are ready: a
    promotion (`python -m steps.register --run_id <the run not serving>`: the gate, with limits a
    1-epoch model passes, then a version of it @production), then a rollback
    (`python -m steps.register --rollback true`); for each, the time from the move (the alias
    read every 20 ms while the command runs) until every answer comes from the new version;
  - kills one live model process: the requests that failed, and the time until it answers again.
Then, without load, it times single arrays and batches of 100 at /invocations through the serve
step and through plain `mlflow models serve` on the same version, interleaved: p50 and the ratio;
and one picture and 100 at /predict through two new serve steps, one recording each prediction
in its inference log, one recording none.
Prints the tables; every figure is a median (with its range) of this one run.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import base64
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "serverFolder"))
from load import Load  # noqa: E402
from local_server import healthy  # noqa: E402  (a script, not a package)
from mlflow.utils import find_free_port as free_port  # noqa: E402
from mnistflow.flags import OneLineParser  # noqa: E402
from mnistflow.rollout import answers  # noqa: E402

NAME = "MNIST_CNN"


def wait_for(condition, what: str, timeout: float = 300, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            sys.exit(f"serving: waited {timeout:.0f} s for {what}")
        time.sleep(every)
    return found


def run(command: list[str], env: dict) -> str:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        sys.exit(f"serving: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def registry(uri: str, data_dir: str, env: dict) -> list[str]:
    """Two models trained alike (the same seed, so that one passes the gate's comparison with the
    other), registered as versions 1 and 2: @production on 1, @previous on 2; their run ids."""
    import mlflow

    env = {**env, "MLFLOW_TRACKING_URI": uri}
    for _ in range(2):
        run([sys.executable, "-m", "steps.train", "--epochs", "1", "--max_train_samples", "5000", "--data_dir",
             data_dir, "--augment", "shift", "--system_metrics", "false"], env)
    client = mlflow.MlflowClient(uri)
    runs = [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                                      order_by=["attributes.start_time ASC"])]
    mlflow.set_tracking_uri(uri)
    for run_id in runs:
        mlflow.register_model(f"runs:/{run_id}/model", NAME)
    mlflow.set_tracking_uri(None)
    client.set_registered_model_alias(NAME, "production", "1")
    client.set_registered_model_alias(NAME, "previous", "2")
    return runs


class Served:
    """The serve step on a free port, its output and its inference log in `folder`."""

    def __init__(self, uri: str, folder: str, poll: float, data_dir: str, env: dict, log: bool = True, *args: str):
        self.port, self.folder = free_port(), folder
        os.makedirs(folder, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = os.path.join(folder, "serve.out"), os.path.join(folder, "serve.err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "steps.serve", "--port", str(self.port), "--poll_interval", str(poll),
                 "--data_dir", data_dir, "--inference_log", f"sqlite:///{folder}/inference.db" if log else "off", *args],
                cwd=ROOT, env={**env, "MLFLOW_TRACKING_URI": uri}, stdout=out, stderr=err)
        wait_for(lambda: "serving MNIST_CNN" in open(self.out).read() or self.process.poll() is not None, "the endpoint")
        if self.process.poll() is not None:
            sys.exit(f"serving: the serve step stopped:\n{open(self.err).read()[-3000:]}")

    def model_ports(self) -> tuple[set[str], set[str]]:
        """(live ports, spare ports) of the model processes."""
        import psutil

        children = psutil.Process(self.process.pid).children()
        [config] = [arg for child in children for arg in child.cmdline() if arg.endswith("nginx.conf")]
        with open(os.path.join(os.path.dirname(config), "upstream.conf")) as f:
            live = set(re.findall(r"127\.0\.0\.1:(\d+)", f.read()))
        ports = {c.cmdline()[c.cmdline().index("--port") + 1] for c in children if "--port" in c.cmdline()}
        return live, ports - live

    def spares_ready(self) -> bool:
        """A spare answers only once it has imported and loaded a first version: it is warm."""
        live, spares = self.model_ports()
        return len(spares) == len(live) and all(answers(f"http://127.0.0.1:{p}/health") for p in spares)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=120)


def moves_under_load(served: Served, uri: str, run_ids: list[str], repeats: int, users: int, picture: str, data_dir: str,
                     env: dict) -> dict:
    """Promotions and rollbacks, then a killed process, under Locust: the figures."""
    import mlflow
    import psutil

    client = mlflow.MlflowClient(uri)
    with open(picture, "rb") as f:
        load = Load(served.url, f.read(), served.folder, users=users, env=env)
    wait_for(lambda: len(load.results) > 50, "Locust's first answers")
    moves = []  # (kind, moved at, new version)
    try:
        for i in range(2 * repeats):
            wait_for(served.spares_ready, "the spare processes")
            holder = client.get_model_version_by_alias(NAME, "production")
            current = str(holder.version)
            kind = "promotion" if i % 2 == 0 else "rollback"
            # The real commands, a promotion of the run whose model is not serving; when the alias
            # moved, read as they run.
            candidate = run_ids[1] if holder.run_id == run_ids[0] else run_ids[0]
            command = ["--run_id", candidate, "--data_dir", data_dir, "--min_accuracy", "0.9", "--recall_margin", "0.2",
                       "--min_robust_accuracy", "0"] if kind == "promotion" else ["--rollback", "true"]
            log = os.path.join(served.folder, f"register-{i}.txt")
            with open(log, "w") as out:
                register = subprocess.Popen([sys.executable, "-m", "steps.register", *command], cwd=ROOT,
                                            env={**env, "MLFLOW_TRACKING_URI": uri}, stdout=out, stderr=out)

            def moved_to() -> tuple[float, str] | None:
                version = str(client.get_model_version_by_alias(NAME, "production").version)
                if version != current:
                    return time.time(), version
                if register.poll() is not None:
                    sys.exit(f"serving: `python -m steps.register {' '.join(command)}` moved nothing:\n"
                             f"{open(log).read()[-3000:]}")
                return None

            moved, new = wait_for(moved_to, f"the {kind}'s move", every=0.02)
            if register.wait(timeout=300):
                sys.exit(f"serving: `python -m steps.register {' '.join(command)}` failed:\n{open(log).read()[-3000:]}")
            moves.append((kind, moved, new))
            wait_for(lambda: [r[2] for r in load.results[-20:]] == [new] * 20, f"version {new} answering everything",
                     300)
        wait_for(served.spares_ready, "the spare processes")
        live, _ = served.model_ports()
        victim = [c for c in psutil.Process(served.process.pid).children()
                  if "--port" in c.cmdline() and c.cmdline()[c.cmdline().index("--port") + 1] in live][0]
        port = victim.cmdline()[victim.cmdline().index("--port") + 1]
        victim.kill()
        killed = time.time()
        wait_for(lambda: "exited; started again" in open(served.err).read(), "the replacement")
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), "the replaced process")
        back = time.time() - killed
        wait_for(lambda: load.results[-1][0] > killed + back + 2, "answers after it")
    finally:
        answered = load.stop()
    switches = {"promotion": [], "rollback": []}
    for (kind, moved, new), following in zip(moves, [m[1] for m in moves[1:]] + [killed]):
        old = [sent for sent, _, version in answered if moved < sent < following and version != new]
        switches[kind].append(max(old, default=moved) - moved)
    span = answered[-1][0] - answered[0][0]
    return {"switches": switches, "failed": sum(status != 200 for _, status, _ in answered),
            "failed_kill": sum(status != 200 for sent, status, _ in answered if sent >= killed),
            "rate": len(answered) / span, "replaced_s": back, "requests": len(answered)}


def latencies(url: str, body: bytes, count: int) -> list[float]:
    times = []
    for _ in range(count):
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
        times.append((time.perf_counter() - start) * 1000)
    return times


def cost(served: Served, uri: str, env: dict, rounds: int) -> dict:
    """p50 ms of /invocations through the serve step and through plain `mlflow models serve`."""
    port = free_port()
    plain = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m",
                              f"models:/{NAME}/1", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                             cwd=served.folder, env={**env, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/ping"), "mlflow models serve")
        rng = np.random.default_rng(0)
        bodies = {n: json.dumps({"inputs": rng.random((n, 1, 28, 28), dtype=np.float32).round(4).tolist()}).encode()
                  for n in (1, 100)}
        found = {(where, n): [] for where in ("plain", "serve") for n in (1, 100)}
        for r in range(rounds):  # interleaved, so that the machine's moods hit both alike
            for where, base in (("plain", f"http://127.0.0.1:{port}"), ("serve", served.url))[::1 if r % 2 else -1]:
                for n, count in ((1, 100), (100, 20)):
                    found[(where, n)] += latencies(f"{base}/invocations", bodies[n], count)
        return {key: statistics.median(values) for key, values in found.items()}
    finally:
        os.killpg(plain.pid, signal.SIGTERM)
        plain.wait(timeout=60)


def log_cost(uri: str, folder: str, data_dir: str, env: dict, rounds: int, picture: str) -> dict:
    """p50 ms of /predict (one picture, and 100) through two new serve steps on the same registry,
    one recording each prediction in its inference log, one recording none."""
    logged, unlogged = (Served(uri, os.path.join(folder, name), 600, data_dir, env, log=log)
                        for name, log in (("logged", True), ("unlogged", False)))
    try:
        for served in (logged, unlogged):
            wait_for(served.spares_ready, "the spare processes")  # no start-up work left running
        with open(picture, "rb") as f:
            encoded = base64.b64encode(f.read()).decode()
        bodies = {n: json.dumps({"pictures": [encoded] * n}).encode() for n in (1, 100)}
        for served in (logged, unlogged):  # each process's first requests
            latencies(f"{served.url}/predict", bodies[1], 20)
        found = {(where, n): [] for where in ("off", "on") for n in (1, 100)}
        for r in range(rounds):
            for where, base in (("off", unlogged.url), ("on", logged.url))[::1 if r % 2 else -1]:
                for n, count in ((1, 100), (100, 10)):
                    found[(where, n)] += latencies(f"{base}/predict", bodies[n], count)
        return {key: statistics.median(values) for key, values in found.items()}
    finally:
        logged.stop()
        unlogged.stop()


def span(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f} to {max(values):.1f})" if values else "-"


def main() -> None:
    parser = OneLineParser(prog="serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="", help="real MNIST (default: $MNISTFLOW_DATA_DIR)")
    parser.add_argument("--repeats", type=int, default=5, help="promotions and rollbacks, each")
    parser.add_argument("--users", type=int, default=4, help="Locust users, 6 requests/s each")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the cost measurements")
    args = parser.parse_args()
    for option in ("repeats", "users", "rounds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} {getattr(args, option)} is not allowed; it must be >= 1")
    data_dir = os.path.abspath(args.data_dir or os.environ.get("MNISTFLOW_DATA_DIR", ""))
    if not os.path.isdir(os.path.join(data_dir, "MNIST", "raw")):
        parser.error(f"--data_dir {args.data_dir!r} is not allowed; give a folder holding MNIST/raw/ "
                     "(or set MNISTFLOW_DATA_DIR)")

    folder = tempfile.mkdtemp(prefix="serving-bench-")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    picture = os.path.join(folder, "digit.png")
    from PIL import Image

    from mnistflow import data as datasets

    test = datasets.load("mnist", data_dir)
    Image.fromarray(255 - (test.pixels(test.test)[0, 0].numpy() * 255).astype(np.uint8)).save(picture)

    server_root = os.path.join(folder, "server")
    started = run([sys.executable, "serverFolder/local_server.py", "--root", server_root, "--port", str(free_port())],
                  env)
    stores = {"SQLite, polling every 1 s": (f"sqlite:///{folder}/mlflow.db", 1.0),
              "tracking server, webhooks": (started.split("export MLFLOW_TRACKING_URI=")[1].strip(), 600.0)}
    results, costs = {}, None
    try:
        for label, (uri, poll) in stores.items():
            print(f"{label}: training and registering", file=sys.stderr, flush=True)
            run_ids = registry(uri, data_dir, env)
            where = os.path.join(folder, label.split(",")[0].replace(" ", "-"))
            os.makedirs(where)
            served = Served(uri, where, poll, data_dir, env)
            try:
                print(f"{label}: {args.repeats} promotions and rollbacks under load", file=sys.stderr, flush=True)
                results[label] = moves_under_load(served, uri, run_ids, args.repeats, args.users, picture, data_dir,
                                                  env)
                if costs is None:
                    print(f"{label}: the serving path against mlflow models serve", file=sys.stderr, flush=True)
                    costs = cost(served, uri, env, args.rounds)
                    print(f"{label}: the inference log's cost", file=sys.stderr, flush=True)
                    costs.update(log_cost(uri, where, data_dir, env, args.rounds, picture))
            finally:
                served.stop()
    finally:
        run([sys.executable, "serverFolder/local_server.py", "--root", server_root, "--stop"], env)

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\n{platform.node()}: {os.cpu_count()} cores, load average {load} at the end; 2 model processes; "
          f"{args.users} Locust users\n")
    print(f"{'':<52}" + "".join(f"{label:>32}" for label in results))
    lines = [("promotion (register): move -> every answer new, s", lambda r: span(r["switches"]["promotion"])),
             ("rollback (register --rollback): the same, s", lambda r: span(r["switches"]["rollback"])),
             ("requests / s under load", lambda r: f"{r['rate']:.1f}"),
             ("requests, of them failed", lambda r: f"{r['requests']}, {r['failed']}"),
             ("killed process: failed requests after the kill", lambda r: str(r["failed_kill"])),
             ("killed process: s until it answers again", lambda r: f"{r['replaced_s']:.1f}")]
    for name, figure in lines:
        print(f"{name:<52}" + "".join(f"{figure(r):>32}" for r in results.values()))
    print(f"\n{'POST /invocations, p50 ms':<40}{'mlflow models serve':>22}{'serve step':>14}{'ratio':>8}{'goal':>7}")
    for n in (1, 100):
        plain, through = costs[("plain", n)], costs[("serve", n)]
        print(f"{f'{n} image(s)':<40}{plain:>22.2f}{through:>14.2f}{through / plain:>8.2f}{'<= 1.2':>7}")
    print(f"\n{'POST /predict, p50 ms':<40}{'inference log off':>22}{'on':>14}{'ratio':>8}{'goal':>7}")
    for n in (1, 100):
        off, on = costs[("off", n)], costs[("on", n)]
        print(f"{f'{n} picture(s)':<40}{off:>22.2f}{on:>14.2f}{on / off:>8.2f}{'<= 1.1':>7}")


if __name__ == "__main__":
    main()
