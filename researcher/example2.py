"""Example 2: hyperparameter search as a hierarchy of runs: one parent run for the Optuna study,
one nested child run per trial, on Fashion-MNIST.

    python researcher/example2.py                      # settings from cfg/ex2.yaml
    python researcher/example2.py --trials 10 --epochs 3

The MLflow UI shows the trials folded under the parent; compare them there side by side. The
full version (pruning, parallel workers, resuming a study) is the tune step: steps/tune.py.
"""
import mlflow
import optuna

import helpers
from mnistflow import data as datasets
from mnistflow import models, tracking
from mnistflow.config import MAX_LR, TrainConfig
from mnistflow.errors import ConfigError, Diverged, StepError
from mnistflow.train import fit, seed_everything, select_device

config = helpers.load_config("ex2.yaml")
try:  # every setting checked and the data read before MLflow gets anything
    if config["trials"] < 1:
        raise ConfigError(f"trials={config['trials']} is not allowed; it must be >= 1")
    if not 0 < config["lr_low"] < config["lr_high"] <= MAX_LR:
        raise ConfigError(f"lr_low={config['lr_low']}, lr_high={config['lr_high']} are not allowed; "
                          f"they must be 0 < lr_low < lr_high <= {MAX_LR:g}")
    if not config["batch_sizes"] or not all(type(size) is int and size >= 1 for size in config["batch_sizes"]):
        raise ConfigError(f"batch_sizes={config['batch_sizes']} is not allowed; give a list of whole numbers >= 1")
    TrainConfig(dataset=config["dataset"], model=config["model"], epochs=config["epochs"], seed=config["seed"],
                max_train_samples=config["max_train_samples"]).validate()  # the train step's own rules
    data = datasets.load(config["dataset"], config["data_dir"], seed=config["seed"],
                         max_train_samples=config["max_train_samples"])
except StepError as exc:
    helpers.error(str(exc))
helpers.use_tracking(config)
optuna.logging.set_verbosity(optuna.logging.WARNING)
device = select_device("auto")


def objective(trial: optuna.Trial) -> float:
    """One trial: sample settings, train, and return the best validation accuracy."""
    train_cfg = TrainConfig(dataset=config["dataset"], model=config["model"], epochs=config["epochs"],
                            lr=trial.suggest_float("lr", config["lr_low"], config["lr_high"], log=True),
                            batch_size=trial.suggest_categorical("batch_size", config["batch_sizes"]),
                            seed=config["seed"], data_dir=config["data_dir"]).validate()
    seed_everything(train_cfg.seed, train_cfg.deterministic)
    net = models.build(train_cfg.model, train_cfg.mirror)
    # nested=True makes this run a child of the active (parent) run.
    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.log_params({**trial.params, "trial_number": trial.number, "epochs": train_cfg.epochs})
        mlflow.set_tag("trial_number", str(trial.number))
        state = fit(train_cfg, net, data, device, log_metrics=lambda metrics, step: mlflow.log_metrics(metrics, step=step))
        best_val_accuracy = max(epoch["val_accuracy"] for epoch in state["history"])
        mlflow.log_metric("best_val_accuracy", best_val_accuracy)
    return best_val_accuracy


with mlflow.start_run(run_name="example2-study") as parent:
    mlflow.log_params({key: value for key, value in config.items() if key != "tracking_uri"})
    mlflow.set_tags(tracking.run_tags("tuning", config["dataset"], note="researcher example 2"))
    # A seeded sampler makes the same config search the same settings again.
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config["seed"]))
    try:
        study.optimize(objective, n_trials=config["trials"])
    except Diverged as exc:  # leaving the `with` blocks on an error ends the trial's run and this one FAILED
        helpers.error(str(exc), exc.exit_code)
    # The outcome belongs to the parent: the best value as a metric, the best settings as params.
    mlflow.log_metric("best_val_accuracy", study.best_value)
    mlflow.log_params({f"best_{name}": value for name, value in study.best_params.items()})

print(f"parent run {parent.info.run_id}: best trial {study.best_trial.number} "
      f"val_accuracy={study.best_value:.4f} with {study.best_params}")
print(f"overlay the trials' validation losses: python researcher/log_plot.py --run-id {parent.info.run_id}")
