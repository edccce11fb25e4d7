"""The serve step, for real: model processes behind nginx, on a SQLite registry holding a good
model trained on the real MNIST files, the same model again, one that answers wrongly and one
that cannot load; a steady load while the alias moves, a process is killed, and bad requests come."""
import base64
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import mlflow
import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import (ROOT, free_port, readme_line, refused_step, registry_of, require, run_step,
                      sigint_as_in_a_terminal, step_env, wait_until)
import netns_recorder
from bench.load import Load
from mnistflow import rollout
from mnistflow.serving import TOKEN_ENV, TOKEN_HEADER

REAL_DATA = os.environ.get("MNISTFLOW_DATA_DIR") or os.path.join(ROOT, "..", "shared", "data")
NAME = "MNIST_CNN"


def require_real_mnist() -> None:
    require(os.path.isdir(os.path.join(REAL_DATA, "MNIST", "raw")), "the real MNIST files",
            fix=f"put them in {REAL_DATA} or name their folder in MNISTFLOW_DATA_DIR")


def png(pixels: np.ndarray) -> bytes:
    """A picture as a user would send it: dark ink on white paper."""
    out = io.BytesIO()
    Image.fromarray(255 - (pixels * 255).round().astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


class Registry:
    def __init__(self, uri: str, versions: dict, pictures: list[bytes], labels: list[int]):
        self.uri, self.versions, self.pictures, self.labels = uri, versions, pictures, labels

    def point(self, alias_to: str) -> float:
        """Move MNIST_CNN@production to the version called `alias_to`; when it moved (time.time(), as Load's)."""
        mlflow.MlflowClient(self.uri).set_registered_model_alias(NAME, "production", self.versions[alias_to])
        return time.time()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_data) -> Registry:
    require_real_mnist()
    from mnistflow import data as datasets

    root = tmp_path_factory.mktemp("serve")
    # good: real MNIST, as versions 1 and 2; wrong: the tiny data, whose labels say where a patch
    # is, which a real digit does not
    uri, _ = registry_of(root, [(REAL_DATA, "5000"), (tiny_data, "600")], [0, 0, 1])
    client = mlflow.MlflowClient(uri)
    versions = {"v1": "1", "v2": "2", "wrong": "3"}
    broken = root / "broken-model"
    broken.mkdir()
    (broken / "MLmodel").write_text("not: [a model\n")
    versions["broken"] = str(client.create_model_version(NAME, str(broken)).version)
    data = datasets.load("mnist", REAL_DATA)
    pixels = data.pixels(data.test)[100:110, 0].numpy()  # not among the known pictures the serve step checks with
    registry = Registry(uri, versions, [png(p) for p in pixels], data.test.labels[100:110].tolist())
    registry.point("v1")
    return registry


class Serving:
    """`python -m steps.serve` on a free port of 127.0.0.1, up: its process, URL and output (both streams).
    `prefix`: a command that runs the step (in a network namespace of its own)."""

    def __init__(self, tracking_uri: str, folder, *args: str, prefix: tuple = ()):
        self.port = free_port()
        self.url, self.log, self.folder = f"http://127.0.0.1:{self.port}", folder / "serve.txt", folder
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "steps.serve", "--port", str(self.port), "--data_dir", REAL_DATA,
                 "--inference_log", f"sqlite:///{folder}/inference.db", *args],
                cwd=ROOT, env={**step_env(), "MLFLOW_TRACKING_URI": tracking_uri}, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=sigint_as_in_a_terminal)
        wait_until(lambda: "serving MNIST_CNN@production" in self.output(), "the endpoint", 300, alive=self.process)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        """Ctrl-C; the step's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    serving = Serving(registry.uri, tmp_path_factory.mktemp("serving"), "--poll_interval", "0.5")
    yield serving
    serving.stop()


def post(url: str, body: bytes, content_type: str, timeout: float = 30):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


def upload(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body, as `curl -F picture=@a.png -F picture=@b.png` sends it."""
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"picture\"; filename=\"{name}\"\r\n"
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def served_version(served, registry) -> str:
    status, headers, _ = post(f"{served.url}/predict", *upload([("a.png", registry.pictures[0])]))
    assert status == 200
    return headers["X-Model-Version"]


