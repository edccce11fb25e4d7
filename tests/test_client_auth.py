"""The client's side of API keys, logins and the access check, against real HTTP servers started
here: the key never reaches a host over plain HTTP unless that host is this machine (or the user
opts in), neither the key nor the login reaches a host other than the tracking server, and a
tracking server or setting that cannot work stops a step with one line, also through `mlflow run`.

Servers that stand for another host are on 127.0.0.2 (this machine, but another origin than the
tracking server's), or on a TEST-NET address inside a network namespace the test makes, beside
the client it tests (tests/netns_recorder.py): no test sends anything off this machine.
"""
import base64
import functools
import json
import os
import socket
import sys

import mlflow
import pytest

from conftest import ROOT, python_step, refused_script, refused_step, require, run_step
import netns_recorder
from netns_recorder import REMOTE, Recorder
from mnistflow import auth

KEY = "mf_test-key-that-must-not-travel"
LOGIN = ("alice", "alice-Pw-that-must-not-travel")
BASIC = "Basic " + base64.b64encode(":".join(LOGIN).encode()).decode()
SEARCH = "import mlflow; mlflow.MlflowClient().search_experiments(max_results=1)"  # one request, and its plugins


@pytest.fixture
def recorders():
    started = []
    yield lambda *args, **kwargs: started.append(Recorder(*args, **kwargs)) or started[-1]
    for server in started:
        server.stop()


@pytest.fixture
def other_host(tmp_path):
    """Runs a command in a network namespace of its own, beside a recorder at REMOTE; returns the
    command's result and the requests the recorder received."""
    require(netns_recorder.available(), "a network namespace (unshare --net and ip, as root)", "util-linux iproute2")
    records = iter(tmp_path / f"remote-{n}.json" for n in range(100))

    def run(*command: str, timeout: int = 120):
        record = next(records)
        result = run_step("unshare", "--net", sys.executable, netns_recorder.__file__, str(record), "--", *command,
                          timeout=timeout)
        assert record.exists(), result.stderr[-3000:]
        return result, json.loads(record.read_text())
    return run


@pytest.fixture
def closed_port():
    """A port of 127.0.0.1 where nothing listens (held, so nothing else starts to)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def carried(requests: list, header: str) -> set:
    """The values of `header` in the recorded requests (None for a request without it), except in
    the access check's first, MLflow-less one (/health)."""
    return {headers.get(header.lower()) for path, headers in requests if path != "/health"}


def with_key_and_login(monkeypatch) -> None:
    monkeypatch.setenv("AM_SC_API_KEY", KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", LOGIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", LOGIN[1])
    monkeypatch.delenv("MNISTFLOW_ALLOW_PLAIN_HTTP_KEY", raising=False)


def search_experiments_at(uri: str, monkeypatch) -> None:
    """One real MLflow client request to `uri`, from this process (its plugins included)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    finally:
        mlflow.set_tracking_uri(None)


def assert_one_line_from_mlflow_run(result, message: str) -> None:
    """`mlflow run` stopped with exit code 2 and the project's line (after MLflow's own log lines)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == "mlflow run: " + message.rstrip("\n")


def test_the_key_and_the_login_go_over_plain_http_only_to_this_machine(recorders, other_host, monkeypatch):
    with_key_and_login(monkeypatch)
    local = recorders("127.0.0.1")
    other_loopback = recorders("127.0.0.2")  # on this machine, but not where a local server listens

    search_experiments_at(other_loopback.uri, monkeypatch)
    assert other_loopback.requests
    assert carried(other_loopback.requests, "X-Api-Key") == carried(other_loopback.requests, "Authorization") == {None}
    search_experiments_at(local.uri, monkeypatch)
    assert carried(local.requests, "X-Api-Key") == {KEY} and carried(local.requests, "Authorization") == {BASIC}
    for remote in (REMOTE, REMOTE.replace("http:", "HTTP:")):  # a scheme in any case is the same scheme
        monkeypatch.setenv("MLFLOW_TRACKING_URI", remote)
        result, received = other_host(sys.executable, "-c", SEARCH)
        assert result.returncode == 0 and received, result.stderr[-3000:]
        # The plugin itself leaves them out, in any program that uses MLflow's client.
        assert carried(received, "X-Api-Key") == carried(received, "Authorization") == {None}
    monkeypatch.setenv("MNISTFLOW_ALLOW_PLAIN_HTTP_KEY", "true")  # the user says that network is trusted
    result, received = other_host(sys.executable, "-c", SEARCH)
    assert result.returncode == 0, result.stderr[-3000:]
    assert carried(received, "X-Api-Key") == {KEY} and carried(received, "Authorization") == {BASIC}


