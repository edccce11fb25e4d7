"""What every step does around its work: read its flags, make sure the tracking server lets this
client in, report what stopped it in one line with an exit code, and exit fast.
"""
import gc
import os
import sys

from mnistflow import auth, flags
from mnistflow.errors import StepError


def run(prog: str, step, config_class, description: str, argv=None) -> None:
    """`step(cfg)` with the config its flags give (see mnistflow/config.py); a StepError is one line
    on stderr, `<prog>: error: <message>` (`refused` for a refusal), and the error's exit code."""
    cfg = flags.parse(config_class, prog, description, argv)
    try:
        auth.check_access()
        step(cfg)
    except StepError as exc:
        print(f"{prog}: {exc.verdict}: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    # Python's last garbage collection at exit walks every object torch and mlflow made, for
    # seconds; frozen objects are skipped, and the OS frees the memory anyway.
    gc.freeze()


def launcher_run() -> str | None:
    """The run `mlflow run` opened for this step, if it did. Taken out of the environment, where
    MLflow would reopen it for every other run this process starts (a trial, a register run)."""
    return os.environ.pop("MLFLOW_RUN_ID", None)


def describe_launcher(run_id: str | None, name: str, note: str, tags: dict | None = None) -> None:
    """Name the run `mlflow run` opened for this step (`run_id`, if it did) and say what the step
    did, where the step logs its work elsewhere or not at all: a random name and an empty page
    would say nothing in the MLflow UI."""
    if run_id:
        import mlflow  # here, not at the top: a step's --help and a bad flag need no MLflow

        client = mlflow.MlflowClient()
        client.update_run(run_id, name=name)
        for key, value in {"mlflow.note.content": note, **(tags or {})}.items():
            client.set_tag(run_id, key, value)