def test_pictures_get_their_class_probabilities_an_id_and_the_version(registry, served):
    files = [(f"{i}.png", picture) for i, picture in enumerate(registry.pictures)]
    status, headers, answer = post(f"{served.url}/predict", *upload(files))
    assert status == 200 and headers["X-Model-Version"] == registry.versions["v1"] == answer["version"]
    classes = list(answer["predictions"][0]["probabilities"])
    found = [classes.index(p["class"]) for p in answer["predictions"]]
    assert sum(f == label for f, label in zip(found, registry.labels)) >= 8, (found, registry.labels)
    assert len({p["id"] for p in answer["predictions"]}) == len(files)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-3 for p in answer["predictions"])
    # Each picture read as a number too (one digit here), and whether the model is unsure of it.
    for p in answer["predictions"]:
        assert isinstance(p["unsure"], bool) and re.fullmatch(r"[0-9?]+", p["number"])
        assert [digit["class"] for digit in p["digits"]] == [int(d) if d != "?" else digit["class"]
                                                            for d, digit in zip(p["number"], p["digits"])]
    assert sum(p["number"] == str(label) for p, label in zip(answer["predictions"], registry.labels)) >= 7
    # The same pictures as base64 in JSON get the same classes.
    body = json.dumps({"pictures": [base64.b64encode(p).decode() for p in registry.pictures]}).encode()
    status, _, again = post(f"{served.url}/predict", body, "application/json")
    assert status == 200 and [p["class"] for p in again["predictions"]] == [p["class"] for p in answer["predictions"]]
    # Today's clients: the signature's arrays at MLflow's /invocations.
    inputs = np.zeros((2, 1, 28, 28), dtype=np.float32).tolist()
    status, headers, arrays = post(f"{served.url}/invocations", json.dumps({"inputs": inputs}).encode(),
                                   "application/json")
    assert status == 200 and np.asarray(arrays["predictions"]).shape == (2, 10)
    assert headers["X-Model-Version"] == registry.versions["v1"]


