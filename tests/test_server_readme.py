"""docs/server.md's commands, run as written: the backup of a local server and the whole
shared-server setup (PostgreSQL, the shared server, TLS, a user and her key), then its take-down.

They run in a scratch directory holding a copy of serverFolder/, so the stores and certificates
they make in serverFolder/… land there; only the fixed ports (5000, 5432, 8443) and /tmp/pg become
free ones, and the '…' placeholders of the secrets get values."""
import os
import re
import shutil
import sqlite3
import subprocess

import mlflow
import pytest

from conftest import ROOT, free_port, require, step_env
from test_shared_server import call

README = os.path.join(ROOT, "docs", "server.md")


def fenced_blocks(section: str) -> list[str]:
    """The ```bash blocks of the README section whose heading is `section`."""
    text = open(README).read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.S)


def scratch_copy(tmp_path) -> str:
    """tmp_path/work with a copy of serverFolder's files (not its stores)."""
    work = tmp_path / "work"
    (work / "serverFolder").mkdir(parents=True)
    for name in os.listdir(os.path.join(ROOT, "serverFolder")):
        if os.path.isfile(os.path.join(ROOT, "serverFolder", name)):
            shutil.copy2(os.path.join(ROOT, "serverFolder", name), work / "serverFolder" / name)
    return str(work)


def run_script(script: str, cwd: str, env: dict, stdin: str = "") -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, input=stdin,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_backup_commands_work_as_written(tmp_path):
    require(bool(shutil.which("sqlite3")), "the sqlite3 command", "sqlite3")
    work = scratch_copy(tmp_path)
    [start_block, backup_block] = fenced_blocks("A server on your own machine")
    port = str(free_port())  # instead of the default 5000, which another server may hold
    start = "\n".join(line.replace("local_server.py ", f"local_server.py --port {port} ", 1)
                      for line in start_block.splitlines() if line.startswith(("python", "export")))
    assert start.count("\n") == 2  # start, export, stop: the user's `mlflow run` (real MNIST) is left out
    run_script("\n".join(start.splitlines()[:2]), work, step_env())
    try:
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        run_id = client.create_run("0").info.run_id
        client.log_text(run_id, "kept", "note.txt")
    finally:
        run_script(start.splitlines()[-1], work, step_env())  # the README's --stop
    run_script(backup_block, work, step_env())  # "stop the server (...) and copy both stores"
    with sqlite3.connect(os.path.join(work, "backup", "mlflow.db")) as backup:
        assert backup.execute("SELECT run_uuid FROM runs").fetchall() == [(run_id,)]
    [note] = [os.path.join(d, "note.txt") for d, _, files in os.walk(os.path.join(work, "backup", "artifacts"))
              if "note.txt" in files]
    assert open(note).read() == "kept"


def test_the_shared_setup_works_as_written(tmp_path):
    require(bool(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")), "nginx", "nginx-light")
    from local_postgres import available

    require(available(), "PostgreSQL", "postgresql")
    work = scratch_copy(tmp_path)
    [setup] = fenced_blocks("A shared server")[:1]
    take_down = re.findall(r"`([^`]*--stop)`", open(README).read().split("To take it down:", 1)[1].split("\n\n")[0])
    # /tmp/pg itself: the postgres account (the tests run as root) cannot enter pytest's directories.
    pg_root = f"/tmp/mnistflow-readme-pg-{os.getpid()}"
    ports = {"5432": str(free_port()), "5000": str(free_port()), "8443": str(free_port())}

    def as_here(script: str) -> str:
        script = re.sub(r"\b(5432|5000|8443)\b", lambda m: ports[m[1]], script).replace("/tmp/pg", pg_root)
        return script.replace("'…'", "'readme-Secret-pw-1'")

    lines = [line for line in as_here(setup).splitlines() if not line.startswith("pip install")]
    env = {k: v for k, v in step_env().items() if not k.startswith(("PG", "MLFLOW_", "MNISTFLOW_"))}
    try:
        done = run_script("\n".join(lines), work, env, stdin="alice-Pw-123456\n")
        key = done.stdout.strip().splitlines()[-1]
        url, ca = f"https://localhost:{ports['8443']}", os.path.join(work, "serverFolder", "tls", "ca.crt")
        status, _ = call(url, ca, "/api/2.0/mlflow/experiments/create", {"name": "alice-readme"}, key=key)
        assert status == 200
        assert os.stat(os.path.join(pg_root, "pgpass")).st_mode & 0o077 == 0
    finally:
        run_script(" || true\n".join(as_here(command) for command in take_down) + " || true", work, env)
        shutil.rmtree(pg_root, ignore_errors=True)
    assert len(take_down) == 3
    with pytest.raises(OSError):  # taken down: nothing answers any more
        call(url, ca, "/health")
