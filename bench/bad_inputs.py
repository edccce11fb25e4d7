"""Bad input at every entry point: does each end in one line, with nothing written?

    python bench/bad_inputs.py                          # every probe: a table, then the counts per outcome
    python bench/bad_inputs.py --list                   # the probes, without running them
    python bench/bad_inputs.py --only 'steps.train:*,mlflow-run:*' --jobs 2 --timeout 120

A probe runs one entry point on one bad value: a step (`python -m steps.<step>` or
`mlflow run . -e <step> --env-manager local`), or a script of researcher/, serverFolder/ or bench/.
Each has a fresh SQLite tracking store, a folder of its own as its working directory and TMPDIR
(`mlflow run` works in the project directory, so those probes run one at a time), and a tiny
dataset in MNISTFLOW_DATA_DIR: no probe downloads anything, and every address is on 127.0.0.1.
Outcomes, by what the user sees:

  one-line   exit 1 or 2 and exactly one non-empty line on stderr, the program's own
             ("train: error: ..."); through `mlflow run`, one such line among MLflow's log lines
  traceback  a Python traceback on stderr
  accepted   exit 0: the bad value was taken
  other      any other failure: several lines, a line of another program, or a line that does
             not name the value where a probe could fail for another reason (its `names`)
  hang       still running after --timeout seconds (then killed)

A probe is OK when it is one-line and left nothing behind: no run RUNNING in its store, no file
written or changed in its folder (or in the project, for `mlflow run`), no process still running.
The table has a row per probe, the runs and experiments each created and what it left; the exit
code is 1 when any probe is not OK.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "sweep"
# Every process a probe starts inherits this variable: how the ones it leaves running are found.
MARKER = "MNISTFLOW_BAD_INPUT_PROBE"
OUTCOMES = ("one-line", "traceback", "accepted", "other", "hang")
MLFLOW_LOG_LINE = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d [A-Z]+ mlflow[\w.]*: ")
LONG_NAME = "p" * 300
# What commands read by a path relative to the project directory, where the docs run them: linked
# into each probe's folder.
PROJECT_FILES = ("search_space.yaml",)


@dataclasses.dataclass(frozen=True)
class Probe:
    """One entry point on one bad value. In args, env and files, {data}, {run}, {png}, {tmp} and
    {port} stand for the tiny dataset, a finished train run in the store, a digit PNG, the probe's
    folder and a port nothing listens on; a file whose text is {sqlite} is an SQLite database."""
    entry: str                  # steps.<step>, or a script's path in the project
    how: str                    # "python -m", "mlflow run" or "python"
    bad: str                    # the bad value, as the table shows it
    args: tuple = ()
    env: tuple = ()             # (name, value) pairs added to the environment
    files: tuple = ()           # (name, text) pairs written into the probe's folder first
    names: str = ""             # text a refusal must hold where a one-liner could be about something else
    stdin: str = ""

    @property
    def id(self) -> str:
        slug = re.sub(r"[^\w.=+,-]+", "_", self.bad)[:60]
        if self.how == "mlflow run":
            return f"mlflow-run:{self.entry.removeprefix('steps.')}:{slug}"
        return f"{self.entry}:{slug}"

    def programs(self) -> set[str]:
        """The names the program's own line may start with."""
        name = os.path.basename(self.entry).removeprefix("steps.").removesuffix(".py")
        return {name, f"{name}.py"} | ({"mlflow run"} if self.how == "mlflow run" else set())

    def command(self) -> list[str]:
        if self.how == "python -m":
            return [sys.executable, "-m", self.entry, *self.args]
        if self.how == "mlflow run":
            return [os.path.join(os.path.dirname(sys.executable), "mlflow"), "run", ".", "-e",
                    self.entry.removeprefix("steps."), "--env-manager", "local", *self.args]
        return [sys.executable, os.path.join(ROOT, self.entry), *self.args]

    def uses(self, name: str) -> bool:
        texts = [*self.args, *(value for _, value in self.env), *(text for _, text in self.files)]
        return any(f"{{{name}}}" in text for text in texts)


def step(name: str, bad: str, *common: str, args=None, **kwargs) -> Probe:
    """`python -m steps.<name> <common> <bad>` (args: the bad part's arguments, where not `bad` split)."""
    return Probe(f"steps.{name}", "python -m", bad, (*common, *(shlex.split(bad) if args is None else args)), **kwargs)


def mlflow_run(name: str, bad: str, *common: str, params=None, **kwargs) -> Probe:
    """`mlflow run . -e <name> -P <common> -P <bad>` (params: the bad part's pairs, where not `bad` split)."""
    pairs = (*common, *(shlex.split(bad) if params is None else params))
    return Probe(f"steps.{name}", "mlflow run", bad, tuple(arg for pair in pairs for arg in ("-P", pair)), **kwargs)