def logged(served, ids: list[str]) -> dict:
    """The inference log's rows of the predictions `ids`, once the writer has put them all in."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{served.folder}/inference.db")
    try:
        def rows():
            with engine.connect() as connection:
                found = connection.execute(sa.text("SELECT * FROM predictions WHERE id IN :ids").bindparams(
                    sa.bindparam("ids", expanding=True)), {"ids": ids}).mappings().all()
            return {row["id"]: dict(row) for row in found} if len(found) == len(ids) else None
        return wait_until(rows, "the predictions in the inference log", 30)
    finally:
        engine.dispose()


def feedback(served, body) -> tuple[int, dict]:
    status, _, answer = post(f"{served.url}/feedback", json.dumps(body).encode(), "application/json")
    if isinstance(answer, str):
        assert len(answer.strip().splitlines()) == 1, answer
        answer = json.loads(answer)
    return status, answer


def test_each_prediction_is_logged_and_takes_its_true_label_once(registry, served):
    status, _, answer = post(f"{served.url}/predict", *upload([("0.png", registry.pictures[0]),
                                                              ("1.png", registry.pictures[1])]))
    assert status == 200
    ids = [p["id"] for p in answer["predictions"]]
    classes = list(answer["predictions"][0]["probabilities"])
    rows = logged(served, ids)
    for prediction in answer["predictions"]:
        row = rows[prediction["id"]]
        assert (row["model_name"], row["version"]) == (NAME, answer["version"])
        assert classes[row["class_index"]] == prediction["class"]
        assert row["confidence"] == pytest.approx(max(prediction["probabilities"].values()), abs=1e-5)
        assert row["latency_ms"] > 0 and (row["picture_width"], row["picture_height"]) == (28, 28)
        assert 0 < row["ink_fraction"] < 0.5 and 0 < row["box_width"] <= 1 and row["label"] is None
    # Feedback: the true class, by index or by name; once.
    assert feedback(served, {"id": ids[0], "label": registry.labels[0]}) == (
        200, {"id": ids[0], "label": registry.labels[0], "class": classes[registry.labels[0]]})
    documented = readme_line("curl -s -X POST http://127.0.0.1:5001/feedback", "docs/serving.md")
    line = documented.replace("<id from /predict>", ids[1]).replace('"label": 7', f'"label": "{classes[registry.labels[1]]}"')
    typed = subprocess.run(["bash", "-c", line.replace("127.0.0.1:5001", f"127.0.0.1:{served.port}")],
                           capture_output=True, text=True, timeout=60)
    assert json.loads(typed.stdout) == {"id": ids[1], "label": registry.labels[1], "class": classes[registry.labels[1]]}
    assert [logged(served, ids)[i]["label"] for i in ids] == registry.labels[:2]
    status, answer = feedback(served, {"id": ids[0], "label": 3})
    assert status == 409 and "has a label already" in answer["error"]
    assert logged(served, ids)[ids[0]]["label"] == registry.labels[0]  # unchanged


def test_a_blank_picture_in_a_request_gets_an_error_of_its_own_and_the_others_are_answered(registry, served):
    blank = io.BytesIO()
    Image.new("L", (40, 40), 250).save(blank, format="PNG")
    files = [("0.png", registry.pictures[0]), ("blank.png", blank.getvalue()), ("1.png", registry.pictures[1])]
    status, _, answer = post(f"{served.url}/predict", *upload(files))
    assert status == 200
    first, empty, second = answer["predictions"]
    assert empty == {"error": "blank.png: no digit found; the image is blank"}
    classes = list(first["probabilities"])
    assert [classes.index(p["class"]) for p in (first, second)] == [registry.labels[0], registry.labels[1]]
    assert set(logged(served, [first["id"], second["id"]])) == {first["id"], second["id"]}
    status, _, alone = post(f"{served.url}/predict", *upload(files[1:2]))  # nothing to answer: the request is refused
    assert status == 400 and json.loads(alone) == {"error": "blank.png: no digit found; the image is blank"}


@pytest.mark.parametrize("body, status, error", [
    ({"id": "0" * 32, "label": 1}, 404, "no prediction with id '00000000000000000000000000000000'"),
    ({"id": "any", "label": 10}, 400, "label 10 is not allowed; give a class index from 0 to 9 or a class name"),
    ({"id": "any", "label": -1}, 400, "label -1 is not allowed"),
    ({"id": "any", "label": True}, 400, "label True is not allowed"),
    ({"id": "any", "label": "seven"}, 400, "label 'seven' is not allowed"),
    ({"label": 1}, 400, "send {\"id\": \"<a prediction's id>\""),
    (["not", "an", "object"], 400, "send {\"id\""),
])
def test_bad_feedback_is_one_line_and_writes_nothing(registry, served, body, status, error):
    got, answer = feedback(served, body)
    assert got == status and error in answer["error"], answer


def test_a_database_that_does_not_answer_costs_no_prediction(registry, served):
    """The inference log locked by another writer: predictions answer as fast as ever, unlogged."""
    import sqlite3

    lock = sqlite3.connect(f"{served.folder}/inference.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        body, content_type = upload([("0.png", registry.pictures[0])])
        for _ in range(10):
            started = time.monotonic()
            assert post(f"{served.url}/predict", body, content_type)[0] == 200
            assert time.monotonic() - started < 1  # the log's writer waits 5 s for the lock; a prediction does not
        status, answer = feedback(served, {"id": "0" * 32, "label": 1})
        assert status == 503 and "cannot take feedback now" in answer["error"]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    status, _, answer = post(f"{served.url}/predict", body, content_type)
    assert status == 200 and logged(served, [answer["predictions"][0]["id"]])  # and logging goes on


@pytest.mark.parametrize("body, content_type, status, error", [
    (b"", "application/json", 400, "the body is empty"),
    (b"{\"pictures\": \"abc\"}", "application/json", 400, "a list of strings"),
    (b"[1, 2]", "application/json", 400, "a list of strings"),
    (b"not json", "application/json", 400, "the body is not JSON"),
    (json.dumps({"pictures": ["%%%"]}).encode(), "application/json", 400, "picture 0 is not base64"),
    (json.dumps({"pictures": [base64.b64encode(b"hello").decode()]}).encode(), "application/json", 400,
     "picture 0: not an image"),
    (upload([("notes.txt", b"not an image")])[0], None, 400, "notes.txt: not an image"),
    (b"x" * (50 * 1024 * 1024), "application/json", 413, "the most allowed"),
])
def test_a_bad_request_gets_a_4xx_with_one_line_of_json_and_serving_goes_on(registry, served, body, content_type,
                                                                            status, error):
    if content_type is None:
        body, content_type = upload([("notes.txt", b"not an image")])
    got, _, answer = post(f"{served.url}/predict", body, content_type)
    assert got == status, answer
    assert len(answer.strip().splitlines()) == 1 and error in json.loads(answer)["error"]
    assert served_version(served, registry) == registry.versions["v1"]


def test_the_endpoint_follows_the_alias_under_load_without_a_failed_request(registry, served, tmp_path):
    load = Load(served.url, registry.pictures[0], tmp_path, users=5)
    wait_until(lambda: len(load.results) > 40, "the load's first requests")
    switches = []
    for to in ("v2", "v1"):  # a promotion, then a rollback
        wanted = registry.versions[to]
        moved = registry.point(to)

        def answered_by_old():
            return [sent for sent, _, version in list(load.results) if sent > moved and version != wanted]

        def switched() -> bool:
            """Whether the last 40 requests sent were all answered by the new version."""
            latest = sorted(list(load.results))[-40:]
            return all(sent > moved and version == wanted for sent, _, version in latest)

        wait_until(switched, f"version {to} answering every request", 120)
        switches.append(max(answered_by_old(), default=moved) - moved)  # until every response is the new one's
    results = load.stop()
    assert [r for r in results if r[1] != 200] == []
    assert load.rate() >= 20
    print(f"from the alias move to the new version: {', '.join(f'{s:.1f}' for s in switches)} s, "
          f"at {load.rate():.0f} requests/s")


@pytest.mark.parametrize("version, reason", [
    ("wrong", "known mnist pictures right, below check_accuracy=0.8"),
    ("broken", "it did not load"),
])
def test_a_version_that_answers_wrongly_or_cannot_load_never_takes_traffic(registry, served, version, reason,
                                                                           tmp_path):
    load = Load(served.url, registry.pictures[0], tmp_path)
    wait_until(lambda: len(load.results) > 20, "the load's first requests")
    registry.point(version)
    number = registry.versions[version]
    wait_until(lambda: f"refused version {number} of MNIST_CNN" in served.output(), "the refusal", 180,
               alive=served.process)
    results = load.stop()
    registry.point("v1")
    assert {(status, answered) for _, status, answered in results} == {(200, registry.versions["v1"])}
    [line] = [line for line in served.output().splitlines() if f"refused version {number}" in line]
    assert reason in line
    tag = mlflow.MlflowClient(registry.uri).get_model_version(NAME, number).tags[rollout.REFUSED_TAG]
    assert reason in tag


def live_processes(serve_pid: int) -> list:
    """The model processes nginx sends requests to: those on the ports of its upstream.conf."""
    children = psutil.Process(serve_pid).children()
    [config] = [arg for child in children for arg in child.cmdline() if arg.endswith("nginx.conf")]
    with open(os.path.join(os.path.dirname(config), "upstream.conf")) as f:
        ports = re.findall(r"server 127\.0\.0\.1:(\d+)", f.read())
    return [child for child in children if "--port" in child.cmdline()
            and child.cmdline()[child.cmdline().index("--port") + 1] in ports]


def test_a_killed_model_process_costs_no_request_and_is_replaced(registry, served, tmp_path):
    def live():
        return live_processes(served.process.pid)

    wait_until(lambda: len(live()) == 2, "two live model processes")
    load = Load(served.url, registry.pictures[0], tmp_path)
    wait_until(lambda: len(load.results) > 20, "the load's first requests")
    victim = live()[0]
    victim.kill()
    killed = time.time()
    wait_until(lambda: "exited; started again" in served.output(), "the replacement", 60)
    wait_until(lambda: len(live()) == 2 and all(c.pid != victim.pid for c in live()), "two live processes again")
    wait_until(lambda: len([r for r in load.results if r[0] > killed]) > 40, "requests after the kill")
    results = load.stop()
    assert [r for r in results if r[1] != 200] == []


def test_ctrl_c_stops_the_proxy_and_every_model_process(served):
    children = psutil.Process(served.process.pid).children(recursive=True)
    assert len(children) >= 5  # nginx's master and worker, two live processes, two spares
    assert served.stop() == 0
    psutil.wait_procs(children, timeout=60)
    assert not [child for child in children if child.is_running()]
    assert "serve: stopped" in served.output()
    assert rollout.port_free("127.0.0.1", served.port)


def test_the_readme_serves_through_mlflow_run_and_answers_its_curl_line(registry, tmp_path):
    env = {**step_env(), "MLFLOW_TRACKING_URI": registry.uri, "MNISTFLOW_DATA_DIR": REAL_DATA}
    made = subprocess.run(["bash", "-c", readme_line("python -c \"from torchvision.datasets import MNIST")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    port = free_port()
    command = readme_line("mlflow run . -e serve").split("#")[0] + f" -P port={port}"
    out = tmp_path / "out.txt"
    with open(out, "w") as log:  # a session of its own, as a terminal's: Ctrl-C reaches mlflow run and the step
        process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=sigint_as_in_a_terminal, start_new_session=True)
    try:
        wait_until(lambda: "serving MNIST_CNN@production" in out.read_text(), "the endpoint", 300, alive=process)
        curl = readme_line("curl -s -F picture=@a.png").replace("5001", str(port))
        answer = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert [p["class"] for p in json.loads(answer.stdout)["predictions"]] == ["7 - seven", "2 - two"]
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    assert "serve: stopped" in out.read_text()
    client = mlflow.MlflowClient(registry.uri)
    launchers = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   filter_string="tags.`mlflow.project.entryPoint` = 'serve'")
    assert [run.info.status for run in launchers] and "RUNNING" not in [run.info.status for run in launchers]


def test_a_killed_serve_step_leaves_no_process_behind(registry, tmp_path):
    serving = Serving(registry.uri, tmp_path, "--workers", "1")
    children = psutil.Process(serving.process.pid).children(recursive=True)
    assert len(children) >= 4  # nginx's master and worker, the live model process, a spare
    serving.process.kill()  # no chance to clean up: the children must end by themselves
    serving.process.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert alive == []
    assert rollout.port_free("127.0.0.1", serving.port)


def test_a_port_in_use_is_one_line(registry):
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        result = subprocess.run([sys.executable, "-m", "steps.serve", "--port", str(port)], cwd=ROOT,
                                env={**step_env(), "MLFLOW_TRACKING_URI": registry.uri}, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"serve: error: port {port} on 127.0.0.1 is in use; give another port"]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "workers=0 is not allowed; it must be in [1, 32]"),
    (["--host", "0.0.0.0"], "host '0.0.0.0' is beyond loopback: give tls_cert, tls_key and api_keys_db too"),
    (["--host", "localhost; error_log /tmp/x"], "host 'localhost; error_log /tmp/x' is not allowed; give a host"),
    (["--host", "fe80::1%lo;x"], "host 'fe80::1%lo;x' is not allowed; give a host name or an IP address"),
    (["--tls_cert", ROOT + "/README.md"], "tls_cert and tls_key go together"),
    (["--api_keys_db", "/nope/keys.db"], "api_keys_db '/nope/keys.db' is not a file"),
    (["--webhook_address", "0.0.0.0:5002"], "webhook_address '0.0.0.0:5002' is not allowed; give HOST:PORT"),
    (["--inference_log", "inference.db"], "inference_log 'inference.db' is not allowed; give a database URL"),
    (["--inference_log", "postgresql://u:secret@db/x"], "inference_log carries a password"),
    (["--inference_log", "nosuch://x"], "inference_log nosuch://x cannot be used"),
    (["--keep_days", "0"], "keep_days=0.0 is not allowed; it must be in (0, 36500]"),
    (["--webhook_address", "192.0.2.7:5002"], "webhook_address 192.0.2.7:5002: cannot listen there"),
    (["--poll_interval", "nan"], "poll_interval=nan is not allowed; it must be a finite number"),
    (["--check_accuracy", "1.5"], "check_accuracy=1.5 is not allowed; it must be in [0, 1]"),
    (["--model_name", "Nope"], "Nope@production: no such registered model or alias"),
])
def test_bad_serve_flags_are_one_line(registry, monkeypatch, capsys, args, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    line = refused_step(monkeypatch, capsys, "steps.serve", *args)
    assert line.startswith("serve: error: ") and message in line


def test_a_certificate_path_nginx_conf_cannot_hold_is_one_line(registry, monkeypatch, capsys, tmp_path):
    cert = tmp_path / 'a"b.crt'
    cert.write_text("not read")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    line = refused_step(monkeypatch, capsys, "steps.serve", "--tls_cert", str(cert), "--tls_key", str(cert))
    assert line == (f"serve: error: tls_cert {str(cert)!r} is not allowed; nginx.conf takes a path without a double "
                    "quote, backslash, '$' or control character")


def test_a_bad_serve_parameter_through_mlflow_run_is_one_line_and_fails_the_run(registry, tmp_path):
    store = f"sqlite:///{tmp_path / 'runs.db'}"  # the launcher's run, apart from the registry
    result = subprocess.run(["mlflow", "run", ".", "-e", "serve", "--env-manager", "local", "-P", "workers=0"],
                            cwd=ROOT, env={**step_env(), "MLFLOW_TRACKING_URI": store}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("serve: ")] == [
        "serve: error: workers=0 is not allowed; it must be in [1, 32]"]
    client = mlflow.MlflowClient(store)
    [run] = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert run.info.status == "FAILED"


def test_beyond_loopback_it_answers_over_https_to_an_active_api_key_only(registry, tmp_path):
    """docs/serving.md's two lines, on another address than loopback (192.0.2.1, in a network
    namespace of the test's own) as a user on another machine reaches it, with a shared server's
    certificate and key store (in tmp_path instead of serverFolder/)."""
    require(netns_recorder.available(), "a network namespace (unshare --net and ip, as root)", "util-linux iproute2")
    from mnistflow import keystore

    def documented(start: str) -> str:
        return readme_line(start, "docs/serving.md").replace("serverFolder/", f"{tmp_path}/")

    assert run_step("bash", "serverFolder/make_certs.sh", str(tmp_path / "tls"), "mlflow.example.org").returncode == 0
    (tmp_path / "shared").mkdir()
    keys = str(tmp_path / "shared" / "api_keys.db")
    keystore.create_store(keys)
    key, revoked = keystore.issue_key(keys, "alice"), keystore.issue_key(keys, "bob")
    keystore.revoke_keys(keys, "bob")
    host = netns_recorder.REMOTE_HOST
    serve = shlex.split(documented("python -m steps.serve --host 0.0.0.0"))
    port = serve[serve.index("--port") + 1]
    on_another_address = ("unshare", "--net", "sh", "-c",
                          f"ip link set lo up && ip addr add {host}/32 dev lo && exec \"$@\"", "sh")
    serving = Serving(registry.uri, tmp_path, *serve[3:], prefix=on_another_address)
    (tmp_path / "a.png").write_bytes(registry.pictures[0])
    # For curl, mlflow.example.org is 192.0.2.1 (its config file says so, as a hosts file would).
    (tmp_path / ".curlrc").write_text(f"resolve = mlflow.example.org:{port}:{host}\n")

    def curl(line: str, api_key: str = "") -> tuple[int, str]:
        """(status, body) of a curl line typed on the user's machine (HOME and the folder: tmp_path)."""
        assert line.startswith("curl ")
        result = subprocess.run(
            ["nsenter", f"--net=/proc/{serving.process.pid}/ns/net", "bash", "-c",
             line.replace("curl ", "curl -w '\\n%{http_code}' ", 1)], capture_output=True, text=True, timeout=60,
            cwd=tmp_path, env={**step_env(), "HOME": str(tmp_path), keystore.KEY_ENV: api_key})
        body, status = result.stdout.rsplit("\n", 1)
        return int(status), body

    predict = documented("curl -s --cacert")
    try:
        assert f"at https://0.0.0.0:{port}, to requests with an API key" in serving.output()
        status, body = curl(predict, key)
        assert status == 200, body
        assert int(json.loads(body)["predictions"][0]["class"][0]) == registry.labels[0]
        for api_key, error in ("", keystore.MISSING_KEY), (revoked, keystore.BAD_KEY), ("guessed", keystore.BAD_KEY):
            for route in ("/predict", "/invocations", "/metadata", "/version"):
                status, body = curl(predict.replace("/predict", route), api_key)
                assert (status, json.loads(body)) == (401, {"error": error}), route
        assert curl(f"{predict.split(' -H ')[0]} https://mlflow.example.org:{port}/health")[0] == 200  # for probes
        status, body = curl(predict.replace("https://", "http://"), key)
        assert (status, json.loads(body)) == (400, {"error": "this endpoint takes https only"})
        # Past the proxy, on a model process's own port: no key, no answer. The step's token (which
        # it checks new versions with) works there, but the proxy drops it from what clients send.
        [process, *_] = live_processes(serving.process.pid)
        process_port = process.cmdline()[process.cmdline().index("--port") + 1]
        environ = dict(line.split("=", 1) for line in open(f"/proc/{process.pid}/environ").read().split("\0")
                       if "=" in line)
        token = f"-H '{TOKEN_HEADER}: {environ[TOKEN_ENV]}'"
        assert curl(f"curl -s http://127.0.0.1:{process_port}/metadata")[0] == 401
        assert curl(f"curl -s {token} http://127.0.0.1:{process_port}/metadata")[0] == 200
        assert curl(predict.replace(" -H ", f" {token} -H ").replace("/predict", "/metadata"))[0] == 401
    finally:
        assert serving.stop() == 0
    assert key not in serving.output()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """serverFolder/local_server.py on loopback, with MNIST_CNN versions 1 and 2 (one good model twice)."""
    require_real_mnist()
    from steps import train

    root = tmp_path_factory.mktemp("tracking-server")
    started = run_step(sys.executable, "serverFolder/local_server.py", "--root", str(root), "--port", str(free_port()))
    assert started.returncode == 0, started.stderr
    assert stat.S_IMODE(os.stat(root / "webhook.key").st_mode) == 0o600  # it decrypts the webhooks' secrets
    uri = started.stdout.split("export MLFLOW_TRACKING_URI=")[1].strip()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        env.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        train.main(["--data_dir", REAL_DATA, "--epochs", "1", "--max_train_samples", "5000", "--augment", "shift"])
        run = mlflow.last_active_run().info.run_id
        for _ in range(2):
            mlflow.register_model(f"runs:/{run}/model", NAME)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "production", "1")
        mlflow.set_tracking_uri(None)
    yield uri
    assert run_step(sys.executable, "serverFolder/local_server.py", "--root", str(root), "--stop").returncode == 0