@pytest.mark.parametrize("uri, in_clear", [
    ("http://localhost:5000", True), ("http://localhost.:5000", True), ("HTTP://LocalHost:5000", True),
    ("http://127.0.0.1", True), ("http://[::1]:5000", True), ("http://[0:0:0:0:0:0:0:1]:5000", True),
    ("HTTPS://192.0.2.1", True),
    ("HTTP://192.0.2.1:5000", False), ("http://Example.ORG.:80", False), ("http://127.0.0.2:5000", False),
    ("http://[2001:db8::1]:5000", False), ("http://localhost.example.org", False),
])
def test_the_plain_http_rule_reads_uris_as_urls_are_compared(monkeypatch, uri, in_clear):
    monkeypatch.delenv("MNISTFLOW_ALLOW_PLAIN_HTTP_KEY", raising=False)
    mlflow.set_tracking_uri(uri)
    try:
        assert auth.plain_http_destinations() == ([] if in_clear else [uri])
    finally:
        mlflow.set_tracking_uri(None)


def test_an_origin_is_scheme_host_and_port_in_any_spelling():
    assert auth.origin("HTTPS://MLflow.Example.org.:443/api") == auth.origin("https://mlflow.example.org") \
        == ("https", "mlflow.example.org", 443)
    assert auth.origin("http://[0:0::1]/x") == auth.origin("HTTP://[::1]:80") == ("http", "::1", 80)
    assert len({auth.origin(uri) for uri in ("http://h", "https://h", "http://h:8080", "http://h.example")}) == 4
    assert auth.origin("sqlite:///mlflow.db") is None and auth.origin("http://h:port") is None


def test_steps_refuse_a_plain_http_server_elsewhere_before_any_request(other_host, monkeypatch, tiny_data):
    monkeypatch.setenv("AM_SC_API_KEY", KEY)
    monkeypatch.delenv("MNISTFLOW_ALLOW_PLAIN_HTTP_KEY", raising=False)
    for remote in (REMOTE, REMOTE.replace("http:", "HTTP:")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", remote)
        message = (f"error: the API key in AM_SC_API_KEY would travel unencrypted to {remote}, which is not localhost, "
                   "127.0.0.1 or ::1: use an https:// URI, or set MNISTFLOW_ALLOW_PLAIN_HTTP_KEY=true if the network "
                   "is trusted\n")
        step, received = other_host(sys.executable, "-m", "steps.train", "--epochs", "1", "--data_dir", tiny_data)
        assert (step.returncode, step.stderr, received) == (2, "train: " + message, [])
    launched, received = other_host("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1",
                                     "-P", f"data_dir={tiny_data}")
    assert_one_line_from_mlflow_run(launched, message)
    assert received == []  # nothing was sent, so no run was created either

    # A login without a key: the password would travel in clear just the same.
    monkeypatch.delenv("AM_SC_API_KEY")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", LOGIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", LOGIN[1])
    step, received = other_host(sys.executable, "-m", "steps.train", "--epochs", "1", "--data_dir", tiny_data)
    assert (step.returncode, step.stderr, received) == (2, f"train: error: the password in MLFLOW_TRACKING_PASSWORD "
                                                           f"would travel unencrypted to {remote}, which is not "
                                                           "localhost, 127.0.0.1 or ::1: use an https:// URI, or set "
                                                           "MNISTFLOW_ALLOW_PLAIN_HTTP_KEY=true if the network is "
                                                           "trusted\n", [])


@pytest.mark.parametrize("status, health", [(502, None), (500, 200)])  # a proxy alone; a server in trouble
def test_a_server_error_during_the_access_check_is_one_line(recorders, monkeypatch, capsys, tiny_data, status,
                                                           health):
    server = recorders("127.0.0.1", status=status, health=health)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow would retry a 5xx for minutes
    message = (f"error: the tracking server {server.uri} failed to answer (HTTP {status}); try again later, "
               "or tell the server's admin\n")
    line = refused_step(monkeypatch, capsys, "steps.train", "--epochs", "1", "--data_dir", tiny_data)
    assert line == "train: " + message.rstrip("\n")
    launched = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1",
                        "-P", f"data_dir={tiny_data}", timeout=120)
    assert_one_line_from_mlflow_run(launched, message)
    assert not [path for path, _ in server.requests if "runs/create" in path]


