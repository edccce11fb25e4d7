"""The environment the MLproject declares (conda.yaml) builds and runs without conda:
`mlflow run . --env-manager uv` from a fresh clone, main and its steps all in the one it builds."""
import ast
import os
import shutil
import subprocess
import sys

import mlflow
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT, MLFLOW_PROJECT_ENV

from conftest import EXPERIMENT, ROOT, step_env

UV = shutil.which("uv", path=step_env()["PATH"])
pytestmark = pytest.mark.skipif(UV is None and os.environ.get("MNISTFLOW_REQUIRE_SERVERS") != "1",
                                reason="uv is not installed (pip install uv; it is in the dev extra)")

# pip's settings for where packages come from, and the uv environment variable taking each (uv's separator).
PIP_TO_UV = {"index-url": ("UV_INDEX_URL", " "), "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
             "find-links": ("UV_FIND_LINKS", ","), "constraint": ("UV_CONSTRAINT", " ")}


def uv_settings_from_pip() -> dict:
    """uv reads its own settings, not pip's: point it at the indexes, find-links and constraints
    pip is configured with on this machine (`pip config list`), so the environment is built from
    the same packages as the test's own."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    values = {}
    # Later sections win, as in pip: [global], then [install], then PIP_* environment variables.
    for section in ("global", "install", ":env:"):
        for line in listed:
            key, _, value = line.partition("=")
            key_section, _, name = key.rpartition(".")
            if key_section == section and name in PIP_TO_UV:
                values[name] = ast.literal_eval(value)  # pip prints each value as a Python string literal
    return {PIP_TO_UV[name][0]: PIP_TO_UV[name][1].join(value.split()) for name, value in values.items()}


def test_main_through_uv_builds_conda_yaml_once_and_runs_every_step_in_it(store, tiny_data, tmp_path):
    # `mlflow run . -e train --env-manager uv` is covered too: main launches train through the same
    # mlflow.projects.run(entry point, env_manager="uv") as that command.
    clone, env_root = str(tmp_path / "mnistflow"), str(tmp_path / "mlflow_envs")
    subprocess.run(["git", "clone", "--quiet", ROOT, clone], check=True)
    env = {**step_env(), **uv_settings_from_pip(), "MLFLOW_ENV_ROOT": env_root,
           "UV_PYTHON_DOWNLOADS": "never"}  # a Python 3.11 of this machine, never one from the network
    # uv does not compile bytecode at install (pip does): without the .pyc files Python writes on
    # first import, every step would compile torch's and MLflow's sources again (about 10 s of CPU each).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    result = subprocess.run(["mlflow", "run", ".", "--env-manager", "uv", "-P", "epochs=2", "-P", "n_trials=1",
                             "-P", "tune_epochs=1", "-P", f"data_dir={tiny_data}",
                             "-P", f"storage=sqlite:///{tmp_path}/optuna.db", "-P", "model_name=UvPipeline",
                             "-P", "min_accuracy=0.5", "-P", "recall_margin=1", "-P", "min_robust_accuracy=0",
                             "-P", "max_latency_ms=100000"],
                            cwd=clone, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    [built] = os.listdir(env_root)  # one environment for the pipeline and its four steps
    env_dir = os.path.join(env_root, built)
    for entry_point in ("main", "train", "tune", "register", "plot_loss"):
        # MLflow's log of each command it starts: in that environment, activated.
        assert f"source {env_dir}/bin/activate && python -m steps.{entry_point} " in result.stderr, entry_point
    [pipeline_run] = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                        filter_string=f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = 'main'")
    steps = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                               filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{pipeline_run.info.run_id}'")
    assert sorted(run.data.tags[MLFLOW_PROJECT_ENTRY_POINT] for run in steps) == ["plot_loss", "register", "train", "tune"]
    assert all(run.data.tags[MLFLOW_PROJECT_ENV] == "uv" for run in [pipeline_run, *steps])
    # The environment has its own Python, torch and MLflow, and the clone installed (conda.yaml's `-e .`).
    where = subprocess.run([f"{env_dir}/bin/python", "-c", "import importlib.util as u, sys; print(sys.prefix, "
                            "*(u.find_spec(name).origin for name in ('torch', 'mlflow', 'mnistflow')))"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.split()
    assert where[0] == env_dir and all(path.startswith(env_dir + "/") for path in where[1:3])
    assert where[3] == os.path.join(clone, "mnistflow", "__init__.py")
    shutil.rmtree(env_root)  # gigabytes where uv copied its cache instead of linking it (on another file system)