def test_with_a_tracking_server_the_alias_is_followed_by_webhook_not_by_polling(tracking_server, tmp_path):
    # A poll interval far beyond the waits below: only a webhook can be that quick.
    serving = Serving(tracking_server, tmp_path, "--poll_interval", "600")
    client = mlflow.MlflowClient(tracking_server)
    try:
        assert "following the alias by MLflow's registry webhooks" in serving.output()
        [webhook] = client.list_webhooks()
        assert webhook.url.startswith("http://127.0.0.1:")
        load = Load(serving.url, png(np.eye(28, dtype=np.float32)), tmp_path)
        wait_until(lambda: len(load.results) > 20, "the load's first requests")
        moved = time.monotonic()
        client.set_registered_model_alias(NAME, "production", "2")
        wait_until(lambda: "version 2 (was 1)" in serving.output(), "the switch", 120, alive=serving.process)
        switched = time.monotonic() - moved
        wait_until(lambda: [r[2] for r in sorted(load.results)[-20:]] == ["2"] * 20, "version 2 answering")
        results = load.stop()
        assert [r for r in results if r[1] != 200] == []
        assert switched < 120
        print(f"from the alias move to version 2 by webhook: {switched:.1f} s")
        # A process that dies is started again at once, whatever the poll interval.
        [victim, *_] = live_processes(serving.process.pid)
        victim.kill()
        wait_until(lambda: "exited; started again" in serving.output(), "the replacement", 60, alive=serving.process)
    finally:
        serving.stop()
    assert client.list_webhooks() == []  # removed when the step stopped


