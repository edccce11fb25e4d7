"""The canary: the share of live traffic it takes, each version's figures, and its automatic abort.

    python bench/canary.py --data_dir ../shared/data [--requests 2000]

Trains three models on real MNIST, 1 epoch each: two alike (20000 pictures, one seed) and a
worse one (1000 pictures), registered as versions 1, 2 and 3 of MNIST_CNN in a SQLite store,
@production on 1. Serves it with the serve step (check_accuracy=0.3, so that the worse one is
served at all). Puts version 2 under @challenger and sends --requests MNIST test pictures, one a
request and without X-Split-Key (nginx splits at random), each with its true label as feedback;
prints the share each version took, and the monitor step's figures for each. Then puts version 3
under @challenger and sends pictures with feedback until the serve step aborts it: how many
requests that took, its line, and which versions answered after.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import base64
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from serving import Served, run  # noqa: E402  (bench/serving.py)
from mnistflow import data as datasets, robustness  # noqa: E402
from mnistflow.flags import OneLineParser  # noqa: E402
from mnistflow.rollout import post_json  # noqa: E402

NAME = "MNIST_CNN"


def registry(uri: str, data_dir: str, env: dict) -> None:
    import mlflow

    for samples in ("20000", "20000", "1000"):
        run([sys.executable, "-m", "steps.train", "--epochs", "1", "--max_train_samples", samples, "--data_dir",
             data_dir, "--augment", "shift", "--system_metrics", "false"], {**env, "MLFLOW_TRACKING_URI": uri})
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time ASC"])
    mlflow.set_tracking_uri(uri)
    for r in runs:
        mlflow.register_model(f"runs:/{r.info.run_id}/model", NAME)
    mlflow.set_tracking_uri(None)
    client.set_registered_model_alias(NAME, "production", "1")


def send(url: str, pictures: list[tuple[str, int]]) -> list[str]:
    """Each picture to /predict, then its label to /feedback; the version that answered each."""
    import urllib.request

    def one(item):
        picture, label = item
        request = urllib.request.Request(f"{url}/predict", data=json.dumps({"pictures": [picture]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            version, answer = response.headers["X-Model-Version"], json.loads(response.read())
        post_json(f"{url}/feedback", {"id": answer["predictions"][0]["id"], "label": label})
        return version
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, pictures))


def wait_for_line(served: Served, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in open(served.out).read() + open(served.err).read():
        if time.monotonic() > deadline:
            sys.exit(f"canary: waited {timeout:.0f} s for {text!r}")
        time.sleep(0.2)


def main() -> None:
    parser = OneLineParser(prog="canary", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", "--data-dir", default="")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    if not 300 <= args.requests <= 10000:
        parser.error(f"--requests {args.requests} is not allowed; give 300 to 10000 (the canary needs 300 labelled)")
    import mlflow

    made, labels = robustness.pictures(datasets.load("mnist", args.data_dir), "clean_png", args.requests, seed=3)
    pictures = []
    for picture, label in zip(made, labels.tolist()):
        out = io.BytesIO()
        picture.save(out, "PNG")
        pictures.append((base64.b64encode(out.getvalue()).decode(), label))
    env = {**os.environ, "PYTHONPATH": ROOT}
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        registry(uri, args.data_dir, env)
        client = mlflow.MlflowClient(uri)
        served = Served(uri, folder, 0.5, args.data_dir, env, True, "--check_accuracy", "0.3")
        try:
            client.set_registered_model_alias(NAME, "challenger", "2")
            wait_for_line(served, "canary: version 2 (@challenger) takes 10% of the requests")
            answered = send(served.url, pictures)
            monitored = subprocess.run(
                [sys.executable, "-m", "steps.monitor", "--window", str(len(answered)), "--inference_log",
                 f"sqlite:///{folder}/inference.db"], cwd=ROOT, env={**env, "MLFLOW_TRACKING_URI": uri},
                capture_output=True, text=True, timeout=600)
            table = monitored.stdout.split("\n", 1)[1].split("monitor: run")[0].rstrip()
            client.set_registered_model_alias(NAME, "challenger", "3")
            wait_for_line(served, "canary: version 3 (@challenger) takes 10% of the requests")
            started, sent = time.monotonic(), []
            while "canary of version 3 aborted" not in open(served.err).read() and len(sent) < 10 * args.requests:
                sent += send(served.url, pictures[:200])
            took = time.monotonic() - started
            [aborted] = [line for line in open(served.err).read().splitlines() if "canary of version 3 aborted" in line]
            after = send(served.url, pictures[:200])
            left = "still set" if "challenger" in client.get_registered_model(NAME).aliases else "removed"
        finally:
            served.stop()
    print(f"# bench/canary.py, {args.requests} requests; {platform.node()}, {datetime.date.today()}\n")
    print(f"Version 2 (trained as version 1) under @challenger at canary_share=0.1: {answered.count('2')} of "
          f"{len(answered)} requests ({answered.count('2') / len(answered):.1%}), version 1 {answered.count('1')}.\n")
    print("The monitor step on those requests (`--window "
          f"{len(answered)}`):\n\n```\n{table}\n```\n")
    print(f"Version 3 (1000 training pictures) under @challenger: aborted by the serve step after {len(sent)} requests "
          f"({sent.count('3')} to version 3), {took:.1f} s:\n\n```\n{aborted}\n```\n")
    print(f"After: {after.count('1')} of {len(after)} requests answered by version 1; @challenger {left}.")


if __name__ == "__main__":
    main()