def test_a_model_uri_on_another_host_gets_neither_the_key_nor_the_login(recorders, monkeypatch, tiny_data):
    """MLflow adds the login to every request it sends, wherever to: a step given a model on
    another host fetches it without the login, and without the key."""
    with_key_and_login(monkeypatch)
    server, elsewhere = recorders("127.0.0.1"), recorders("127.0.0.2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    model_uri = f"{elsewhere.uri}/api/2.0/mlflow-artifacts/artifacts/1/0123/artifacts/model"
    step = python_step("steps.evaluate", "--model_uri", model_uri, "--data_dir", tiny_data)
    assert step.returncode == 2 and "Traceback" not in step.stderr, step.stderr[-3000:]  # no model there
    assert carried(server.requests, "X-Api-Key") == {KEY} and carried(server.requests, "Authorization") == {BASIC}
    assert elsewhere.requests, step.stderr[-3000:]
    assert carried(elsewhere.requests, "X-Api-Key") == carried(elsewhere.requests, "Authorization") == {None}


def test_a_redirect_to_another_host_carries_neither_the_key_nor_the_login(recorders, monkeypatch):
    with_key_and_login(monkeypatch)
    elsewhere = recorders("127.0.0.2")
    server = recorders("127.0.0.1", redirect=elsewhere.uri)
    search_experiments_at(server.uri, monkeypatch)
    assert carried(server.requests, "X-Api-Key") == {KEY} and carried(server.requests, "Authorization") == {BASIC}
    assert elsewhere.requests
    assert carried(elsewhere.requests, "X-Api-Key") == carried(elsewhere.requests, "Authorization") == {None}


# The step in this process; `mlflow run` once for each of its two checks before it creates a run:
# the access check of the first request (auth.py) and the store URI's (cli_guard.py).
@pytest.mark.parametrize("uri, settings, message, through_mlflow_run", [
    ("HTTPS://127.0.0.1:{port}", {}, "cannot reach the tracking server HTTPS://127.0.0.1:{port}: ConnectionError; "
                                     "is it running, and is MLFLOW_TRACKING_URI right?", True),
    ("https://127.0.0.1:{port}", {"MLFLOW_TRACKING_SERVER_CERT_PATH": "{tmp}/ca.pem"},
     "MLFLOW_TRACKING_SERVER_CERT_PATH names no file: '{tmp}/ca.pem'; set it to the certificate file the server's "
     "admin gives you, or unset it", False),
    ("sqlit:///{tmp}/mlflow.db", {}, "the tracking URI 'sqlit:///{tmp}/mlflow.db' names no store MLflow knows "
                                     "(sqlit:); use https://host, http://host, a path, file:, sqlite:, postgresql:, "
                                     "mysql:, mssql: or databricks", True),
    ("bogus://x", {}, "the tracking URI 'bogus://x' names no store MLflow knows (bogus:); use https://host, "
                      "http://host, a path, file:, sqlite:, postgresql:, mysql:, mssql: or databricks", False),
])
def test_a_tracking_setting_that_cannot_work_is_one_line_and_creates_nothing(monkeypatch, capsys, tmp_path, tiny_data,
                                                                            closed_port, uri, settings, message,
                                                                            through_mlflow_run):
    fill = functools.partial(str.format, port=closed_port, tmp=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fill(uri))
    for name, value in settings.items():
        monkeypatch.setenv(name, fill(value))
    line = refused_step(monkeypatch, capsys, "steps.train", "--epochs", "1", "--data_dir", tiny_data)
    assert line == f"train: error: {fill(message)}"
    if through_mlflow_run:
        launched = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1",
                            "-P", f"data_dir={tiny_data}", timeout=120)
        assert_one_line_from_mlflow_run(launched, f"error: {fill(message)}")
    assert os.listdir(tmp_path) == []


def test_a_researcher_script_refuses_a_tracking_uri_mlflow_has_no_store_for(store, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "researcher"))
    line = refused_script(monkeypatch, capsys, os.path.join(ROOT, "researcher", "log_plot.py"),
                          "--tracking_uri", "bogus://x", "--run-id", "0123")
    assert line == ("log_plot.py: error: the tracking URI 'bogus://x' names no store MLflow knows (bogus:); use "
                    "https://host, http://host, a path, file:, sqlite:, postgresql:, mysql:, mssql: or databricks")


def test_users_py_says_at_once_that_the_server_is_down(monkeypatch, closed_port):
    """MLflow's client would retry for minutes (the timeout fails the test long before)."""
    url = f"https://127.0.0.1:{closed_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    result = run_step(sys.executable, "serverFolder/users.py", "grant", "alice", "mnist", "READ", timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"users: error: cannot reach the tracking server {url}: ConnectionError; is it running, "
                             "and is MLFLOW_TRACKING_URI right?\n")