def test_a_tracking_server_on_another_machine_sends_its_webhooks_to_webhook_address(registry, tmp_path):
    """The tracking server on 192.0.2.1, the serve step's webhook receiver on 192.0.2.2, in a network
    namespace of the test's own: MLflow delivers the alias's events across the network, to the
    address the step was given (the server told, as docs/serving.md says, to send them there)."""
    require(netns_recorder.available(), "a network namespace (unshare --net and ip, as root)", "util-linux iproute2")
    store = tmp_path / "mlflow.db"
    shutil.copy(registry.uri.removeprefix("sqlite:///"), store)  # its versions, with v1 @production
    addresses = "".join(f" && ip addr add {host}/32 dev lo" for host in ("192.0.2.1", "192.0.2.2"))
    started = subprocess.run(
        ["unshare", "--net", "sh", "-c", f"ip link set lo up{addresses} && exec \"$@\"", "sh", sys.executable,
         "serverFolder/local_server.py", "--root", str(tmp_path / "server"), "--host", "192.0.2.1", "--port", "5000",
         "--backend-store-uri", f"sqlite:///{store}"], cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**step_env(), "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
             "MLFLOW_WEBHOOK_CACHE_TTL": "2", "MLFLOW_SERVER_ALLOWED_HOSTS": "192.0.2.1:5000"})
    assert started.returncode == 0, started.stderr
    server_pid = int((tmp_path / "server" / "server.pid").read_text())
    in_namespace = ("nsenter", f"--net=/proc/{server_pid}/ns/net")
    uri = "http://192.0.2.1:5000"
    try:
        serving = Serving(uri, tmp_path, "--poll_interval", "600", "--webhook_address", "192.0.2.2:5002",
                          prefix=in_namespace)
        try:
            assert "following the alias by MLflow's registry webhooks" in serving.output()
            moved = subprocess.run([*in_namespace, sys.executable, "-c", f"import mlflow; c = mlflow.MlflowClient({uri!r}); "
                                    "print([w.url for w in c.list_webhooks()]); c.set_registered_model_alias("
                                    f"'{NAME}', 'production', '{registry.versions['v2']}')"],
                                   capture_output=True, text=True, timeout=120)
            assert moved.stdout.strip() == "['http://192.0.2.2:5002/alias']", moved.stderr
            wait_until(lambda: f"version {registry.versions['v2']} (was {registry.versions['v1']})" in serving.output(),
                       "the switch, told by webhook (the next poll is 10 minutes away)", 120, alive=serving.process)
        finally:
            assert serving.stop() == 0
    finally:
        run_step(sys.executable, "serverFolder/local_server.py", "--root", str(tmp_path / "server"), "--stop")


