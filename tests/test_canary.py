"""The canary, for real: the serve step sends a share of the requests to the version @challenger
names, the inference log and feedback tell the versions apart, a worse challenger is aborted on
its own, and `register` ends a canary by promoting it through the gate or by removing its alias."""
import base64
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas
import pytest

from conftest import EXPERIMENT, ROOT, readme_line, refused_step, registry_of, step_env, wait_until
from test_serve import REAL_DATA, Serving, require_real_mnist
from mnistflow import monitoring, robustness

NAME = "MNIST_CNN"
REQUESTS = 2000


def log_rows(versions: dict) -> pandas.DataFrame:
    """Log rows: version -> (predictions, of them labelled, of those right, latency ms)."""
    rows = []
    for version, (count, labelled, right, latency_ms) in versions.items():
        rows += [{"version": version, "latency_ms": latency_ms, "confidence": 0.9, "class_index": 1,
                  "label": None if i >= labelled else 1 if i < right else 2} for i in range(count)]
    return pandas.DataFrame(rows)


@pytest.mark.parametrize("versions, says", [
    ({"1": (900, 900, 873, 5.0), "3": (100, 100, 97, 5.0)}, ""),  # the same 3 % error
    ({"1": (900, 900, 873, 5.0), "3": (100, 100, 92, 5.0)}, ""),  # 8 %: above the gap, within 3 standard errors
    ({"1": (900, 900, 873, 5.0), "3": (100, 100, 80, 5.0)},
     "its error rate 0.200 (100 labelled) is 0.170 above version 1's 0.030 (900 labelled), more than "
     "canary_max_error_gap=0.02 and 3 standard errors (0.040)"),
    ({"1": (900, 900, 873, 5.0), "3": (99, 99, 50, 5.0)}, ""),  # too few labelled to judge
    ({"1": (900, 0, 0, 5.0), "3": (100, 0, 0, 400.0)},
     "its p95 latency 400.0 ms over 100 predictions is above canary_max_latency_ms=250"),
])
def test_a_canary_is_aborted_for_a_clear_error_gap_or_its_latency_only(versions, says):
    assert monitoring.canary_breach(log_rows(versions), "1", "3", 100, 0.02, 250) == says


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """MNIST_CNN versions on real MNIST, 1 epoch each: 1 and 3 trained alike (one seed), 2 on
    1000 pictures only (much worse: about 40 % right, which passes the serve step's check at check_accuracy=0.3).
    @production on 1. Returns {"uri", "runs": {version: run id}}."""
    require_real_mnist()
    uri, runs = registry_of(tmp_path_factory.mktemp("canary"), [(REAL_DATA, "20000"), (REAL_DATA, "1000"),
                                                                (REAL_DATA, "20000")], [0, 1, 2])
    mlflow.MlflowClient(uri).set_registered_model_alias(NAME, "production", "1")
    return {"uri": uri, "runs": dict(zip("123", runs))}


@pytest.fixture(scope="module")
def pictures() -> list[tuple[str, int]]:
    """REQUESTS MNIST test pictures as users' PNGs in base64, with their labels."""
    from mnistflow import data as datasets

    made, labels = robustness.pictures(datasets.load("mnist", REAL_DATA), "clean_png", REQUESTS, seed=2)
    encoded = []
    for picture in made:
        out = io.BytesIO()
        picture.save(out, "PNG")
        encoded.append(base64.b64encode(out.getvalue()).decode())
    return list(zip(encoded, labels.tolist()))


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    serving = Serving(registry["uri"], tmp_path_factory.mktemp("served"), "--poll_interval", "0.5",
                      "--check_accuracy", "0.3", "--canary_min_rows", "100", "--canary_max_latency_ms", "60000")
    yield serving
    serving.stop()


def client(registry) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(registry["uri"])


def challenge(registry, served, version: str) -> None:
    """@challenger onto `version`, and wait until the serve step sends it traffic (at once when it does)."""
    started = served.output().count(f"canary: version {version} (@challenger) takes 10% of the requests")
    ended = served.output().count(f"canary of version {version} ")
    if started > ended and str(client(registry).get_registered_model(NAME).aliases.get("challenger")) == version:
        return
    client(registry).set_registered_model_alias(NAME, "challenger", version)
    wait_until(lambda: served.output().count(f"canary: version {version} (@challenger) takes 10% of the requests")
               > started, f"the canary of version {version}", 120, alive=served.process)


def predict(served, picture: str, key: str | None = None) -> tuple[str, str]:
    """(the version that answered, the prediction's id)."""
    headers = {"Content-Type": "application/json", **({"X-Split-Key": key} if key else {})}
    request = urllib.request.Request(f"{served.url}/predict", data=json.dumps({"pictures": [picture]}).encode(),
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.headers["X-Model-Version"], json.loads(response.read())["predictions"][0]["id"]


def feedback(served, prediction_id: str, label: int) -> int:
    request = urllib.request.Request(f"{served.url}/feedback", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"id": prediction_id, "label": label}).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def send(served, pictures, keys=True) -> list[str]:
    """Each picture once, with its label as feedback; the version that answered each."""
    def one(item):
        i, (picture, label) = item
        version, prediction_id = predict(served, picture, f"user-{i}" if keys else None)
        assert feedback(served, prediction_id, label) == 200
        return version
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, enumerate(pictures)))


LIMITS = f" -P min_accuracy=0.9 -P min_robust_accuracy=0 -P data_dir={REAL_DATA}"


def register(registry, line: str, more: str = "") -> subprocess.CompletedProcess:
    """A register command line of the docs, run as a user would (with `more` parameters)."""
    return subprocess.run(["bash", "-c", line.split("#")[0] + more], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**step_env(), "MLFLOW_TRACKING_URI": registry["uri"], "MLFLOW_EXPERIMENT_NAME": EXPERIMENT})


