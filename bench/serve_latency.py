"""How fast does a served model answer? `mlflow models serve` over HTTP vs. the same model in process.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python bench/serve_latency.py [--model_uri models:/MNIST_CNN@production]

Downloads the model once and checks that it is one mnistflow logs (see mnistflow/logged_model.py;
--allow_pickled_models true loads others), then serves that checked copy with
`mlflow models serve` on a free port of 127.0.0.1 and sends requests one after another,
alternating the three cases in blocks of 50 so that a noisy moment hits all of them alike:
  1. pyfunc `predict` of one image in this process (what the register gate measures),
  2. POST /invocations with one image (JSON, as in the README's curl command),
  3. POST /invocations with a batch of images.
Prints one table of p50 / p95 latency and images per second, and the HTTP overhead as a ratio.
The pixels are random: a CNN's compute does not depend on what the image shows.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import tempfile
import urllib.request

import numpy as np
from mlflow.utils import find_free_port

from mnistflow import logged_model
from mnistflow.errors import ModelError
from mnistflow.flags import OneLineParser, parse_bool

BLOCK, SETTLE = 50, 10


def start_server(model: str, port: int, allow_pickled: bool) -> subprocess.Popen:
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    with logged_model.mlflow_pickle_switch(allow_pickled):  # the server loads the model as this process did
        server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", model, "--env-manager", "local",
                                   "-h", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve_latency: `mlflow models serve -m {model}` exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGTERM)
    sys.exit("serve_latency: the server did not answer /ping within 180 s")


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def timed_post(url: str, body: bytes) -> float:
    start = time.perf_counter()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
    return time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="serve_latency", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_uri", default="models:/MNIST_CNN@production")
    parser.add_argument("--requests", type=int, default=500, help="timed requests per case")
    parser.add_argument("--batch", type=int, default=100, help="images in a batch request")
    parser.add_argument(f"--{logged_model.PICKLED_FLAG}", type=parse_bool, default=False,
                        help="load models mnistflow did not log (they may run code on load)")
    args = parser.parse_args(argv)
    for name in ("requests", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} is not allowed; it must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = logged_model.download(args.model_uri, folder, args.allow_pickled_models)
            model = logged_model.load_local(local, args.model_uri, args.allow_pickled_models)
        except ModelError as exc:
            print(f"serve_latency: error: {exc}", file=sys.stderr)
            sys.exit(2)
        port = find_free_port()
        time_cases(args, model, start_server(local, port, args.allow_pickled_models), port)


def time_cases(args: argparse.Namespace, model, server: subprocess.Popen, port: int) -> None:
    """Time the three cases against the served and the loaded model; print the table."""
    pixels = np.random.default_rng(0).random((args.batch, 1, 28, 28)).astype(np.float32)
    one = json.dumps({"inputs": pixels[:1].tolist()}).encode()
    batch = json.dumps({"inputs": pixels.tolist()}).encode()
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        cases = {
            "in-process predict, 1 image": (1, lambda: timed(lambda: model.predict(pixels[:1]))),
            "REST /invocations, 1 image": (1, lambda: timed_post(url, one)),
            f"REST /invocations, {args.batch} images": (args.batch, lambda: timed_post(url, batch)),
        }
        times = {name: [] for name in cases}
        rounds = -(-args.requests // BLOCK)
        for _ in range(rounds):
            for name, (_, measure) in cases.items():
                # The first calls of a block are not timed: they pay for lazy imports (first block)
                # or share the CPU with the other process's OpenMP threads, which spin a while
                # after their last request before they sleep.
                for _ in range(SETTLE):
                    measure()
                times[name] += [measure() for _ in range(BLOCK)]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    print(f"{args.model_uri}: {rounds * BLOCK} requests per case, in alternating blocks of {BLOCK}\n")
    print(f"{'case':<34}{'p50 ms':>9}{'p95 ms':>9}{'images/s':>10}")
    for name, (images, _) in cases.items():
        t = sorted(times[name])
        p50, p95 = statistics.median(t), t[int(0.95 * (len(t) - 1))]
        print(f"{name:<34}{p50 * 1000:>9.2f}{p95 * 1000:>9.2f}{images / p50:>10.0f}")
    in_process, rest = (statistics.median(times[name]) for name in list(cases)[:2])
    print(f"\nHTTP + JSON overhead for one image: p50 {rest / in_process:.1f}x the in-process predict "
          f"(+{(rest - in_process) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