def test_the_webhook_receiver_takes_only_fresh_deliveries_signed_with_its_secret(tracking_server):
    import hashlib
    import hmac

    client = mlflow.MlflowClient(tracking_server)
    # One left by a serve step that was killed (SIGKILL: no clean-up), at a port where nothing listens.
    client.create_webhook(name=f"{rollout.WEBHOOK_PREFIX}killed", url=f"http://127.0.0.1:{free_port()}/alias",
                          events=["model_version_alias.created"])
    webhook = rollout.AliasWebhook(client, NAME, ("production", "challenger"))
    assert [w.name for w in client.list_webhooks()] == [client.get_webhook(webhook.webhook_id).name]
    url = client.get_webhook(webhook.webhook_id).url
    try:
        def deliver(secret: str, age_s: float = 0, name: str = NAME) -> int:
            body = json.dumps({"entity": "model_version_alias", "action": "created",
                               "data": {"name": name, "alias": "production", "version": "2"}})
            sent = str(int(time.time() - age_s))
            signature = base64.b64encode(hmac.new(secret.encode(), f"d1.{sent}.{body}".encode(),
                                                  hashlib.sha256).digest()).decode()
            request = urllib.request.Request(url, data=body.encode(), headers={
                "Content-Type": "application/json", "X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": sent,
                "X-MLflow-Signature": f"v1,{signature}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert deliver("not the secret") == 401 and not webhook.moved.is_set()
        assert deliver(webhook.secret, age_s=3600) == 401 and not webhook.moved.is_set()  # a replay
        assert deliver(webhook.secret, name="Another") == 204 and not webhook.moved.is_set()
        assert deliver(webhook.secret) == 204 and webhook.moved.is_set()
    finally:
        webhook.close()
    assert client.list_webhooks() == []
