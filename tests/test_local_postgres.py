"""serverFolder/local_postgres.py: a password-protected PostgreSQL (scram-sha-256, never `trust`),
whose password is on no command line and in no URL, and whose databases are made without SQL
built from strings."""
import os
import shutil
import subprocess

import pytest
import sqlalchemy

from conftest import ROOT, free_port, refused_script, require, run_step, step_env
import local_postgres


@pytest.fixture
def cluster():
    """local_postgres.py run as the README runs it (no PGPASSWORD: it makes one and a pgpass file)."""
    require(local_postgres.available(), "PostgreSQL", "postgresql")
    root, port = f"/tmp/mnistflow-pg-test-{os.getpid()}", free_port()  # the postgres account must reach it
    env = {k: v for k, v in step_env().items() if not k.startswith("PG")}
    started = subprocess.run(["python", "serverFolder/local_postgres.py", "--root", root, "--port", str(port),
                              "mlflow", 'odd "name; DROP DATABASE mlflow'],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr
        yield root, port, started.stdout.splitlines()
    finally:
        local_postgres.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def test_connections_need_the_password_which_only_the_owner_can_read(cluster, monkeypatch):
    root, port, printed = cluster
    pgpass = os.path.join(root, "pgpass")
    assert printed == [f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow",
                       f"postgresql+psycopg2://postgres@127.0.0.1:{port}/odd%20%22name%3B%20DROP%20DATABASE%20mlflow",
                       f"export PGPASSFILE={pgpass}"]
    assert os.stat(pgpass).st_mode & 0o777 == 0o600
    with open(os.path.join(root, "data", "pg_hba.conf")) as f:
        rules = [line.split() for line in f if line.strip() and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules)
    for name in ("PGPASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", root)  # no ~/.pgpass of the user running the tests either
    query = sqlalchemy.text("SELECT datname FROM pg_database WHERE datname NOT LIKE 'template%' ORDER BY datname")
    engine = sqlalchemy.create_engine(printed[0])
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password"):
        engine.connect()
    engine.dispose()
    monkeypatch.setenv("PGPASSFILE", pgpass)
    engine = sqlalchemy.create_engine(printed[0])
    with engine.connect() as connection:  # the odd name is one database; nothing was dropped
        assert [row[0] for row in connection.execute(query)] == ["mlflow", 'odd "name; DROP DATABASE mlflow',
                                                                  "postgres"]
    engine.dispose()


def test_a_bad_port_is_one_line_and_starts_nothing(tmp_path):
    result = run_step("python", "serverFolder/local_postgres.py", "--root", str(tmp_path / "pg"), "--port", "0")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "local_postgres.py: error: argument --port: port '0' is not allowed; " \
                            "give a number from 1 to 65535\n"
    assert not (tmp_path / "pg").exists()


def test_a_folder_in_use_is_refused_before_its_owner_or_contents_change(tmp_path, monkeypatch, capsys):
    """Run as root, local_postgres.py hands --root to the postgres account: never one that holds something."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("mine\n")
    owner = os.stat(root).st_uid
    line = refused_script(monkeypatch, capsys, os.path.join(ROOT, "serverFolder", "local_postgres.py"),
                          "--root", str(root), "--port", str(free_port()))
    assert line == f"local_postgres.py: error: --root {root} is not empty; give a new or empty folder for the cluster"
    assert os.stat(root).st_uid == owner and os.listdir(root) == ["notes.txt"]
    assert (root / "notes.txt").read_text() == "mine\n" and os.stat(root / "notes.txt").st_uid == owner
