"""Shared fixtures: tiny MNIST-format IDX files, a throw-away MLflow store per test, a PostgreSQL server."""
import contextlib
import importlib
import os
import runpy
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

import mlflow
from mlflow.utils import find_free_port as free_port  # noqa: F401 (the tests import it from here)
import numpy as np
import pytest
import sqlalchemy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "serverFolder"))  # its scripts are not a package
import local_postgres  # noqa: E402

pytest_plugins = ["timing"]  # tests/timing.py: durations, slowest files first, threads per worker, --quick


def write_idx(path: str, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file, the format of the MNIST distribution files."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def learnable_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise with a bright 6x6 patch whose position encodes the label: easy but not trivial."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28))
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 4 + row * 12:10 + row * 12, 2 + col * 5:8 + col * 5] = 255
    return images


def make_dataset(root: str, folder: str = "MNIST", n_train: int = 600, n_test: int = 200, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), learnable_images(labels, rng))
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A data directory with small MNIST and Fashion-MNIST files in torchvision's layout."""
    root = str(tmp_path_factory.mktemp("data"))
    make_dataset(root, "MNIST")
    make_dataset(root, "FashionMNIST", seed=1)
    return root


EXPERIMENT = "tests"


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store with artifacts beside it, for this process and its children.

    The experiment is created here with an absolute artifact location, so runs started from
    the project directory (as `mlflow run .` must be) still write their artifacts into tmp_path.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "artifacts"))
    yield uri
    mlflow.set_tracking_uri(None)