def monitor(registry, served, rows: int) -> mlflow.entities.Run:
    done = subprocess.run([sys.executable, "-m", "steps.monitor", "--window", str(rows), "--inference_log",
                           f"sqlite:///{served.folder}/inference.db"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**step_env(), "MLFLOW_TRACKING_URI": registry["uri"],
                                            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT})
    [run] = [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("monitor: run ")]
    return client(registry).get_run(run)


def test_the_canary_takes_its_share_of_2000_requests_and_the_monitor_shows_each_version(registry, served, pictures):
    challenge(registry, served, "3")
    answered = send(served, pictures)
    share = answered.count("3") / len(answered)
    assert set(answered) == {"1", "3"} and abs(share - 0.1) <= 0.02, share
    # The same key, the same version: a user stays with one.
    assert {predict(served, pictures[0][0], "user-7")[0] for _ in range(5)} == {answered[7]}
    run = monitor(registry, served, REQUESTS + 5)
    metrics = run.data.metrics
    assert metrics["v3_rows"] == answered.count("3") and metrics["v1_rows"] == answered.count("1") + 5
    assert metrics["v3_labelled"] == answered.count("3") and metrics["v1_labelled"] == answered.count("1")
    assert 0.9 < metrics["v1_live_accuracy"] <= 1 and 0.9 < metrics["v3_live_accuracy"] <= 1
    assert {"v1_latency_p95_ms", "v3_latency_p95_ms", "v1_confidence", "v3_confidence"} <= set(metrics)


def test_drop_alias_ends_the_canary(registry, served, pictures):
    challenge(registry, served, "3")
    done = register(registry, readme_line("mlflow run . -e register -P drop_alias=challenger", "docs/serving.md"))
    assert done.returncode == 0 and "@challenger removed from version 3: removed by register (drop_alias)" in done.stdout, \
        done.stdout + done.stderr
    wait_until(lambda: "canary of version 3 ended: @challenger was removed" in served.output(), "the canary's end", 60)
    assert set(send(served, pictures[:100])) == {"1"}
    assert client(registry).get_model_version(NAME, "3").tags[monitoring.CANARY_TAG] == "removed by register (drop_alias)"


def test_a_worse_challenger_is_aborted_on_its_own(registry, served, pictures):
    challenge(registry, served, "2")
    answered = []
    for start in range(0, 3 * REQUESTS, 200):  # until the serve step aborts it; bounded
        answered += send(served, pictures[start % REQUESTS:start % REQUESTS + 200], keys=False)
        if "canary of version 2 aborted" in served.output():
            break
    [line] = [line for line in served.output().splitlines() if "canary of version 2 aborted" in line]
    assert line.startswith("serve: canary of version 2 aborted, @challenger removed: its error rate ")
    assert "canary_max_error_gap=0.02" in line
    assert "challenger" not in client(registry).get_registered_model(NAME).aliases
    assert client(registry).get_model_version(NAME, "2").tags[monitoring.CANARY_TAG].startswith(
        "aborted by the serve step: its error rate")
    assert set(send(served, pictures[:100])) == {"1"}  # all back on production


def test_a_gated_challenger_is_promoted_through_the_gate_onto_its_own_version(registry, served, pictures):
    """docs/serving.md's lines as written, with limits a 1-epoch model passes."""
    if "challenger" in client(registry).get_registered_model(NAME).aliases:
        client(registry).delete_registered_model_alias(NAME, "challenger")
    before = served.output().count("canary: version 3 (@challenger)")
    done = register(registry, readme_line("mlflow run . -e register -P run_id=<run_id> -P alias=challenger",
                                          "docs/serving.md").replace("<run_id>", registry["runs"]["3"]), LIMITS)
    assert done.returncode == 0 and "@challenger -> version 3" in done.stdout, done.stdout + done.stderr
    wait_until(lambda: served.output().count("canary: version 3 (@challenger)") > before, "the canary", 120)
    done = register(registry, readme_line("mlflow run . -e register -P from_alias=challenger", "docs/serving.md"), LIMITS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vs_champion" in done.stdout and "@production -> version 3; @previous -> version 1" in done.stdout
    aliases = client(registry).get_registered_model(NAME).aliases
    assert (str(aliases["production"]), str(aliases["previous"]), "challenger" in aliases) == ("3", "1", False)
    assert client(registry).get_model_version(NAME, "3").tags[monitoring.CANARY_TAG] == "promoted by register onto @production"
    wait_until(lambda: "serving MNIST_CNN@production version 3 (was 1)" in served.output(), "the promotion", 120)
    assert set(send(served, pictures[:100])) == {"3"}
    assert len(client(registry).search_model_versions(f"name = '{NAME}'")) == 3  # the version itself, no new one


@pytest.mark.parametrize("step, args, says", [
    ("steps.serve", ["--canary_share", "0.6"], "canary_share=0.6 is not allowed; it must be in [0, 0.5]"),
    ("steps.serve", ["--canary_alias", "production"], "canary_alias 'production' is not allowed"),
    ("steps.serve", ["--canary_max_latency_ms", "0"], "canary_max_latency_ms=0.0 is not allowed"),
    ("steps.register", ["--from_alias", "challenger", "--run_id", "abc"], "run_id and from_alias go separately"),
    ("steps.register", ["--drop_alias", "production"], "drop_alias 'production' is not allowed"),
])
def test_a_bad_canary_flag_is_one_line_and_exit_2(monkeypatch, capsys, step, args, says):
    line = refused_step(monkeypatch, capsys, step, *args)
    assert says in line
