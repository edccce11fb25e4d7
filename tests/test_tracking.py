"""The run life cycle against a real SQLite store: how a run ends, what a failed write does, and\nthe checkpoints and liveness that resuming a run relies on."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import mlflow
import pytest
import sqlalchemy
import torch

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


@contextlib.contextmanager
def ctrl_c_at_the_next_write_commit():
    """Send this process a real SIGINT while SQLAlchemy commits the next write; yield the arming call."""
    armed = []

    def ctrl_c_mid_commit(connection):
        if armed and connection.connection.dbapi_connection.in_transaction:  # a write, not a read
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "commit", ctrl_c_mid_commit)
    try:
        yield lambda: armed.append(True)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "commit", ctrl_c_mid_commit)
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_a_checkpoint_is_stored_still_ends_the_run_killed(store, tmp_path):
    # Handled inside the commit, that Ctrl-C left the SQLite transaction open and the database
    # locked, so the run could not be ended KILLED and stayed RUNNING (seen in CI).
    with ctrl_c_at_the_next_write_commit() as arm, pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run() as (run, _):
            arm()
            tracking.checkpoint_saver(str(tmp_path))({"epoch": 1, "history": [{}]})
            raise AssertionError("the Ctrl-C was lost")
    run = mlflow.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.CHECKPOINT_TAG] == "1"  # the saver finished before it stopped


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


def test_logged_config_reads_mirror_and_shift_off_for_a_run_from_before_them(store):
    with mlflow.start_run() as run:
        mlflow.log_dict({"model": "fast", "dataset": "fashion_mnist"}, "config.yaml")
    assert tracking.logged_config(run.info.run_id) == {"model": "fast", "dataset": "fashion_mnist",
                                                       "mirror": "off", "shift": "off"}
    with mlflow.start_run() as run:
        mlflow.log_dict({"model": "fast", "mirror": "on", "shift": "on"}, "config.yaml")
    assert tracking.logged_config(run.info.run_id) == {"model": "fast", "mirror": "on", "shift": "on"}


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


def saved_checkpoints(epochs: int) -> str:
    """A train-like run whose saver stored `epochs` checkpoints and logged their val_loss; its id."""
    with tracking.tracked_run() as (run, log_metrics), tempfile.TemporaryDirectory() as tmp:
        save = tracking.checkpoint_saver(tmp)
        for epoch in range(1, epochs + 1):
            save({"epoch": epoch, "history": [{"val_loss": 1.0 / e} for e in range(1, epoch + 1)]})
            log_metrics({"val_loss": 1.0 / epoch}, epoch)
    return run.info.run_id


def stored_checkpoint(run_id: str, name: str) -> str:
    return os.path.join(local_artifact_dir(run_id), tracking.CHECKPOINTS, name)


def local_artifact_dir(run_id: str) -> str:
    return mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")


def checkpoint_names(run_id: str) -> list[str]:
    return sorted(os.path.basename(f.path) for f in mlflow.MlflowClient().list_artifacts(run_id, tracking.CHECKPOINTS))


def test_each_epoch_is_a_new_checkpoint_and_the_two_newest_stay(store):
    run_id = saved_checkpoints(4)
    # A crash while epoch 4 was written could only tear epoch_004.pt: epoch_003.pt stays whole.
    assert checkpoint_names(run_id) == ["epoch_003.pt", "epoch_004.pt"]
    assert tracking.resume_state(run_id)["epoch"] == 4


def test_a_torn_newest_checkpoint_resumes_from_the_one_before_and_says_so(store, capsys):
    run_id = saved_checkpoints(3)
    path = stored_checkpoint(run_id, "epoch_003.pt")
    with open(path, "r+b") as f:  # what a crash in the middle of its copy leaves
        f.truncate(os.path.getsize(path) // 2)
    assert tracking.resume_state(run_id)["epoch"] == 2
    assert f"checkpoint epoch_003.pt of run {run_id} is unreadable" in capsys.readouterr().out


def test_a_run_from_before_epoch_checkpoints_resumes_from_its_last_pt(store):
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        torch.save({"epoch": 2, "history": [{}, {}]}, os.path.join(tmp, "last.pt"))
        mlflow.log_artifact(os.path.join(tmp, "last.pt"), tracking.CHECKPOINTS)
    assert tracking.resume_state(run.info.run_id)["epoch"] == 2


def test_no_checkpoint_means_a_fresh_start_only_when_no_epoch_was_logged(store):
    with mlflow.start_run() as run:
        pass
    assert tracking.resume_state(run.info.run_id) is None

    run_id = saved_checkpoints(2)
    for name in checkpoint_names(run_id):  # every checkpoint unreadable
        open(stored_checkpoint(run_id, name), "wb").close()
    with pytest.raises(tracking.StoreError, match="trained 2 epochs but has no readable checkpoint"):
        tracking.resume_state(run_id)

    run_id = saved_checkpoints(1)
    shutil.rmtree(local_artifact_dir(run_id))  # the artifact store lost the run's files
    with pytest.raises(tracking.StoreError, match="trained 1 epochs but has no readable checkpoint"):
        tracking.resume_state(run_id)

    # A SIGKILL can lose every metric still queued for asynchronous writing; the checkpoint's
    # tag, written with it, still says that checkpoints must be there.
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        tracking.checkpoint_saver(tmp)({"epoch": 1, "history": [{}]})
    shutil.rmtree(local_artifact_dir(run.info.run_id))
    with pytest.raises(tracking.StoreError, match="trained 1 epochs but has no readable checkpoint"):
        tracking.resume_state(run.info.run_id)


def test_resumed_metrics_are_logged_once_per_step(store):
    with tracking.tracked_run() as (run, log_metrics):
        log_metrics({"val_loss": 0.5, "loss": 0.7}, 1)
    with tracking.tracked_run(run_id=run.info.run_id) as (_, log_metrics):
        # the checkpoint holds epochs 1 and 2; epoch 2's metrics were lost in a crash
        log_once = tracking.metrics_once(run.info.run_id, [{"val_loss": 0.5}, {"val_loss": 0.4}], log_metrics)
        log_once({"val_loss": 0.4}, 2)  # epoch 2 again, from an older checkpoint
        log_once({"val_loss": 0.3}, 3)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4), (3, 0.3)]


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
        assert tracking.still_alive(elsewhere, now=time.time() + 199) is not None
        assert tracking.still_alive(elsewhere, now=time.time() + 201) is None
