"""serverFolder/local_server.py: a real `mlflow server` on 127.0.0.1 that the steps log to."""
import glob
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import mlflow
import pytest

from conftest import ROOT, free_port, run_step, step_env, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for this module's tests (starting one takes ~20 s)."""
    root = tmp_path_factory.mktemp("server")
    started = run_step("python", "serverFolder/local_server.py", "--root", str(root), "--port", str(free_port()))
    assert started.returncode == 0, started.stderr
    yield started.stdout.split("export MLFLOW_TRACKING_URI=")[1].strip(), root
    stopped = run_step("python", "serverFolder/local_server.py", "--root", str(root), "--stop")
    assert stopped.returncode == 0 and "stopped the server" in stopped.stdout


@pytest.fixture
def local_server(server, monkeypatch):
    url, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(url)
    yield server
    mlflow.set_tracking_uri(None)


def test_train_step_logs_to_the_local_server(local_server, tiny_data):
    url, root = local_server
    result = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1",
                      "-P", "batch_size=64", "-P", f"data_dir={tiny_data}")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = mlflow.search_runs(experiment_ids=["0"], output_format="list")
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client never writes to root
    # ... and the files are in the server's own stores.
    assert os.path.exists(root / "mlflow.db")
    assert glob.glob(str(root / "artifacts" / "**" / "MLmodel"), recursive=True)
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").metadata.run_id == run.info.run_id


def test_a_second_server_on_a_busy_port_is_refused(local_server, tmp_path):
    url, _ = local_server
    port = url.rsplit(":", 1)[1]
    result = run_step("python", "serverFolder/local_server.py", "--root", str(tmp_path / "other"), "--port", port)
    assert result.returncode == 1 and "already answers" in result.stderr
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:  # the first one is untouched
        assert response.status == 200


def test_a_name_the_server_does_not_allow_is_one_line_naming_allowed_hosts(local_server, tmp_path):
    """MLflow answers 403 to a Host header it does not know (its guard against DNS rebinding): not a
    missing API key, which is what the step said before. 127.1 is 127.0.0.1 by another name."""
    url, _ = local_server
    other_name = url.replace("127.0.0.1", "127.1")
    result = subprocess.run([sys.executable, "-m", "steps.plot_loss", "--run_id", "0" * 32], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**step_env(), "MLFLOW_TRACKING_URI": other_name})
    assert result.returncode == 2
    host = other_name.split("//")[1]
    assert result.stderr.strip().splitlines() == [
        f"plot_loss: error: the tracking server {other_name} refused the name {host} (HTTP 403, its check of the Host "
        f"header): start it with --allowed-hosts {host}, or MLFLOW_SERVER_ALLOWED_HOSTS"]


def refuses_connections(port: int) -> bool:
    """Whether nothing listens on the port: a killed server's processes have all exited."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_run_survives_a_server_restart(tmp_path, tiny_data):
    """The server is killed and started again while the train step logs: MLflow's client retries
    until it is back, the run finishes and every epoch's metrics are there."""
    root, port, epochs = tmp_path / "restarted", free_port(), 6
    start = ["python", "serverFolder/local_server.py", "--root", str(root), "--port", str(port)]
    assert run_step(*start).returncode == 0
    url = f"http://127.0.0.1:{port}"
    # A shorter backoff than the default (2): the client retries sooner once the server is back.
    env = {**step_env(), "MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_NAME": "restart",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    training = subprocess.Popen([sys.executable, "-m", "steps.train", "--epochs", str(epochs), "--batch_size", "32",
                                 "--data_dir", tiny_data], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        for line in training.stdout:  # wait until training is under way, then pull the server away
            if line.startswith("epoch 2/"):
                break
        os.killpg(int((root / "server.pid").read_text()), signal.SIGKILL)  # no chance to finish anything
        wait_until(lambda: refuses_connections(port), "the killed server to let go of its port", timeout=60)
        assert run_step(*start).returncode == 0
        output = training.stdout.read()
        assert training.wait(timeout=300) == 0, output[-3000:]
        client = mlflow.MlflowClient(url)
        [run] = client.search_runs([client.get_experiment_by_name("restart").experiment_id])
        assert run.info.status == "FINISHED"
        for name in ("train_loss", "val_loss", "val_accuracy", "epoch_time_s"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(1, epochs + 1))
    finally:
        training.kill()
        run_step("python", "serverFolder/local_server.py", "--root", str(root), "--stop")


@pytest.mark.parametrize("script, args, message", [
    ("tls_proxy", ["--listen", "8443"], "argument --listen: '8443' is not allowed; give HOST:PORT, e.g. 127.0.0.1:8443"),
    ("tls_proxy", ["--listen", "127.0.0.1:99999"],
     "argument --listen: port '99999' is not allowed; give a number from 1 to 65535"),
    ("tls_proxy", ["--upstream", "localhost"],
     "argument --upstream: 'localhost' is not allowed; give HOST:PORT, e.g. 127.0.0.1:8443"),
    ("tls_proxy", ["--max-body-size", "0"], "argument --max-body-size: '0' is not allowed; give a size above 0 in "
                                            "bytes, or with k, m or g (nginx's client_max_body_size), e.g. 2g"),
    ("tls_proxy", ["--login-rate", "5"], "argument --login-rate: '5' is not allowed; give requests per second or per "
                                         "minute (nginx's limit_req_zone rate), e.g. 5r/s or 30r/m"),
    ("local_server", ["--port", "70000"], "argument --port: port '70000' is not allowed; give a number from 1 to 65535"),
    ("local_server", ["--workers", "0"], "argument --workers: '0' is not allowed; give a whole number above 0"),
    ("local_server", ["--timeout", "-5"], "argument --timeout: '-5' is not allowed; give a number of seconds above 0"),
    ("shared_server", ["--port", "http"], "argument --port: port 'http' is not allowed; give a number from 1 to 65535"),
    ("shared_server", ["--allowed-hosts", "localhost", "--backend-store-uri", "postgresql://mlflow:s3cret@db/mlflow"],
     "--backend-store-uri carries a password, which every user of this machine can read on a command line; leave "
     "it out (PGPASSWORD, ~/.pgpass) or pass the whole URI in MLFLOW_BACKEND_STORE_URI"),
    ("shared_server", ["--allowed-hosts", "localhost", "--auth-db-uri", "postgresql://mlflow:s3cret@db/auth"],
     "--auth-db-uri carries a password, which every user of this machine can read on a command line; leave "
     "it out (PGPASSWORD, ~/.pgpass) or pass the whole URI in MNISTFLOW_AUTH_DB_URI"),
])
def test_a_bad_server_option_is_one_line_and_writes_nothing(tmp_path, script, args, message):
    root = tmp_path / "root"
    result = run_step("python", f"serverFolder/{script}.py", "--root", str(root), *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"{script}.py: error: {message}\n"
    assert not root.exists()
