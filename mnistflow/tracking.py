"""MLflow helpers: the run's life cycle, what makes it reproducible, checkpoints, results and the model."""
import dataclasses
import getpass
import os
import pickle
import platform
import re
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager

import mlflow
import numpy as np
import torch
import torchvision
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from mnistflow import metrics, plots
from mnistflow.config import AUTO, ConfigError, first_line
from mnistflow.data import Data
from mnistflow.models import count_params, servable
from mnistflow.train import evaluate

CHECKPOINTS = "checkpoints"
EPOCH_CHECKPOINT = re.compile(r"epoch_(\d+)\.pt")
LEGACY_CHECKPOINT = "last.pt"  # the one checkpoint of runs from before epoch-numbered checkpoints
UNREADABLE = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError)  # torch.load of a torn file
TRAIN_RUN_PARAM = "steps_per_epoch"  # logged by the train step only, from its first version on
# The epoch of the newest stored checkpoint, set right after it: unlike the metrics, which are
# written asynchronously and lost by a SIGKILL, it says that checkpoints must be there.
CHECKPOINT_TAG = "checkpoint_epoch"
# A RUNNING run is taken for alive while its newest metric is younger than twice its longest
# epoch, and never less than this: the final test and model logging write no metric for a while.
SILENCE_FLOOR_S = 60


class StoreError(Exception):
    """The tracking or artifact store could not be read; the message says what and why."""


class AsyncMetrics:
    """Logs metrics without blocking the training loop; `flush` waits and raises on any failed write."""

    def __init__(self):
        self._pending = []

    def __call__(self, metrics: dict, step: int) -> None:
        self._pending.append(mlflow.log_metrics(metrics, step=step, synchronous=False))

    def flush(self) -> None:
        mlflow.flush_async_logging()  # write what is buffered now, not at the next tick
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def interrupts_held():
    """Hold Ctrl-C and SIGTERM until the block is done, then act on them as usual.

    For store writes: one interrupted while SQLAlchemy commits leaves its SQLite transaction
    open, and the database locked to this process, which then cannot even end its run KILLED.
    """
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in received:
            signal.raise_signal(sig)


@contextmanager
def tracked_run(**start_run_args):
    """Start or continue a run; yield (run, log_metrics).

    The run ends FINISHED only when the body succeeds and every metric was written; an error
    ends it FAILED, Ctrl-C or SIGTERM ends it KILLED.
    """
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    log_metrics = AsyncMetrics()
    run = mlflow.start_run(**start_run_args)
    try:
        yield run, log_metrics
        log_metrics.flush()
    except BaseException as exc:
        # Finish the bookkeeping even when a second Ctrl-C or SIGTERM arrives meanwhile
        # (`mlflow run` sends SIGTERM to the step after the Ctrl-C that both received).
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                log_metrics.flush()  # keep what was measured before the failure
            except MlflowException as flush_error:
                print(f"warning: some metrics were not written: {flush_error}", flush=True)
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                mlflow.end_run(status)
            except MlflowException as end_error:  # keep the error that stopped the run in sight
                print(f"warning: run {run.info.run_id} could not be ended {status} and stays RUNNING: "
                      f"{first_line(end_error)}", flush=True)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def existing_run(run_id: str, what: str = "run_id") -> mlflow.entities.Run:
    """The run with this id; ConfigError naming the id and the tracking store when there is none."""
    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"unknown {what} {run_id!r}: no such run in {mlflow.get_tracking_uri()}") from None


def resumable_config(run_id: str) -> dict:
    """The config.yaml of a train run that `--resume` may continue; ConfigError saying why not.

    Only a run the train step started has checkpoints; a FINISHED run is done; a RUNNING run
    whose process may still be writing to it would be trained twice at once (`still_alive`).
    """
    run = existing_run(run_id, "resume run id")
    if TRAIN_RUN_PARAM not in run.data.params:
        raise ConfigError(f"run {run_id} ({run.info.run_name}) was not started by the train step, so it has "
                          "no checkpoints to resume; give the id of a train run")
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} already FINISHED; only a FAILED, KILLED or RUNNING run can be resumed")
    alive = still_alive(run) if run.info.status == "RUNNING" else None
    if alive:
        raise ConfigError(f"run {run_id} is still RUNNING ({alive}); resume it once its process has stopped")
    try:
        return logged_config(run_id)
    except (MlflowException, OSError) as exc:
        raise StoreError(f"cannot read config.yaml of run {run_id} from {run.info.artifact_uri}: {_first_sentence(exc)}")


