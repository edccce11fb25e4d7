"""Chaining entry points: run one through `mlflow.projects.run` as a child of the active run, or
reuse its earlier run when nothing that matters has changed (the MLflow multistep-workflow way).
"""
import os
import shlex
from dataclasses import dataclass

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PROJECT_ENTRY_POINT, MLFLOW_PROJECT_ENV

from mnistflow import tracking

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class StepRun:
    entry_point: str
    run: mlflow.entities.Run
    reused: bool


def env_manager(run: mlflow.entities.Run) -> str:
    """The environment manager `mlflow run` used for `run`: it tags conda, virtualenv and uv; local goes untagged."""
    return run.data.tags.get(MLFLOW_PROJECT_ENV, "local")


def finished_run(entry_point: str, parameters: dict, git_commit: str, experiment_id: str):
    """The newest FINISHED run of this entry point with these parameters at this git commit, or None.

    Parameters are compared as MLflow stores those of `mlflow run`: as shell-quoted strings
    (an empty value is stored as '').
    """
    expected = {key: shlex.quote(value) for key, value in parameters.items()}
    candidates = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}' AND attributes.status = 'FINISHED'")
    for run in candidates:
        if run.data.tags.get(MLFLOW_GIT_COMMIT) == git_commit and \
                all(run.data.params.get(key) == value for key, value in expected.items()):
            return run
    return None


def get_or_run(entry_point: str, parameters: dict, env: str, force: bool = False) -> StepRun:
    """Run an entry point of this project as a child of the active run, unless an identical run
    FINISHED before (and not `force`). Raises mlflow's ExecutionException when the step fails."""
    parameters = {key: str(value) for key, value in parameters.items()}
    parent = mlflow.active_run()
    commit = tracking.git_commit()
    if not force:
        earlier = finished_run(entry_point, parameters, commit, parent.info.experiment_id)
        if earlier is not None:
            print(f"== {entry_point}: reusing run {earlier.info.run_id} (same parameters, commit {commit[:8]})",
                  flush=True)
            return StepRun(entry_point, earlier, reused=True)
    print(f"== {entry_point}: running {' '.join(f'{k}={v}' for k, v in parameters.items())}", flush=True)
    submitted = mlflow.projects.run(PROJECT_DIR, entry_point, parameters=parameters, env_manager=env,
                                    experiment_id=parent.info.experiment_id, synchronous=True)
    return StepRun(entry_point, mlflow.get_run(submitted.run_id), reused=False)
