"""The monitor step, for real: a model trained on the real MNIST files logs its reference, the serve
step answers pictures as users send them (MNIST's own, pictures under robustness conditions,
Fashion-MNIST's) and records them, feedback labels them, and `steps.monitor` judges each window."""
import base64
import io
import json
import math
import pathlib
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas
import pytest

from conftest import EXPERIMENT, ROOT, readme_line, refused_step, registry_of, step_env, wait_until
from test_serve import REAL_DATA, Serving, post, require_real_mnist
from mnistflow import images, logged_model, monitoring, robustness
from mnistflow.config import MonitorConfig

NAME = "MNIST_CNN"
N = 600  # pictures a window: more than min_rows=500


# ---- the judgement alone, on tables made here ----

def table(rows: int, seed: int = 0, **columns) -> pandas.DataFrame:
    """A log-like table: every monitored column drawn alike unless given."""
    rng = np.random.default_rng(seed)
    made = {name: rng.normal(0.5, 0.1, rows) for name in monitoring.NUMBERS}
    made.update({"picture_width": np.full(rows, 28.0), "picture_height": np.full(rows, 28.0),
                 monitoring.CLASS: rng.integers(0, 10, rows)})
    made.update(columns)
    return pandas.DataFrame(made)


def test_drift_is_scored_as_evidently_scores_it_and_flags_only_what_moved():
    reference = table(2000)
    same = monitoring.drift(reference, table(2000, seed=1))
    assert [d.column for d in same] == [*monitoring.NUMBERS, monitoring.CLASS]
    assert not [d for d in same if d.drifted], same
    moved = monitoring.drift(reference, table(2000, seed=1, box_x=np.random.default_rng(2).normal(0.8, 0.1, 2000)))
    [drifted] = [d for d in moved if d.drifted]
    # Wasserstein distance in units of the reference's std: the mean moved by 3 std.
    assert (drifted.column, drifted.method) == ("box_x", "Wasserstein (std)")
    assert drifted.score == pytest.approx(3.0, abs=0.15) and re.fullmatch(r"median 0\.(49|50)\d* -> 0\.(79|80)\d*", drifted.moved)
    # A column with few values (a size constant in the reference) is scored as a class: the
    # Jensen-Shannon distance of two tables with no value in common is sqrt(ln 2), Evidently's 0.833.
    resized = {d.column: d for d in monitoring.drift(reference, table(2000, seed=1, picture_width=np.full(2000, 84.0)))}
    assert resized["picture_width"].method == "Jensen-Shannon"
    assert resized["picture_width"].score == pytest.approx(math.sqrt(math.log(2)))
    assert resized["picture_width"].moved == "84 in 0% -> 100%" and resized["picture_width"].drifted
    one_class = {d.column: d for d in monitoring.drift(reference, table(2000, seed=1, class_index=np.full(2000, 8)))}
    assert one_class[monitoring.CLASS].drifted and one_class[monitoring.CLASS].moved.startswith("8 in 1")


def logged(versions: list[str], labelled: int, right: int) -> pandas.DataFrame:
    """Rows of the log: the first `labelled` with feedback, of which the first `right` were answered right."""
    rows = table(len(versions))
    rows["version"], rows["latency_ms"] = versions, 5.0
    answered = rows[monitoring.CLASS].to_numpy()
    rows["label"] = [None if i >= labelled else answered[i] if i < right else (answered[i] + 1) % 10
                     for i in range(len(rows))]
    return rows


def test_each_version_is_judged_on_its_own_rows_with_its_own_reference():
    versions = ["9"] * 600 + ["10"] * 300 + ["2"] * 100
    rows = logged(versions, labelled=300, right=150)  # version 9: 300 labelled, half right
    reference = table(2000)
    judged = monitoring.judge(rows, {"9": reference, "10": reference, "2": None}, min_rows=500)
    assert [v.version for v in judged] == ["2", "9", "10"]  # as numbers
    by = {v.version: v for v in judged}
    assert [by[v].share for v in ("2", "9", "10")] == [0.1, 0.6, 0.3]
    assert (by["9"].labelled, by["9"].live_accuracy) == (300, 0.5) and by["10"].live_accuracy is None
    assert by["9"].drift and not by["10"].drift and "fewer than min_rows=500" in by["10"].unjudged
    assert "without a reference" in by["2"].unjudged
    # 300 labels are too few to judge accuracy at min_rows=500; at 300 the half right breaches.
    assert not [line for line in monitoring.breaches(judged, 500, 0.95) if "accuracy" in line]
    assert not by["9"].drifted and monitoring.breaches(judged, 300, 0.95) == [
        "version 9: live accuracy 0.5000 < min_accuracy 0.95 (300 labelled)"]


