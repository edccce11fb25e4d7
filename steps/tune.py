"""The `tune` step: an Optuna study whose trials are nested MLflow runs under one parent run.

    python -m steps.tune --n_trials 20 --epochs 3
    mlflow run . -e tune -P n_trials=20 --env-manager local
    python -m steps.tune --workers 2                  # two local processes on one study
    python -m steps.tune --workers 8 --launcher slurm --storage postgresql+psycopg2://user@dbhost/optuna

Run the same command again (same study_name and storage) to add trials to the same study and
parent run; a trial whose worker died is failed and rerun. The step exits 1, its parent run
FAILED, when every trial it added failed or one of its workers died. With launcher=slurm the
workers are the tasks of one Slurm array job (mnistflow/slurm.py) on a shared PostgreSQL storage;
workers on other machines also join a study by running this step with the same study_name and storage.
"""
import multiprocessing
import os
import shutil
import sys

import mlflow
import optuna

from mnistflow import cli, slurm, tracking, tuning
from mnistflow.config import TuneConfig
from mnistflow.errors import StepFailed


def tune(cfg: TuneConfig) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    launcher_run = cli.launcher_run()
    space = tuning.load_search_space(cfg.search_space)
    counts = tuning.shares(cfg.n_trials, cfg.workers)
    # Slurm's checks come before any study or run: a job it would refuse leaves nothing behind.
    job_folder = slurm.prepare(cfg, len(counts)) if cfg.launcher == "slurm" else None
    try:
        run_study(cfg, space, counts, job_folder, launcher_run)
    finally:
        if job_folder:
            shutil.rmtree(job_folder, ignore_errors=True)


def run_study(cfg: TuneConfig, space: dict, counts: list, job_folder: str | None, launcher_run: str | None) -> None:
    data = tuning.load_data(cfg)
    storage = tuning.open_storage(cfg)
    parent_run = tuning.existing_parent_run(cfg, storage)
    study = tuning.open_study(cfg, storage)
    if parent_run:  # the results go to the study's parent run
        cli.describe_launcher(launcher_run, f"add-trials-{cfg.study_name}",
                              f"added trials to study {cfg.study_name}, parent run {parent_run}",
                              {tuning.STUDY_PARENT_TAG: parent_run})

    with tracking.tracked_run(run_id=parent_run or launcher_run,
                              run_name=None if parent_run else f"study-{cfg.study_name}") as (parent, _):
        if not parent_run:
            study.set_user_attr(tuning.PARENT_RUN_ATTR, parent.info.run_id)
            tracking.log_config(cfg)  # its storage holds no password (TuneConfig refuses one)
            mlflow.set_tags({**tracking.run_tags("tuning", cfg.dataset), "study_name": cfg.study_name})
            mlflow.log_artifact(cfg.search_space)
            tracking.log_datasets(data)
        before = len(study.trials)
        print(f"study {cfg.study_name} ({before} trials so far) in {tuning.storage_label(cfg)}; "
              f"parent run {parent.info.run_id}", flush=True)

        if job_folder:
            dead = on_slurm(cfg, space, study, parent.info.run_id, counts, job_folder)
        else:
            dead = on_this_machine(cfg, space, study, parent.info.run_id, counts, data)

        best = tuning.log_study(study, cfg, data)
        print(tuning.summary_table(study))
        failure = tuning.invocation_failure(study, before, dead)
        if failure:
            raise StepFailed(failure)  # inside the parent run, which this ends FAILED

    print(f"study {cfg.study_name}: {len(study.trials) - before} trials added, {len(study.trials)} in all; "
          + (f"best trial {best.number} val_accuracy={best.value:.4f} (run {best.user_attrs[tuning.RUN_ID_ATTR]})"
             if best else "no trial completed") + f"; parent run {parent.info.run_id}", flush=True)


def on_this_machine(cfg: TuneConfig, space: dict, study, parent_run_id: str, counts: list, data) -> list[str]:
    """Worker 0 is this process; the others are fresh interpreters on the same study. How each that died ended."""
    spawn = multiprocessing.get_context("spawn")
    others = [spawn.Process(target=tuning.work, args=(cfg, space, parent_run_id, i, n), daemon=True)
              for i, n in enumerate(counts[1:], start=1)]
    for process in others:
        process.start()
    tuning.work(cfg, space, parent_run_id, 0, counts[0], data)
    for process in others:
        process.join()
        if process.exitcode:
            tuning.fail_trials_of(study, tuning.WORKER_ATTR, tuning.worker_name(process.pid))
    dead = [f"worker {i} died (exit code {process.exitcode})" for i, process in enumerate(others, start=1)
            if process.exitcode]
    if dead:  # a worker killed mid-epoch leaves its progress bar's line unfinished on the terminal
        print(file=sys.stderr, flush=True)
    return dead


def on_slurm(cfg: TuneConfig, space: dict, study, parent_run_id: str, counts: list, job_folder: str) -> list[str]:
    """The workers are the tasks of one Slurm array job; how each that did not complete ended.
    The batch script and each task's output are logged to the parent run, under slurm/."""
    mlflow.log_artifact(os.path.join(job_folder, slurm.SCRIPT), "slurm")
    job_id = slurm.submit(job_folder, cfg, space, parent_run_id, counts)
    print(f"Slurm array job {job_id}: {len(counts)} tasks, one worker each; waiting for it", flush=True)
    try:
        states = slurm.wait(job_id, slurm.time_allowed(job_id, cfg, len(counts)))
    finally:  # also after Ctrl-C, which cancelled the array: its tasks have ended
        tuning.fail_trials_of(study, tuning.SLURM_JOB_ATTR, job_id)
        tuning.retry_interrupted_trials_of(study, tuning.SLURM_JOB_ATTR, job_id)
        for name in sorted(os.listdir(job_folder)):
            if name.startswith("task-"):
                mlflow.log_artifact(os.path.join(job_folder, name), "slurm")
    for task, state in states.items():
        print(f"Slurm task {job_id}_{task}: {state}", flush=True)
    return [f"Slurm task {job_id}_{task} ended {state}" for task, state in states.items() if state != "COMPLETED"]


def main(argv=None) -> None:
    cli.run("tune", tune, TuneConfig, __doc__, argv)


if __name__ == "__main__":
    main()
