"""Chaining entry points: run one through `mlflow.projects.run` as a child of the active run, or
reuse its earlier run when nothing that matters has changed (the MLflow multistep-workflow way):
the same parameters, the same data and study storage they resolve to, the same git commit and the
same uncommitted changes.
"""
import hashlib
import json
import os
import shlex
import subprocess
import urllib.parse
from dataclasses import dataclass

import mlflow
import pandas
import sqlalchemy
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PROJECT_ENTRY_POINT, MLFLOW_PROJECT_ENV

from mnistflow import data as datasets, tracking, tuning
from mnistflow.config import TuneConfig
from mnistflow.plot_loss import ARTIFACT as PLOT_LOSS_ARTIFACT

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKTREE_TAG = "git_worktree_sha256"  # on a step run: worktree_digest() when it was launched
# On a step run: what its parameters resolved to where they leave it to the environment (the data
# directory, the study storage), as JSON.
RESOLVED_TAG = "resolved_inputs"


@dataclass
class StepRun:
    entry_point: str
    run: mlflow.entities.Run
    reused: bool
    why: str  # why it was reused, or run anew


def worktree_digest(directory: str = PROJECT_DIR) -> str | None:
    """A sha256 of how the git working tree differs from its commit: `git diff HEAD` (staged and
    not) and every untracked file that .gitignore does not exclude, by path and content.
    None outside a git working tree."""
    def git(*args: str) -> bytes:
        # --no-optional-locks: reading must not rewrite the index under another git command.
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=directory, capture_output=True,
                              check=True).stdout
    try:
        digest = hashlib.sha256(git("diff", "HEAD", "--binary", "--no-ext-diff"))
        top = git("rev-parse", "--show-toplevel").decode().strip()
        for path in sorted(git("ls-files", "--others", "--exclude-standard", "--full-name", "-z", ":/").split(b"\0")):
            if path:
                with open(os.path.join(top, os.fsdecode(path)), "rb") as f:
                    digest.update(b"\0untracked\0" + path + b"\0" + hashlib.sha256(f.read()).digest())
    except (OSError, subprocess.CalledProcessError):
        return None
    return digest.hexdigest()


def env_manager(run: mlflow.entities.Run) -> str:
    """The environment manager `mlflow run` used for `run`: it tags conda, virtualenv and uv; local goes untagged."""
    return run.data.tags.get(MLFLOW_PROJECT_ENV, "local")


def data_dir(parameter: str) -> str:
    """The data directory a step reads for its data_dir parameter (data.resolve_data_dir: it, else
    $MNISTFLOW_DATA_DIR, else the download cache); a relative one from the project directory, where steps run."""
    given = parameter or os.environ.get(datasets.DATA_DIR_ENV, "")
    root, _ = datasets.resolve_data_dir(os.path.join(PROJECT_DIR, os.path.expanduser(given)) if given else "")
    return os.path.realpath(root)


def study_storage(parameter: str) -> str:
    """The Optuna storage the tune step opens for its storage parameter (tuning.storage_url), without
    its password (only a digest of it when it comes from the environment); a relative SQLite path
    from the project directory, where steps run."""
    url = tuning.storage_url(TuneConfig(storage=parameter))
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return "an unreadable URL"  # the tune step says so; no part of it is kept
    if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
        parsed = parsed.set(database=os.path.join(PROJECT_DIR, parsed.database))
    shown = parsed.render_as_string(hide_password=True)
    if not parameter and os.environ.get(tuning.STORAGE_ENV):
        # A storage given in the environment stays out of the store, as in every message
        # (tuning.storage_label): only a digest, enough to tell one storage from another.
        return f"${tuning.STORAGE_ENV} sha256:{hashlib.sha256(shown.encode()).hexdigest()[:16]}"
    return shown


def reusable_run(entry_point: str, parameters: dict, experiment_id: str, commit: str,
                 digest: str | None, resolved: dict) -> tuple[mlflow.entities.Run | None, str]:
    """The newest FINISHED run of this entry point with these parameters, which resolved to the same
    inputs (`resolved`), from this git commit and working tree (`digest`), or None; and why, for the
    summary.

    Parameters are compared as MLflow stores those of `mlflow run`: as shell-quoted strings
    (an empty value is stored as '').
    """
    expected = {key: shlex.quote(value) for key, value in parameters.items()}
    candidates = [run for run in mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}' AND attributes.status = 'FINISHED'")
        if all(run.data.params.get(key) == value for key, value in expected.items())]
    if not candidates:
        return None, "no earlier run with these parameters"
    same_inputs = [run for run in candidates if json.loads(run.data.tags.get(RESOLVED_TAG, "{}")) == resolved]
    if not same_inputs:
        theirs = json.loads(candidates[0].data.tags.get(RESOLVED_TAG, "{}"))
        changed = [name for name in resolved if theirs.get(name) != resolved[name]]
        return None, f"{' and '.join(changed)} changed since run {candidates[0].info.run_id[:8]}"
    candidates = same_inputs
    same_commit = [run for run in candidates if run.data.tags.get(MLFLOW_GIT_COMMIT) == commit]
    if not same_commit:
        return None, f"commit {commit[:8]} differs from run {candidates[0].info.run_id[:8]}'s"
    for run in same_commit:
        if digest is not None and run.data.tags.get(WORKTREE_TAG) == digest:
            return run, f"same parameters, commit {commit[:8]} and working tree"
    return None, f"working tree differs from run {same_commit[0].info.run_id[:8]}'s"


