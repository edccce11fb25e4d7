"""serverFolder/local_server.py: a real `mlflow server` on 127.0.0.1 that the steps log to."""
import glob
import os
import urllib.request

import mlflow
import pytest

from conftest import free_port, run_step


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
