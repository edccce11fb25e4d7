"""Checks that run inside the `mlflow run` command's own process, before it creates a run.

`mlflow run` creates its run and logs every -P value as a param before any step of ours starts,
and it talks to the tracking server (with MLflow's retries and tracebacks) before a step can check
access. Two of MLflow's plugin hooks run in that process earlier, and this project uses both:

- MLflow instantiates every `mlflow.run_context_provider` when it imports its registry, which the
  `mlflow` command does before it reads its options: `StorageParameterCheck` refuses there a
  storage parameter that holds a password, so the password is never logged.
- MLflow asks every `mlflow.request_header_provider` before each request: auth.py's provider runs
  the access check the first time (for http(s) tracking servers).
"""
import os
import sys

from mlflow.tracking.context.abstract_context import RunContextProvider

from mnistflow.config import refuse_storage_password
from mnistflow.errors import ConfigError

PROG = "mlflow run"


def is_mlflow_run_command(argv: list[str] | None = None) -> bool:
    """Whether this process is `mlflow run …` (the console script or `python -m mlflow run …`)."""
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] != "run":
        return False
    program = os.path.normpath(argv[0])
    return os.path.basename(program) == "mlflow" or program.endswith(os.path.join("mlflow", "__main__.py"))


def run_parameters(args: list[str]) -> dict[str, str]:
    """The -P name=value pairs of `mlflow run`'s arguments, in each spelling click accepts."""
    values, rest = [], iter(args)
    for arg in rest:
        if arg in ("-P", "--param-list"):
            values.append(next(rest, ""))
        elif arg.startswith("--param-list="):
            values.append(arg.removeprefix("--param-list="))
        elif arg.startswith("-P"):
            values.append(arg.removeprefix("-P"))
    return dict(value.split("=", 1) for value in values if "=" in value)


def exit_with(error: Exception) -> None:
    print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


class StorageParameterCheck(RunContextProvider):
    """Adds no tags; being built is the hook (see the module docstring). MLflow builds it in every
    process that imports mlflow, which is why config.py imports nothing heavy."""

    def __init__(self):
        storage = run_parameters(sys.argv[2:]).get("storage") if is_mlflow_run_command() else None
        if storage:
            try:
                refuse_storage_password(storage)
            except ConfigError as exc:
                exit_with(exc)

    def in_context(self) -> bool:
        return False

    def tags(self) -> dict:
        return {}
