"""Small helpers the examples share: a YAML config whose keys the command line can override,
a one-line stop on bad input, and a run's parameters fetched back by its id."""
import argparse
import os
import sys
from typing import NoReturn

import mlflow
import yaml

from mnistflow import auth
from mnistflow.config import OneLineParser, parse_bool
from mnistflow.errors import StepError

CFG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cfg")


def load_config(default_file: str, argv=None) -> dict:
    """Read cfg/<default_file> (or --config PATH), then apply `--key value` overrides.

    Every key of the YAML file is a flag of the type of its value there: `--epochs 3` is a whole
    number, `--lr 0.005` a number, `--batch_sizes [64,128]` a list. `--run-id` and `--run_id`
    are the same flag. A value of the wrong type stops the script in one line (exit code 2).
    """
    first = argparse.ArgumentParser(add_help=False)  # only to find which YAML file to read
    first.add_argument("--config", default=os.path.join(CFG_DIR, default_file))
    config_file = first.parse_known_args(argv)[0].config
    parser = OneLineParser(prog=_script_name(), description=sys.modules["__main__"].__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config_file, help="the YAML file of defaults")
    try:
        with open(config_file) as f:
            config = yaml.safe_load(f) or {}
    except OSError as exc:
        parser.error(f"cannot read config {config_file}: {exc.strerror}")
    for key, value in config.items():
        flags = sorted({f"--{key}", f"--{key.replace('_', '-')}"})
        parser.add_argument(*flags, dest=key, default=value, type=_parser_for(value), help=f"default: {value!r}")
    return vars(parser.parse_args(argv))


def _parser_for(value):
    """How a flag's text is read: as the type of its YAML default (a run id of digits stays text)."""
    if isinstance(value, bool):
        return parse_bool
    if isinstance(value, (int, float)):
        return type(value)
    if isinstance(value, list):
        return _yaml_list
    return str


def _yaml_list(text: str) -> list:
    value = yaml.safe_load(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list; write it like [64,128]")
    return value


def error(message: str) -> NoReturn:
    """Stop on bad input as the project's steps do: one line, exit code 2, nothing written."""
    print(f"{_script_name()}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _script_name() -> str:
    return os.path.basename(sys.argv[0])


def use_tracking(config: dict) -> None:
    """Point MLflow at the config's tracking URI and experiment ("" = $MLFLOW_TRACKING_URI or the default),
    once the steps' access check passes (a URI MLflow has no store for, a server that is down: one line)."""
    if config.get("tracking_uri"):
        mlflow.set_tracking_uri(config["tracking_uri"])
    try:
        auth.check_access()
    except StepError as exc:
        error(str(exc))
    if config.get("experiment"):
        mlflow.set_experiment(config["experiment"])


def run_params(run_id: str) -> dict:
    """The parameters a run logged, as strings (the way MLflow stores them)."""
    return mlflow.MlflowClient().get_run(run_id).data.params
