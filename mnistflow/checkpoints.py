"""Epoch checkpoints on the run, and resuming a train run from them.

Every epoch's checkpoint is a new artifact, checkpoints/epoch_NNN.pt, and the run's
`checkpoint_epoch` tag says the newest one stored. `--resume` continues a run from its newest
readable checkpoint, logging each epoch once.
"""
import os
import pickle
import re
import tempfile

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from mnistflow import tracking
from mnistflow.errors import ConfigError, StoreError, first_line

CHECKPOINTS = "checkpoints"
EPOCH_CHECKPOINT = re.compile(r"epoch_(\d+)\.pt")
LEGACY_CHECKPOINT = "last.pt"  # the one checkpoint of runs from before epoch-numbered checkpoints
UNREADABLE = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError)  # torch.load of a torn file
TRAIN_RUN_PARAM = "steps_per_epoch"  # logged by the train step only, from its first version on
# The epoch of the newest stored checkpoint, set right after it: unlike the metrics, which are
# written asynchronously and lost by a SIGKILL, it says that checkpoints must be there.
CHECKPOINT_TAG = "checkpoint_epoch"


def resumable_config(run_id: str) -> dict:
    """The config.yaml of a train run that `--resume` may continue; ConfigError saying why not.
    It writes nothing: `take_for_resume` takes the run once every flag is checked.

    Only a run the train step started has checkpoints; a FINISHED run is done.
    """
    run = tracking.existing_run(run_id, "resume run id")
    if TRAIN_RUN_PARAM not in run.data.params:
        raise ConfigError(f"run {run_id} ({run.info.run_name}) was not started by the train step, so it has "
                          "no checkpoints to resume; give the id of a train run")
    _refuse_finished(run)
    try:
        return tracking.logged_config(run_id)
    except (MlflowException, OSError) as exc:
        raise StoreError(f"cannot read config.yaml of run {run_id} from {run.info.artifact_uri}: {_first_sentence(exc)}")


def take_for_resume(run_id: str) -> tracking.Lease:
    """Make this process the run's one writer (`tracking.take_lease`: refused while another process
    may still write to it); refused too when the run FINISHED after `resumable_config` read it."""
    lease = tracking.take_lease(run_id)
    try:
        _refuse_finished(mlflow.get_run(run_id))
    except ConfigError:
        lease.release()
        raise
    return lease


def _refuse_finished(run: mlflow.entities.Run) -> None:
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run.info.run_id} already FINISHED; "
                          "only a FAILED, KILLED or RUNNING run can be resumed")


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


def saver(directory: str):
    """A `save_checkpoint(state)` for `fit` that logs checkpoints/epoch_NNN.pt to the run.

    Every epoch's checkpoint is a new file, so a crash while one is written leaves the ones before
    it whole. The two newest are kept: the previous one also covers a newest one that the store
    acknowledged but lost (a local copy is not synced to disk). Older ones are deleted where the
    artifact store can delete; elsewhere they stay. The best epoch's weights are in every
    checkpoint (`best`), and they are what the run's model holds at the end.
    """
    def save(state: dict) -> None:
        path = os.path.join(directory, checkpoint_name(state["epoch"]))
        torch.save(state, path)
        with tracking.interrupts_held():  # the store writes made while training
            mlflow.log_artifact(path, CHECKPOINTS)
            mlflow.set_tag(CHECKPOINT_TAG, str(state["epoch"]))
            os.remove(path)
            if state["epoch"] > 2:
                _delete_artifact(f"{CHECKPOINTS}/{checkpoint_name(state['epoch'] - 2)}")
    return save


def _delete_artifact(path: str) -> None:
    repository = get_artifact_repository(mlflow.get_artifact_uri())
    try:
        repository.delete_artifacts(path)
    except NotImplementedError:
        pass  # this kind of store cannot delete: the old checkpoint stays
    except (MlflowException, OSError) as exc:
        print(f"warning: old checkpoint {path} not deleted, it stays: {_first_sentence(exc)}", flush=True)


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of an error's message (torch's explain themselves at length)."""
    return first_line(exc).split(". ")[0]


def resume_state(run_id: str) -> dict | None:
    """The state a train run continues from: its newest readable checkpoint, or None when it
    stopped before its first one.

    An unreadable checkpoint (a crash while it was written) is skipped, and said so. StoreError
    when the store cannot list or fetch the checkpoints, or when the run stored checkpoints
    (CHECKPOINT_TAG) or logged epochs but none of its checkpoints can be read: training again
    from epoch 1 would log those epochs twice.
    """
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    where = f"{run.info.artifact_uri}/{CHECKPOINTS}"
    try:
        names = {os.path.basename(f.path) for f in client.list_artifacts(run_id, CHECKPOINTS)}
    except (MlflowException, OSError) as exc:
        raise StoreError(f"cannot list the checkpoints of run {run_id} in {where}: {_first_sentence(exc)}")
    numbered = sorted((name for name in names if EPOCH_CHECKPOINT.fullmatch(name)),
                      key=lambda name: int(EPOCH_CHECKPOINT.fullmatch(name)[1]), reverse=True)
    newest_first = numbered + ([LEGACY_CHECKPOINT] if LEGACY_CHECKPOINT in names else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name in newest_first:
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=f"{CHECKPOINTS}/{name}", dst_path=tmp)
            except (MlflowException, OSError) as exc:
                raise StoreError(f"cannot fetch checkpoint {name} of run {run_id} from {where}: {_first_sentence(exc)}")
            try:
                # weights_only: a checkpoint is data; never let it run code while loading.
                return torch.load(path, weights_only=True)
            except UNREADABLE as exc:
                print(f"checkpoint {name} of run {run_id} is unreadable ({_first_sentence(exc)}); "
                      "trying the one before it", flush=True)
    epochs = max([int(run.data.tags.get(CHECKPOINT_TAG, 0))] +
                 [m.step for m in client.get_metric_history(run_id, "val_loss")])
    if epochs or newest_first:
        raise StoreError(f"run {run_id} trained {epochs} epochs but has no readable checkpoint in {where}; "
                         "it cannot continue without training those epochs twice")
    return None


def metrics_once(run_id: str, history: list[dict], log_metrics):
    """A `log_metrics` for a resumed run that writes each metric at each step at most once.

    It first logs the epochs the checkpoint holds but the run lacks (a crash between the
    checkpoint and the metrics), then leaves out the steps the run already has (a resume from an
    older checkpoint, when the newest was unreadable, trains epochs that were logged).
    """
    client = mlflow.MlflowClient()
    logged = {key: max(m.step for m in client.get_metric_history(run_id, key))
              for key in client.get_run(run_id).data.metrics}

    def log_new(metrics: dict, step: int, **links) -> None:
        new = {key: value for key, value in metrics.items() if step > logged.get(key, 0)}
        if new:
            log_metrics(new, step, **links)
            logged.update(dict.fromkeys(new, step))

    for epoch, epoch_metrics in enumerate(history, start=1):
        log_new(epoch_metrics, epoch)
    return log_new