@pytest.mark.parametrize("window, span", [("30m", (1800, 0)), ("24h", (86400, 0)), ("7d", (604800, 0)),
                                          ("1.5h", (5400, 0)), ("45s", (45, 0)), ("2000", (0, 2000))])
def test_a_window_is_a_time_or_a_number_of_predictions(window, span):
    assert MonitorConfig(window=window).validate().span() == span


@pytest.mark.parametrize("flag, value, says", [
    ("window", "0h", "window '0h' is not allowed"),
    ("window", "24 h", "window '24 h' is not allowed; give a time (30m, 24h, 7d: more than 0, up to 36500d) or a "
                       "number of predictions (1 to 10000000)"),
    ("window", "0", "window '0' is not allowed"),
    ("window", "36501d", "window '36501d' is not allowed"),
    ("min_rows", "0", "min_rows=0 is not allowed; it must be in [1, 1000000]"),
    ("min_accuracy", "1.5", "min_accuracy=1.5 is not allowed; it must be in [0, 1]"),
    ("min_accuracy", "nan", "min_accuracy=nan is not allowed"),
    ("inference_log", "inference.db", "inference_log 'inference.db' is not allowed; give a database URL"),
    ("inference_log", "postgresql://me:secret@db/log", "inference_log carries a password"),
    ("model_name", "a'b", "model_name \"a'b\" is not allowed"),
])
def test_a_bad_flag_is_one_line_and_exit_2(monkeypatch, capsys, flag, value, says):
    line = refused_step(monkeypatch, capsys, "steps.monitor", f"--{flag}", value)
    assert line.startswith(f"monitor: error: {says}") and "secret" not in line


# ---- for real: a model, the serve step, the monitor step ----

@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A SQLite registry with MNIST_CNN version 1 @production, trained on real MNIST (its
    validation split, 2000 pictures, is its reference)."""
    require_real_mnist()
    uri, _ = registry_of(tmp_path_factory.mktemp("monitor"), [(REAL_DATA, "20000")], [0])
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias(NAME, "production", "1")
    return uri


@pytest.fixture(scope="module")
def served(registry):
    """The serve step, its inference log where the monitor looks by default: beside the registry."""
    serving = Serving(registry, pathlib.Path(registry.removeprefix("sqlite:///")).parent)
    yield serving
    serving.stop()


def window(dataset: str, condition: str) -> tuple[list[bytes], list[int]]:
    """N test pictures of the dataset under the robustness condition, as a user's PNG files, and their labels."""
    from mnistflow import data as datasets

    made, labels = robustness.pictures(datasets.load(dataset, REAL_DATA), condition, N, seed=1)
    files = []
    for picture in made:
        out = io.BytesIO()
        picture.save(out, "PNG")
        files.append(out.getvalue())
    return files, labels.tolist()


SENT = []  # the predictions this module's tests were answered


def send(served, pictures: list[bytes], labels: list[int] | None) -> list[dict | None]:
    """Each picture to /predict as a user's PNG, one a request; then its label as feedback, when given."""
    def one(picture: bytes):
        status, _, answer = post(f"{served.url}/predict",
                                 json.dumps({"pictures": [base64.b64encode(picture).decode()]}).encode(),
                                 "application/json")
        return answer["predictions"][0] if status == 200 else None
    with ThreadPoolExecutor(4) as pool:
        answered = list(pool.map(one, pictures))
        SENT.extend(a for a in answered if a is not None)
        if labels is not None:
            statuses = pool.map(lambda pair: post(f"{served.url}/feedback", json.dumps(
                {"id": pair[0]["id"], "label": pair[1]}).encode(), "application/json")[0],
                [(a, label) for a, label in zip(answered, labels) if a is not None])
            assert set(statuses) == {200}
    return answered


