"""The shared server of serverFolder/, for real: shared_server.py (basic-auth app, API keys,
--allowed-hosts, the hardening settings) behind nginx terminating TLS (tls_proxy.py, with
certificates from make_certs.sh), on SQLite and on PostgreSQL. Requests that must be refused are
refused before anything is written; keys never show up in what the server stores or logs."""
import base64
import glob
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import pytest

from conftest import ROOT, free_port, require, run_step, step_env

sys.path.insert(0, os.path.join(ROOT, "serverFolder"))
import api_keys  # noqa: E402  (scripts, not a package)
import users  # noqa: E402

ADMIN = ("admin", "test-Admin-pw-1")
SECRETS = {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """shared_server.py on a free port behind tls_proxy.py on another; alice exists and has a key."""
    require(bool(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")), "nginx", "nginx-light")
    root = tmp_path_factory.mktemp(f"shared-{request.param}")
    backend = request.getfixturevalue("postgres")("mlflow") if request.param == "postgresql" \
        else f"sqlite:///{root}/mlflow.db"
    assert run_step("bash", "serverFolder/make_certs.sh", str(root / "certs")).returncode == 0
    mlflow_port, proxy_port = free_port(), free_port()
    keys = str(root / "api_keys.db")
    env = {**step_env(), **SECRETS, "MNISTFLOW_API_KEYS_DB": keys}
    started = subprocess.run(
        ["python", "serverFolder/shared_server.py", "--allowed-hosts", "localhost", "--port", str(mlflow_port),
         "--root", str(root / "server"), "--backend-store-uri", backend, "--workers", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    proxy = run_step("python", "serverFolder/tls_proxy.py", "--listen", f"127.0.0.1:{proxy_port}",
                     "--upstream", f"127.0.0.1:{mlflow_port}", "--cert", str(root / "certs" / "server.crt"),
                     "--key", str(root / "certs" / "server.key"), "--root", str(root / "proxy"))
    try:
        assert proxy.returncode == 0, proxy.stderr
        url = proxy.stdout.split("export MLFLOW_TRACKING_URI=")[1].strip()
        ca = str(root / "certs" / "ca.crt")
        assert call(url, ca, "/api/2.0/mlflow/users/create", {"username": "alice", "password": "alice-Pw-123456"},
                    basic=ADMIN)[0] == 200
        issued = run_step("python", "serverFolder/api_keys.py", "issue", "alice", "--db", keys)
        assert issued.returncode == 0, issued.stderr
        yield {"url": url, "ca": ca, "key": issued.stdout.strip(), "keys": keys, "root": root, "backend": backend}
    finally:
        run_step("python", "serverFolder/tls_proxy.py", "--root", str(root / "proxy"), "--stop")
        run_step("python", "serverFolder/shared_server.py", "--root", str(root / "server"), "--stop")


def call(url: str, ca: str, path: str, body: dict | None = None, key: str | None = None,
         basic: tuple | None = None, host: str | None = None) -> tuple[int, str]:
    """(HTTP status, response text) of one REST call over HTTPS, verified with the test CA."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-Api-Key"] = key
    if basic is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(basic).encode()).decode()
    if host is not None:
        headers["Host"] = host
    request = urllib.request.Request(url + path, json.dumps(body).encode() if body is not None else None, headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context(cafile=ca)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def experiment_names(server) -> set[str]:
    status, text = call(server["url"], server["ca"], "/api/2.0/mlflow/experiments/search?max_results=1000",
                        basic=ADMIN)
    assert status == 200
    return {e["name"] for e in json.loads(text).get("experiments", [])}


@pytest.fixture
def as_admin(server, monkeypatch):
    """This process talks to the server over HTTPS as the admin (what users.py expects)."""
    for name, value in admin_env(server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AM_SC_API_KEY", raising=False)
    mlflow.set_tracking_uri(server["url"])
    yield server
    mlflow.set_tracking_uri(None)


def test_train_over_https_with_a_key_lands_in_the_server_stores(server, tiny_data, as_admin, monkeypatch):
    result = subprocess.run(
        ["mlflow", "run", ".", "-e", "train", "--env-manager", "local", "--experiment-name", "alice-exp",
         "-P", "epochs=1", "-P", "batch_size=64", "-P", f"data_dir={tiny_data}"],
        cwd=ROOT, capture_output=True, text=True,
        env={**user_env(server), "AM_SC_API_KEY": server["key"]})
    assert result.returncode == 0, result.stderr[-3000:]
    # Read back from the backend store itself (SQLite file or PostgreSQL), not through the server.
    store = mlflow.MlflowClient(server["backend"])
    [run] = store.search_runs([store.get_experiment_by_name("alice-exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"test_accuracy", "val_loss"} <= set(run.data.metrics)
    assert [m.step for m in store.get_metric_history(run.info.run_id, "val_loss")] == [1]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert glob.glob(str(server["root"] / "server" / "artifacts" / "**" / "MLmodel"), recursive=True)
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").metadata.run_id == run.info.run_id
    # The requests came as alice: the auth app made her the manager of the experiment she created.
    permission = users.AuthServiceClient(server["url"]).get_user_permission("alice", "experiment",
                                                                            run.info.experiment_id)
    assert permission.permission == "MANAGE"
    # A model version may point at the server's artifacts, not at a path on the server's disk.
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "alice-model")
    assert version.source.startswith(("mlflow-artifacts:", "models:/"))
    status, text = call(server["url"], server["ca"], "/api/2.0/mlflow/model-versions/create",
                        {"name": "alice-model", "source": "file:///etc"}, basic=ADMIN)
    assert status == 400 and "Invalid model version source" in text
    assert len(mlflow.MlflowClient().search_model_versions("name='alice-model'")) == 1
    # Hardening: no job runner was started beside the server (MLflow's is a huey consumer).
    server_session = (server["root"] / "server" / "server.pid").read_text()
    assert subprocess.run(["pgrep", "-s", server_session, "-f", "huey"], capture_output=True).returncode == 1
    stored = json.dumps([run.data.params, run.data.tags])
    logs = "".join(open(path).read() for path in glob.glob(str(server["root"] / "*" / "*.log")))
    artifacts = b"".join(open(path, "rb").read() for path in
                         glob.glob(str(server["root"] / "server" / "artifacts" / "**" / "*"), recursive=True)
                         if os.path.isfile(path))
    for text in (stored, logs, result.stdout + result.stderr):
        assert server["key"] not in text
    assert artifacts and server["key"].encode() not in artifacts


def test_no_key_wrong_key_revoked_key_and_foreign_host_are_refused(server, capsys):
    url, ca = server["url"], server["ca"]
    bob = users_main(capsys, server, "create", "bob", stdin="bob-Pw-12345678\n")
    assert bob == "created user bob\n"
    keys = [keys_script(capsys, "issue", "bob", "--db", server["keys"]).strip() for _ in range(2)]
    assert call(url, ca, "/api/2.0/mlflow/experiments/create", {"name": "by-bob"}, key=keys[0])[0] == 200
    assert "revoked 2 key(s) of bob" in keys_script(capsys, "revoke", "bob", "--db", server["keys"])
    refused = [
        (None, None, 401), ("not-a-key", None, 401), (keys[0], None, 401), (keys[1], None, 401),
        (server["key"], "evil.example.com", 403),  # a valid key, but the Host of a DNS-rebinding page
    ]
    for key, host, status in refused:
        assert call(url, ca, "/api/2.0/mlflow/experiments/create", {"name": "sneaky"}, key=key, host=host)[0] == status
    assert "by-bob" in experiment_names(server) and "sneaky" not in experiment_names(server)
    listed = keys_script(capsys, "list", "--db", server["keys"])
    assert listed.count("REVOKED") == 2 and not any(key in listed for key in keys)


def test_user_and_permission_scripts(server, as_admin, capsys, monkeypatch):
    url, ca = server["url"], server["ca"]
    experiment_id = mlflow.create_experiment("carols-target")
    run_in_it = {"experiment_id": experiment_id}
    assert users_main(capsys, server, "create", "carol", stdin="carol-Pw-123456\n") == "created user carol\n"
    carol = ("carol", "carol-Pw-123456")
    assert call(url, ca, "/api/2.0/mlflow/runs/create", run_in_it, basic=carol)[0] == 403  # default: READ
    assert users_main(capsys, server, "grant", "carol", "carols-target", "edit") == \
        "carol now has EDIT on experiment 'carols-target'\n"
    assert call(url, ca, "/api/2.0/mlflow/runs/create", run_in_it, basic=carol)[0] == 200
    users_main(capsys, server, "grant", "carol", "carols-target", "DENY")
    assert call(url, ca, f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}", basic=carol)[0] == 403
    assert users_main(capsys, server, "password", "carol", stdin="carol-New-pw-123\n") == \
        "changed the password of carol\n"
    assert call(url, ca, "/api/2.0/mlflow/experiments/search?max_results=1", basic=carol)[0] == 401
    assert call(url, ca, "/api/2.0/mlflow/experiments/search?max_results=1", basic=("carol", "carol-New-pw-123"))[0] == 200
    for args, message in [
        (("grant", "carol", "carols-target", "WRITE"),
         "permission 'WRITE' is not allowed; choose from READ, EDIT, MANAGE, DENY"),
        (("grant", "carol", "no-such-experiment", "READ"), f"no experiment named 'no-such-experiment' on {url}"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            users.main(list(args))
        assert exit_info.value.code == 2 and capsys.readouterr().err == f"users: error: {message}\n"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(SystemExit):
        users.main(["grant", "carol", "carols-target", "MANAGE"])
    assert "refused the admin login" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    assert users.AuthServiceClient(url).get_user_permission("carol", "experiment", experiment_id).permission \
        == "DENY"


@pytest.mark.parametrize("key, ca, message", [
    (None, "server", "the tracking server {url} refused this client (HTTP 401): set AM_SC_API_KEY to your API key"),
    ("not-a-key", "server", "the tracking server {url} refused this client (HTTP 401): the key in AM_SC_API_KEY "
                            "is unknown, revoked or lacks permission; ask the server's admin"),
    ("valid", "other", "the TLS certificate of {url} could not be verified with the CA in "
                       "MLFLOW_TRACKING_SERVER_CERT_PATH ({ca}): set MLFLOW_TRACKING_SERVER_CERT_PATH to the CA "
                       "certificate the server's admin gives you"),
])
def test_steps_stop_at_start_up_with_one_line(server, tiny_data, tmp_path, key, ca, message):
    if server["backend"].startswith("postgresql"):
        pytest.skip("the client's checks do not depend on the server's backend store")
    if ca == "other":
        assert run_step("bash", "serverFolder/make_certs.sh", str(tmp_path)).returncode == 0
    ca_path = server["ca"] if ca == "server" else str(tmp_path / "ca.crt")
    env = {**user_env(server), "MLFLOW_TRACKING_SERVER_CERT_PATH": ca_path, "MLFLOW_EXPERIMENT_NAME": "refused",
           "AM_SC_API_KEY": server["key"] if key == "valid" else key or ""}
    result = subprocess.run(["python", "-m", "steps.train", "--epochs", "1", "--data_dir", tiny_data], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr == "train: error: " + message.format(url=server["url"], ca=ca_path) + "\n"
    assert "epoch" not in result.stdout and "refused" not in experiment_names(server)


def test_the_shared_server_refuses_to_start_without_its_secrets(tmp_path):
    base = ["python", "serverFolder/shared_server.py", "--root", str(tmp_path), "--port", str(free_port())]
    env = {k: v for k, v in step_env().items() if k not in SECRETS}
    no_hosts = subprocess.run(base, cwd=ROOT, env={**env, **SECRETS}, capture_output=True, text=True)
    assert no_hosts.returncode == 1 and "--allowed-hosts is required" in no_hosts.stderr
    no_password = subprocess.run([*base, "--allowed-hosts", "localhost"], cwd=ROOT, env=env,
                                 capture_output=True, text=True)
    assert no_password.returncode == 1 and "set MLFLOW_AUTH_ADMIN_PASSWORD" in no_password.stderr
    assert not os.path.exists(tmp_path / "server.pid")


def admin_env(server) -> dict:
    """The admin's login to the server over HTTPS (what users.py expects)."""
    return {"MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_SERVER_CERT_PATH": server["ca"],
            "MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}


def user_env(server) -> dict:
    """A researcher's environment: the server's URL and CA, no admin login."""
    env = {k: v for k, v in step_env().items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    return {**env, "MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_SERVER_CERT_PATH": server["ca"]}


def keys_script(capsys, *args: str) -> str:
    """serverFolder/api_keys.py run in this process (the fixture runs it as a command); its stdout."""
    api_keys.main(list(args))
    return capsys.readouterr().out


def users_main(capsys, server, *args: str, stdin: str = "") -> str:
    """serverFolder/users.py run in this process as the admin, the password on standard input."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in admin_env(server).items():
            env.setenv(name, value)
        env.setattr(sys, "stdin", io.StringIO(stdin))
        users.main(list(args))
    return capsys.readouterr().out