def process_tags() -> dict:
    """Where the train step's process runs, so that `still_alive` can ask it."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def still_alive(run: mlflow.entities.Run, now: float | None = None) -> str | None:
    """Why a RUNNING run may still have a process writing to it, or None when it went silent.

    On the machine that runs it, its process (tags `host` and `pid`) says so. Elsewhere, and for
    runs from before those tags, it counts as alive while its newest metric is younger than twice
    its longest epoch so far, and at least SILENCE_FLOOR_S.
    """
    tags = run.data.tags
    if tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit():
        try:
            os.kill(int(tags["pid"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # another user's process: it exists
        return f"its process {tags['pid']} on this machine is alive"
    client = mlflow.MlflowClient()
    newest_ms = max([run.info.start_time] + [m.timestamp for key in run.data.metrics
                                             for m in client.get_metric_history(run.info.run_id, key)])
    longest_epoch_s = max([m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s")], default=0)
    window_s = max(2 * longest_epoch_s, SILENCE_FLOOR_S)
    silent_s = (now or time.time()) - newest_ms / 1000
    if silent_s < window_s:
        return f"its last write was {silent_s:.0f} s ago, less than {window_s:.0f} s"
    return None


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def run_tags(phase: str, dataset: str, note: str = "") -> dict:
    """Who ran what: git commit/branch/dirty, user, phase, dataset, and the note."""
    tags = {
        "git_commit": git_commit(),
        "git_branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "user": getpass.getuser(),
        "phase": phase,
        "dataset": dataset,
    }
    if note:
        tags["mlflow.note.content"] = note
    return tags


def library_versions() -> dict:
    return {
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mlflow_version": mlflow.__version__,
    }


def log_config(cfg) -> None:
    """The resolved config both as params (searchable) and as config.yaml (re-runnable).

    `mlflow run` has already logged the entry point's -P values as params, in its own
    spelling; MLflow refuses to change a param, so only the keys it did not log are added.
    """
    config = dataclasses.asdict(cfg)
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({key: value for key, value in config.items() if key not in logged})
    mlflow.log_dict(config, "config.yaml")


def logged_config(run_id: str) -> dict:
    """The config.yaml that log_config wrote for a run.

    Runs from before `mirror` and `shift` existed trained without them, so their config reads off.
    """
    return {"mirror": "off", "shift": "off", **yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))}


def log_datasets(data: Data, contexts=("training", "validation", "test")) -> None:
    splits = {"training": data.train, "validation": data.val, "test": data.test}
    for context in contexts:
        split = splits[context]
        with warnings.catch_warnings():
            # MLflow registers two local-path source types under one name and warns that it
            # picked one of them; either is right for a local data directory.
            warnings.filterwarnings("ignore", message="The specified dataset source")
            dataset = mlflow.data.from_numpy(split.images.numpy(), targets=split.labels.numpy(),
                                             source=data.root, name=f"{data.name}-{context}",
                                             digest=split.digest)
        mlflow.log_input(dataset, context=context)


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


def checkpoint_saver(directory: str):
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
        with interrupts_held():  # the store writes made while training
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

    def log_new(metrics: dict, step: int) -> None:
        new = {key: value for key, value in metrics.items() if step > logged.get(key, 0)}
        if new:
            log_metrics(new, step)
            logged.update(dict.fromkeys(new, step))

    for epoch, epoch_metrics in enumerate(history, start=1):
        log_new(epoch_metrics, epoch)
    return log_new


def log_test_results(net: torch.nn.Module, data: Data, device: torch.device) -> dict:
    """Final metrics of a trained net on the test split (see log_test_scores)."""
    _, _, logits = evaluate(net, data.test, device)
    return log_test_scores(torch.log_softmax(logits, 1).numpy(), data)


def log_test_scores(log_probs: np.ndarray, data: Data) -> dict:
    """Log test loss, accuracy and per-class precision/recall/F1 as metrics, the classification
    report (text and JSON), the confusion matrix and misclassified images; return the metrics."""
    labels = data.test.labels.numpy()
    results, report, cm = metrics.test_metrics(log_probs, labels, data.classes)
    mlflow.log_metrics(results)
    mlflow.log_dict(report, "test/classification_report.json")
    mlflow.log_text(metrics.report_text(report), "test/classification_report.txt")
    log_figure(plots.confusion_matrix(cm, data.classes), "plots/test_confusion_matrix.png")
    preds = log_probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    log_figure(plots.misclassified(data.pixels(data.test)[wrong], labels[wrong], preds[wrong], data.classes),
               "plots/test_misclassified.png")
    return results


def log_figure(figure, path: str) -> None:
    """Log a matplotlib figure as a PNG artifact and free it."""
    mlflow.log_figure(figure, path)
    plots.close(figure)


def log_curves(history: list[dict]) -> None:
    log_figure(plots.curves(history), "plots/loss_accuracy_curves.png")


def log_model(net: torch.nn.Module, data: Data) -> mlflow.models.model.ModelInfo:
    """Log the net as a servable model: [0, 1] pixels (N, 1, 28, 28) in, class probabilities out."""
    model = servable(net.cpu(), data.mean, data.std)
    example = data.pixels(data.test)[:5].numpy()
    with torch.no_grad():
        probabilities = model(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        model, name="model",
        signature=infer_signature(example, probabilities),
        input_example=example,
        # Listed, not inferred: inference imports the model in a subprocess and costs ~15 s.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                          f"numpy=={np.__version__}"],
        # pt2 (torch.export) stores a traced graph: loading runs no pickled code and needs no
        # mnistflow import, unlike the pickle format.
        serialization_format="pt2",
        metadata={"dataset": data.name, "classes": data.classes},  # so predictions can be named
    )


def model_params(cfg, net: torch.nn.Module, device: torch.device) -> dict:
    """Size, device and libraries, and what each "auto" setting became (`mlflow run` has logged the
    -P value, "auto", under the setting's own name, and MLflow params cannot change)."""
    return {"num_params": count_params(net), "resolved_device": str(device),
            **{f"resolved_{name}": getattr(cfg, name) for name in AUTO[cfg.dataset]},
            **library_versions()}
