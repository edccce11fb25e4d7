"""A run's life cycle and what makes it reproducible: start and end it (FINISHED, FAILED or
KILLED), log metrics without blocking, and record who ran what, with which config, data and code.
"""
import dataclasses
import getpass
import logging
import os
import platform
import signal
import socket
import subprocess
import time
import warnings
from contextlib import contextmanager

import mlflow
import torch
import torchvision
import yaml
from mlflow.exceptions import MlflowException

from mnistflow.config import AUTO
from mnistflow.data import Data
from mnistflow.errors import NotFound, first_line
from mnistflow.models import count_params

# The system metrics monitor says at INFO that it starts and stops, and that there is no GPU:
# four lines around every train run and tune trial, between the step's own.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

# A RUNNING run is taken for alive while its newest metric is younger than twice its longest
# epoch, and never less than this: the final test and model logging write no metric for a while.
SILENCE_FLOOR_S = 60


class AsyncMetrics:
    """Logs metrics without blocking the training loop; `flush` waits and raises on any failed write."""

    def __init__(self):
        self._pending = []

    def __call__(self, metrics: dict, step: int, **links) -> None:
        """`links`: mlflow.log_metrics' model_id and dataset, which the metrics were measured on."""
        self._pending.append(mlflow.log_metrics(metrics, step=step, synchronous=False, **links))

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
    """The run with this id; NotFound naming the id and the tracking store when there is none."""
    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        raise NotFound(f"unknown {what} {run_id!r}: no such run in {mlflow.get_tracking_uri()}") from None


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
    """Who ran what: git commit/branch/dirty, user, phase, dataset, the note, and the Slurm job."""
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
    # In a Slurm job: which one, and for a task of an array job, the array and the task.
    for variable in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        if os.environ.get(variable):
            tags[variable.lower()] = os.environ[variable]
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

    Runs from before `mirror` and `augment` existed trained without them, so their config reads
    off and none; a run from when `shift` was its own on/off setting reads as augment shift or none.
    """
    config = {"mirror": "off", **yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))}
    shift = config.pop("shift", "off")
    config.setdefault("augment", "shift" if shift == "on" else "none")
    return config


def split_dataset(data: Data, context: str) -> mlflow.data.Dataset:
    """A split as an MLflow dataset, <dataset>-<context> with the split's digest: what the run's
    inputs list and what metrics measured on the split name (mlflow.log_metrics' dataset=)."""
    split = {"training": data.train, "validation": data.val, "test": data.test}[context]
    with warnings.catch_warnings():
        # MLflow registers two local-path source types under one name and warns that it
        # picked one of them; either is right for a local data directory.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        return mlflow.data.from_numpy(split.images.numpy(), targets=split.labels.numpy(),
                                      source=data.root, name=f"{data.name}-{context}", digest=split.digest)


def log_datasets(data: Data, contexts=("training", "validation", "test")) -> None:
    for context in contexts:
        mlflow.log_input(split_dataset(data, context), context=context)


def model_params(cfg, net: torch.nn.Module, device: torch.device) -> dict:
    """Size, device and libraries, and what each "auto" setting became (`mlflow run` has logged the
    -P value, "auto", under the setting's own name, and MLflow params cannot change)."""
    return {"num_params": count_params(net), "resolved_device": str(device),
            **{f"resolved_{name}": getattr(cfg, name) for name in AUTO[cfg.dataset]},
            **library_versions()}
