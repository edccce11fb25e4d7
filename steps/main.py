"""The `main` entry point: train → tune → register → plot_loss as child runs of one pipeline run.

    mlflow run . --env-manager local                              # the whole pipeline
    mlflow run . --env-manager local -P epochs=2 -P n_trials=4
    mlflow run . --env-manager local -P force=true                # rerun every step
    mlflow run . --env-manager uv                                 # in conda.yaml's environment, built with uv

Each step is launched with mlflow.projects.run, in the environment manager this run was started
with: under conda or uv, MLflow names the environment it builds by a hash of conda.yaml, so each
step finds the one main runs in and reuses it. Run ids are passed on: register gets the better of
the train run and the tune parent run (by test accuracy), plot_loss the run that was registered.
A step whose earlier run FINISHED with the same parameters, on the same data directory and study
storage (where a parameter left empty leaves them to $MNISTFLOW_DATA_DIR or
$MNISTFLOW_OPTUNA_STORAGE), at the same git commit and with the same uncommitted changes, is reused
instead of rerun; the summary says why each step ran or was reused.
"""
import dataclasses

from mnistflow import cli
from mnistflow.config import PipelineConfig
from mnistflow.errors import StepFailed


def study_name(cfg: PipelineConfig) -> str:
    # One study per objective: trials of different budgets or data must not be compared.
    return f"{cfg.dataset}-pipeline-{cfg.tune_epochs}ep-{cfg.max_train_samples or 'all'}"


def run_steps(cfg: PipelineConfig, env: str) -> list:
    """Each step's StepRun (mnistflow/pipeline.py), run or reused, in the order they ran."""
    import mlflow  # here, as in run_pipeline: not loaded for --help

    from mnistflow import pipeline, tuning

    common = {"dataset": cfg.dataset, "max_train_samples": cfg.max_train_samples, "data_dir": cfg.data_dir}
    # What "" leaves to the environment: a step run on other data or another study is not reused.
    data = {"data_dir": pipeline.data_dir(cfg.data_dir)}
    train = pipeline.get_or_run("train", {**common, "epochs": cfg.epochs}, data, env, cfg.force)
    tune = pipeline.get_or_run("tune", {**common, "n_trials": cfg.n_trials, "epochs": cfg.tune_epochs,
                                        "study_name": study_name(cfg), "storage": cfg.storage},
                               {**data, "storage": pipeline.study_storage(cfg.storage)}, env, cfg.force)
    study_parent = mlflow.get_run(tune.run.data.tags.get(tuning.STUDY_PARENT_TAG, tune.run.info.run_id))
    best = max((train.run, study_parent), key=lambda run: run.data.metrics.get("test_accuracy", -1.0))
    register = pipeline.get_or_run("register", {"run_id": best.info.run_id, "model_name": cfg.model_name,
                                                "min_accuracy": cfg.min_accuracy, "recall_margin": cfg.recall_margin,
                                                "min_robust_accuracy": cfg.min_robust_accuracy,
                                                "max_latency_ms": cfg.max_latency_ms, "data_dir": cfg.data_dir},
                                   data, env, cfg.force)
    plot = pipeline.get_or_run("plot_loss", {"run_id": best.info.run_id}, {}, env, cfg.force)
    return [train, dataclasses.replace(tune, run=study_parent), register, plot]


def run_pipeline(cfg: PipelineConfig) -> None:
    # Here, not at the top: --help and a bad flag answer without loading torch or MLflow.
    import mlflow
    from mlflow.exceptions import ExecutionException

    from mnistflow import pipeline, tracking

    try:
        with tracking.step_run("pipeline", cfg, "development") as (run, _):
            steps = run_steps(cfg, pipeline.env_manager(mlflow.get_run(run.info.run_id)))
            table = pipeline.summary_table(steps)
            mlflow.log_text(table + "\n", "pipeline_summary.txt")
            mlflow.set_tags({f"{s.entry_point}_run_id": s.run.info.run_id for s in steps})
            mlflow.set_tag("mlflow.note.content", pipeline.description(steps))
    except ExecutionException as exc:
        raise StepFailed(f"a step failed ({exc}); its output is above") from None
    print(f"\npipeline run {run.info.run_id}:\n{table}", flush=True)


def main(argv=None) -> None:
    cli.run("main", run_pipeline, PipelineConfig, __doc__, argv)


if __name__ == "__main__":
    main()
