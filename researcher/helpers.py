"""Small helpers the examples share: a YAML config whose keys the command line can override,
a one-line stop on bad input, and a run's parameters fetched back by its id."""
import argparse
import os
import sys
from typing import NoReturn

import mlflow
import yaml

from mnistflow import auth
from mnistflow.errors import StepError
from mnistflow.flags import OneLineParser, parse_bool

CFG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cfg")


def load_config(default_file: str, argv=None) -> dict:
    """Read cfg/<default_file> (or --config PATH), then apply `--key value` overrides.

    A --config file has the keys of cfg/<default_file>, each with a value of the same kind.
    Every key is a flag of that kind: `--epochs 3` is a whole number, `--lr 0.005` a number,
    `--batch_sizes [64,128]` a list. `--run-id` and `--run_id` are the same flag. A file or a
    value that does not fit stops the script in one line (exit code 2).
    """
    default_path = os.path.join(CFG_DIR, default_file)
    first = argparse.ArgumentParser(add_help=False)  # only to find which YAML file to read
    first.add_argument("--config", default=default_path)
    config_file = first.parse_known_args(argv)[0].config
    parser = OneLineParser(prog=_script_name(), description=sys.modules["__main__"].__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config_file, help="the YAML file of defaults")
    try:
        defaults = _read_yaml(default_path)
        config = _fitting(config_file, _read_yaml(config_file), defaults, default_path)
    except ValueError as exc:
        parser.error(str(exc))
    for key, value in config.items():
        flags = sorted({f"--{key}", f"--{key.replace('_', '-')}"})
        parser.add_argument(*flags, dest=key, default=value, type=_parser_for(defaults[key]),
                            help=f"default: {value!r}")
    return vars(parser.parse_args(argv))


def _read_yaml(path: str):
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc.strerror}")
    except yaml.YAMLError as exc:
        raise ValueError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}")


def _fitting(path: str, config, defaults: dict, default_path: str) -> dict:
    """`config`, read from `path`, if it is a mapping with the keys of `defaults` (read from
    `default_path`), each holding a value of the same kind; else ValueError naming file and key."""
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a mapping of key: value, as {default_path} is")
    for key in config:
        if key not in defaults:
            raise ValueError(f"config {path}: unknown key {key!r}; the keys are those of {default_path}: "
                             + ", ".join(defaults))
    for key, default in defaults.items():
        if key not in config:
            raise ValueError(f"config {path}: no key {key!r}; it needs every key of {default_path}")
        if not _same_kind(config[key], default):
            raise ValueError(f"config {path}: {key}={config[key]!r} is not allowed; it must be "
                             f"{KINDS[_parser_for(default)]}, like {default!r}")
    return config


def _same_kind(value, default) -> bool:
    """Whether a file's value may stand where the default file has `default` (a whole number for a number too)."""
    if type(default) is float:
        return type(value) in (int, float)
    return type(value) is type(default)


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


KINDS = {parse_bool: "true or false", int: "a whole number", float: "a number", _yaml_list: "a list",
         str: "text (quoted where YAML would read a number)"}


def error(message: str, exit_code: int = 2) -> NoReturn:
    """Stop as the project's steps do: one line, and exit code 2 for bad input (nothing written)."""
    print(f"{_script_name()}: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


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
