"""The `tune` step: an Optuna study whose trials are nested MLflow runs under one parent run.

    python -m steps.tune --n_trials 20 --epochs 3
    mlflow run . -e tune -P n_trials=20 --env-manager local
    python -m steps.tune --workers 2                  # two local processes on one study
    python -m steps.tune --workers 8 --launcher slurm --storage postgresql+psycopg2://user@dbhost/optuna

Run the same command again (same study_name and storage) to add trials to the same study and
parent run; a trial whose worker died is failed and rerun. The step exits 1, its parent run
FAILED, when every trial it added failed or one of its workers died. With launcher=slurm the
workers are the tasks of one Slurm array job (mnistflow/workers.py) on a shared PostgreSQL storage;
workers on other machines also join a study by running this step with the same study_name and storage.
"""
from mnistflow import cli
from mnistflow.config import TuneConfig
from mnistflow.errors import StepFailed


def tune(cfg: TuneConfig) -> None:
    # Here, not at the top: --help and a bad flag answer without loading torch, Optuna or MLflow.
    import mlflow
    import optuna

    from mnistflow import tracking, tuning, workers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = tuning.load_search_space(cfg.search_space)
    with workers.pool(cfg) as pool:
        data = tuning.load_data(cfg)
        storage = tuning.open_storage(cfg)
        parent_run = tuning.existing_parent_run(cfg, storage)  # the study's, when it has one: trials go there
        study = tuning.open_study(cfg, storage)

        def added_trials(parent) -> tuple:  # what the run `mlflow run` opened says, when the study had a parent
            return (f"add-trials-{cfg.study_name}", f"added trials to study {cfg.study_name}, parent run "
                    f"{parent.info.run_id}", {tuning.STUDY_PARENT_TAG: parent.info.run_id})

        # Its config goes into params: its storage holds no password (TuneConfig refuses one).
        with tracking.step_run(f"study-{cfg.study_name}", cfg, "tuning", tags={"study_name": cfg.study_name},
                               data=data, continues=parent_run, launcher_says=added_trials) as (parent, _):
            if not parent_run:
                study.set_user_attr(tuning.PARENT_RUN_ATTR, parent.info.run_id)
                mlflow.log_artifact(cfg.search_space)
            before = len(study.trials)
            print(f"study {cfg.study_name} ({before} trials so far) in {tuning.storage_label(cfg)}; "
                  f"parent run {parent.info.run_id}", flush=True)
            dead = pool.run(space, study, parent.info.run_id, data)
            best = tuning.log_study(study, cfg, data)
            print(tuning.summary_table(study))
            failure = tuning.invocation_failure(study, before, dead)
            if failure:
                raise StepFailed(failure)  # inside the parent run, which this ends FAILED

    print(f"study {cfg.study_name}: {len(study.trials) - before} trials added, {len(study.trials)} in all; "
          + (f"best trial {best.number} val_accuracy={best.value:.4f} (run {best.user_attrs[tuning.RUN_ID_ATTR]})"
             if best else "no trial completed") + f"; parent run {parent.info.run_id}", flush=True)


def main(argv=None) -> None:
    cli.run("tune", tune, TuneConfig, __doc__, argv)


if __name__ == "__main__":
    main()
