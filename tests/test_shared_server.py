"""The shared server of serverFolder/, for real: shared_server.py (basic-auth app, API keys,
--allowed-hosts, the hardening settings) behind nginx terminating TLS (tls_proxy.py, with
certificates from make_certs.sh), on SQLite and on PostgreSQL. Requests that must be refused are
refused before anything is written; keys never show up in what the server stores or logs."""
import base64
import concurrent.futures
import glob
import hashlib
import io
import json
import os
import pwd
import re
import shutil
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import mlflow
import pytest

from conftest import ROOT, free_port, require, run_step, step_env, wait_until

sys.path.insert(0, os.path.join(ROOT, "serverFolder"))
import api_keys  # noqa: E402  (scripts, not a package)
import users  # noqa: E402
from mnistflow import keystore  # noqa: E402
from shared_server import HARDENING_ENV  # noqa: E402

SOURCE_RULE = HARDENING_ENV["MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX"]

ADMIN = ("admin", "test-Admin-pw-1")
SECRETS = {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"}


def with_password(url: str) -> str:
    """A PostgreSQL URL of the `postgres` fixture with its password in it, URL-encoded ('%' is '%25')."""
    return url.replace("postgres@", f"postgres:{urllib.parse.quote(os.environ['PGPASSWORD'], safe='')}@", 1)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """shared_server.py on a free port behind tls_proxy.py on another; alice exists and has a key.

    On PostgreSQL, both stores (runs, and users) are URLs whose password holds a '%'; they reach
    the server in environment variables, and the server has no PGPASSWORD to fall back on."""
    require(bool(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")), "nginx", "nginx-light")
    root = tmp_path_factory.mktemp(f"shared-{request.param}")
    env = {k: v for k, v in step_env().items() if k != "PGPASSWORD"}
    if request.param == "postgresql":
        backend = with_password(request.getfixturevalue("postgres")("mlflow"))
        env.update(MLFLOW_BACKEND_STORE_URI=backend,
                   MNISTFLOW_AUTH_DB_URI=with_password(request.getfixturevalue("postgres")("mlflow_auth")))
    else:
        backend = f"sqlite:///{root}/server/mlflow.db"
    # Paths nginx.conf holds, with characters that end an unquoted value there: a project folder can have them.
    certs, proxy_root = root / "tls certs; {x}", root / "nginx proxy #1"
    assert run_step("bash", "serverFolder/make_certs.sh", str(certs)).returncode == 0
    mlflow_port, proxy_port = free_port(), free_port()
    keys = str(root / "server" / "api_keys.db")  # shared_server.py's default, beside its basic_auth.ini
    started = subprocess.run(
        ["python", "serverFolder/shared_server.py", "--allowed-hosts", "localhost", "--port", str(mlflow_port),
         "--root", str(root / "server"), "--workers", "2"],
        cwd=ROOT, env={**env, **SECRETS}, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    proxy = run_step("python", "serverFolder/tls_proxy.py", "--listen", f"127.0.0.1:{proxy_port}",
                     "--upstream", f"127.0.0.1:{mlflow_port}", "--cert", str(certs / "server.crt"),
                     "--key", str(certs / "server.key"), "--root", str(proxy_root))
    try:
        assert proxy.returncode == 0, proxy.stderr
        url = proxy.stdout.split("export MLFLOW_TRACKING_URI=")[1].strip()
        ca = str(certs / "ca.crt")
        assert call(url, ca, "/api/2.0/mlflow/users/create", {"username": "alice", "password": "alice-Pw-123456"},
                    basic=ADMIN)[0] == 200
        issued = run_step("python", "serverFolder/api_keys.py", "issue", "alice", "--db", keys)
        assert issued.returncode == 0, issued.stderr
        yield {"url": url, "ca": ca, "key": issued.stdout.strip(), "keys": keys, "root": root, "backend": backend,
               "upstream": f"127.0.0.1:{mlflow_port}", "certs": certs, "proxy_root": proxy_root}
    finally:
        run_step("python", "serverFolder/tls_proxy.py", "--root", str(proxy_root), "--stop")
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
    # The run records who logged it: the key's user, not the client's OS account.
    assert (run.info.user_id, run.data.tags["mlflow.user"]) == ("alice", "alice")
    assert {"test_accuracy", "val_loss"} <= set(run.data.metrics)
    assert [m.step for m in store.get_metric_history(run.info.run_id, "val_loss")] == [1]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert glob.glob(str(server["root"] / "server" / "artifacts" / "**" / "MLmodel"), recursive=True)
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").metadata.run_id == run.info.run_id
    # The requests came as alice: the auth app made her the manager of the experiment she created.
    permission = users.admin_client(server["url"]).get_user_permission("alice", "experiment",
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
    assert users.admin_client(url).get_user_permission("carol", "experiment", experiment_id).permission \
        == "DENY"


@pytest.mark.parametrize("key, ca, message", [
    (None, "server", "the tracking server {url} refused this client (HTTP 401): set AM_SC_API_KEY to your API key"),
    ("not-a-key", "server", "the tracking server {url} refused this client (HTTP 401): the key in AM_SC_API_KEY "
                            "is unknown, revoked or lacks permission; ask the server's admin"),
    ("valid", "other", "the TLS certificate of {url} could not be verified with the CA in "
                       "MLFLOW_TRACKING_SERVER_CERT_PATH ({ca}): set MLFLOW_TRACKING_SERVER_CERT_PATH to the CA "
                       "certificate the server's admin gives you"),
])
# SQLite only: the client's checks do not depend on the server's backend store.
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_steps_stop_at_start_up_with_one_line(server, tiny_data, tmp_path, key, ca, message):
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
    assert no_hosts.returncode == 2 and "--allowed-hosts is required" in no_hosts.stderr
    no_password = subprocess.run([*base, "--allowed-hosts", "localhost"], cwd=ROOT, env=env,
                                 capture_output=True, text=True)
    assert no_password.returncode == 2 and "set MLFLOW_AUTH_ADMIN_PASSWORD" in no_password.stderr
    assert not os.path.exists(tmp_path / "server.pid")


def test_a_run_records_the_authenticated_user_whatever_the_client_claims(server):
    url, ca, key = server["url"], server["ca"], server["key"]
    assert call(url, ca, "/api/2.0/mlflow/experiments/create", {"name": "alice-audit"}, key=key)[0] == 200
    store = mlflow.MlflowClient(server["backend"])  # read back from the backend store itself
    experiment_id = store.get_experiment_by_name("alice-audit").experiment_id
    forged = {"experiment_id": experiment_id, "user_id": "mallory", "tags": [{"key": "mlflow.user", "value": "mallory"}]}
    status, text = call(url, ca, "/api/2.0/mlflow/runs/create", forged, key=key)
    assert status == 200, text
    run_id = json.loads(text)["run"]["info"]["run_id"]
    status, _ = call(url, ca, "/api/2.0/mlflow/runs/create", {"experiment_id": experiment_id}, basic=ADMIN)
    assert status == 200
    runs = {run.info.run_id: run for run in store.search_runs([experiment_id])}
    assert {(r.info.user_id, r.data.tags["mlflow.user"]) for r in runs.values()} == {("alice", "alice"),
                                                                                     ("admin", "admin")}
    # Afterwards, no one sets or deletes it; a body MLflow would parse twice cannot slip past.
    for path, body, status in [
        ("runs/set-tag", {"run_id": run_id, "key": "mlflow.user", "value": "mallory"}, 403),
        ("runs/delete-tag", {"run_id": run_id, "key": "mlflow.user"}, 403),
        ("runs/log-batch", {"run_id": run_id, "tags": [{"key": "mlflow.user", "value": "mallory"}]}, 403),
        ("runs/create", json.dumps(forged), 400),
    ]:
        assert call(url, ca, f"/api/2.0/mlflow/{path}", body, key=key)[0] == status, path
    assert call(url, ca, "/api/2.0/mlflow/runs/set-tag", {"run_id": run_id, "key": "note", "value": "x"}, key=key)[0] \
        == 200
    assert store.get_run(run_id).data.tags["mlflow.user"] == "alice"
    assert len(store.search_runs([experiment_id])) == 2


def test_the_servers_files_are_owner_only_and_no_password_is_on_a_command_line(server):
    root = server["root"] / "server"
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    files = ["api_keys.db", "basic_auth.ini", *(["mlflow.db", "basic_auth.db"] if "sqlite" in server["backend"] else [])]
    assert {name: stat.S_IMODE(os.stat(root / name).st_mode) for name in files} == {name: 0o600 for name in files}
    if "sqlite" in server["backend"]:
        return
    password = os.environ["PGPASSWORD"]
    assert "%" in password and urllib.parse.quote(password, safe="") in server["backend"]
    session = int((root / "server.pid").read_text())
    command_lines = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            command_lines.append((os.getsid(int(cmdline.split("/")[2])), open(cmdline, "rb").read()))
        except OSError:  # a process that ended meanwhile
            pass
    assert sum(sid == session for sid, _ in command_lines) >= 3  # mlflow server, uvicorn and its workers
    for _, command_line in command_lines:
        assert password.encode() not in command_line
        assert urllib.parse.quote(password, safe="").encode() not in command_line
    assert urllib.parse.quote(password, safe="") not in (root / "server.log").read_text()


# SQLite only: the proxy does not depend on the server's backend store.
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_the_tls_proxy_is_hardened(server, tmp_path):
    url, ca, proxy = server["url"], server["ca"], server["proxy_root"]
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    dumped = subprocess.run([nginx, "-T", "-c", str(proxy / "nginx.conf")], capture_output=True, text=True).stdout
    [ciphers] = re.findall(r"ssl_ciphers (\S+);", dumped)
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers.split(":"))
    assert re.findall(r"client_max_body_size (\S+);", dumped) == ["2g"]
    with urllib.request.urlopen(url + "/health", context=ssl.create_default_context(cafile=ca)) as response:
        max_age = int(re.fullmatch(r"max-age=(\d+)", response.headers["Strict-Transport-Security"])[1])
    assert max_age >= 365 * 86400
    master = (proxy / "nginx.pid").read_text().strip()
    workers = subprocess.run(["ps", "-o", "user=", "--ppid", master], capture_output=True, text=True).stdout.split()
    assert workers and "root" not in workers
    # ... and can write where nginx spools large bodies and responses.
    temp_dirs = re.findall(r'(?:client_body|proxy)_temp_path "?([^";]+)"?;', dumped)
    assert len(temp_dirs) == 2 and {pwd.getpwuid(os.stat(d).st_uid).pw_name for d in temp_dirs} == set(workers)
    # Password guessing is slowed, then refused (429), per address; API-key traffic is not.
    assert re.findall(r"limit_req_zone \$basic_auth_client zone=basic_auth:1m rate=(\S+);", dumped) == ["5r/s"]
    assert re.findall(r"limit_req zone=basic_auth burst=(\d+);", dumped) == ["20"]
    # How it behaves, on a proxy of its own that lets one password through a minute: 40 guesses
    # arrive within that minute however busy this machine is. The first is answered, the next 20
    # (the burst) wait their turn, a minute each, and the other 19 are refused at once. The same
    # proxy limits bodies to 1 KB: a 2 KB body is refused before MLflow sees it.
    port = free_port()
    slow_url = f"https://localhost:{port}"
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        slow = run_step("python", "serverFolder/tls_proxy.py", "--listen", f"127.0.0.1:{port}", "--login-rate", "1r/m",
                        "--max-body-size", "1k", "--upstream", server["upstream"],
                        "--cert", str(server["certs"] / "server.crt"),
                        "--key", str(server["certs"] / "server.key"), "--root", str(tmp_path))
        try:
            assert slow.returncode == 0, slow.stderr
            guesses = [pool.submit(call, slow_url, ca, search, basic=("admin", f"guess-{i}")) for i in range(40)]

            def answered() -> list[int]:  # the statuses of the guesses answered so far
                return sorted(guess.result()[0] for guess in guesses if guess.done() and not guess.exception())

            wait_until(lambda: len(answered()) >= 20, "20 guesses answered", timeout=60)
            assert answered() == [401] + [429] * 19  # and 20 wait their turn
            assert [call(slow_url, ca, search, key=server["key"])[0] for _ in range(40)] == [200] * 40
            too_big = {"name": "x" * 2048}
            assert call(slow_url, ca, "/api/2.0/mlflow/experiments/create", too_big, key=server["key"])[0] == 413
        finally:
            run_step("python", "serverFolder/tls_proxy.py", "--root", str(tmp_path), "--stop")  # ends the waiting ones
    assert "x" * 2048 not in experiment_names(server)


@pytest.mark.parametrize("source", [
    "mlflow-artifacts://other.host/0/models/m-0/artifacts", "mlflow-artifacts:/0/../../etc",
    "mlflow-artifacts:/0/./x", "mlflow-artifacts:/0/x\n", "mlflow-artifacts:", "file:///etc/passwd",
    "s3://bucket/model", "http://other.host/model", "runs:/0123456789abcdef/model", "/etc", "models:/alice-model/1",
    "models:/m-{model_id}\n", "models:/m-{model_id}/../x", " models:/m-{model_id}", "MODELS:/m-{model_id}",
])
def test_a_model_version_source_outside_the_servers_store_is_refused(server, source):
    url, ca, key = server["url"], server["ca"], server["key"]
    if not call(url, ca, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=alice-sources", key=key)[0] == 200:
        assert call(url, ca, "/api/2.0/mlflow/experiments/create", {"name": "alice-sources"}, key=key)[0] == 200
        call(url, ca, "/api/2.0/mlflow/registered-models/create", {"name": "alice-sources"}, key=key)
    store = mlflow.MlflowClient(server["backend"])
    experiment_id = store.get_experiment_by_name("alice-sources").experiment_id
    [model] = store.search_logged_models([experiment_id]) or [store.create_logged_model(experiment_id)]
    attempt = source.format(model_id=model.model_id.removeprefix("m-"))
    request = ("/api/2.0/mlflow/model-versions/create", {"name": "alice-sources", "source": attempt})
    # As alice, the auth app's own checks may refuse some first (403; a 500 for 'models:/m-<id>/../x').
    assert call(url, ca, *request, key=key)[0] >= 400
    # The admin skips the auth app's checks: the server's rule itself refuses (MLflow's own later
    # checks word it differently).
    status, text = call(url, ca, *request, basic=ADMIN)
    assert status == 400 and json.loads(text)["message"] == f"Invalid model version source: '{attempt}'.", text
    assert store.search_model_versions("name='alice-sources'") == []
    # The form MLflow 3 registers with is accepted.
    assert re.search(SOURCE_RULE, f"models:/{model.model_id}") and re.search(SOURCE_RULE, "mlflow-artifacts:/1/a/b")


def test_api_keys_expire_are_revoked_one_by_one_and_only_name_real_users(server, capsys):
    url, ca, keys = server["url"], server["ca"], server["keys"]
    # A key issued for a day works; one whose time is up (its expiry given, a second ago) does not.
    day = keys_script(capsys, "issue", "alice", "--db", keys, "--days", "1").strip()
    expired = keystore.issue_key(keys, "alice", expires=time.time() - 1)
    kept, revoked = (keys_script(capsys, "issue", "alice", "--db", keys).strip() for _ in range(2))
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    listed = keys_script(capsys, "list", "--db", keys).splitlines()
    [revoked_id] = [line.split()[2] for line in listed[-1:]]  # the newest key: `revoked`
    assert any("active until" in line for line in listed) and any("EXPIRED" in line for line in listed)
    day_id = hashlib.sha256(day.encode()).hexdigest()[:12]  # the id `list` shows
    [(created, expires)] = [(row[2], row[4]) for row in keystore.list_keys(keys) if row[1] == day_id]
    assert expires - created == pytest.approx(86400, abs=60)
    assert keys_script(capsys, "revoke", "--key", revoked_id[:8], "--db", keys) == \
        f"revoked key {revoked_id[:8]} of alice\n"
    assert [call(url, ca, search, key=k)[0] for k in (day, expired, kept, revoked)] == [200, 401, 200, 401]
    listed = keys_script(capsys, "list", "--db", keys)
    assert listed.count("REVOKED") >= 1
    before = os.path.getsize(keys), keystore.list_keys(keys)
    for args, message in [
        (("issue", "nobody-here"), "no user 'nobody-here' on the server; create it first (users.py create NAME)"),
        (("revoke", "--key", "zz"), "key id 'zz' is not allowed; give 6 or more hex digits of an id from 'list'"),
        (("revoke", "--key", "000000"), "key id '000000' matches 0 keys; give one id from 'list'"),
        (("issue", "alice", "--days", "-1"), "argument --days: '-1' is not allowed; give a number of days above 0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            api_keys.main([*args, "--db", keys])
        assert exit_info.value.code == 2 and capsys.readouterr().err == f"api_keys: error: {message}\n"
    assert (os.path.getsize(keys), keystore.list_keys(keys)) == before


def test_an_old_key_store_keeps_working(tmp_path):
    """A store made before keys could expire (no `expires` column) still lets its keys in."""
    path = str(tmp_path / "api_keys.db")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE api_keys (key_hash TEXT PRIMARY KEY, username TEXT NOT NULL, created REAL NOT NULL, "
                   "revoked REAL)")
        db.execute("INSERT INTO api_keys VALUES (?, 'olduser', 0, NULL)", (hashlib.sha256(b"old-key").hexdigest(),))
    assert keystore.user_of(path, "old-key") == "olduser"
    assert [row[0] for row in keystore.list_keys(path)] == ["olduser"]


@pytest.mark.parametrize("args, message", [
    (["--db", "/no/such/dir/x.db", "issue", "alice"], "no key store at /no/such/dir/x.db; shared_server.py creates "
                                                      "it (<root>/api_keys.db, or $MNISTFLOW_API_KEYS_DB)"),
    (["--db", "{tmp}/missing.db", "list"], "no key store at {tmp}/missing.db; shared_server.py creates "
                                           "it (<root>/api_keys.db, or $MNISTFLOW_API_KEYS_DB)"),
    (["--db", "{tmp}/missing.db", "revoke", "alice"], "no key store at {tmp}/missing.db; shared_server.py creates "
                                                      "it (<root>/api_keys.db, or $MNISTFLOW_API_KEYS_DB)"),
])
def test_api_keys_with_a_mistyped_store_says_so_and_writes_nothing(tmp_path, args, message):
    result = run_step("python", "serverFolder/api_keys.py", *(a.format(tmp=tmp_path) for a in args))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"api_keys: error: {message.format(tmp=tmp_path)}\n"
    assert os.listdir(tmp_path) == [] and not os.path.exists("/no/such")


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


# SQLite only: the client's checks do not depend on the server's backend store.
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
@pytest.mark.parametrize("key, ca, message", [
    (None, "server", "the tracking server {url} refused this client (HTTP 401): set AM_SC_API_KEY to your API key"),
    ("not-a-key", "server", "the tracking server {url} refused this client (HTTP 401): the key in AM_SC_API_KEY "
                            "is unknown, revoked or lacks permission; ask the server's admin"),
    ("valid", None, "the TLS certificate of {url} could not be verified with this machine's CAs: set "
                    "MLFLOW_TRACKING_SERVER_CERT_PATH to the CA certificate the server's admin gives you"),
])
def test_mlflow_run_stops_before_its_first_request_with_the_steps_line(server, tiny_data, key, ca, message):
    """`mlflow run`, as the README has users start steps, runs the access check in its own process
    (mnistflow/auth.py's request auth plugin), so MLflow's CLI neither fails with a traceback nor retries
    for minutes, and creates nothing."""
    env = {**user_env(server), "MLFLOW_EXPERIMENT_NAME": "refused-mlflow-run",
           "AM_SC_API_KEY": server["key"] if key == "valid" else key or ""}
    if ca is None:
        del env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    result = subprocess.run(["mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1",
                             "-P", f"data_dir={tiny_data}"], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == "mlflow run: error: " + message.format(url=server["url"])
    assert "refused-mlflow-run" not in experiment_names(server)


# SQLite only: the client's handling of a refusal does not depend on the server's backend store.
@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_a_model_name_another_user_owns_is_one_line_and_changes_nothing(server, tiny_data, monkeypatch):
    """Alice created a registered model name; bob, another user of the server, registering under it
    is told in one line that the name is hers and how to choose another (whether he may read it,
    as by default, or not), and the registry stays as it was."""
    from mnistflow import data, logged_model, models  # noqa: E402  (only this test logs a model itself)
    url, ca, name = server["url"], server["ca"], "alice-owned"
    assert call(url, ca, "/api/2.0/mlflow/registered-models/create", {"name": name}, key=server["key"])[0] == 200
    assert call(url, ca, "/api/2.0/mlflow/users/create", {"username": "bob-registers", "password": "bob-Pw-12345678"},
                basic=ADMIN)[0] == 200
    issued = run_step("python", "serverFolder/api_keys.py", "issue", "bob-registers", "--db", server["keys"])
    assert issued.returncode == 0, issued.stderr
    bob = {**user_env(server), "AM_SC_API_KEY": issued.stdout.strip(), "MLFLOW_EXPERIMENT_NAME": "bob-models"}
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_SERVER_CERT_PATH", "AM_SC_API_KEY", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(variable, bob[variable])
    mlflow.set_tracking_uri(url)
    try:
        mlflow.create_experiment("bob-models")
        with mlflow.start_run() as run:  # bob's model, logged as the train step logs one
            mlflow.set_tag("dataset", "mnist")
            logged_model.log(models.build("fast", "off"), data.load("mnist", tiny_data))
    finally:
        mlflow.set_tracking_uri(None)
    store = mlflow.MlflowClient(server["backend"])
    expected = (f"register: error: the registered model name '{name}' belongs to another user on {url} (HTTP 403); "
                "choose another name with model_name=<name> (--model_name <name>)")
    register = ["python", "-m", "steps.register", "--model_name", name, "--run_id", run.info.run_id,
                "--data_dir", tiny_data, "--force", "true"]  # past the gate, whatever the untrained net scores

    # Bob may read the name (the server's default): creating a version under it is refused.
    result = subprocess.run(register, cwd=ROOT, capture_output=True, text=True, env=bob, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == expected
    # Bob may not even read it: its champion cannot be read, which is not "no champion yet".
    assert call(url, ca, "/api/3.0/mlflow/users/permissions/grant", {"username": "bob-registers", "permission": "DENY",
                "resource_type": "registered_model", "resource_id": name}, basic=ADMIN)[0] == 200
    result = subprocess.run(register, cwd=ROOT, capture_output=True, text=True, env=bob, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == expected
    assert store.search_model_versions(f"name = '{name}'") == [] and store.get_registered_model(name).aliases == {}
