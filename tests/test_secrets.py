"""An Optuna storage URL that holds a password is refused at every entry point before anything is
logged (`mlflow run` logs its -P values itself, before a step starts), and the whole URL given in
$MNISTFLOW_OPTUNA_STORAGE is used but never logged, stored or printed."""
import glob
import os

import mlflow
import optuna
import pytest

from conftest import EXPERIMENT, refused_step, run_step
from mnistflow import cli_guard

SECRET = "S3cret-pw-9f2c"
REFUSAL = ("carries a password, and parameters are logged and printed: put the password in PGPASSWORD or "
           "~/.pgpass, or the whole URL in the environment variable MNISTFLOW_OPTUNA_STORAGE, which no step "
           "logs or prints")
IN_USER_PART = f"postgresql://optuna:{SECRET}@127.0.0.1:1/optuna"
IN_QUERY = f"postgresql://optuna@127.0.0.1:1/optuna?password={SECRET}"


# The steps in this process (their command lines have tests of their own); `mlflow run`, which
# refuses in its own process before it creates a run (cli_guard.py), through its command line.
@pytest.mark.parametrize("step, storage, shown", [
    ("tune", IN_USER_PART, "tune: error: storage 'postgresql://optuna:***@127.0.0.1:1/optuna'"),
    ("main", IN_QUERY, "main: error: storage 'postgresql://optuna@127.0.0.1:1/optuna?password=hidden'"),
])
def test_a_storage_with_a_password_is_refused_before_anything_is_logged(monkeypatch, capsys, store, step, storage,
                                                                        shown):
    assert refused_step(monkeypatch, capsys, f"steps.{step}", "--storage", storage) == f"{shown} {REFUSAL}"
    assert mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list") == []


@pytest.mark.parametrize("entry_point, storage, shown", [
    (["-e", "tune"], IN_USER_PART, "mlflow run: error: storage 'postgresql://optuna:***@127.0.0.1:1/optuna'"),
    ([], IN_QUERY, "mlflow run: error: storage 'postgresql://optuna@127.0.0.1:1/optuna?password=hidden'"),
])
def test_a_storage_with_a_password_is_refused_by_mlflow_run_before_anything_is_logged(store, entry_point, storage,
                                                                                      shown):
    result = run_step("mlflow", "run", ".", *entry_point, "--env-manager", "local", "-P", f"storage={storage}",
                      timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{shown} {REFUSAL}"] and result.stdout == ""
    assert mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list") == []  # not even a RUNNING run


@pytest.mark.parametrize("args", [
    ["-e", "tune", "-P", "storage=x", "-P", "a=1"], ["-Pstorage=x", "-Pa=1"], ["--param-list", "storage=x", "-Pa=1"],
    ["--param-list=storage=x", "--param-list=a=1", "--env-manager", "local"],
])
def test_the_mlflow_run_check_reads_every_spelling_of_a_parameter(args):
    assert cli_guard.run_parameters(args) == {"storage": "x", "a": "1"}
    assert cli_guard.is_mlflow_run_command(["/venv/bin/mlflow", "run", *args])
    assert not cli_guard.is_mlflow_run_command(["/venv/bin/mlflow", "server", *args])


def secret_storage(folder) -> str:
    """An SQLite storage under a directory named after the secret: it stands in for a URL with a
    password, as any copy of the URL anywhere would carry it."""
    os.makedirs(folder / SECRET, exist_ok=True)
    return f"sqlite:///{folder}/{SECRET}/optuna.db"


def assert_never_recorded(store_folder, outputs: list[str]) -> None:
    """The secret is in nothing MLflow stored in the `store` fixture's folder (params, tags,
    metrics: the SQLite file; artifacts: their files) and in nothing printed."""
    stored = [store_folder / "mlflow.db", *glob.glob(str(store_folder / "artifacts" / "**" / "*"), recursive=True)]
    leaks = [str(path) for path in stored if os.path.isfile(path) and SECRET.encode() in open(path, "rb").read()]
    assert leaks == [] and not any(SECRET in output for output in outputs)
    assert len(mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")) > 1  # it did log


# The pipeline, which runs the tune step through `mlflow run`'s machinery (mlflow.projects.run),
# with the storage in the environment: test_pipeline.py's chain test.
def test_the_storage_in_the_environment_is_used_and_never_recorded(store, tiny_data, tmp_path, monkeypatch):
    storage = secret_storage(tmp_path)
    monkeypatch.setenv("MNISTFLOW_OPTUNA_STORAGE", storage)
    result = run_step("python", "-m", "steps.tune", "--n_trials", "1", "--epochs", "1", "--data_dir", tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "study mnist-cnn (0 trials so far) in $MNISTFLOW_OPTUNA_STORAGE" in result.stdout + result.stderr
    assert len(optuna.load_study(study_name="mnist-cnn", storage=storage).trials) == 1
    assert_never_recorded(tmp_path, [result.stdout + result.stderr])


def mlflow_run_parameters(parameters: dict) -> list[str]:
    return [arg for name, value in parameters.items() for arg in ("-P", f"{name}={value}")]