def script(path: str, bad: str, *common: str, args=None, **kwargs) -> Probe:
    return Probe(path, "python", bad, (*common, *(shlex.split(bad) if args is None else args)), **kwargs)


# Short runs on the tiny data, for values a step may take and train with.
TRAIN = ("--epochs", "1", "--batch_size", "64", "--max_train_samples", "200", "--augment", "shift")
TUNE = ("--n_trials", "1", "--epochs", "1", "--max_train_samples", "200", "--storage", "sqlite:///{tmp}/optuna.db")
RUN_TRAIN = ("epochs=1", "batch_size=64", "max_train_samples=200", "augment=shift")
MODEL = ("--model_uri", "runs:/{run}/model")
POSTGRES = "postgresql+psycopg2://mnist@127.0.0.1:{port}/optuna"  # a closed port: nothing is reached
SECRETS = (("MLFLOW_AUTH_ADMIN_PASSWORD", "sweep-admin"), ("MLFLOW_FLASK_SERVER_SECRET_KEY", "sweep-key"))
CLOSED = "127.0.0.1:{port}"
NOT_A_MAPPING = ("list.yaml", "- a\n- b\n")
BROKEN_IDX = tuple((f"broken/MNIST/raw/{name}", "not an IDX file\n") for name in
                   ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                    "t10k-labels-idx1-ubyte"))
BIG = "1" + "0" * 19  # 20 digits

