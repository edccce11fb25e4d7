"""What MLflow runs of ours in every process that imports it, and the checks that stop `mlflow run`
before it creates a run.

`mlflow run` creates its run and logs every -P value as a param before any step of ours starts,
and it talks to the tracking server (with MLflow's retries and tracebacks) before a step can check
access. Two of MLflow's plugin hooks run in that process earlier, and this project uses both:

- MLflow instantiates every `mlflow.run_context_provider` when it imports its registry, which
  `import mlflow` does, before the `mlflow` command reads its options: `MlflowRunCheck` refuses
  there a tracking URI MLflow has no store for, and a storage parameter that holds a password (so
  the password is never logged).
- MLflow hands every request to the `mlflow.request_auth_provider` that MLFLOW_TRACKING_AUTH names:
  auth.py's runs the access check the first time (for http(s) tracking servers). This module makes
  it the default, early enough for the first request.
"""
import importlib.metadata
import os
import sys
import urllib.parse

from mnistflow.config import refuse_storage_password
from mnistflow.errors import ConfigError, StepError

PROG = "mlflow run"
AUTH_PLUGIN = "mnistflow"  # auth.py's request auth provider: the API key and the login only to the tracking server
# MLflow reads this for each request, so setting it here, when `import mlflow` builds MlflowRunCheck,
# is before the first one. A user's own choice stays (auth.check_access then says what it costs).
os.environ.setdefault("MLFLOW_TRACKING_AUTH", AUTH_PLUGIN)

# The stores MLflow builds for a tracking or registry URI ("" is a path); postgresql+psycopg2 etc. too.
STORE_SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                 "databricks-uc", "uc")
STORE_PLUGINS = {"tracking": "mlflow.tracking_store", "registry": "mlflow.model_registry_store"}  # more schemes


def check_store_uri(uri: str, role: str) -> None:
    """Refuse a tracking or registry URI (`role`) MLflow has no store for (`sqlit:///…`, `bogus://x`),
    which it would only report with a traceback once a step is under way."""
    scheme = urllib.parse.urlsplit(uri).scheme.lower().split("+")[0]
    plugins = {entry.name for entry in importlib.metadata.entry_points(group=STORE_PLUGINS[role])}
    if scheme not in STORE_SCHEMES and scheme not in plugins:
        raise ConfigError(f"the {role} URI {uri!r} names no store MLflow knows ({scheme}:); use https://host, "
                          "http://host, a path, file:, sqlite:, postgresql:, mysql:, mssql: or databricks")


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


class MlflowRunCheck:
    """MLflow's RunContextProvider (MLflow calls its in_context and tags, and checks no base class, so
    this module loads no MLflow for auth.py). Adds no tags; being built is the hook (see the module
    docstring). MLflow builds it in every process that imports mlflow, which is why config.py imports
    nothing heavy."""

    def __init__(self):
        if not is_mlflow_run_command():
            return
        # `mlflow run` has no flag for these: it reads them from the environment, as MLflow does.
        uris = {"tracking": os.environ.get("MLFLOW_TRACKING_URI"), "registry": os.environ.get("MLFLOW_REGISTRY_URI")}
        storage = run_parameters(sys.argv[2:]).get("storage")
        try:
            for role, uri in uris.items():
                if uri:
                    check_store_uri(uri, role)
            if storage:
                refuse_storage_password(storage)
        except StepError as exc:
            exit_with(exc)

    def in_context(self) -> bool:
        return False

    def tags(self) -> dict:
        return {}
