"""Does the monitor flag drift where the traffic changed, and only there? Is live accuracy right?

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python bench/drift.py --data_dir ../shared/data
        [--model_name MNIST_CNN] [--n 2000] [--conditions lowres_8 photo off_centre]

Serves <model_name>@production with the serve step (its inference log in a temporary folder) and
sends it windows of --n pictures, one picture a request, each as a user's PNG: MNIST test
pictures as they are, the same under each robustness condition (mnistflow/robustness.py), and
Fashion-MNIST test pictures. After each digit window it sends every picture's true label as
feedback. Then it runs the monitor step on that window alone and prints, per window: the
monitor's exit code, the columns that drifted and how, the live accuracy from feedback and the
accuracy of the same model on the same PNGs offline (steps.predict's path), which must be equal.

A second table chooses the drift limit: how many of 50 windows of MNIST test pictures, drawn from
the first window's rows, each limit flags, by window size.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import base64
import datetime
import io
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from serving import Served  # noqa: E402  (bench/serving.py)
from mnistflow import data as datasets, images, logged_model, monitoring, robustness  # noqa: E402
from mnistflow.flags import OneLineParser  # noqa: E402
from mnistflow.inference_log import InferenceLog  # noqa: E402
from mnistflow.rollout import post_json  # noqa: E402

SIZES = (100, 200, 500, 1000)
DRAWS = 50


def as_png(picture) -> bytes:
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def window(data: datasets.Data, condition: str, n: int, seed: int) -> tuple[list[bytes], list[int]]:
    """n test pictures of `data` under `condition`, as PNG files, and their labels."""
    pictures, labels = robustness.pictures(data, condition, n, seed)
    return [as_png(picture) for picture in pictures], labels.tolist()


def send(url: str, pictures: list[bytes]) -> list[dict | None]:
    """Each picture's prediction from /predict, one request each; None where it was refused (blank)."""
    def one(picture: bytes) -> dict | None:
        try:
            return post_json(f"{url}/predict", {"pictures": [base64.b64encode(picture).decode()]})["predictions"][0]
        except OSError:
            return None
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, pictures))


def offline_accuracy(model, pictures: list[bytes], labels: list[int], answered: list) -> float:
    """The model's accuracy on the pictures the endpoint answered, through predict's preprocessing."""
    kept = [(p, label) for p, label, a in zip(pictures, labels, answered) if a is not None]
    inputs = np.stack([images.to_mnist(images.decode(p)) for p, _ in kept])[:, None]
    predicted = logged_model.probabilities(model, inputs).argmax(1)
    return float((predicted == np.array([label for _, label in kept])).mean())


def logged(log, model_name: str, since: float, count: int):
    """The log's `count` newest rows, once every row since `since` is in (the writer batches them)."""
    deadline = time.monotonic() + 60
    while len(rows := log.window(model_name, seconds=time.time() - since + 1)) < count:
        if time.monotonic() > deadline:
            sys.exit(f"drift: {len(rows)} of {count} predictions reached the inference log in 60 s")
        time.sleep(0.2)
    return rows


