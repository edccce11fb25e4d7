"""The client's side of API keys and the access check, against real HTTP servers started here:
the key never reaches a host over plain HTTP unless that host is this machine (or the user opts
in), and a tracking server that answers with an error stops a step with one line, also through
`mlflow run`."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest

from conftest import python_step, run_step

KEY = "mf_test-key-that-must-not-travel"


class Recorder(ThreadingHTTPServer):
    """Answers every request with `status` (MLflow's answers when 200) and records its headers."""

    def __init__(self, host: str, status: int = 200, health: int | None = None):
        super().__init__((host, 0), Handler)
        self.status, self.health, self.requests = status, health or status, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def keys_received(self) -> list[str]:
        return [headers.get("X-Api-Key") for _, headers in self.requests if headers.get("X-Api-Key")]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append((self.path, dict(self.headers)))
        status = self.server.health if self.path == "/health" else self.server.status
        body = (b"OK" if self.path == "/health" else json.dumps({"experiments": []}).encode()) \
            if status == 200 else b"<html>Bad Gateway</html>"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def recorders():
    started = []
    yield lambda *args, **kwargs: started.append(Recorder(*args, **kwargs)) or started[-1]
    for server in started:
        server.shutdown()
        server.server_close()


def non_loopback_address() -> str:
    """An address of this machine that is not a loopback one (the source of its default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # sends nothing: it only picks the outgoing address
        except OSError:
            pytest.skip("this machine has no network address besides loopback")
        return probe.getsockname()[0]


def search_experiments_at(uri: str, monkeypatch) -> None:
    """One real MLflow client request to `uri`, from this process (its request header plugins included)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    finally:
        mlflow.set_tracking_uri(None)


def assert_one_line_from_mlflow_run(result, message: str) -> None:
    """`mlflow run` stopped with exit code 2 and the project's line (after MLflow's own log lines)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == "mlflow run: " + message.rstrip("\n")


def test_the_key_goes_over_plain_http_only_to_this_machine(recorders, monkeypatch):
    monkeypatch.setenv("AM_SC_API_KEY", KEY)
    monkeypatch.delenv("MNISTFLOW_ALLOW_PLAIN_HTTP_KEY", raising=False)
    remote, local = recorders(non_loopback_address()), recorders("127.0.0.1")
    other_loopback = recorders("127.0.0.2")  # on this machine, but not where a local server listens

    search_experiments_at(remote.uri, monkeypatch)
    assert remote.requests and remote.keys_received() == []  # the plugin itself leaves the key out
    search_experiments_at(other_loopback.uri, monkeypatch)
    assert other_loopback.requests and other_loopback.keys_received() == []
    search_experiments_at(local.uri, monkeypatch)
    assert set(local.keys_received()) == {KEY}
    monkeypatch.setenv("MNISTFLOW_ALLOW_PLAIN_HTTP_KEY", "true")  # the user says that network is trusted
    search_experiments_at(remote.uri, monkeypatch)
    assert set(remote.keys_received()) == {KEY}


def test_steps_refuse_a_plain_http_server_elsewhere_before_any_request(recorders, monkeypatch, tiny_data):
    remote = recorders(non_loopback_address())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", remote.uri)
    monkeypatch.setenv("AM_SC_API_KEY", KEY)
    monkeypatch.delenv("MNISTFLOW_ALLOW_PLAIN_HTTP_KEY", raising=False)
    message = (f"error: the API key in AM_SC_API_KEY would travel unencrypted to {remote.uri}, which is not "
               "localhost, 127.0.0.1 or ::1: use an https:// URI, or set MNISTFLOW_ALLOW_PLAIN_HTTP_KEY=true if the network is trusted\n")
    step = python_step("steps.train", "--epochs", "1", "--data_dir", tiny_data)
    assert (step.returncode, step.stderr) == (2, "train: " + message)
    launched = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1",
                        "-P", f"data_dir={tiny_data}", timeout=120)
    assert_one_line_from_mlflow_run(launched, message)
    assert remote.requests == []  # nothing was sent, so no run was created either


@pytest.mark.parametrize("status, health", [(502, None), (500, 200)])  # a proxy alone; a server in trouble
def test_a_server_error_during_the_access_check_is_one_line(recorders, monkeypatch, tiny_data, status, health):
    server = recorders("127.0.0.1", status, health)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow would retry a 5xx for minutes
    message = (f"error: the tracking server {server.uri} failed to answer (HTTP {status}); try again later, "
               "or tell the server's admin\n")
    step = python_step("steps.train", "--epochs", "1", "--data_dir", tiny_data)
    assert (step.returncode, step.stderr, step.stdout) == (2, "train: " + message, "")
    launched = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1",
                        "-P", f"data_dir={tiny_data}", timeout=120)
    assert_one_line_from_mlflow_run(launched, message)
    assert not [path for path, _ in server.requests if "runs/create" in path]
