"""Tune workers as one Slurm array job: its options, its batch script, submitting it, waiting for it.

The tune step (launcher=slurm) writes the batch script into a job folder under the current
directory, which the cluster's nodes must share, has `sbatch --test-only` check it before anything
is written anywhere else, then writes the workers' settings beside it, submits it and waits for it
(cancelling an array that is held, or not ended within the time it may take). Task i of
the array runs `python -m mnistflow.slurm <job folder>`: worker i of the study (tuning.work).
The storage URL and tracking credentials reach the tasks through the environment (sbatch exports
it), never through a file.
"""
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import mlflow
import sqlalchemy
import yaml

from mnistflow import tuning
from mnistflow.config import TuneConfig
from mnistflow.errors import ConfigError, StepFailed

NAME = r"[A-Za-z0-9_.-]+"  # a partition or account name: nothing Slurm or a shell would read as a separator
CONTROL = r"[\x00-\x1f\x7f]"  # a newline, tab, ...
DURATION = r"(\d+-)?\d+(:\d+){0,2}"  # Slurm's durations: minutes[:seconds], hours:minutes:seconds, days-hours[:...]


@dataclasses.dataclass(frozen=True)
class Option:
    """A slurm_config key: what it may hold, in words for the refusal, and the check."""
    allowed: str
    valid: Callable[[object], bool]


def _matches(pattern: str) -> Callable[[object], bool]:
    return lambda value: isinstance(value, str) and re.fullmatch(pattern, value) is not None


def _at_least_one(value) -> bool:
    return type(value) is int and value >= 1  # type(): YAML's true is no number


def _flags(value) -> bool:
    """sbatch_flags: options only (a bare word would be taken for the script to submit), none the step
    sets itself, none holding a control character (a newline would end the comment the batch script
    shows them in)."""
    try:
        flags = shlex.split(value) if isinstance(value, str) else None
    except ValueError:  # an unclosed quote
        return False
    return flags is not None and all(re.match(r"--?[A-Za-z]", flag) and not _own(flag)
                                     and not re.search(CONTROL, flag) for flag in flags)


def _own(flag: str) -> bool:
    """Whether a flag is one of the step's own, also abbreviated (sbatch takes --arr for --array)."""
    name = flag.split("=", 1)[0]
    if name.startswith("--"):
        return any(own.startswith(name) for own in OWN_FLAGS if own.startswith("--"))
    return name[:2] in OWN_FLAGS


# sbatch options the step gives the job itself: its tasks, where their output goes, how it submits.
OWN_FLAGS = ("--array", "-a", "--output", "-o", "--parsable", "--export", "--test-only")
# What a slurm_config YAML file may set. Every value reaches sbatch, so each is held to what Slurm
# takes there: none can end a #SBATCH line and start a command, or hand sbatch a script of its own.
OPTIONS = {
    "partition": Option("one or more partition names (letters, digits, '_', '.', '-'), comma-separated",
                        _matches(f"{NAME}(,{NAME})*")),
    "account": Option("an account name (letters, digits, '_', '.', '-')", _matches(NAME)),
    "time": Option("minutes or a duration such as \"2:00:00\" or \"1-12:00:00\", or UNLIMITED",
                   _matches(f"{DURATION}|UNLIMITED|INFINITE")),
    "cpus_per_task": Option("a whole number, at least 1", _at_least_one),
    "gpus_per_task": Option("a whole number, at least 1 (leave it out for none)", _at_least_one),
    "sbatch_flags": Option("sbatch options on one line, each written as --name=value or -Xvalue, none of "
                           f"{', '.join(OWN_FLAGS)} (the step sets those)", _flags),
    "max_wait": Option("a duration such as \"12:00:00\" or \"2-00:00:00\"", _matches(DURATION)),
}
# Task states after which a task will not run again (squeue's long names).
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}
# States a task leaves by itself. Any other (REQUEUE_HOLD, SPECIAL_EXIT, STOPPED, a held PENDING, one
# this list does not know) waits for someone to act on it: the step cancels the array rather than hang.
MOVING = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "RESIZING",
          "SIGNALING", "STAGE_OUT"}
HELD = "PENDING (held)"  # a pending task of priority 0, which runs only once someone releases it
QUEUE_ALLOWANCE_S = 24 * 3600  # how long an array may wait in the queue, beyond its tasks' time limits
NO_LIMIT_WAIT_S = 7 * 24 * 3600  # how long the step waits for tasks without a time limit
CANCEL_WAIT_S = 120  # for the tasks of a cancelled array to end (Slurm's KillWait is 30 s by default)
JOBS_FOLDER = ".slurm"  # under the current directory: the job folders of arrays not yet finished
SETTINGS = "worker.json"
SCRIPT = "tune.sbatch"


class SlurmLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except that 2:00:00 stays the text it is: YAML 1.1 reads it as the
    base-60 number 7200, which Slurm would take for minutes."""


def _base_60_as_text(loader: yaml.SafeLoader, node: yaml.ScalarNode):
    text = loader.construct_scalar(node)
    if ":" in text:
        return text
    return (loader.construct_yaml_int if node.tag.endswith(":int") else loader.construct_yaml_float)(node)


for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
    SlurmLoader.add_constructor(_tag, _base_60_as_text)


def load_options(path: str) -> dict:
    """The options of a slurm_config YAML file ({} for no file), checked: unknown keys and values
    Slurm does not accept there refused. A time in minutes (time: 30) becomes text, as Slurm takes it."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"slurm_config file {path!r} not found")
    try:
        with open(path) as f:
            options = yaml.load(f, SlurmLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"slurm_config {path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(options, dict):
        raise ConfigError(f"slurm_config {path}: must be a mapping like 'partition: gpu'")
    if type(options.get("time")) is int:
        options["time"] = str(options["time"])
    for key, value in options.items():
        if key not in OPTIONS:
            raise ConfigError(f"slurm_config {path}: unknown option {key!r}; allowed: {', '.join(OPTIONS)}")
        if not OPTIONS[key].valid(value):
            raise ConfigError(f"slurm_config {path}: {key} must be {OPTIONS[key].allowed}, not {value!r}")
    return options


def sbatch_flags(options: dict) -> list[str]:
    """The sbatch_flags option as sbatch's arguments (split as a shell would, run by none)."""
    return shlex.split(options.get("sbatch_flags", ""))


def _sbatch_quoted(value: str) -> str:
    """A #SBATCH value in double quotes, as sbatch reads them. (A backslash would escape the next
    character; the paths given here have none, see `prepare`.)"""
    return '"' + value.replace('"', '\\"') + '"'


def batch_script(options: dict, tasks: int, job_folder: str) -> str:
    """The array job: one task per worker, each task's output in the job folder (whose '%' Slurm's
    file name pattern would read as its own, hence '%%')."""
    output = os.path.join(job_folder.replace("%", "%%"), "task-%a.out")
    lines = ["#!/bin/bash", "#SBATCH --job-name=mnistflow-tune", f"#SBATCH --array=0-{tasks - 1}",
             f"#SBATCH --output={_sbatch_quoted(output)}"]
    for key in ("partition", "account", "time", "cpus_per_task", "gpus_per_task"):
        if key in options:
            lines.append(f"#SBATCH --{key.replace('_', '-')}={options[key]}")
    if "sbatch_flags" in options:
        lines.append(f"# and on sbatch's command line: {shlex.join(sbatch_flags(options))}")
    lines += ["# Worker $SLURM_ARRAY_TASK_ID of the study, with the settings the tune step wrote beside this script.",
              f"cd {shlex.quote(os.getcwd())}",
              f"exec {shlex.quote(sys.executable)} -m mnistflow.slurm {shlex.quote(job_folder)}", ""]
    return "\n".join(lines)


def prepare(cfg: TuneConfig, tasks: int) -> str:
    """The job folder with its batch script, checked by `sbatch --test-only`; ConfigError (and no
    folder left) when Slurm is not there, the storage is SQLite, an option or the current directory
    is one Slurm cannot take, or sbatch refuses the job."""
    if not shutil.which("sbatch"):
        raise ConfigError("launcher=slurm needs Slurm's sbatch, which is not on PATH; run the step on a machine "
                          "that submits jobs to your cluster, or use launcher=local")
    url = tuning.storage_url(cfg)
    if sqlalchemy.engine.make_url(url).get_backend_name() == "sqlite":
        raise ConfigError(f"storage {tuning.storage_label(cfg)} is SQLite, which workers on other nodes cannot "
                          "share; with launcher=slurm give a server database, "
                          "e.g. postgresql+psycopg2://user@host/optuna")
    options = load_options(cfg.slurm_config)
    if re.search(rf"\\|{CONTROL}", os.getcwd()):  # sbatch drops a backslash from --output; a newline ends its line
        raise ConfigError(f"the current directory {os.getcwd()!r} holds a backslash or a control character, "
                          "which Slurm's --output cannot take; run the step from a directory without one")
    os.makedirs(JOBS_FOLDER, exist_ok=True)
    job_folder = tempfile.mkdtemp(prefix="tune-", dir=os.path.abspath(JOBS_FOLDER))
    script = os.path.join(job_folder, SCRIPT)
    with open(script, "w") as f:
        f.write(batch_script(options, tasks, job_folder))
    checked = _sbatch(options, "--test-only", script)
    if checked.returncode != 0:
        shutil.rmtree(job_folder)
        lines = checked.stderr.strip().splitlines() or [f"exit code {checked.returncode}"]
        reason = next((line for line in lines if "error:" in line), lines[0]).split("error:", 1)[-1].strip()
        raise ConfigError(f"sbatch refuses the job: {reason}"
                          + (f" (slurm_config {cfg.slurm_config})" if cfg.slurm_config else ""))
    return job_folder


def _sbatch(options: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """sbatch with the user's sbatch_flags, then the step's own arguments, which win over them."""
    return subprocess.run(["sbatch", *sbatch_flags(options), *args], capture_output=True, text=True, env=env)


def submit(job_folder: str, cfg: TuneConfig, space: dict, parent_run_id: str, counts: list) -> str:
    """Write the workers' settings and submit the array; its job id. The tasks get this process's
    environment, with the tracking URI this process uses (--export=ALL: over a site's SBATCH_EXPORT)."""
    with open(os.path.join(job_folder, SETTINGS), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "space": space, "parent_run_id": parent_run_id,
                   "counts": counts}, f, indent=1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    done = _sbatch(load_options(cfg.slurm_config), "--parsable", "--export=ALL", os.path.join(job_folder, SCRIPT),
                   env=env)
    if done.returncode != 0:
        raise StepFailed(f"sbatch failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return done.stdout.strip().split(";")[0]


def seconds(duration: str) -> int:
    """A Slurm duration in seconds: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes or days-hours:minutes:seconds (squeue writes time limits the same way)."""
    days, _, clock = duration.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days or len(parts) == 3:
        hours, minutes, secs = parts + [0] * (3 - len(parts))
    else:
        hours, minutes, secs = 0, parts[0], (parts[1:] or [0])[0]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + secs


def time_allowed(job_id: str, cfg: TuneConfig, tasks: int) -> float:
    """How long the step waits for the array, in seconds: slurm_config's max_wait, or else as long as
    its tasks would take one after another at their time limit, plus a day in the queue."""
    max_wait = load_options(cfg.slurm_config).get("max_wait")
    if max_wait:
        return seconds(max_wait)
    done = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%l"], capture_output=True, text=True)
    limit = (done.stdout.split() or [""])[0]
    if done.returncode != 0 or not re.fullmatch(DURATION, limit):  # UNLIMITED, or squeue could not tell
        return NO_LIMIT_WAIT_S
    return tasks * seconds(limit) + QUEUE_ALLOWANCE_S


def task_states(job_id: str) -> dict[str, str] | None:
    """Array task id (or a range of tasks not yet started) -> state; {} once Slurm forgot the job,
    None when squeue could not tell (a busy controller times out)."""
    done = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--jobs", job_id,
                           "--format=%K %T %Q"], capture_output=True, text=True)
    if done.returncode != 0:
        return {} if "Invalid job id" in done.stderr else None
    states = {}
    for task, state, priority in (line.split() for line in done.stdout.splitlines() if line.strip()):
        states[task] = HELD if state == "PENDING" and priority == "0" else state
    return states


def ended(states: dict[str, str] | None) -> bool:
    return states is not None and all(state in ENDED for state in states.values())


def stuck(job_id: str, states: dict[str, str] | None) -> str | None:
    """Why the array will not end by itself, if it will not: a task held or in a state not known to move on."""
    for task, state in (states or {}).items():
        if state not in ENDED | MOVING:
            return f"Slurm task {job_id}_{task} is {state}, which it leaves only when someone acts on it"
    return None


def wait(job_id: str, allowed_s: float) -> dict[str, str]:
    """Poll until every task of the array has ended; the state each ended in. A task that is stuck
    (see `stuck`), or an array not ended within allowed_s seconds, cancels the array: StepFailed.
    Ctrl-C (or SIGTERM) cancels the array and waits for its tasks to end before passing the interrupt on."""
    deadline = time.monotonic() + allowed_s
    pause = 1
    try:
        while not ended(states := task_states(job_id)):
            why = stuck(job_id, states)
            if not why and time.monotonic() > deadline:
                why = (f"Slurm job {job_id} did not end within {datetime.timedelta(seconds=round(allowed_s))} "
                       "(max_wait in slurm_config sets how long the step waits)")
            if why:
                cancel(job_id)
                raise StepFailed(f"{why}; cancelled job {job_id}")
            time.sleep(max(0, min(pause, deadline - time.monotonic())))
            pause = min(2 * pause, 10)
        return states
    except KeyboardInterrupt:
        print(f"cancelling Slurm job {job_id}", flush=True)
        cancel(job_id)
        raise


def cancel(job_id: str) -> None:
    """scancel the array and wait, a while, for its tasks to end."""
    subprocess.run(["scancel", job_id])
    deadline = time.monotonic() + CANCEL_WAIT_S
    while not ended(task_states(job_id)) and time.monotonic() < deadline:
        time.sleep(1)


def main(argv=None) -> None:
    """One task of the array: worker SLURM_ARRAY_TASK_ID on its share of the trials, on the task's cores."""
    [job_folder] = argv or sys.argv[1:]
    with open(os.path.join(job_folder, SETTINGS)) as f:
        settings = json.load(f)
    worker = int(os.environ["SLURM_ARRAY_TASK_ID"])
    tuning.work(TuneConfig(**settings["config"]), settings["space"], settings["parent_run_id"], worker,
                settings["counts"][worker], threads=int(os.environ.get("SLURM_CPUS_PER_TASK") or 1))


if __name__ == "__main__":
    main()
