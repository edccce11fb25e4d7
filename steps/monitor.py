"""The `monitor` step: does the served model still fit its traffic? A window of the serve step's
inference log, per model version, against the reference each version's model was logged with.

    python -m steps.monitor --window 24h
    mlflow run . -e monitor -P window=1h --env-manager local
    mlflow run . -e monitor -P retrain=true --env-manager local   # on a breach, run the pipeline anew

It logs a run (each version's share of the traffic, latency, confidence, live accuracy from
feedback, drift per column, a drift table and a plot per version) and prints what moved. A
breached limit (drift in any column, or live accuracy below min_accuracy) ends the run FAILED
and the step with exit code 1, so that cron or CI can act. See docs/serving.md.
"""
from mnistflow import cli
from mnistflow.config import MonitorConfig


def retrain(cfg: MonitorConfig, dataset: str) -> None:
    """The pipeline (`main`) for the model's dataset, every step anew, as a child of the monitor's
    run, in its environment manager; its run id is tagged on the monitor's run."""
    import mlflow
    from mlflow.exceptions import ExecutionException

    from mnistflow import pipeline
    from mnistflow.errors import StepFailed

    monitor_run = mlflow.get_run(mlflow.active_run().info.run_id)
    parameters = {"dataset": dataset, "model_name": cfg.model_name, "data_dir": cfg.data_dir, "force": "true"}
    print(f"== retraining: main {' '.join(f'{key}={value}' for key, value in parameters.items())}", flush=True)
    try:
        mlflow.projects.run(pipeline.PROJECT_DIR, "main", parameters=parameters,
                            env_manager=pipeline.env_manager(monitor_run),
                            experiment_id=monitor_run.info.experiment_id, synchronous=True)
    except ExecutionException:
        raise StepFailed("the retraining pipeline (main) promoted no model; its output above says why") from None
    finally:  # its run, whether it promoted a model or not
        for child in mlflow.search_runs([monitor_run.info.experiment_id], output_format="list",
                                        filter_string=f"tags.mlflow.parentRunId = '{monitor_run.info.run_id}'"):
            mlflow.set_tag("retrain_run_id", child.info.run_id)


def monitor(cfg: MonitorConfig) -> None:
    from mnistflow import monitoring  # here: --help and a bad flag answer without loading MLflow

    monitoring.monitor(cfg, (lambda dataset: retrain(cfg, dataset)) if cfg.retrain else None)


def main(argv=None) -> None:
    cli.run("monitor", monitor, MonitorConfig, __doc__, argv)


if __name__ == "__main__":
    main()