PROBES = [
    # The train step: numbers that are not numbers, choices, flags, files, the tracking URI.
    *(step("train", bad, *TRAIN) for bad in (
        "--lr nan", "--lr inf", "--lr 1e30", "--lr abc", "--weight_decay nan", "--weight_decay inf",
        "--val_fraction 1e-9", "--seed -1", f"--seed {BIG}", "--epochs 0", "--batch_size 0", "--max_train_samples -5",
        "--dataset cifar10", "--model resnet", "--augment blur", "--device cuda", "--register maybe",
        "--resume nosuchrun", "--resume {run}", "--data_dir {tmp}/nodata", "--bogus_flag 1")),
    step("train", "--data_dir <IDX files that are not>", *TRAIN, args=("--data_dir", "{tmp}/broken"), files=BROKEN_IDX),
    step("train", "--note <9000 characters>", *TRAIN, args=("--note", "n" * 9000)),
    step("train", "MLFLOW_TRACKING_URI=sqlit:///x.db", *TRAIN, args=(),
         env=(("MLFLOW_TRACKING_URI", "sqlit:///{tmp}/x.db"),)),
    step("train", "MLFLOW_TRACKING_URI=HTTPS://<closed port>", *TRAIN, args=(),
         env=(("MLFLOW_TRACKING_URI", f"HTTPS://{CLOSED}"),)),
    step("train", "MLFLOW_TRACKING_SERVER_CERT_PATH=<missing file>", *TRAIN, args=(),
         env=(("MLFLOW_TRACKING_URI", f"https://{CLOSED}"),
              ("MLFLOW_TRACKING_SERVER_CERT_PATH", "{tmp}/missing-ca.crt"))),
    step("train", "MNISTFLOW_DATA_DIR=<missing folder>", *TRAIN, args=(),
         env=(("MNISTFLOW_DATA_DIR", "{tmp}/nodata"),)),

    # The tune step.
    *(step("tune", bad, *TUNE) for bad in (
        "--seed -1", f"--seed {BIG}", "--heartbeat_s 100000000000", "--n_trials -1", "--workers 0",
        "--sampler grid", "--storage sqlit:///{tmp}/optuna.db", "--storage postgresql://127.0.0.1:{port}/optuna",
        "--search_space {tmp}/missing.yaml", "--launcher slurm")),
    step("tune", "--study_name <9000 characters>", *TUNE, args=("--study_name", "s" * 9000)),
    step("tune", "--storage <password in the URL>", *TUNE, args=("--storage", POSTGRES.replace("mnist@", "mnist:pw@"))),
    step("tune", "--storage <?password=>", *TUNE, args=("--storage", POSTGRES + "?password=pw")),
    step("tune", "--search_space <not a mapping>", *TUNE, args=("--search_space", "{tmp}/list.yaml"),
         files=(NOT_A_MAPPING,)),
    step("tune", "--search_space <unknown model>", *TUNE, args=("--search_space", "{tmp}/space.yaml"),
         files=(("space.yaml", "model: resnet\n"),)),
    step("tune", "--slurm_config with launcher=local", *TUNE, args=("--slurm_config", "{tmp}/slurm.yaml"),
         files=(("slurm.yaml", "partition: debug\n"),)),
    step("tune", "slurm_config partition: 'debug\\necho pwned'", *TUNE,
         args=("--launcher", "slurm", "--storage", POSTGRES, "--slurm_config", "{tmp}/slurm.yaml"),
         files=(("slurm.yaml", 'partition: "debug\\necho pwned"\n'),), names="partition"),
    step("tune", "MNISTFLOW_OPTUNA_STORAGE=sqlit:///x.db", "--n_trials", "1", "--epochs", "1", args=(),
         env=(("MNISTFLOW_OPTUNA_STORAGE", "sqlit:///{tmp}/x.db"),)),

    # The register step.
    *(step("register", bad) for bad in (
        "--alias latest", "--min_accuracy 1.5", "--min_accuracy nan", "--max_size_mb 0", "--metric 'a\"b'",
        "--model_name /bad", "--run_id nosuchrun", "--rollback true")),
    step("register", "--max_latency_ms inf", "--run_id", "{run}", "--dry_run", "true", "--max_latency_ms", "inf",
         args=(), names="max_latency_ms"),
    step("register", "--checkpoint_metric val_loss (no checkpoints)", "--run_id", "{run}",
         args=("--checkpoint_metric", "val_loss")),

    # The evaluate step.
    *(step("evaluate", bad) for bad in (
        "--model_uri models:/Nope@production", "--model_uri runs:/nosuchrun/model",
        "--model_uri http://127.0.0.1:{port}/model", "--model_uri {tmp}")),
    step("evaluate", "--dataset fashion_mnist (a mnist model)", *MODEL, args=("--dataset", "fashion_mnist")),
    step("evaluate", "--data_dir <missing folder>", *MODEL, args=("--data_dir", "{tmp}/nodata")),

    # The predict step.
    *(step("predict", bad, *MODEL, "--images", "{png}") for bad in (
        "--plot {tmp}/preds.txt", "--plot /dev/full", "--top 0",
        "--payload {tmp}/no/such/folder/payload.json")),
    step("predict", "--plot <300-character name>", *MODEL, "--images", "{png}",
         args=("--plot", f"{{tmp}}/{LONG_NAME}.png")),
    step("predict", "--images <missing file>", *MODEL, args=("--images", "{tmp}/missing.png")),
    step("predict", "--images <a text file>", *MODEL, args=("--images", "{tmp}/notes.png"),
         files=(("notes.png", "not an image\n"),)),
    step("predict", "--images <an empty file>", *MODEL, args=("--images", "{tmp}/empty.png"),
         files=(("empty.png", ""),)),
    step("predict", "no --images", *MODEL, args=()),
    *(step("predict", bad, *MODEL, "--images", "{png}") for bad in ("--one_digit maybe", "--abstain 2")),
    step("predict", "--model_uri models:/Nope@production", "--images", "{png}"),

    # The serve step: flags, and a model that is not registered (nothing is started for either).
    *(step("serve", bad) for bad in (
        "--workers 0", "--workers 33", "--port 70000", "--host 0.0.0.0", "--host 'localhost; error_log x'",
        "--tls_cert {png}", "--tls_cert /nope --tls_key /nope", "--api_keys_db /nope", "--api_keys_db {png}", "--webhook_address 0.0.0.0:5002",
        "--webhook_address serve.example.org", "--inference_log inference.db",
        "--inference_log nosuch://x", "--keep_days 0", "--poll_interval nan",
        "--poll_interval 0", "--check_accuracy 2", "--alias 'a b'", "--model_name /bad", "--model_name Nope",
        "--canary_share 0.6", "--canary_alias production", "--canary_max_error_gap -1", "--canary_min_rows 0")),

    # The monitor step: flags, a log that is not there (not created), a model that is not registered.
    *(step("monitor", bad) for bad in (
        "--window 0", "--window 24x", "--window 36501d", "--min_rows 0", "--min_accuracy 2",
        "--inference_log inference.db", "--inference_log postgresql://me:pw@db/log",
        "--inference_log sqlite:///{tmp}/none.db", "--model_name Nope")),
    *(step("register", bad) for bad in (
        "--from_alias production", "--drop_alias 'a b'", "--from_alias challenger --run_id x",
        "--drop_alias challenger")),

    # The plot_loss step.
    step("plot_loss", "no --run_id", args=()),
    step("plot_loss", "--run_id nosuchrun"),
    *(step("plot_loss", bad, "--run_id", "{run}") for bad in (
        "--out {tmp}/loss.txt", "--out /dev/full", "--out {tmp}")),
    step("plot_loss", "--out <300-character name>", "--run_id", "{run}", args=("--out", f"{{tmp}}/{LONG_NAME}.png")),

    # The pipeline and the progressive runs.
    *(step("main", bad) for bad in ("--epochs 0", "--n_trials 0", "--min_accuracy 2")),
    step("main", "--storage <password in the URL>", args=("--storage", POSTGRES.replace("mnist@", "mnist:pw@"))),
    *(step("progressive", bad) for bad in ("--epochs 0", "--dataset cifar10")),

    # Through `mlflow run`: each step at least once.
    *(mlflow_run("train", bad, *RUN_TRAIN) for bad in ("lr=inf", "seed=-1", "bogus=1")),
    mlflow_run("train", "epochs=abc"),
    mlflow_run("train", "MLFLOW_TRACKING_URI=sqlit:///x.db", *RUN_TRAIN, params=(),
               env=(("MLFLOW_TRACKING_URI", "sqlit:///{tmp}/x.db"),)),
    mlflow_run("train", "MLFLOW_TRACKING_URI=HTTPS://<closed port>", *RUN_TRAIN, params=(),
               env=(("MLFLOW_TRACKING_URI", f"HTTPS://{CLOSED}"),)),
    mlflow_run("train", "MLFLOW_TRACKING_SERVER_CERT_PATH=<missing file>", *RUN_TRAIN, params=(),
               env=(("MLFLOW_TRACKING_URI", f"https://{CLOSED}"),
                    ("MLFLOW_TRACKING_SERVER_CERT_PATH", "{tmp}/missing-ca.crt"))),
    mlflow_run("tune", "storage=<password in the URL>", params=(f"storage={POSTGRES.replace('mnist@', 'mnist:pw@')}",)),
    mlflow_run("tune", "n_trials=-1"),
    mlflow_run("tune", "study_name=<9000 characters>", "n_trials=1", "epochs=1", "max_train_samples=200",
               "storage=sqlite:///{tmp}/optuna.db", params=(f"study_name={'s' * 9000}",)),
    mlflow_run("register", "alias=latest"),
    mlflow_run("evaluate", "model_uri=models:/Nope@production"),
    mlflow_run("predict", "images=<missing file>", params=("images={tmp}/missing.png",)),
    mlflow_run("predict", "plot={tmp}/preds.txt", "model_uri=runs:/{run}/model", "images={png}"),
    mlflow_run("serve", "workers=0"),
    mlflow_run("serve", "model_name=Nope"),
    mlflow_run("monitor", "window=forever"),
    mlflow_run("monitor", "model_name=Nope"),
    mlflow_run("plot_loss", "run_id=nosuchrun"),
    mlflow_run("plot_loss", "out={tmp}/loss.txt", "run_id={run}"),
    mlflow_run("main", "epochs=0"),
    mlflow_run("progressive", "epochs=0"),

    # The researcher's examples: their YAML configs and flags.
    *(script("researcher/example1.py", bad, "--epochs", "1", "--max_train_samples", "200") for bad in (
        "--seed -1", "--lr inf", "--epochs abc", "--config {tmp}/missing.yaml")),
    script("researcher/example1.py", "--config <not a mapping>", args=("--config", "{tmp}/list.yaml"),
           files=(NOT_A_MAPPING,)),
    script("researcher/example1.py", "--config <lacks keys>", args=("--config", "{tmp}/cfg.yaml"),
           files=(("cfg.yaml", "dataset: mnist\nepochs: 1\n"),)),
    *(script("researcher/example2.py", bad, "--trials", "1", "--epochs", "1", "--max_train_samples", "200")
      for bad in ("--trials 0", "--lr_low 0.1 --lr_high 0.01", "--lr_high inf", "--batch_sizes [0]", f"--seed {BIG}")),
    script("researcher/example2.py", "--config <not a mapping>", args=("--config", "{tmp}/list.yaml"),
           files=(NOT_A_MAPPING,)),
    script("researcher/log_plot.py", "--tracking_uri bogus://x", "--run-id", "nosuchrun"),
    script("researcher/log_plot.py", "no --run-id", args=()),
    script("researcher/log_plot.py", "--run-id nosuchrun"),
    script("researcher/log_plot.py", "--out {tmp}/loss.txt", "--run-id", "{run}"),
    script("researcher/log_plot.py", "--config <not a mapping>", args=("--config", "{tmp}/list.yaml"),
           files=(NOT_A_MAPPING,)),

    # The server scripts: checks of their arguments, before (or instead of) starting anything.
    *(script("serverFolder/local_server.py", bad, "--port", "{port}", "--timeout", "30") for bad in (
        "--root /dev/null/x", "--port 0", "--port 70000", "--workers 0", "--timeout nan", "--bogus_flag")),
    script("serverFolder/local_server.py", "--stop with no server in --root", args=("--root", "{tmp}", "--stop")),
    script("serverFolder/shared_server.py", "--root /dev/null/x", "--allowed-hosts", "localhost", "--port", "{port}",
           env=SECRETS),
    script("serverFolder/shared_server.py", "no --allowed-hosts", "--root", "{tmp}/server", "--port", "{port}", args=(),
           env=SECRETS),
    script("serverFolder/shared_server.py", "no MLFLOW_AUTH_ADMIN_PASSWORD", "--root", "{tmp}/server",
           "--allowed-hosts", "localhost", "--port", "{port}", args=()),
    script("serverFolder/shared_server.py", "--backend-store-uri <password in the URL>",
           args=("--backend-store-uri", "postgresql://mlflow:pw@127.0.0.1:{port}/mlflow"), env=SECRETS),
    script("serverFolder/shared_server.py", "--backend-store-uri <?password=>", "--root", "{tmp}/server",
           "--allowed-hosts", "localhost", "--port", "{port}", "--timeout", "30",
           args=("--backend-store-uri", "postgresql://mlflow@127.0.0.1:1/mlflow?password=pw"), env=SECRETS,
           names="password"),
    *(script("serverFolder/local_postgres.py", bad, "--port", "{port}") for bad in (
        "--root /dev/null/x", "--port 0 --root {tmp}/pg")),
    script("serverFolder/local_postgres.py", "no --root", args=()),
    script("serverFolder/local_postgres.py", "--root <a folder that holds files>", "--port", "{port}",
           args=("--root", "{tmp}/full"), files=(("full/keep.txt", "the user's file\n"),)),
    script("serverFolder/local_slurm.py", "--root /dev/null/x"),
    script("serverFolder/local_slurm.py", "no --root", args=()),
    *(script("serverFolder/tls_proxy.py", bad, "--root", "{tmp}/proxy") for bad in (
        "--listen 0.0.0.0", "--listen 127.0.0.1:99999", "--max-body-size 0", "--cert {tmp}/missing.crt",
        "--stop")),
    script("serverFolder/tls_proxy.py", "--server-name 'localhost; error_log <file>'", "--root", "{tmp}/proxy",
           "--listen", CLOSED, "--upstream", "127.0.0.1:1", "--cert", "{tmp}/server.crt", "--key", "{tmp}/server.key",
           "--timeout", "10", args=("--server-name", "localhost; error_log {tmp}/injected.log"),
           files=(("server.crt", ""), ("server.key", "")), names="server-name"),
    script("serverFolder/api_keys.py", "list --db <not SQLite>", args=("list", "--db", "{tmp}/notes.txt"),
           files=(("notes.txt", "the user's notes\n"),)),
    script("serverFolder/api_keys.py", "list --db <another SQLite database>", args=("list", "--db", "{tmp}/other.db"),
           files=(("other.db", "{sqlite}"),)),
    script("serverFolder/api_keys.py", "issue --auth-config <ini with an unescaped %>",
           args=("issue", "alice", "--db", "{tmp}/keys.db", "--auth-config", "{tmp}/auth.ini"),
           files=(("keys.db", ""), ("auth.ini", "[mlflow]\ndatabase_uri = sqlite:///{tmp}/users%1.db\n"))),
    *(script("serverFolder/api_keys.py", bad) for bad in (
        "frobnicate", "issue --db {tmp}/keys.db", "issue alice --days 0 --db {tmp}/keys.db", "list",
        "list --db {tmp}/missing.db")),
    *(script("serverFolder/users.py", bad) for bad in ("grant alice exp FLY", "create")),
    script("serverFolder/users.py", "no command", args=()),
    script("serverFolder/users.py", "a server that is down", args=("grant", "alice", "exp", "READ"),
           env=(("MLFLOW_TRACKING_URI", f"http://{CLOSED}"),)),

    # The benches.
    *(script("bench/robustness.py", bad, *MODEL, "--n", "20") for bad in (
        "--plot {tmp}/cond.txt", "--plot /dev/full", "--seed -1", "--n 0")),
    script("bench/robustness.py", "--model_uri models:/Nope@production"),
    *(script("bench/read_numbers.py", bad, *MODEL, "--n", "2") for bad in ("--n 0", "--seed -1")),
    script("bench/read_numbers.py", "--model_uri models:/Nope@production"),
    *(script("bench/abstain.py", bad, *MODEL, "--n", "2") for bad in ("--n 0", "--seed -1")),
    script("bench/abstain.py", "--model_uri models:/Nope@production"),
    *(script("bench/server_load.py", bad, "--seconds", "1", "--rounds", "1", "--clients", "1")
      for bad in ("--clients 0", "--rounds 0", "--seconds 0")),
    script("bench/drift.py", "--n 10"),
    script("bench/canary.py", "--requests 0"),
    *(script("bench/serve_latency.py", bad) for bad in (
        "--requests 0", "--batch -1", "--model_uri models:/Nope@production")),
    *(script("bench/train_speed.py", bad, "--repeats", "1", "--train_samples", "200")
      for bad in ("--repeats 0", "--train_samples abc", "--pipeline_models fast,resnet")),
    *(script("bench/tune_speed.py", bad, "--epochs", "1", "--train_samples", "200")
      for bad in ("--minutes 0", "--minutes inf", "--dataset cifar10")),
    *(script("bench/serving.py", bad) for bad in ("--repeats 0", "--users 0", "--data_dir {tmp}/nodata")),
    *(script("bench/startup.py", bad, "--rows", "servers")
      for bad in ("--repeats 0", "--rows bogus", "--repo /nope")),
]


