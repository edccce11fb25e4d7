"""A run's life cycle and what makes it reproducible: start and end it (FINISHED, FAILED or
KILLED), log metrics without blocking, let one process at a time write a train run (its lease),
and record who ran what, with which config, data and code.
"""
import dataclasses
import getpass
import importlib.metadata
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import threading
import time
import uuid
import warnings
from contextlib import contextmanager

import mlflow
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnistflow.config import AUTO
from mnistflow.data import Data
from mnistflow.errors import ConfigError, NotFound, StoreError, first_line
from mnistflow.models import count_params

# The system metrics monitor says at INFO that it starts and stops, and that there is no GPU:
# four lines around every train run and tune trial, between the step's own.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

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


# --- one writer per run -------------------------------------------------------------------------
# A process writes to a train run only while it holds the run's newest lease: the param lease_<n>
# with the highest n. A param is written once: the store keeps one value per run and key (the
# primary key of SQLite's and PostgreSQL's params table, behind a tracking server too), so of the
# processes that find lease_<n> free, exactly one logs lease_<n+1> and the others read another
# value back. (A file store, ./mlruns, checks and writes a param in two steps: it cannot arbitrate.)
LEASE_PARAM = "lease_"
HEARTBEAT_TAG = "lease_heartbeat"  # "<n> <unix time>": when lease n's holder last said it is alive
RELEASED_TAG = "lease_released"    # "<n>": lease n's holder writes no more
HEARTBEAT_S = 10
# A holder that cannot be asked (another machine or container) counts as stopped after this long
# without a heartbeat; it covers clocks that are a little apart.
LEASE_EXPIRY_S = 60
# A RUNNING run from before leases is taken for alive while its newest metric is younger than twice
# its longest epoch, and never less than this: the final test and model logging write no metric for a while.
SILENCE_FLOOR_S = 60


