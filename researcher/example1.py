"""Example 1: one training run on Fashion-MNIST, tracked in MLflow, every MLflow call in sight.

    python researcher/example1.py                      # settings from cfg/ex1.yaml
    python researcher/example1.py --epochs 5 --lr 0.005

Data, model and training loop come from the mnistflow package; what this file shows is how a
run is opened, what goes into it, and how to find it again.
"""
import mlflow

import helpers
from mnistflow import data as datasets
from mnistflow import logged_model, models, report, tracking
from mnistflow.config import TrainConfig
from mnistflow.errors import Diverged, StepError
from mnistflow.train import evaluate, fit, seed_everything, select_device

config = helpers.load_config("ex1.yaml")
try:  # every setting checked and the data read before MLflow gets anything
    train_cfg = TrainConfig(dataset=config["dataset"], model=config["model"], epochs=config["epochs"],
                            batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"],
                            data_dir=config["data_dir"], max_train_samples=config["max_train_samples"]).validate()
    data = datasets.load(train_cfg.dataset, train_cfg.data_dir, train_cfg.val_fraction, train_cfg.seed,
                         train_cfg.max_train_samples)
except StepError as exc:
    helpers.error(str(exc))
helpers.use_tracking(config)  # mlflow.set_tracking_uri + mlflow.set_experiment
seed_everything(train_cfg.seed, train_cfg.deterministic)
device = select_device(train_cfg.device)
net = models.build(train_cfg.model, train_cfg.mirror)

# A run is opened with start_run; leaving the `with` block ends it FINISHED (or FAILED on an error).
with mlflow.start_run(run_name=f"example1-{train_cfg.model}") as run:
    # Parameters: what the run was asked to do. Logged once; MLflow refuses to change them later.
    mlflow.log_params({**config, "num_params": models.count_params(net)})
    # Tags: searchable labels, here who ran which commit (tracking.run_tags collects them).
    mlflow.set_tags(tracking.run_tags("development", train_cfg.dataset, note="researcher example 1"))

    # Metrics: numbers over time. `fit` calls this after every epoch (and every few steps),
    # and `step` puts them on the x axis of the MLflow UI's charts.
    def log_metrics(metrics: dict, step: int) -> None:
        mlflow.log_metrics(metrics, step=step)

    try:
        state = fit(train_cfg, net, data, device, log_metrics=log_metrics)
    except Diverged as exc:  # leaving the `with` block on an error ends the run FAILED
        helpers.error(str(exc), exc.exit_code)

    test_loss, test_accuracy, _ = evaluate(net, data.test, device)
    mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})
    # Artifacts: files. A figure goes in as a PNG; the model with a signature and input example.
    report.log_curves(state["history"])
    logged_model.log(net, data)

print(f"run {run.info.run_id}: test_accuracy={test_accuracy:.4f} in experiment {config['experiment']!r}")
print(f"fetched back by its id: lr={helpers.run_params(run.info.run_id)['lr']!r} (MLflow keeps params as text)")
print(f"plot its losses: python researcher/log_plot.py --run-id {run.info.run_id}")