# What the probes share, made once: the tiny dataset, a digit PNG, a SQLite file that is no key
# store, and the tracking stores each probe gets a copy of (empty, or with a finished train run).

class Fixtures:
    def __init__(self, folder: str, need_run: bool):
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import learnable_images, make_dataset  # the tests' own tiny MNIST files
        import numpy as np
        from PIL import Image

        self.folder = folder
        self.data = make_dataset(make_dataset(os.path.join(folder, "data"), "MNIST"), "FashionMNIST", seed=1)
        self.png = os.path.join(folder, "digit.png")
        Image.fromarray(learnable_images(np.array([3]), np.random.default_rng(0))[0].astype(np.uint8)).save(self.png)
        self.sqlite = self._other_sqlite_file()
        self.stores = {"empty": self._empty_store()}
        self.run = ""
        if need_run:
            self.stores["trained"], self.run = self._trained_store()

    def _other_sqlite_file(self) -> bytes:
        path = os.path.join(self.folder, "other.db")
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE notes (text TEXT)")
        with open(path, "rb") as f:
            return f.read()

    def _empty_store(self) -> str:
        import mlflow

        path = os.path.join(self.folder, "empty.db")
        mlflow.MlflowClient(f"sqlite:///{path}").create_experiment(
            EXPERIMENT, artifact_location=os.path.join(self.folder, "artifacts"))
        return path

    def _trained_store(self) -> tuple[str, str]:
        path = os.path.join(self.folder, "trained.db")
        shutil.copyfile(self.stores["empty"], path)
        env = {**self.environment(os.path.join(self.folder, "trained")), "MLFLOW_TRACKING_URI": f"sqlite:///{path}"}
        os.makedirs(env["TMPDIR"])
        command = [sys.executable, "-m", "steps.train", *TRAIN, "--epochs", "2", "--max_train_samples", "300",
                   "--system_metrics", "false"]
        done = subprocess.run(command, cwd=self.folder, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bad_inputs: training the run the probes use failed:\n{done.stderr[-3000:]}")
        [(run_id,)] = query(path, "SELECT run_uuid FROM runs")
        return path, run_id

    def environment(self, folder: str) -> dict:
        """The environment of a probe working in `folder`: none of the caller's MLflow, mnistflow,
        PostgreSQL or Slurm settings; this project's code; the tiny data; TMPDIR in the folder."""
        inherited = {name: value for name, value in os.environ.items()
                     if not name.startswith(("MLFLOW_", "MNISTFLOW_", "AM_SC_", "PG", "SLURM_"))}
        return {**inherited, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
                "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": os.path.join(folder, "tmp"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{os.path.join(folder, 'mlflow.db')}",
                "MLFLOW_EXPERIMENT_NAME": EXPERIMENT, "MNISTFLOW_DATA_DIR": self.data, MARKER: folder}


def query(database: str, sql: str) -> list:
    """Rows of a read-only query; none when there is no such database."""
    if not os.path.isfile(database):
        return []
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return db.execute(sql).fetchall()


def store_counts(database: str) -> tuple[dict, int]:
    """Runs by status, and the number of experiments, in a tracking store."""
    runs = dict(query(database, "SELECT status, COUNT(*) FROM runs GROUP BY status"))
    [(experiments,)] = query(database, "SELECT COUNT(*) FROM experiments") or [(0,)]
    return runs, experiments


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Not user files: caches and the tracking store (its runs are counted apart); nor is a probe's
# TMPDIR, its folder's tmp/, where MLflow leaves the models it downloads.
SKIPPED = {"__pycache__", ".git", "mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm"}


def snapshot(folder: str) -> dict:
    """path -> what a write would change: size, time, mode and owner of files; mode and owner of folders."""
    seen = {}
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if name not in SKIPPED and not (parent == folder and name == "tmp")]
        for name in folders + [name for name in files if name not in SKIPPED]:
            path = os.path.join(parent, name)
            try:
                stat = os.lstat(path)
            except OSError:
                continue
            kind = "folder" if os.path.isdir(path) else "file"
            seen[os.path.relpath(path, folder)] = (kind, stat.st_mode, stat.st_uid) + (
                (stat.st_size, stat.st_mtime_ns) if kind == "file" else ())
    return seen


def written(before: dict, after: dict) -> list[str]:
    """What is new or changed; a new folder is named by what it holds, if anything."""
    changed = []
    for path, state in after.items():
        if before.get(path) == state:
            continue
        if state[0] == "folder" and path not in before and any(p.startswith(path + os.sep) for p in after):
            continue
        changed.append(path + ("/" if state[0] == "folder" else ""))
    return sorted(changed)


def processes_left(folder: str) -> list[int]:
    """Processes a probe started that still run (they carry its marker), stopped here."""
    marker = f"{MARKER}={folder}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0") and _signal(int(pid), 0):
                    found.append(int(pid))
        except OSError:
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in found if _signal(pid, 0)]
        for pid in alive:
            _signal(pid, sig)
        deadline = time.monotonic() + 10
        while any(_signal(pid, 0) for pid in alive) and time.monotonic() < deadline:
            time.sleep(0.2)
    return found


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return not _is_zombie(pid) if sig == 0 else True


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@dataclasses.dataclass
class Result:
    probe: Probe
    outcome: str
    line: str                   # the program's line, or what stderr shows instead
    exit_code: int | None
    runs: dict                  # status -> runs created
    experiments: int            # experiments created
    left: list[str]             # what the probe left behind
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome == "one-line" and not self.left


