"""API keys against a real `mlflow server --app-name basic-auth` on 127.0.0.1 with mnistflow's
authorization function: the steps' requests carry X-Api-Key; missing, wrong and revoked keys are
refused before anything is written; keys never show up in what the server stores or logs."""
import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import pytest
from mlflow.server import get_app_client

from conftest import ROOT, free_port, run_step, step_env, wait_until_up

sys.path.insert(0, os.path.join(ROOT, "serverFolder"))
import api_keys  # noqa: E402  (a script, not a package)

ADMIN_PASSWORD = "test-Admin-pw-1"


def call(url: str, path: str, body: dict | None = None, key: str | None = None, basic: str | None = None):
    """(HTTP status, response text) of one REST call."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-Api-Key"] = key
    if basic is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(basic.encode()).decode()
    request = urllib.request.Request(url + path, json.dumps(body).encode() if body is not None else None, headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("secured")
    ini = root / "basic_auth.ini"
    template = open(os.path.join(ROOT, "serverFolder", "basic_auth.ini")).read()
    ini.write_text(template.replace("sqlite:///basic_auth.db", f"sqlite:///{root}/basic_auth.db"))
    keys = str(root / "api_keys.db")
    env = {**step_env(), "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret", "MNISTFLOW_API_KEYS_DB": keys}
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(["mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                               "--artifacts-destination", str(root / "artifacts")],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", server)
        status, _ = call(url, "/api/2.0/mlflow/users/create", {"username": "alice", "password": "alice-Pw-123456"},
                         basic=f"admin:{ADMIN_PASSWORD}")
        assert status == 200
        issued = run_step("python", "serverFolder/api_keys.py", "issue", "alice", "--db", keys)
        assert issued.returncode == 0, issued.stderr
        yield {"url": url, "key": issued.stdout.strip(), "keys": keys, "log": root / "server.log"}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def keys_script(capsys, *args: str) -> str:
    """serverFolder/api_keys.py run in this process (the fixture runs it as a command); its stdout."""
    api_keys.main(list(args))
    return capsys.readouterr().out


def experiments(server) -> list[str]:
    status, text = call(server["url"], "/api/2.0/mlflow/experiments/search?max_results=100",
                        basic=f"admin:{ADMIN_PASSWORD}")
    assert status == 200
    return [e["name"] for e in json.loads(text).get("experiments", [])]


def test_train_with_a_valid_key_logs_to_the_secured_server(secured_server, tiny_data, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secured_server["url"])
    monkeypatch.setenv("AM_SC_API_KEY", secured_server["key"])
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    result = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "--experiment-name", "alice-exp",
                      "-P", "epochs=1", "-P", "batch_size=64", "-P", f"data_dir={tiny_data}")
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(secured_server["url"])
    try:
        [run] = mlflow.search_runs(experiment_names=["alice-exp"], output_format="list")
        assert run.info.status == "FINISHED"
        assert "test_accuracy" in run.data.metrics
        assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model") is not None
        stored = json.dumps([run.data.params, run.data.tags])
    finally:
        mlflow.set_tracking_uri(None)
    # The requests came as alice: the auth app made her the manager of the experiment she created.
    monkeypatch.delenv("AM_SC_API_KEY")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    admin = get_app_client("basic-auth", tracking_uri=secured_server["url"])
    assert admin.get_user_permission("alice", "experiment", run.info.experiment_id).permission == "MANAGE"
    assert secured_server["key"] not in stored
    assert secured_server["key"] not in open(secured_server["log"]).read()
    assert secured_server["key"] not in result.stdout + result.stderr


@pytest.mark.parametrize("key, message", [
    (None, "set AM_SC_API_KEY to your API key"),
    ("not-a-key", "the key in AM_SC_API_KEY is unknown, revoked or lacks permission"),
])
def test_steps_stop_at_start_up_without_a_valid_key(secured_server, tiny_data, key, message):
    env = {**step_env(), "MLFLOW_TRACKING_URI": secured_server["url"], "MLFLOW_EXPERIMENT_NAME": "refused",
           "AM_SC_API_KEY": key or ""}
    result = subprocess.run(["python", "-m", "steps.train", "--epochs", "1", "--data_dir", tiny_data], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr == (f"train: error: the tracking server {secured_server['url']} refused this client "
                             f"(HTTP 401): {message}" + ("; ask the server's admin" if key else "") + "\n")
    assert "epoch" not in result.stdout and "refused" not in experiments(secured_server)


def test_missing_wrong_and_revoked_keys_write_nothing(secured_server, capsys):
    url, keys = secured_server["url"], secured_server["keys"]
    for key in (None, "wrong-key"):
        assert call(url, "/api/2.0/mlflow/experiments/create", {"name": f"sneaky-{key}"}, key=key)[0] == 401
    assert call(url, "/api/2.0/mlflow/users/create", {"username": "bob", "password": "bob-Pw-1234567"},
                basic=f"admin:{ADMIN_PASSWORD}")[0] == 200
    bob = [keys_script(capsys, "issue", "bob", "--db", keys).strip() for _ in range(2)]
    assert call(url, "/api/2.0/mlflow/experiments/create", {"name": "by-bob"}, key=bob[0])[0] == 200
    assert "revoked 2 key(s) of bob" in keys_script(capsys, "revoke", "bob", "--db", keys)
    for key in bob:
        assert call(url, "/api/2.0/mlflow/experiments/create", {"name": "after-revoke"}, key=key)[0] == 401
    names = experiments(secured_server)
    assert "by-bob" in names and not {"sneaky-None", "sneaky-wrong-key", "after-revoke"} & set(names)
    listed = keys_script(capsys, "list", "--db", keys)
    assert listed.count("REVOKED") == 2 and not any(key in listed for key in bob)