def get_or_run(entry_point: str, parameters: dict, resolved: dict, env: str, force: bool = False) -> StepRun:
    """Run an entry point of this project as a child of the active run, unless an identical run
    FINISHED before (and not `force`). `resolved`: what the step's parameters resolve to where they
    leave it to the environment ({"data_dir": data_dir(...)}), which must be the same too.
    Raises mlflow's ExecutionException when the step fails."""
    parameters = {key: str(value) for key, value in parameters.items()}
    parent = mlflow.active_run()
    commit, digest = tracking.git_commit(), worktree_digest()
    earlier, why = (None, "force") if force else \
        reusable_run(entry_point, parameters, parent.info.experiment_id, commit, digest, resolved)
    if earlier is not None:
        print(f"== {entry_point}: reusing run {earlier.info.run_id} ({why})", flush=True)
        return StepRun(entry_point, earlier, reused=True, why=why)
    print(f"== {entry_point}: running ({why}) {' '.join(f'{k}={v}' for k, v in parameters.items())}", flush=True)
    submitted = mlflow.projects.run(PROJECT_DIR, entry_point, parameters=parameters, env_manager=env,
                                    experiment_id=parent.info.experiment_id, synchronous=True)
    # Set once the step FINISHED (mlflow.projects.run returns no earlier): a run without them is never reused.
    mlflow.MlflowClient().set_tag(submitted.run_id, RESOLVED_TAG, json.dumps(resolved))
    if digest is not None:
        mlflow.MlflowClient().set_tag(submitted.run_id, WORKTREE_TAG, digest)
    return StepRun(entry_point, mlflow.get_run(submitted.run_id), reused=False, why=why)


def key_figures(step: StepRun) -> str:
    metrics, tags = step.run.data.metrics, step.run.data.tags
    if step.entry_point == "train":
        return f"test_accuracy {metrics['test_accuracy']:.4f}"
    if step.entry_point == "tune":
        return (f"best_val_accuracy {metrics.get('best_val_accuracy', float('nan')):.4f}, "
                f"test_accuracy {metrics.get('test_accuracy', float('nan')):.4f}, "
                f"{metrics.get('trials_complete', 0):.0f} complete / {metrics.get('trials_pruned', 0):.0f} pruned")
    if step.entry_point == "register":
        return (f"{tags.get('model_name')} version {tags.get('model_version')} @{tags.get('alias')} "
                f"(source run {tags.get('source_run_id', '')[:8]}, gate accuracy {metrics.get('gate_test_accuracy', 0):.4f})")
    return f"{PLOT_LOSS_ARTIFACT} on run {step.run.data.params.get('run_id', '')[:8]}"


def summary_table(steps: list[StepRun]) -> str:
    """One row per step: its run, whether it ran or was reused, its key figures, and why."""
    table = pandas.DataFrame({
        "step": [s.entry_point for s in steps],
        "run id": [s.run.info.run_id for s in steps],
        "ran": ["reused" if s.reused else "new" for s in steps],
        "key figures": [key_figures(s) for s in steps],
        "why": [s.why for s in steps],
    })
    # pandas right-aligns text; padding each value to its column's width makes it read left to right.
    left_aligned = {column: f"{{:<{table[column].str.len().max()}}}".format for column in table}
    text = table.to_string(index=False, justify="left", formatters=left_aligned)
    return "\n".join(line.rstrip() for line in text.splitlines())


def run_link(run: mlflow.entities.Run) -> str:
    """A Markdown link to the run's page, relative to the MLflow UI's own address."""
    return f"[{run.info.run_name}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})"


def description(steps: list[StepRun]) -> str:
    """The pipeline run's description in the MLflow UI: each step's run with a link, whether it ran
    or was reused, its key figures; and the model version registered, with a link."""
    lines = [f"- **{s.entry_point}** {run_link(s.run)}, {'reused' if s.reused else 'new'}: {key_figures(s)}"
             for s in steps]
    registered = next(s.run.data.tags for s in steps if s.entry_point == "register")
    name, version = registered["model_name"], registered["model_version"]
    return "\n".join([f"Registered [{name} version {version}](#/models/{urllib.parse.quote(name)}/versions/{version}) "
                      f"@{registered['alias']}. The steps:", "", *lines])
