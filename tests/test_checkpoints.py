"""Epoch checkpoints against a real SQLite store: which stay, which a resume reads, and a Ctrl-C
while one is stored."""
import os
import shutil
import tempfile

import mlflow
import numpy as np
import pytest
import torch

from mnistflow import checkpoints, tracking
from mnistflow.errors import StoreError
from conftest import ctrl_c_at_the_next_write_commit


def saved_checkpoints(epochs: int) -> str:
    """A train-like run whose saver stored `epochs` checkpoints and logged their val_loss; its id."""
    with tracking.tracked_run() as (run, log_metrics), tempfile.TemporaryDirectory() as tmp:
        save = checkpoints.saver(tmp)
        for epoch in range(1, epochs + 1):
            save({"epoch": epoch, "history": [{"val_loss": 1.0 / e} for e in range(1, epoch + 1)]})
            log_metrics({"val_loss": 1.0 / epoch}, epoch)
    return run.info.run_id


def stored_checkpoint(run_id: str, name: str) -> str:
    return os.path.join(local_artifact_dir(run_id), checkpoints.CHECKPOINTS, name)


def local_artifact_dir(run_id: str) -> str:
    return mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")


def checkpoint_names(run_id: str) -> list[str]:
    return sorted(os.path.basename(f.path) for f in mlflow.MlflowClient().list_artifacts(run_id, checkpoints.CHECKPOINTS))


def test_each_epoch_is_a_new_checkpoint_and_the_two_newest_stay(store):
    run_id = saved_checkpoints(4)
    # A crash while epoch 4 was written could only tear epoch_004.pt: epoch_003.pt stays whole.
    assert checkpoint_names(run_id) == ["epoch_003.pt", "epoch_004.pt"]
    assert checkpoints.resume_state(run_id)["epoch"] == 4


def test_a_torn_newest_checkpoint_resumes_from_the_one_before_and_says_so(store, capsys):
    run_id = saved_checkpoints(3)
    path = stored_checkpoint(run_id, "epoch_003.pt")
    with open(path, "r+b") as f:  # what a crash in the middle of its copy leaves
        f.truncate(os.path.getsize(path) // 2)
    assert checkpoints.resume_state(run_id)["epoch"] == 2
    assert f"checkpoint epoch_003.pt of run {run_id} is unreadable" in capsys.readouterr().out


def test_a_run_from_before_epoch_checkpoints_resumes_from_its_last_pt(store):
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        torch.save({"epoch": 2, "history": [{}, {}]}, os.path.join(tmp, "last.pt"))
        mlflow.log_artifact(os.path.join(tmp, "last.pt"), checkpoints.CHECKPOINTS)
    assert checkpoints.resume_state(run.info.run_id)["epoch"] == 2


def test_no_checkpoint_means_a_fresh_start_only_when_no_epoch_was_logged(store):
    with mlflow.start_run() as run:
        pass
    assert checkpoints.resume_state(run.info.run_id) is None

    run_id = saved_checkpoints(2)
    for name in checkpoint_names(run_id):  # every checkpoint unreadable
        open(stored_checkpoint(run_id, name), "wb").close()
    with pytest.raises(StoreError, match="trained 2 epochs but has no readable checkpoint"):
        checkpoints.resume_state(run_id)

    run_id = saved_checkpoints(1)
    shutil.rmtree(local_artifact_dir(run_id))  # the artifact store lost the run's files
    with pytest.raises(StoreError, match="trained 1 epochs but has no readable checkpoint"):
        checkpoints.resume_state(run_id)

    # A SIGKILL can lose every metric still queued for asynchronous writing; the checkpoint's
    # tag, written with it, still says that checkpoints must be there.
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        checkpoints.saver(tmp)({"epoch": 1, "history": [{}]})
    shutil.rmtree(local_artifact_dir(run.info.run_id))
    with pytest.raises(StoreError, match="trained 1 epochs but has no readable checkpoint"):
        checkpoints.resume_state(run.info.run_id)


def test_resumed_metrics_are_logged_once_per_step(store):
    with tracking.tracked_run() as (run, log_metrics):
        log_metrics({"val_loss": 0.5, "loss": 0.7}, 1)
    with tracking.tracked_run(run_id=run.info.run_id) as (_, log_metrics):
        # the checkpoint holds epochs 1 and 2; epoch 2's metrics were lost in a crash
        log_once = checkpoints.metrics_once(run.info.run_id, [{"val_loss": 0.5}, {"val_loss": 0.4}], log_metrics)
        log_once({"val_loss": 0.4}, 2)  # epoch 2 again, from an older checkpoint
        log_once({"val_loss": 0.3}, 3)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4), (3, 0.3)]


def test_resumed_metrics_keep_their_links_to_a_checkpoint_model_and_dataset(store):
    # With checkpoint_models=true a resumed run's epoch metrics pass through metrics_once with the
    # checkpoint model and dataset they were measured with (logged_model.with_checkpoint_models).
    with tracking.tracked_run() as (run, log_metrics):
        log_once = checkpoints.metrics_once(run.info.run_id, [], log_metrics)
        model = mlflow.initialize_logged_model(name="checkpoint-1")
        validation = mlflow.data.from_numpy(np.zeros((2, 1)), name="mnist-validation", digest="0123")
        log_once({"val_loss": 0.3}, 1, model_id=model.model_id, dataset=validation)
    [metric] = mlflow.get_logged_model(model.model_id).metrics
    assert (metric.key, metric.step, metric.value, metric.dataset_name) == ("val_loss", 1, 0.3, "mnist-validation")


def test_ctrl_c_while_a_checkpoint_is_stored_still_ends_the_run_killed(store, tmp_path):
    # Handled inside the commit, that Ctrl-C left the SQLite transaction open and the database
    # locked, so the run could not be ended KILLED and stayed RUNNING (seen in CI).
    with ctrl_c_at_the_next_write_commit() as arm, pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run() as (run, _):
            arm()
            checkpoints.saver(str(tmp_path))({"epoch": 1, "history": [{}]})
            raise AssertionError("the Ctrl-C was lost")
    run = mlflow.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[checkpoints.CHECKPOINT_TAG] == "1"  # the saver finished before it stopped