def monitor(registry: str, served, rows: int, *args: str) -> tuple[subprocess.CompletedProcess, mlflow.entities.Run]:
    """`python -m steps.monitor` on the log's newest `rows`; its process and its run."""
    done = subprocess.run([sys.executable, "-m", "steps.monitor", "--window", str(rows), "--inference_log",
                           f"sqlite:///{served.folder}/inference.db", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**step_env(), "MLFLOW_TRACKING_URI": registry,
                                            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT})
    run_id = re.search(r"monitor: run (\w+)", done.stdout)
    assert run_id, done.stdout + done.stderr
    return done, mlflow.MlflowClient(registry).get_run(run_id[1])


def test_mnist_pictures_drift_nowhere_and_live_accuracy_is_the_offline_accuracy(registry, served):
    pictures, labels = window("mnist", "clean_png")
    since = time.time()
    answered = send(served, pictures, labels)
    assert None not in answered
    wait_until(lambda: served_rows(served, since) >= N, "the window's rows in the inference log", 30)
    done, run = monitor(registry, served, N)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"^\s+1\s+{N}\s+100.0%.*\s{N}\s+0\.\d{{4}}\s+none$", done.stdout, re.M), done.stdout
    # Offline: the same PNGs through predict's preprocessing and the same model.
    model = load_model(registry)
    inputs = np.stack([images.to_mnist(images.decode(p)) for p in pictures])[:, None]
    offline = float((logged_model.probabilities(model, inputs).argmax(1) == np.array(labels)).mean())
    metrics = run.data.metrics
    assert metrics["v1_live_accuracy"] == pytest.approx(offline, abs=1e-9) and metrics["v1_labelled"] == N
    assert metrics["v1_rows"] == N and metrics["v1_share"] == 1.0 and run.data.tags["breaches"] == "0"
    assert metrics["v1_drifted_columns"] == 0 and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.note.content"] == "no limit breached"
    artifacts = {a.path for a in mlflow.MlflowClient(registry).list_artifacts(run.info.run_id)}
    assert {"drift_v1.png", "drift_table.json", "config.yaml"} <= artifacts


def load_model(registry: str):
    mlflow.set_tracking_uri(registry)
    try:
        return logged_model.load(f"models:/{NAME}/1")
    finally:
        mlflow.set_tracking_uri(None)


def served_rows(served, since: float) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{served.folder}/inference.db")
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT COUNT(*) FROM predictions WHERE time >= :t"), {"t": since}).scalar()
    finally:
        engine.dispose()


@pytest.mark.parametrize("dataset, condition, moved", [
    ("mnist", "lowres_8", {"ink_fraction", "input_grey", "confidence"}),
    ("mnist", "photo", {"picture_width", "picture_height", "box_width", "input_grey"}),
    ("mnist", "off_centre", {"picture_width", "picture_height", "box_x", "box_y", "ink_fraction"}),
    ("fashion_mnist", "clean_png", {"ink_fraction", "confidence", "class_index"}),
])
def test_pictures_unlike_the_reference_breach_and_say_what_moved(registry, served, dataset, condition, moved):
    pictures, _ = window(dataset, condition)
    since = time.time()
    answered = send(served, pictures, None)
    count = sum(a is not None for a in answered)
    wait_until(lambda: served_rows(served, since) >= count, "the window's rows in the inference log", 30)
    done, run = monitor(registry, served, count)
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("monitor: breach: version 1: drift in ")
    named = set(re.findall(r"(\w+) \((?:median|\d)", line))
    assert moved <= named, line
    assert run.info.status == "FAILED" and run.data.tags["breaches"] == "1"
    assert run.data.metrics["v1_drifted_columns"] == len(named)
    assert run.data.tags["mlflow.note.content"] == line.removeprefix("monitor: breach: ")
    table_path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="drift_table.json",
                                                     tracking_uri=registry)
    with open(table_path) as f:
        drift_table = json.load(f)
    rows = [dict(zip(drift_table["columns"], row)) for row in drift_table["data"]]
    assert {row["column"] for row in rows if row["drifted"]} == named