def monitor(env: dict, log_url: str, rows: int, model_name: str) -> tuple[int, str, str]:
    """(exit code, output, run id) of the monitor step on the log's newest `rows`."""
    done = subprocess.run([sys.executable, "-m", "steps.monitor", "--model_name", model_name, "--window",
                           str(rows), "--inference_log", log_url], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    found = re.search(r"monitor: run (\w+)", done.stdout)
    if not found:
        sys.exit(f"drift: the monitor step failed:\n{done.stderr[-3000:]}")
    return done.returncode, done.stdout + done.stderr, found[1]


def false_alarms(reference, rows) -> dict:
    """Limit -> window size -> how many of DRAWS windows of `rows` it flags (any column)."""
    rng = np.random.default_rng(0)
    flagged = {limit: {} for limit in (0.1, 0.2)}
    for size in SIZES:
        scores = [max(d.score for d in monitoring.drift(reference, rows.iloc[rng.choice(len(rows), size, replace=False)])
                      if d.method != "Jensen-Shannon") for _ in range(DRAWS)]
        for limit in flagged:
            flagged[limit][size] = sum(score > limit for score in scores)
    return flagged


def main() -> None:
    parser = OneLineParser(prog="drift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", "--data-dir", default="")
    parser.add_argument("--model_name", "--model-name", default="MNIST_CNN")
    parser.add_argument("--n", type=int, default=2000, help="pictures per window")
    parser.add_argument("--conditions", nargs="+", default=["lowres_8", "photo", "off_centre"],
                        choices=[c for c in robustness.CONDITIONS if c != robustness.CLEAN])
    args = parser.parse_args()
    if args.n < 100:
        parser.error(f"--n {args.n} is not allowed; the monitor judges windows of at least min_rows, give 100 or more")
    import mlflow

    model_uri = f"models:/{args.model_name}@production"
    model = logged_model.load(model_uri)
    version = mlflow.MlflowClient().get_model_version_by_alias(args.model_name, "production").version
    reference = logged_model.reference_of(f"models:/{args.model_name}/{version}")
    digits, clothes = (datasets.load(name, args.data_dir) for name in ("mnist", "fashion_mnist"))
    windows = [("MNIST test", digits, "clean_png"), *((c, digits, c) for c in args.conditions),
               ("Fashion-MNIST test", clothes, "clean_png")]
    env = {**os.environ, "PYTHONPATH": ROOT}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        log_url = f"sqlite:///{folder}/inference.db"
        served = Served(mlflow.get_tracking_uri(), folder, 2.0, args.data_dir, env)
        log = InferenceLog(log_url, create=False)
        try:
            for name, data, condition in windows:
                pictures, labels = window(data, condition, args.n, seed=1)
                since = time.time()
                answered = send(served.url, pictures)
                live = data is digits
                if live:  # a garment's label is no digit: no feedback for those
                    with ThreadPoolExecutor(4) as pool:
                        list(pool.map(lambda a: post_json(f"{served.url}/feedback", {"id": a[0]["id"], "label": a[1]}),
                                      [(a, label) for a, label in zip(answered, labels) if a is not None]))
                count = sum(a is not None for a in answered)
                window_rows = logged(log, args.model_name, since, count)
                code, output, run_id = monitor(env, log_url, count, args.model_name)
                metrics = mlflow.get_run(run_id).data.metrics
                drifted = re.search(r"breach: version \S+ drift in (.*)", output)
                rows.append({"window": name, "answered": count,
                             "monitor exit": code, "drifted": drifted[1] if drifted else "none",
                             "live accuracy": metrics.get(f"v{version}_live_accuracy", float("nan")) if live else None,
                             "offline accuracy": offline_accuracy(model, pictures, labels, answered) if live else None})
                if name == "MNIST test":
                    clean_rows = window_rows
        finally:
            served.stop()
    print(f"# bench/drift.py, {model_uri} (version {version}), {args.n} pictures a window; "
          f"{platform.node()}, {datetime.date.today()}\n")
    print("| window | answered | monitor exit | drifted: column (reference -> window) | live accuracy | offline accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        accuracy = [f"{r[k]:.4f}" if r[k] is not None else "-" for k in ("live accuracy", "offline accuracy")]
        print(f"| {r['window']} | {r['answered']} | {r['monitor exit']} | {r['drifted']} | {' | '.join(accuracy)} |")
    flagged = false_alarms(reference, clean_rows)
    print(f"\nWindows of MNIST test pictures flagged (of {DRAWS}, drawn from the first window), by the numbers' limit:\n")
    print("| limit | " + " | ".join(f"{size} rows" for size in SIZES) + " |")
    print("| --- |" + " --- |" * len(SIZES))
    for limit, by_size in flagged.items():
        print(f"| {limit} | " + " | ".join(str(by_size[size]) for size in SIZES) + " |")


if __name__ == "__main__":
    main()