def classify(probe: Probe, exit_code: int | None, stderr: str, stdout: str = "") -> tuple[str, str]:
    """The outcome (see the module docstring) and the line that shows it. exit_code None: it hung."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    own = [line for line in lines if not (probe.how == "mlflow run" and MLFLOW_LOG_LINE.match(line))]
    if exit_code is None:
        return "hang", own[-1] if own else ""
    if "Traceback (most recent call last)" in stderr:
        return "traceback", own[-1]
    if exit_code == 0:
        return "accepted", (stdout.strip().splitlines() or [""])[-1]
    program = own[0].split(": ", 1)[0] if own else ""
    if len(own) != 1 or exit_code not in (1, 2) or not any(program == name or program.startswith(f"{name} ")
                                                           for name in probe.programs()):
        return "other", own[0] if own else (lines[-1] if lines else "")
    if probe.names and probe.names.lower() not in own[0].lower():
        return "other", f"(does not name {probe.names}) {own[0]}"
    return "one-line", own[0]


class Sweep:
    def __init__(self, fixtures: Fixtures, timeout: float):
        self.fixtures, self.timeout = fixtures, timeout
        self.in_project = threading.Lock()  # `mlflow run` works in the project directory: one at a time

    def run(self, probe: Probe) -> Result:
        folder = tempfile.mkdtemp(prefix="probe-", dir=self.fixtures.folder)
        os.chmod(folder, 0o755)  # as run by root, PostgreSQL's account must reach a cluster made in it
        try:
            return self._run_in(probe, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _run_in(self, probe: Probe, folder: str) -> Result:
        values = {"data": self.fixtures.data, "run": self.fixtures.run, "png": self.fixtures.png, "tmp": folder,
                  "port": str(free_port())}

        def fill(text: str) -> str:
            for name, value in values.items():
                text = text.replace(f"{{{name}}}", value)
            return text

        store = self.fixtures.stores["trained" if probe.uses("run") else "empty"]
        shutil.copyfile(store, os.path.join(folder, "mlflow.db"))
        os.makedirs(os.path.join(folder, "tmp"), mode=0o755)
        for name in PROJECT_FILES:
            os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
        for name, text in probe.files:
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(self.fixtures.sqlite if text == "{sqlite}" else fill(text).encode())
        env = {**self.fixtures.environment(folder), **{name: fill(value) for name, value in probe.env}}
        command = [fill(arg) for arg in probe.command()]
        in_project = probe.how == "mlflow run"
        before = snapshot(folder)
        with self.in_project if in_project else contextlib.nullcontext():
            project_before = snapshot(ROOT) if in_project else {}
            exit_code, stdout, stderr, seconds, left_running = self._execute(
                command, ROOT if in_project else folder, env, fill(probe.stdin), folder)
            project_written = written(project_before, snapshot(ROOT)) if in_project else []
        outcome, line = classify(probe, exit_code, stderr, stdout)
        runs_before, experiments_before = store_counts(store)
        runs_after, experiments_after = store_counts(os.path.join(folder, "mlflow.db"))
        runs = {status: n - runs_before.get(status, 0) for status, n in runs_after.items()
                if n > runs_before.get(status, 0)}
        files = written(before, snapshot(folder)) + [f"project/{path}" for path in project_written]
        left = [f"run {status}" for status in runs if status == "RUNNING"]
        left += [f"{len(files)} files: {', '.join(files[:2])}" + (", …" if len(files) > 2 else "")] if files else []
        left += [f"{len(left_running)} processes"] if left_running else []
        return Result(probe, outcome, line, exit_code, runs, experiments_after - experiments_before, left, seconds)

    def _execute(self, command: list[str], cwd: str, env: dict, stdin: str, folder: str):
        """Exit code (None when it ran past the timeout and was killed), stdout, stderr, seconds, and
        the processes it left running (after a timeout: those outside its process group)."""
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        try:
            stdout, stderr = process.communicate(stdin, timeout=self.timeout)
            return process.returncode, stdout, stderr, time.monotonic() - start, processes_left(folder)
        except subprocess.TimeoutExpired:
            seconds = time.monotonic() - start
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            left = processes_left(folder)  # also those that would hold its output open
            return None, *process.communicate(), seconds, left


def shown(text: str, width: int) -> str:
    text = text.encode("unicode_escape").decode() if "\n" in text else text
    return text if len(text) <= width else text[:width - 1] + "…"


def table(results: list[Result]) -> str:
    rows = [("", "#", "outcome", "exit", "runs", "exp", "seconds", "entry point", "how", "bad value", "left behind",
             "stderr (the line; a traceback's last)")]
    for i, r in enumerate(results, start=1):
        runs = ",".join(f"{n} {status}" for status, n in sorted(r.runs.items())) or "-"
        rows.append(("OK" if r.ok else "FAIL", str(i), r.outcome, "-" if r.exit_code is None else str(r.exit_code),
                     runs, str(r.experiments), f"{r.seconds:.0f}", r.probe.entry, r.probe.how, shown(r.probe.bad, 44),
                     shown("; ".join(r.left), 40) or "-", shown(r.line, 120)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def summary(results: list[Result]) -> str:
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in OUTCOMES}
    one_line = [r for r in results if r.outcome == "one-line"]
    return "\n".join([
        f"{len(results)} probes: " + ", ".join(f"{outcome} {n}" for outcome, n in counts.items()),
        f"OK {sum(r.ok for r in results)}, FAIL {sum(not r.ok for r in results)} "
        f"(one-line but left something behind: {sum(bool(r.left) for r in one_line)}; "
        f"one-line with exit code 1: {sum(r.exit_code == 1 for r in one_line)})",
        f"probes that created runs: {sum(bool(r.runs) for r in results)} "
        f"({sum(bool(r.runs) for r in results if r.probe.how == 'mlflow run')} through mlflow run); "
        f"that created experiments: {sum(r.experiments > 0 for r in results)}",
    ])


def exit_code(results: list[Result]) -> int:
    return 0 if all(r.ok for r in results) else 1


def chosen(patterns: str) -> list[Probe]:
    ids = [probe.id for probe in PROBES]
    assert len(set(ids)) == len(ids), "two probes share an id"
    wanted = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()] or ["*"]
    return [probe for probe in PROBES if any(fnmatch.fnmatchcase(probe.id, pattern) for pattern in wanted)]


def parse_args(argv=None) -> argparse.Namespace:
    sys.path.insert(0, ROOT)
    from mnistflow.flags import OneLineParser

    parser = OneLineParser(prog="bad_inputs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the probes' ids and commands, run nothing")
    parser.add_argument("--only", default="", help="comma-separated id patterns (fnmatch), e.g. 'steps.train:*'")
    parser.add_argument("--jobs", type=int, default=2, help="probes run at once")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a probe counts as a hang")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs} is not allowed; it must be >= 1")
    if not 0 < args.timeout < float("inf"):
        parser.error(f"--timeout {args.timeout:g} is not allowed; it must be a number of seconds above 0")
    args.probes = chosen(args.only)
    if not args.probes:
        parser.error(f"--only {args.only!r} matches no probe; see --list")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.list:
        for probe in args.probes:
            print(f"{probe.id}\n    {shlex.join(probe.command()).replace(sys.executable, 'python')}")
        print(f"{len(args.probes)} probes")
        return
    folder = tempfile.mkdtemp(prefix="bad-inputs-")
    os.chmod(folder, 0o755)  # see Sweep.run
    try:
        started = time.monotonic()
        sweep = Sweep(Fixtures(folder, need_run=any(probe.uses("run") for probe in args.probes)), args.timeout)
        results = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for i, result in enumerate(pool.map(sweep.run, args.probes), start=1):
                print(f"[{i}/{len(args.probes)}] {result.probe.id}: {result.outcome} ({result.seconds:.0f} s)",
                      file=sys.stderr, flush=True)
                results.append(result)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(table(results))
    print()
    print(summary(results))
    print(f"{time.monotonic() - started:.0f} s with {args.jobs} probes at once")
    sys.exit(exit_code(results))


if __name__ == "__main__":
    main()
