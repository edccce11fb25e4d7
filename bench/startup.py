"""What does a process of this project spend before and after its work?

    python bench/startup.py --data_dir ../shared/data [--repeats 5] [--repo PATH] [--rows help,servers,imports]

Prints one table of medians, measured side by side (interleaved) in one run, each row also as a
ratio to the import floor, `python -c "import torch, mlflow"`:
  - help: `python -m steps.<step> --help` of each step (goal: a fraction of the floor);
  - servers: `python serverFolder/<script>.py --help` of each server script (goal: a fraction);
  - imports: `python -c "import mnistflow.<module>"` of each core module;
  - run: the fixed cost of a 1-epoch run, `mlflow run <repo> -e train -P epochs=1 --env-manager
    local` on --train_samples real images: its wall time less its epoch's time as the train step
    logs it (epoch_time_s: the training pass and validation), so what is left is start-up, the data,
    the test set's scores, the logged model and the exit (goal: <= 2x the floor); beside it the
    same for the step alone (`python -m steps.train`), and what any entry point costs through
    `mlflow run`: one whose command only imports torch and MLflow and opens and ends a run.
--repo measures another checkout of the project (e.g. `git worktree add /tmp/before <commit>`):
its own mnistflow, steps and scripts, with this interpreter.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from mnistflow.flags import OneLineParser

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("help", "servers", "imports", "run")
FLOOR = "import torch, mlflow (floor)"
RUN = "1-epoch run: wall - epoch"
STEP = "1-epoch steps.train: wall - epoch"
BOUND = "mlflow run: import + empty run (bound)"
# The least an entry point can do: what every step does before its work, and nothing more.
EMPTY_PROJECT = """name: empty
entry_points:
  main:
    command: "python -c 'import torch, mlflow; mlflow.start_run(); mlflow.end_run()'"
"""
GOALS = {"help": "< 1", "servers": "< 1", "run": "<= 2"}


def names(repo: str, folder: str) -> list[str]:
    """The modules of `folder` in `repo` (steps, serverFolder, mnistflow), by name."""
    return sorted(name[:-3] for name in os.listdir(os.path.join(repo, folder))
                  if name.endswith(".py") and name != "__init__.py")


def commands(repo: str, rows: list[str], params: dict[str, str]) -> dict[str, tuple[str, list[str]]]:
    """name -> (kind of row, command) of each row to measure, the floor first."""
    python = sys.executable
    measured = {FLOOR: ("floor", [python, "-c", "import torch, mlflow"])}
    if "help" in rows:
        measured.update({f"steps.{step} --help": ("help", [python, "-m", f"steps.{step}", "--help"])
                         for step in names(repo, "steps")})
    if "servers" in rows:
        measured.update({f"serverFolder/{script}.py --help": ("servers", [python, f"serverFolder/{script}.py", "--help"])
                         for script in names(repo, "serverFolder")})
    if "imports" in rows:
        measured.update({f"import mnistflow.{module}": ("imports", [python, "-c", f"import mnistflow.{module}"])
                         for module in names(repo, "mnistflow")})
    if "run" in rows:
        mlflow = os.path.join(os.path.dirname(python), "mlflow")
        params = {"epochs": "1", **params}
        measured[RUN] = ("run", [mlflow, "run", repo, "-e", "train", "--env-manager", "local",
                                 *[arg for name, value in params.items() for arg in ("-P", f"{name}={value}")]])
        measured[STEP] = ("run", [python, "-m", "steps.train",
                                  *[arg for name, value in params.items() for arg in (f"--{name}", value)]])
        empty = tempfile.mkdtemp()
        with open(os.path.join(empty, "MLproject"), "w") as project:
            project.write(EMPTY_PROJECT)
        measured[BOUND] = ("bound", [mlflow, "run", empty, "--env-manager", "local"])
    return measured


def timed(command: list[str], repo: str, env: dict) -> float:
    """Wall seconds of `command`, run from `repo`; a failure stops the bench with its output."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"startup: {' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return wall


def epoch_seconds(store: str) -> float:
    """The epoch time the newest train run of the bench's store logged."""
    import mlflow

    client = mlflow.MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id],
                               order_by=["attributes.start_time DESC"], max_results=1)
    return sum(metric.value for metric in client.get_metric_history(run.info.run_id, "epoch_time_s"))


def main() -> None:
    parser = OneLineParser(prog="startup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=HERE, help="the checkout to measure (default: this one)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"which rows besides the floor, of {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data_dir", default="", help="real MNIST for the run (default: $MNISTFLOW_DATA_DIR)")
    parser.add_argument("--train_samples", type=int, default=5000, help="images of the run's training pool")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is not allowed; it must be >= 1")
    rows = args.rows.split(",")
    if set(rows) - set(ROWS) or len(set(rows)) < len(rows):
        parser.error(f"--rows {args.rows!r} is not allowed; give some of {', '.join(ROWS)} joined by commas, each once")
    repo = os.path.abspath(args.repo)
    if not all(os.path.isdir(os.path.join(repo, folder)) for folder in ("mnistflow", "steps", "serverFolder")):
        parser.error(f"--repo {args.repo!r} is not allowed; give a checkout of this project (mnistflow/, steps/, "
                     "serverFolder/)")
    if args.train_samples < 10:
        parser.error(f"--train_samples {args.train_samples} is not allowed; it must be >= 10 (a validation split)")
    data_dir = os.path.abspath(args.data_dir or os.environ.get("MNISTFLOW_DATA_DIR", ""))
    if "run" in rows and not os.path.isdir(os.path.join(data_dir, "MNIST", "raw")):
        parser.error(f"--data_dir {args.data_dir!r} is not allowed; give a folder holding MNIST/raw/ "
                     "(or set MNISTFLOW_DATA_DIR)")

    store = f"sqlite:///{tempfile.mkdtemp()}/startup.db"
    # The checkout's own mnistflow first (the installed one may be another checkout), this
    # interpreter's `python` for the one `mlflow run --env-manager local` starts, and a store of
    # the bench's own for the run.
    env = {**{name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_EXPERIMENT_")},
           "PYTHONPATH": repo, "MLFLOW_TRACKING_URI": store,
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    measured = commands(repo, rows, {"data_dir": data_dir, "max_train_samples": str(args.train_samples)})
    times = {name: [] for name in measured}
    for r in range(args.repeats):  # interleaved, so drift in machine load hits every row alike
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for name in measured if r % 2 == 0 else reversed(measured):
            kind, command = measured[name]
            wall = timed(command, repo, env)
            times[name].append(wall - epoch_seconds(store) if kind == "run" else wall)

    floor = statistics.median(times[FLOOR])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\n{repo}: {os.cpu_count()} cores, load average {load} at the end, Python {platform.python_version()}, "
          f"medians of {args.repeats}\n")
    print(f"{'row':<44}{'median s':>9}{'x floor':>9}{'goal':>7}   runs s")
    for name, values in times.items():
        median = statistics.median(values)
        goal = GOALS.get(measured[name][0], "")
        print(f"{name:<44}{median:>9.2f}{median / floor:>9.2f}{goal:>7}   {'  '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
