"""Tune workers as one Slurm array job: its options, its batch script, submitting it, waiting for it.

The tune step (launcher=slurm) writes the batch script into a job folder under the current
directory, which the cluster's nodes must share, has `sbatch --test-only` check it before anything
is written anywhere else, then writes the workers' settings beside it and submits it. Task i of
the array runs `python -m mnistflow.slurm <job folder>`: worker i of the study (tuning.work).
The storage URL and tracking credentials reach the tasks through the environment (sbatch exports
it), never through a file.
"""
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import mlflow
import sqlalchemy
import yaml

from mnistflow import tuning
from mnistflow.config import TuneConfig
from mnistflow.errors import ConfigError, StepFailed

# What a slurm_config YAML file may set, and its type.
OPTIONS = {"partition": str, "account": str, "time": str, "cpus_per_task": int, "gpus_per_task": int,
           "sbatch_flags": str}
# Task states after which a task will not run again (squeue's long names).
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}
JOBS_FOLDER = ".slurm"  # under the current directory: the job folders of arrays not yet finished
SETTINGS = "worker.json"
SCRIPT = "tune.sbatch"


def load_options(path: str) -> dict:
    """The options of a slurm_config YAML file ({} for no file), checked: unknown keys and wrong types refused."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"slurm_config file {path!r} not found")
    try:
        with open(path) as f:
            options = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"slurm_config {path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(options, dict):
        raise ConfigError(f"slurm_config {path}: must be a mapping like 'partition: gpu'")
    for key, value in options.items():
        if key not in OPTIONS:
            raise ConfigError(f"slurm_config {path}: unknown option {key!r}; allowed: {', '.join(OPTIONS)}")
        if not isinstance(value, OPTIONS[key]) or isinstance(value, bool):
            kind = "whole number" if OPTIONS[key] is int else "string"
            raise ConfigError(f"slurm_config {path}: {key} must be a {kind}, not {value!r}")
    return options


def batch_script(options: dict, tasks: int, job_folder: str) -> str:
    """The array job: one task per worker, each task's output in the job folder."""
    lines = ["#!/bin/bash", "#SBATCH --job-name=mnistflow-tune", f"#SBATCH --array=0-{tasks - 1}",
             f"#SBATCH --output={job_folder}/task-%a.out"]
    for key in ("partition", "account", "time", "cpus_per_task", "gpus_per_task"):
        if options.get(key):
            lines.append(f"#SBATCH --{key.replace('_', '-')}={options[key]}")
    if options.get("sbatch_flags"):
        lines.append(f"#SBATCH {options['sbatch_flags']}")
    lines += ["# Worker $SLURM_ARRAY_TASK_ID of the study, with the settings the tune step wrote beside this script.",
              f"cd {shlex.quote(os.getcwd())}",
              f"exec {shlex.quote(sys.executable)} -m mnistflow.slurm {shlex.quote(job_folder)}", ""]
    return "\n".join(lines)


def prepare(cfg: TuneConfig, tasks: int) -> str:
    """The job folder with its batch script, checked by `sbatch --test-only`; ConfigError (and no
    folder left) when Slurm is not there, the storage is SQLite, or sbatch refuses the job."""
    if not shutil.which("sbatch"):
        raise ConfigError("launcher=slurm needs Slurm's sbatch, which is not on PATH; run the step on a machine "
                          "that submits jobs to your cluster, or use launcher=local")
    url = tuning.storage_url(cfg)
    if sqlalchemy.engine.make_url(url).get_backend_name() == "sqlite":
        raise ConfigError(f"storage {tuning.storage_label(cfg)} is SQLite, which workers on other nodes cannot "
                          "share; with launcher=slurm give a server database, "
                          "e.g. postgresql+psycopg2://user@host/optuna")
    options = load_options(cfg.slurm_config)
    os.makedirs(JOBS_FOLDER, exist_ok=True)
    job_folder = tempfile.mkdtemp(prefix="tune-", dir=os.path.abspath(JOBS_FOLDER))
    script = os.path.join(job_folder, SCRIPT)
    with open(script, "w") as f:
        f.write(batch_script(options, tasks, job_folder))
    checked = subprocess.run(["sbatch", "--test-only", script], capture_output=True, text=True)
    if checked.returncode != 0:
        shutil.rmtree(job_folder)
        lines = checked.stderr.strip().splitlines() or [f"exit code {checked.returncode}"]
        reason = next((line for line in lines if "error:" in line), lines[0]).split("error:", 1)[-1].strip()
        raise ConfigError(f"sbatch refuses the job: {reason}"
                          + (f" (slurm_config {cfg.slurm_config})" if cfg.slurm_config else ""))
    return job_folder


def submit(job_folder: str, cfg: TuneConfig, space: dict, parent_run_id: str, counts: list) -> str:
    """Write the workers' settings and submit the array; its job id. The tasks get this process's
    environment, with the tracking URI this process uses (--export=ALL: over a site's SBATCH_EXPORT)."""
    with open(os.path.join(job_folder, SETTINGS), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "space": space, "parent_run_id": parent_run_id,
                   "counts": counts}, f, indent=1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    done = subprocess.run(["sbatch", "--parsable", "--export=ALL", os.path.join(job_folder, SCRIPT)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise StepFailed(f"sbatch failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return done.stdout.strip().split(";")[0]


def task_states(job_id: str) -> dict[str, str] | None:
    """Array task id (or a range of tasks not yet started) -> state; {} once Slurm forgot the job,
    None when squeue could not tell (a busy controller times out)."""
    done = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--jobs", job_id, "--format=%K %T"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {} if "Invalid job id" in done.stderr else None
    return dict(line.split() for line in done.stdout.splitlines() if line.strip())


def ended(states: dict[str, str] | None) -> bool:
    return states is not None and all(state in ENDED for state in states.values())


def wait(job_id: str) -> dict[str, str]:
    """Poll until every task of the array has ended; the state each ended in. Ctrl-C (or SIGTERM)
    cancels the array and waits for its tasks to end before passing the interrupt on."""
    pause = 1
    try:
        while not ended(states := task_states(job_id)):
            time.sleep(pause)
            pause = min(2 * pause, 10)
        return states
    except KeyboardInterrupt:
        print(f"cancelling Slurm job {job_id}", flush=True)
        subprocess.run(["scancel", job_id])
        while not ended(task_states(job_id)):
            time.sleep(1)
        raise


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