@dataclasses.dataclass(frozen=True)
class Holder:
    """The process a lease names, as its param records it."""
    host: str
    pid: int
    started: str   # when the process started, in clock ticks after boot: a reused pid has another
    machine: str   # this boot of the machine and its pid namespace: where the pid can be asked ("" off Linux)
    since: float   # when it took the lease, by its own clock
    token: str     # unique to this claim

    @classmethod
    def this_process(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), _machine(), time.time(),
                   uuid.uuid4().hex)

    @classmethod
    def parse(cls, value: str) -> "Holder":
        return cls(**json.loads(value))

    def value(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"


def _machine() -> str:
    """This boot of this machine and this process's pid namespace ("" where /proc cannot say):
    a pid names the same process only where both are the same. Host names can be shared."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """When process `pid` started, in clock ticks after boot; "" for no such process or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # the fields after the command's name
    except OSError:
        return ""
    state, start = fields[0], fields[19]
    return "" if state == "Z" else start


def _newest_lease(run: mlflow.entities.Run) -> tuple[int, Holder | None]:
    """The number of the run's newest lease and its holder; (0, None) for a run without one."""
    numbers = [int(key[len(LEASE_PARAM):]) for key in run.data.params
               if key.startswith(LEASE_PARAM) and key[len(LEASE_PARAM):].isdigit()]
    if not numbers:
        return 0, None
    newest = max(numbers)
    return newest, Holder.parse(run.data.params[f"{LEASE_PARAM}{newest}"])


def _still_holds(run: mlflow.entities.Run, number: int, holder: Holder, now: float) -> str | None:
    """Why lease `number`'s holder may still write to the run, or None when it is done or dead.

    Where its pid can be asked, the process with that pid and start time says so; elsewhere it
    counts as alive while it took the lease or sent a heartbeat less than LEASE_EXPIRY_S ago.
    """
    if run.data.tags.get(RELEASED_TAG) == str(number):
        return None
    if holder.machine and holder.machine == _machine():
        start = _process_start(holder.pid)
        return "it is running on this machine" if start and start == holder.started else None
    beat_number, _, beat_time = run.data.tags.get(HEARTBEAT_TAG, "").partition(" ")
    heard = max(holder.since, float(beat_time) if beat_number == str(number) else 0)
    if now - heard < LEASE_EXPIRY_S:
        return (f"it runs on another machine or in another container, and said it is alive {now - heard:.0f} s "
                f"ago; it counts as stopped after {LEASE_EXPIRY_S} s of silence")
    return None


def _recent_writes(run: mlflow.entities.Run, now: float) -> str | None:
    """Why a RUNNING run from before leases may still have a process writing to it, or None when it
    went silent: it counts as alive while its newest metric is younger than twice its longest epoch
    so far, and at least SILENCE_FLOOR_S."""
    client = mlflow.MlflowClient()
    newest_ms = max([run.info.start_time] + [m.timestamp for key in run.data.metrics
                                             for m in client.get_metric_history(run.info.run_id, key)])
    longest_epoch_s = max([m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s")], default=0)
    window_s = max(2 * longest_epoch_s, SILENCE_FLOOR_S)
    silent_s = now - newest_ms / 1000
    if silent_s < window_s:
        return f"its last write was {silent_s:.0f} s ago, less than {window_s:.0f} s"
    return None


def say_last(message: str) -> None:
    """Write `message` as the last thing this process puts on stderr: what other threads write
    from now on (an epoch's progress bar) goes nowhere, so the message ends the output."""
    stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os.write(stderr, message.encode())


def take_lease(run_id: str, new_run: bool = False) -> "Lease":
    """Make this process the one writer of a run, before it writes anything to it; ConfigError
    naming the holder when another process may still write to it, or has just taken it.

    `new_run`: this process has just started the run, so nobody can hold it yet.
    """
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    number, holder = _newest_lease(run)
    if not new_run:
        if holder is None:
            why = _recent_writes(run, time.time()) if run.info.status == "RUNNING" else None
            if why:
                raise ConfigError(f"run {run_id} is still RUNNING ({why}); resume it once its process has stopped")
        else:
            why = _still_holds(run, number, holder, time.time())
            if why:
                raise ConfigError(f"run {run_id} is held by {holder} ({why}); resume it once that process has stopped")
    mine, key = Holder.this_process(), f"{LEASE_PARAM}{number + 1}"
    try:
        client.log_param(run_id, key, mine.value())
        failure = None
    except MlflowException as exc:  # another value there, or the store failed: reading it back tells
        failure = exc
    won = client.get_run(run_id).data.params.get(key)
    if won is None:
        raise StoreError(f"cannot take run {run_id} in {mlflow.get_tracking_uri()}: {first_line(failure)}")
    if won != mine.value():
        raise ConfigError(f"run {run_id} is held by {Holder.parse(won)} (it took the run just now); "
                          "resume it once that process has stopped")
    return Lease(run_id, number + 1)


class Lease:
    """This process's hold on a run (`take_lease`): it sends heartbeats until released. Should
    another process take the run over (this one was silent too long), this one stops at once."""

    def __init__(self, run_id: str, number: int):
        self.run_id, self.number = run_id, number
        self._released = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease {run_id}", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        client = mlflow.MlflowClient()
        while not self._released.wait(HEARTBEAT_S):
            try:
                newest, holder = _newest_lease(client.get_run(self.run_id))
                if newest != self.number:
                    # Not even the end of the run may be written now: the new holder writes to it.
                    say_last(f"\nrun {self.run_id} was taken over by {holder} while this process was silent; "
                             "stopping without another write\n")
                    os._exit(1)
                client.set_tag(self.run_id, HEARTBEAT_TAG, f"{self.number} {time.time():.0f}")
            except MlflowException as exc:  # the next one may get through
                print(f"warning: no heartbeat for run {self.run_id}: {first_line(exc)}", flush=True)

    def release(self) -> None:
        """Stop the heartbeat and say that this process writes no more (once its run has ended)."""
        self._released.set()
        self._heartbeat.join()
        try:
            with interrupts_held():
                mlflow.MlflowClient().set_tag(self.run_id, RELEASED_TAG, str(self.number))
        except MlflowException as exc:
            print(f"warning: run {self.run_id} could not be released ({first_line(exc)}); "
                  "it is free once this process has exited", flush=True)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


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
        "torchvision_version": importlib.metadata.version("torchvision"),  # as installed; its import takes seconds
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


# --- the one way a step opens its run -----------------------------------------------------------
SPLITS = ("training", "validation", "test")


def _launcher_run() -> str | None:
    """The run `mlflow run` opened for this step, if it did. Taken out of the environment, where
    MLflow would reopen it for every other run this process starts (a trial, a register run)."""
    return os.environ.pop("MLFLOW_RUN_ID", None)


def _describe(run_id: str | None, name: str, note: str, tags: dict | None = None) -> None:
    if run_id:
        client = mlflow.MlflowClient()
        client.update_run(run_id, name=name)
        for key, value in {"mlflow.note.content": note, **(tags or {})}.items():
            client.set_tag(run_id, key, value)


def describe_launcher(name: str, note: str, tags: dict | None = None) -> None:
    """For a step that logs its work elsewhere or not at all: name the run `mlflow run` opened for
    it, if it did, and say what the step did (a random name and an empty page say nothing in the UI)."""
    _describe(_launcher_run(), name, note, tags)


def resumed(run: mlflow.entities.Run) -> tuple[str, str, dict]:
    return f"resume-{run.info.run_name}", f"resumed run {run.info.run_id}", {}


@contextmanager
def step_run(name: str, cfg, phase: str, *, dataset: str = "", note: str = "", tags: dict | None = None,
             data: Data | None = None, contexts=SPLITS, parent: mlflow.entities.Run | None = None,
             continues: str | None = None, launcher_says=resumed, **start_run_args):
    """Open a step's run, as tracked_run does (yield (run, log_metrics)), set up to be found and rerun.

    A new run is named `name`, gets the config as params and config.yaml, run_tags(phase, dataset or
    cfg.dataset, note) with `tags`, and `data`'s splits (`contexts`) as its inputs. Under `mlflow run`
    the run it opened for the step is that run, unless the step `continues` a run that exists (its
    id): then that run is left as it is, and the one `mlflow run` opened is named and tagged with
    what `launcher_says(run)` gives, (name, note, tags): by default that it resumed the run. A
    trial's run has a `parent`, never the launcher's run.
    """
    launcher = None if parent else _launcher_run()
    if parent:  # nested, in the parent's experiment, whether or not the parent is active in this process
        tags = {MLFLOW_PARENT_RUN_ID: parent.info.run_id, **(tags or {})}
        start_run_args.update(experiment_id=parent.info.experiment_id, nested=True)
    if not continues:
        tags = {**run_tags(phase, dataset or cfg.dataset, note), **(tags or {})}
    with tracked_run(run_id=continues or launcher, run_name=None if continues else name,
                     tags=None if continues else tags, **start_run_args) as (run, log_metrics):
        if continues:
            _describe(launcher, *launcher_says(run))
        else:
            log_config(cfg)
            if data is not None:
                log_datasets(data, contexts)
        yield run, log_metrics
