"""The `tune` step: an Optuna study whose trials are nested MLflow runs under one parent run.

    python -m steps.tune --n_trials 20 --epochs 3
    mlflow run . -e tune -P n_trials=20 --env-manager local
    python -m steps.tune --workers 2                  # two local processes on one study

Run the same command again (same study_name and storage) to add trials to the same study and
parent run; a trial whose worker died is failed and rerun. The step exits 1, its parent run
FAILED, when every trial it added failed or one of its worker processes died. Workers on other
machines join a study by running this step with the same study_name and a shared PostgreSQL storage.
"""
import multiprocessing

import mlflow
import optuna

from mnistflow import cli, tracking, tuning
from mnistflow.config import TuneConfig
from mnistflow.errors import StepFailed


def tune(cfg: TuneConfig) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    launcher_run = cli.launcher_run()
    space = tuning.load_search_space(cfg.search_space)
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

        # Worker 0 is this process; the others are fresh interpreters on the same study.
        counts = tuning.shares(cfg.n_trials, cfg.workers)
        spawn = multiprocessing.get_context("spawn")
        others = [spawn.Process(target=tuning.work, args=(cfg, space, parent.info.run_id, i, n), daemon=True)
                  for i, n in enumerate(counts[1:], start=1)]
        for process in others:
            process.start()
        tuning.work(cfg, space, parent.info.run_id, 0, counts[0], data)
        for process in others:
            process.join()
            if process.exitcode:
                tuning.fail_trials_of(study, process.pid)

        best = tuning.log_study(study, cfg, data)
        print(tuning.summary_table(study))
        failure = tuning.invocation_failure(study, before, [process.exitcode for process in others])
        if failure:
            raise StepFailed(failure)  # inside the parent run, which this ends FAILED

    print(f"study {cfg.study_name}: {len(study.trials) - before} trials added, {len(study.trials)} in all; "
          + (f"best trial {best.number} val_accuracy={best.value:.4f} (run {best.user_attrs[tuning.RUN_ID_ATTR]})"
             if best else "no trial completed") + f"; parent run {parent.info.run_id}", flush=True)


def main(argv=None) -> None:
    cli.run("tune", tune, TuneConfig, __doc__, argv)


if __name__ == "__main__":
    main()
