"""The run life cycle against a real SQLite store: how a run ends, what a failed write or a Ctrl-C
does, the tags that record it, and the liveness that resuming a run relies on."""
import os
import subprocess
import sys

import mlflow
import pytest

from conftest import ctrl_c_at_the_next_write_commit
from mnistflow import tracking


def test_run_ends_finished_failed_or_killed(store):
    with tracking.tracked_run() as (run, log_metrics):
        log_metrics({"x": 1.0}, 1)
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    assert mlflow.get_run(run.info.run_id).data.metrics == {"x": 1.0}

    with pytest.raises(RuntimeError):
        with tracking.tracked_run() as (run, log_metrics):
            log_metrics({"x": 2.0}, 1)
            raise RuntimeError("crash mid-training")
    crashed = mlflow.get_run(run.info.run_id)
    assert crashed.info.status == "FAILED"
    assert crashed.data.metrics == {"x": 2.0}  # what was measured before the crash is kept

    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run() as (run, _):
            raise KeyboardInterrupt
    assert mlflow.get_run(run.info.run_id).info.status == "KILLED"


def test_a_run_that_cannot_be_ended_says_so_and_keeps_the_interrupt(store, capsys):
    # Any other write interrupted mid-commit still locks the database for this process (for
    # MLflow's 20 s busy timeout): the user gets Ctrl-C's exit and one line, not a store traceback.
    with ctrl_c_at_the_next_write_commit() as arm, pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run() as (run, _):
            arm()
            mlflow.set_tag("note", "written while Ctrl-C is pressed")
    assert f"warning: run {run.info.run_id} could not be ended KILLED and stays RUNNING: " in capsys.readouterr().out
    assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"


def test_a_metric_that_cannot_be_written_fails_the_run(store):
    with pytest.raises(mlflow.exceptions.MlflowException):
        with tracking.tracked_run() as (run, log_metrics):
            log_metrics({"ok": 1.0}, 1)
            log_metrics({"bad key?!": 1.0}, 1)  # MLflow rejects this name when it writes
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"


def test_logged_config_reads_the_settings_of_runs_from_before_mirror_and_augment(store):
    def logged(config: dict) -> dict:
        with mlflow.start_run() as run:
            mlflow.log_dict(config, "config.yaml")
        return tracking.logged_config(run.info.run_id)

    assert logged({"model": "fast", "dataset": "fashion_mnist"}) == {
        "model": "fast", "dataset": "fashion_mnist", "mirror": "off", "augment": "none"}
    # from when shift was an on/off setting of its own
    assert logged({"model": "fast", "mirror": "on", "shift": "on"}) == {"model": "fast", "mirror": "on", "augment": "shift"}
    assert logged({"model": "fast", "mirror": "on", "shift": "off"}) == {"model": "fast", "mirror": "on", "augment": "none"}
    assert logged({"model": "fast", "mirror": "on", "augment": "affine"}) == {"model": "fast", "mirror": "on", "augment": "affine"}


def test_run_tags_record_the_code_and_the_person():
    tags = tracking.run_tags("production", "fashion_mnist", note="Run 3")
    assert len(tags["git_commit"]) == 40
    assert tags["git_dirty"] in ("true", "false")
    assert tags["phase"] == "production" and tags["dataset"] == "fashion_mnist"
    assert tags["mlflow.note.content"] == "Run 3"
    assert "mlflow.note.content" not in tracking.run_tags("development", "mnist")


def test_importing_mnistflow_sets_mlflow_defaults_but_keeps_the_users():
    show = "import os, mnistflow; print(os.environ['MLFLOW_DEFAULT_PREDICTION_DEVICE'])"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DEFAULT_PREDICTION_DEVICE"}
    # cpu: logged pt2 models cannot be moved to a GPU, where MLflow would otherwise load them.
    for users_value, expected in ((None, "cpu"), ("cuda:1", "cuda:1")):
        if users_value:
            env["MLFLOW_DEFAULT_PREDICTION_DEVICE"] = users_value
        assert subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True,
                              check=True).stdout == expected + "\n"


def test_a_running_run_is_alive_while_its_process_lives_or_it_wrote_recently(store):
    with mlflow.start_run() as run:
        mlflow.log_metric("epoch_time_s", 100.0, step=1)
        mlflow.set_tags(tracking.process_tags())
        this_process = mlflow.get_run(run.info.run_id)
        assert "its process" in tracking.still_alive(this_process)

        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        mlflow.set_tag("pid", str(dead.pid))
        assert tracking.still_alive(mlflow.get_run(run.info.run_id)) is None

        # On another machine: alive while silent less than twice the longest epoch (200 s here).
        mlflow.set_tag("host", "another-machine")
        elsewhere = mlflow.get_run(run.info.run_id)
        assert "less than 200 s" in tracking.still_alive(elsewhere)
        [last_write] = mlflow.MlflowClient().get_metric_history(run.info.run_id, "epoch_time_s")
        assert tracking.still_alive(elsewhere, now=last_write.timestamp / 1000 + 199) is not None
        assert tracking.still_alive(elsewhere, now=last_write.timestamp / 1000 + 201) is None