def test_a_missing_log_or_model_is_one_line_and_writes_nothing(registry, tmp_path):
    env = {"MLFLOW_TRACKING_URI": registry, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    client = mlflow.MlflowClient(registry)
    before = len(client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id]))
    missing = tmp_path / "none.db"
    for args, says in (
            (["--inference_log", f"sqlite:///{missing}"], f"monitor: error: inference_log sqlite:///{missing} holds no "
                                                         "inference log: no such file"),
            (["--model_name", "nobody"], "monitor: error: no registered model named 'nobody'")):
        done = subprocess.run([sys.executable, "-m", "steps.monitor", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**step_env(), **env})
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
        assert done.stderr.startswith(says), done.stderr
    assert not missing.exists()
    assert len(client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])) == before


def test_the_readme_monitors_through_mlflow_run(registry, served):
    """README's line as written, on the log beside the registry (it holds the windows of the tests
    that ran before this one too, judged together); and a bad flag through mlflow run."""
    env = {**step_env(), "MLFLOW_TRACKING_URI": registry, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    pictures, labels = window("mnist", "clean_png")
    send(served, pictures, labels)
    rows = len(SENT)  # the serve step's own checks of a version are no traffic: not recorded
    wait_until(lambda: served_rows(served, 0) >= rows, "the predictions in the inference log", 30)
    command = readme_line("mlflow run . -e monitor").split("#")[0]
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert f"MNIST_CNN, the last 24h of sqlite:///{served.folder}/inference.db" in done.stdout, done.stderr
    assert re.search(rf"^\s+1\s+{rows}\s+100.0%", done.stdout, re.M), done.stdout
    breaches = [line for line in done.stderr.splitlines() if line.startswith("monitor: breach: ")]
    assert done.returncode == (1 if breaches else 0) and len(breaches) <= 1, done.stderr
    bad = subprocess.run(["mlflow", "run", ".", "-e", "monitor", "--env-manager", "local", "-P", "window=forever"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("monitor:")]
    assert bad.returncode == 1 and errors == [
        "monitor: error: window 'forever' is not allowed; give a time (30m, 24h, 7d: more than 0, up to 36500d) or a "
        "number of predictions (1 to 10000000)"], bad.stderr
    client = mlflow.MlflowClient(registry)
    launched = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                  filter_string="tags.`mlflow.project.entryPoint` = 'monitor'",
                                  order_by=["attributes.start_time DESC"])
    # A breach ends the monitor's run FAILED, as a bad flag does; without one it is FINISHED.
    assert [run.info.status for run in launched[:2]] == ["FAILED", "FAILED" if breaches else "FINISHED"]


def test_retrain_runs_the_pipeline_as_a_child_of_the_monitor_run(registry, served, tiny_data, tmp_path):
    """docs/serving.md's line, as written: the log breaches (the tests before this one sent pictures
    unlike MNIST's), so the pipeline runs, on small data here; its register gate refuses the
    small data's model, so no model took over: exit 1, and @production stays."""
    env = {**step_env(), "MLFLOW_TRACKING_URI": registry, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
           "MNISTFLOW_DATA_DIR": tiny_data, "MNISTFLOW_OPTUNA_STORAGE": f"sqlite:///{tmp_path}/optuna.db"}
    pictures, _ = window("mnist", "off_centre")
    send(served, pictures, None)
    wait_until(lambda: served_rows(served, 0) >= len(SENT), "the predictions in the inference log", 30)
    done = subprocess.run(["bash", "-c", readme_line("mlflow run . -e monitor -P retrain=true", "docs/serving.md")
                           .split("#")[0]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert "breach: version 1: drift in " in done.stdout and "== retraining: main dataset=mnist model_name=MNIST_CNN " \
        "data_dir= force=true" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1 and "monitor: error: the retraining pipeline (main) promoted no model" in done.stderr, done.stderr
    client = mlflow.MlflowClient(registry)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    [monitor_run] = client.search_runs([experiment], "tags.retrain_run_id != ''")
    pipeline = client.get_run(monitor_run.data.tags["retrain_run_id"])
    assert pipeline.data.tags["mlflow.parentRunId"] == monitor_run.info.run_id and monitor_run.info.status == "FAILED"
    assert (pipeline.data.params["dataset"], pipeline.data.params["force"]) == ("mnist", "true")
    steps = {run.data.tags["mlflow.project.entryPoint"]: run.info.status for run in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{pipeline.info.run_id}'")}
    assert steps == {"train": "FINISHED", "tune": "FINISHED", "register": "FAILED"}, steps
    assert str(client.get_model_version_by_alias(NAME, "production").version) == "1"
