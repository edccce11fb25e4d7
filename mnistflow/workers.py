"""Tune workers: the processes that run a study's trials, each `tuning.work` on its share, on this
machine (launcher=local) or as the tasks of one Slurm array job (launcher=slurm, mnistflow/slurm.py).
Both kinds have one interface: `pool(cfg)` checks and prepares them before any study or run exists,
and the pool's `run` starts them on the study and waits for them.
"""
import multiprocessing
import os
import shutil
import sys
from contextlib import contextmanager

import mlflow

from mnistflow import slurm, tuning
from mnistflow.config import TuneConfig


def shares(n_trials: int, workers: int) -> list[int | None]:
    """Trials per worker: n_trials split as evenly as possible, or no count when only a timeout
    limits the study. A worker whose share would be 0 is not started."""
    if not n_trials:
        return [None] * workers
    return [n_trials // workers + (i < n_trials % workers) for i in range(min(workers, n_trials))]


class Local:
    """Worker 0 is this process (with the progress bar); the others are fresh interpreters on the same study."""

    def __init__(self, cfg: TuneConfig, counts: list):
        self.cfg, self.counts = cfg, counts

    def run(self, space: dict, study, parent_run_id: str, data) -> list[str]:
        """Run every worker to its end; how each that died ended."""
        spawn = multiprocessing.get_context("spawn")
        others = [spawn.Process(target=tuning.work, args=(self.cfg, space, parent_run_id, i, n), daemon=True)
                  for i, n in enumerate(self.counts[1:], start=1)]
        for process in others:
            process.start()
        tuning.work(self.cfg, space, parent_run_id, 0, self.counts[0], data)
        dead = []
        for i, process in enumerate(others, start=1):
            process.join()
            if process.exitcode:
                tuning.fail_trials_of(study, tuning.WORKER_ATTR, tuning.worker_name(process.pid))
                dead.append(f"worker {i} died (exit code {process.exitcode})")
        if dead:  # a worker killed mid-epoch leaves its progress bar's line unfinished on the terminal
            print(file=sys.stderr, flush=True)
        return dead

    def close(self) -> None:
        pass


class Slurm:
    """The workers are the tasks of one Slurm array job, whose batch script Slurm has checked
    (`slurm.prepare`) when this is made; its job folder is removed on `close`."""

    def __init__(self, cfg: TuneConfig, counts: list):
        self.cfg, self.counts = cfg, counts
        self.job_folder = slurm.prepare(cfg, len(counts))

    def run(self, space: dict, study, parent_run_id: str, data) -> list[str]:
        """Submit the array and wait for it; how each task that did not complete ended. The batch
        script and each task's output are logged to the active (parent) run, under slurm/."""
        mlflow.log_artifact(os.path.join(self.job_folder, slurm.SCRIPT), "slurm")
        job_id = slurm.submit(self.job_folder, self.cfg, space, parent_run_id, self.counts)
        print(f"Slurm array job {job_id}: {len(self.counts)} tasks, one worker each; waiting for it", flush=True)
        try:
            states = slurm.wait(job_id, slurm.time_allowed(job_id, self.cfg, len(self.counts)))
        finally:  # also after Ctrl-C, which cancelled the array: its tasks have ended
            tuning.fail_trials_of(study, tuning.SLURM_JOB_ATTR, job_id)
            tuning.retry_interrupted_trials_of(study, tuning.SLURM_JOB_ATTR, job_id)
            for name in sorted(os.listdir(self.job_folder)):
                if name.startswith("task-"):
                    mlflow.log_artifact(os.path.join(self.job_folder, name), "slurm")
        for task, state in states.items():
            print(f"Slurm task {job_id}_{task}: {state}", flush=True)
        return [f"Slurm task {job_id}_{task} ended {state}" for task, state in states.items() if state != "COMPLETED"]

    def close(self) -> None:
        shutil.rmtree(self.job_folder, ignore_errors=True)


@contextmanager
def pool(cfg: TuneConfig):
    """The workers cfg.launcher asks for, one per share of cfg.n_trials (at most cfg.workers).
    Made before any study or run: a job Slurm would refuse leaves nothing behind."""
    workers = (Slurm if cfg.launcher == "slurm" else Local)(cfg, shares(cfg.n_trials, cfg.workers))
    try:
        yield workers
    finally:
        workers.close()
