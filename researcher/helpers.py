"""Small helpers the examples share: a YAML config whose keys the command line can override,
and a run's parameters fetched back by its id."""
import argparse
import os
import sys

import mlflow
import yaml

CFG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cfg")


def load_config(default_file: str, argv=None) -> dict:
    """Read cfg/<default_file> (or --config PATH), then apply `--key value` overrides.

    Every key of the YAML file is a flag of the same type: `--epochs 3` is a number and
    `--batch_sizes [64,128]` a list. `--run-id` and `--run_id` are the same flag.
    """
    first = argparse.ArgumentParser(add_help=False)  # only to find which YAML file to read
    first.add_argument("--config", default=os.path.join(CFG_DIR, default_file))
    config_file = first.parse_known_args(argv)[0].config
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config_file, help="the YAML file of defaults")
    try:
        with open(config_file) as f:
            config = yaml.safe_load(f) or {}
    except OSError as exc:
        parser.error(f"cannot read config {config_file}: {exc.strerror}")
    for key, value in config.items():
        flags = sorted({f"--{key}", f"--{key.replace('_', '-')}"})
        # Text settings stay text (a run id of digits is not a number); others are read as YAML.
        kind = str if isinstance(value, str) else yaml.safe_load
        parser.add_argument(*flags, dest=key, default=value, type=kind, help=f"default: {value!r}")
    return vars(parser.parse_args(argv))


def use_tracking(config: dict) -> None:
    """Point MLflow at the config's tracking URI and experiment ("" = $MLFLOW_TRACKING_URI or the default)."""
    if config.get("tracking_uri"):
        mlflow.set_tracking_uri(config["tracking_uri"])
    if config.get("experiment"):
        mlflow.set_experiment(config["experiment"])


def run_params(run_id: str) -> dict:
    """The parameters a run logged, as strings (the way MLflow stores them)."""
    return mlflow.MlflowClient().get_run(run_id).data.params