def step_env() -> dict:
    """The environment for commands under test: the test interpreter's bin directory goes first
    on PATH, so `mlflow` and the `python` that `mlflow run --env-manager local` starts are the
    ones of the environment under test."""
    return {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def run_step(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command from the project root, as a user would, capturing its output."""
    return subprocess.run([*args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=step_env())


def python_step(module: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_step(sys.executable, "-m", module, *args, **kwargs)


def git(directory, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost", *args],
                          cwd=directory, capture_output=True, text=True, check=True).stdout


def project_copy(destination) -> str:
    """This project (its files git does not ignore, committed or not) as a git repository of its
    own, whose working tree a test may change."""
    for path in filter(None, git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")):
        if os.path.isfile(os.path.join(ROOT, path)):  # a tracked file deleted in the checkout is still listed
            os.makedirs(os.path.join(destination, os.path.dirname(path)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, path), os.path.join(destination, path))
    git(destination, "init", "-q")
    git(destination, "add", "-A")
    git(destination, "commit", "-q", "-m", "the project under test")
    return str(destination)


def refused(capsys, command) -> str:
    """Call `command()`, which must refuse its input as a command line does: exit code 2, one
    line on stderr, which is returned, and nothing on stdout."""
    capsys.readouterr()  # what fixtures wrote before is not the command's
    with pytest.raises(SystemExit) as exit:
        command()
    assert exit.value.code == 2
    said = capsys.readouterr()
    [line] = said.err.strip().splitlines()
    assert said.out == "", said.out
    return line


def refused_script(monkeypatch, capsys, path: str, *args: str) -> str:
    """Run a script file in this process, as `python path args` would, on input it must refuse (see
    `refused`). (Faster than a new interpreter, for tables of bad input whose command line is run
    once elsewhere.)"""
    monkeypatch.setattr(sys, "argv", [path, *args])
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(path)))  # as python puts a script's folder first
    return refused(capsys, lambda: runpy.run_path(path, run_name="__main__"))


def refused_step(monkeypatch, capsys, module: str, *args: str) -> str:
    """Run a step's `main(args)` in this process, from the project root as `python -m module args`
    would, on input it must refuse (see `refused`); for tables of bad input whose command line is
    run once elsewhere."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # no run of `mlflow run` to reopen
    return refused(capsys, lambda: importlib.import_module(module).main(list(args)))


def sigint_as_in_a_terminal():
    """preexec_fn: a shell starts background jobs (CI runners, `make test &`) with SIGINT ignored,
    and Python keeps an inherited "ignore": give the step the default, as a terminal's Ctrl-C assumes."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def registry_of(root, trainings: list[tuple[str, str]], registered: list[int]) -> tuple[str, list[str]]:
    """A SQLite store in the folder `root` with the experiment EXPERIMENT and a 1-epoch train run
    for each (data directory, max_train_samples) of `trainings`; the runs of `registered` (indices,
    in order, a run again for another version of it) as versions 1, 2, … of MNIST_CNN. (Its URI,
    the run ids.)"""
    from steps import train

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    runs = []
    with steps_in_this_process(uri):
        for data_dir, samples in trainings:
            train.main(["--data_dir", data_dir, "--epochs", "1", "--max_train_samples", samples, "--augment",
                        "shift", "--system_metrics", "false"])
            runs.append(mlflow.last_active_run().info.run_id)
        for index in registered:
            mlflow.register_model(f"runs:/{runs[index]}/model", "MNIST_CNN")
    return uri, runs


@contextlib.contextmanager
def steps_in_this_process(uri: str):
    """Steps' main() called here log to the store at `uri`, in the experiment EXPERIMENT, as
    `python -m steps.<step>` would; as before, after."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        env.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)


def readme_line(start: str, doc: str = "README.md") -> str:
    """The one line of README.md (or `doc`) that starts with `start`: the tests run the commands users copy."""
    [line] = [line.strip() for line in open(os.path.join(ROOT, doc)) if line.startswith(start)]
    return line


def wait_until(condition, what: str, timeout: float = 120, alive: subprocess.Popen | None = None, every: float = 0.1):
    """Poll `condition()` every `every` s until it is true and return what it gave; fail the test,
    naming `what` it waited for, after `timeout` s, or as soon as the process `alive` has exited."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"the process exited while waiting for {what}: {(alive.communicate()[1] or '')[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(every)
    return found


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s")


def require(installed: bool, what: str, debian_package: str = "", fix: str = "") -> None:
    """Skip a test that needs a server program (or files) which is not installed, unless
    MNISTFLOW_REQUIRE_SERVERS=1 (as in CI) makes that a failure."""
    if installed:
        return
    fix = fix or f"apt-get install {debian_package}"
    if os.environ.get("MNISTFLOW_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{what} is required here but not installed ({fix})")
    pytest.skip(f"{what} is not installed ({fix})")


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 and a free port (serverFolder/local_postgres.py);
    yields a function that creates a database and returns its SQLAlchemy URL.

    The URLs carry no password: the server asks for one (scram-sha-256), which this fixture puts
    in PGPASSWORD for the whole session, where libpq (psycopg2, psql) finds it, in this process
    and the commands it starts. It holds a '%', which a URL must encode as '%25'.
    Skipped where PostgreSQL is not installed (see `require`).
    """
    require(local_postgres.available(), "PostgreSQL", "postgresql")
    # Not under pytest's tmp_path: that is private to the user running the tests.
    root = tempfile.mkdtemp(prefix="mnistflow-postgres-")
    port, password = free_port(), f"pw%{secrets.token_hex(8)}"
    local_postgres.start(root, port, [], password)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PGPASSWORD", password)
            yield lambda name: local_postgres.create_database(port, name, password)
    finally:
        local_postgres.stop(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres) -> str:
    return postgres("optuna")


class Trained:
    """A tracking store holding two finished train runs on the tiny data: one good, one poor."""

    def __init__(self, uri: str, good: str, poor: str):
        self.uri, self.good, self.poor = uri, good, poor


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_data) -> Trained:
    # Trained in this process (the train step's CLI has tests of its own): two runs in ~10 s.
    from steps import train

    root = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        env.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
        ids = []
        # The tiny data tells labels by where a patch is; MNIST's default augmentation (affine)
        # moves and turns patches far enough to blur that, shift does not: the good model stays perfect.
        for args in (["--epochs", "2"], ["--epochs", "1", "--lr", "0.0001"]):
            train.main(["--data_dir", tiny_data, "--batch_size", "64", "--augment", "shift", *args])
            ids.append(mlflow.last_active_run().info.run_id)
        mlflow.set_tracking_uri(None)
    return Trained(uri, *ids)


@pytest.fixture
def registry_store(trained, monkeypatch) -> Trained:
    """The `trained` store for this test. Tests share its registry: each uses its own model name."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    mlflow.set_tracking_uri(trained.uri)
    yield trained
    mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def ctrl_c_at_the_next_write_commit():
    """Send this process a real SIGINT while SQLAlchemy commits the next write; yield the arming call."""
    armed = []

    def ctrl_c_mid_commit(connection):
        if armed and connection.connection.dbapi_connection.in_transaction:  # a write, not a read
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "commit", ctrl_c_mid_commit)
    try:
        yield lambda: armed.append(True)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "commit", ctrl_c_mid_commit)
        signal.signal(signal.SIGINT, previous)
