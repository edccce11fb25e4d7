"""The scripts of serverFolder/ and bench/server_load.py on input they must refuse: one line, and
nothing written, started or stopped. Run in this process (each script's command line is run
elsewhere: tests/test_server.py, tests/test_shared_server.py)."""
import hashlib
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, free_port, refused_script
import api_keys  # serverFolder/'s scripts (conftest puts the folder on sys.path)
import local_server
from mnistflow import keystore

SCRIPTS = os.path.join(ROOT, "serverFolder")


def script(name: str) -> str:
    return os.path.join(SCRIPTS, f"{name}.py")


def files_under(path) -> dict:
    """Every file under `path` with a hash of its content, and every folder."""
    found = {}
    for folder, folders, names in os.walk(path):
        found.update({os.path.join(folder, name): None for name in folders})
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.join(folder, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.mark.parametrize("args, message", [
    (["--server-name", "example.org; error_log /tmp/x"],
     "--server-name 'example.org; error_log /tmp/x' is not allowed; give a host name or an IP address"),
    (["--server-name", "example.org\n}}"],
     "--server-name 'example.org\\n}}' is not allowed; give a host name or an IP address"),
    (["--server-name", "fe80::1%x;y"], "--server-name 'fe80::1%x;y' is not allowed; give a host name or an IP address"),
    (["--server-name", '"quoted"'], "--server-name '\"quoted\"' is not allowed; give a host name or an IP address"),
    (["--cert", '{tmp}/server.crt"; error_log /tmp/x'],
     "--cert '{tmp}/server.crt\"; error_log /tmp/x' is not allowed; nginx.conf takes a path without a double quote, backslash, '$' or control character"),
    (["--key", "{tmp}/key\nerror_log /tmp/x"], "--key '{tmp}/key\\nerror_log /tmp/x' is not allowed; nginx.conf takes a path without a double quote, backslash, '$' or control character"),
    (["--root", "{tmp}/proxy\\"], "--root '{tmp}/proxy\\\\' is not allowed; nginx.conf takes a path without a double quote, backslash, '$' or control character"),
    (["--root", "{tmp}/$proxy"], "--root '{tmp}/$proxy' is not allowed; nginx.conf takes a path without a double quote, backslash, '$' or control character"),
    (["--cert", "{tmp}/missing.crt"],
     "--cert {tmp}/missing.crt is not a file; make the certificate and key with serverFolder/make_certs.sh"),
    (["--listen", "127.0.0.1;evil:8443"],
     "argument --listen: '127.0.0.1;evil:8443' is not allowed; give HOST:PORT, e.g. 127.0.0.1:8443"),
    (["--upstream", "[::1:5000"],
     "argument --upstream: '[::1:5000' is not allowed; give HOST:PORT, e.g. 127.0.0.1:8443"),
    (["--upstream", "::1:5000"], "argument --upstream: '::1:5000' is not allowed; give HOST:PORT, e.g. 127.0.0.1:8443"),
    (["--timeout", "nan"], "argument --timeout: 'nan' is not allowed; give a number of seconds above 0"),
])
def test_tls_proxy_writes_no_value_nginx_would_parse(tmp_path, monkeypatch, capsys, args, message):
    """nginx.conf takes its values as written: each of these would end a directive or add one, or
    name a variable. (A path with a space, ';' or '{' works: tests/test_shared_server.py's proxy has one.)"""
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_text("")
    before = files_under(tmp_path)
    given = ["--listen", f"127.0.0.1:{free_port()}", "--timeout", "5", "--root", str(tmp_path / "proxy"),
             "--cert", str(tmp_path / "server.crt"), "--key", str(tmp_path / "server.key"), *args]
    line = refused_script(monkeypatch, capsys, script("tls_proxy"), *(a.format(tmp=tmp_path) for a in given))
    assert line == f"tls_proxy.py: error: {message.format(tmp=tmp_path)}"
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("name", ["local_server", "shared_server", "local_postgres", "tls_proxy", "local_slurm"])
@pytest.mark.parametrize("root, where", [("/dev/null/x", "/dev/null"), ("{tmp}/file/x", "{tmp}/file")])
def test_a_root_that_cannot_be_a_folder_is_one_line(tmp_path, monkeypatch, capsys, name, root, where):
    (tmp_path / "file").write_text("")
    root = root.format(tmp=tmp_path)
    line = refused_script(monkeypatch, capsys, script(name), "--root", root)
    assert line == f"{name}.py: error: argument --root: {root!r} is not allowed; {where.format(tmp=tmp_path)} " \
                   "is not a folder"
    assert os.listdir(tmp_path) == ["file"]


def test_local_slurm_refuses_a_root_slurm_conf_cannot_name(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "my slurm")  # slurm.conf would read "StateSaveLocation=/…/my" and a stray word
    line = refused_script(monkeypatch, capsys, script("local_slurm"), "--root", root)
    assert line == f"local_slurm.py: error: argument --root: {root!r} is not allowed; slurm.conf takes a path of " \
                   "letters, digits and _ . - / + @ only"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("option, env", [("--backend-store-uri", "MLFLOW_BACKEND_STORE_URI"),
                                         ("--auth-db-uri", "MNISTFLOW_AUTH_DB_URI")])
def test_shared_server_refuses_a_password_in_a_store_uris_query(tmp_path, monkeypatch, capsys, option, env):
    """The steps' storage check (mnistflow.config), which also looks at the query (libpq's ?password=)."""
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        monkeypatch.setenv(name, "test-secret")
    line = refused_script(monkeypatch, capsys, script("shared_server"), "--root", str(tmp_path / "server"),
                          "--allowed-hosts", "localhost", "--port", str(free_port()),
                          option, "postgresql+psycopg2://mlflow@127.0.0.1/mlflow?sslmode=require&password=s3cret")
    assert line == f"shared_server.py: error: {option} carries a password, which every user of this machine can " \
                   f"read on a command line; leave it out (PGPASSWORD, ~/.pgpass) or pass the whole URI in {env}"
    assert os.listdir(tmp_path) == []


def sigterm_waiting(pid: int) -> bool:
    """Whether a SIGTERM was sent to process `pid` and waits there (it blocks the signal)."""
    with open(f"/proc/{pid}/status") as f:
        pending = [int(value, 16) for key, value in re.findall(r"^(ShdPnd|SigPnd):\s*(\w+)", f.read(), re.M)]
    return any(mask & 1 << (signal.SIGTERM - 1) for mask in pending)


@pytest.fixture
def bystander():
    """A process in a session of its own, as a server is, that blocks SIGTERM: one sent to it stays
    pending, where `sigterm_waiting` sees it."""
    process = subprocess.Popen([sys.executable, "-c", "import signal, sys; "
                                "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); print(flush=True); "
                                "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               start_new_session=True)
    process.stdout.readline()  # SIGTERM is blocked from here on
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("name", ["local_server", "tls_proxy"])
@pytest.mark.parametrize("start_time", [None, "1"])
def test_stop_leaves_a_process_that_is_not_its_server_alone(tmp_path, monkeypatch, bystander, name, start_time):
    """server.pid names a process that is not the one started there: a pid written by hand or by
    an older version (no start time), or one reused by another process (another start time)."""
    (tmp_path / "server.pid").write_text(str(bystander.pid))
    if start_time is not None:
        (tmp_path / "server.started").write_text(start_time)
    monkeypatch.setattr(sys, "argv", [script(name), "--root", str(tmp_path), "--stop"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(script(name), run_name="__main__")
    assert exit.value.code == f"{name}: pid {bystander.pid} in {tmp_path}/server.pid is not the server started " \
                              "there (it ended, or the pid now names another process); nothing stopped"
    assert bystander.poll() is None and not sigterm_waiting(bystander.pid)


def test_stop_ends_the_server_it_started(tmp_path):
    """A stand-in server (Python's, whose /health is a file) launched and stopped as the scripts do."""
    (tmp_path / "health").write_text("ok")
    port = free_port()
    local_server.launch("test", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                                 str(tmp_path), str(port)], str(tmp_path), f"http://127.0.0.1:{port}", timeout=30)
    pid = int((tmp_path / "server.pid").read_text())
    local_server.stop("test", str(tmp_path))
    _, status = os.waitpid(pid, 0)  # it is this process's child
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not (tmp_path / "server.pid").exists() and not (tmp_path / "server.started").exists()


@pytest.mark.parametrize("kind", ["text", "mlflow"])
@pytest.mark.parametrize("args", [["list"], ["revoke", "alice"], ["issue", "alice"]])
def test_api_keys_refuses_a_file_that_is_not_a_key_store(tmp_path, request, capsys, kind, args):
    if kind == "mlflow":  # a real MLflow tracking store: an SQLite file with tables of its own
        path = request.getfixturevalue("store").removeprefix("sqlite:///")
    else:
        path = str(tmp_path / "notes.txt")
        (tmp_path / "notes.txt").write_text("not a database\n")
    before, mode = files_under(tmp_path), os.stat(path).st_mode
    capsys.readouterr()  # what making the MLflow store printed
    with pytest.raises(SystemExit) as exit:
        api_keys.main([*args, "--db", path])
    reason = "it is not an SQLite database" if kind == "text" else "it is another SQLite database (tables "
    assert exit.value.code == 2 and capsys.readouterr().err.startswith(f"api_keys: error: {path} is not a key "
                                                                       f"store: {reason}")
    assert files_under(tmp_path) == before
    with pytest.raises(keystore.KeyStoreError):  # shared_server.py's start, with $MNISTFLOW_API_KEYS_DB
        keystore.create_store(path)
    assert files_under(tmp_path) == before and os.stat(path).st_mode == mode


@pytest.mark.parametrize("database_uri, message", [
    # MLflow reads the ini with interpolation, where a '%' is written '%%'.
    ("postgresql://auth:pw%41x@127.0.0.1/auth", "database_uri has a '%' not written '%%' (MLflow reads the file "
                                                "with interpolation)"),
    ("postgresql//auth:secret@127.0.0.1/auth", "database_uri is not a database URL (dialect://user@host/name)"),
    ("postgresq://auth:secret@127.0.0.1/auth", "database_uri names a database this Python has no driver for"),
])
def test_api_keys_names_what_is_wrong_in_the_auth_ini_but_not_its_value(tmp_path, capsys, database_uri, message):
    keys = str(tmp_path / "api_keys.db")
    keystore.create_store(keys)
    (tmp_path / "basic_auth.ini").write_text(f"[mlflow]\ndatabase_uri = {database_uri}\n")
    with pytest.raises(SystemExit) as exit:
        api_keys.main(["issue", "alice", "--db", keys, "--auth-config", str(tmp_path / "basic_auth.ini")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"api_keys: error: {tmp_path}/basic_auth.ini: {message}\n"
    assert keystore.list_keys(keys) == []


@pytest.mark.parametrize("args, message", [
    (["--clients", "0"], "argument --clients: '0' is not allowed; give a whole number above 0"),
    (["--rounds", "0"], "argument --rounds: '0' is not allowed; give a whole number above 0"),
    (["--seconds", "0"], "argument --seconds: '0' is not allowed; give a number of seconds above 0"),
    (["--seconds", "inf"], "argument --seconds: 'inf' is not allowed; give a number of seconds above 0"),
    (["--workers", "two"], "argument --workers: 'two' is not allowed; give a whole number above 0"),
])
def test_server_load_checks_its_flags_before_starting_any_server(tmp_path, monkeypatch, capsys, args, message):
    """Its PostgreSQL and servers would live in temporary folders: none is made."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    line = refused_script(monkeypatch, capsys, os.path.join(ROOT, "bench", "server_load.py"), *args)
    assert line == f"server_load: error: {message}"
    assert os.listdir(tmp_path) == []
