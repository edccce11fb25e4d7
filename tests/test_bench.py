"""bench/train_speed.py on tiny files: it runs its real comparisons and prints the table of ratios;
both bench scripts refuse bad input in one line before writing anything."""
import glob
import os
import re
import subprocess
import sys
import tempfile

import mlflow
import torch._dynamo  # noqa: F401  (first imported, it makes a cache folder in the temp folder: not the bench's)
import pytest

from conftest import ROOT, refused_script, run_step, step_env


def test_train_speed_prints_medians_and_ratios(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the bench keeps its tracking store
    result = run_step(sys.executable, "bench/train_speed.py", "--data_dir", tiny_data,
                      "--repeats", "1", "--train_samples", "300", "--augment", "affine,elastic")
    assert result.returncode == 0, result.stderr[-3000:]
    # The tracked run carries the train step's metrics. (Not necessarily system metrics: MLflow's
    # monitor logs its first sample one interval after the run starts, and this run may end sooner.)
    [store] = glob.glob(str(tmp_path / "*" / "bench.db"))
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert {"train_loss", "val_accuracy", "epoch_time_s"} <= set(run.data.metrics)
    assert run.info.run_name == "bench-tracked-fast"
    for row in ("baseline: pipeline / DataLoader epoch", "fast: pipeline / DataLoader epoch",
                "fast: tracking on / off"):
        assert re.search(rf"{re.escape(row)}\s+\d+\.\d+\s+<= ", result.stdout), row
    for row in ("baseline: floor / DataLoader epoch", "fast: floor / DataLoader epoch"):
        assert re.search(rf"{re.escape(row)}\s+\d+\.\d+\s+\(best any pipeline can reach\)", result.stdout), row
    for source in ("in-memory tensors", "DataLoader + ToTensor", "one reused batch (floor)"):
        assert re.search(rf"fast: {re.escape(source)}\s+\d+\.\d+", result.stdout), source
    for augment in ("shift", "affine,elastic"):
        assert re.search(rf"fast: augment {augment}\s+\d+\.\d+", result.stdout), augment
    assert re.search(r"fast: augment affine,elastic / shift epoch\s+\d+\.\d+\s+<= 1.10", result.stdout)
    assert "270 training images per epoch" in result.stdout  # 300 capped, 10 % held out for validation


def test_startup_prints_each_row_against_the_import_floor(tiny_data):
    # As `.venv/bin/python bench/startup.py` from a shell where the environment is not active: the
    # run's `mlflow run --env-manager local` must still start this interpreter's python.
    elsewhere = os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                                if os.path.realpath(folder) != os.path.realpath(os.path.dirname(sys.executable)))
    result = subprocess.run([sys.executable, "bench/startup.py", "--rows", "servers,run", "--repeats", "1",
                             "--data_dir", tiny_data, "--train_samples", "100"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PATH": elsewhere})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"import torch, mlflow \(floor\)\s+\d+\.\d+\s+1\.00\s", result.stdout)
    for row in ["serverFolder/local_server.py --help", "serverFolder/users.py --help"]:
        assert re.search(rf"{re.escape(row)}\s+\d+\.\d+\s+\d+\.\d+\s+< 1\s", result.stdout), row
    assert re.search(r"1-epoch run: wall - epoch\s+\d+\.\d+\s+\d+\.\d+\s+<= 2\s", result.stdout)
    assert re.search(r"1-epoch steps.train: wall - epoch\s+\d+\.\d+\s+\d+\.\d+\s+<= 2\s", result.stdout)
    assert re.search(r"mlflow run: import \+ empty run \(bound\)\s+\d+\.\d+\s+\d+\.\d+\s+\d", result.stdout)
    assert "steps.train --help" not in result.stdout  # rows not asked for are not measured


def test_train_speed_rejects_an_unknown_model_in_one_line(tiny_data):
    result = run_step(sys.executable, "bench/train_speed.py", "--data_dir", tiny_data, "--pipeline_models", "fast,resnet")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("unknown model 'resnet' in --pipeline_models; "
                                                            "choose from fast, wide, baseline, enhanced, cnn_bn, simple")


@pytest.mark.parametrize("script, args, message", [
    ("train_speed", ["--repeats", "0"], "--repeats 0 is not allowed; it must be >= 1"),
    ("train_speed", ["--repeats", "-3"], "--repeats -3 is not allowed; it must be >= 1"),
    ("train_speed", ["--train_samples", "-5"], "--train_samples -5 is not allowed; it must be >= 0 (0 = all)"),
    ("train_speed", ["--augment", "blur"], "augment 'blur' is not allowed; give auto, none, or some of shift"),
    ("tune_speed", ["--minutes", "0"], "--minutes 0 is not allowed; it must be in (0, 1440]"),
    ("tune_speed", ["--minutes", "inf"], "--minutes inf is not allowed; it must be in (0, 1440]"),
    ("tune_speed", ["--epochs", "-1"], "epochs=-1 is not allowed; it must be >= 1"),
    ("tune_speed", ["--train_samples", "-1"], "--train_samples -1 is not allowed; it must be >= 0 (0 = all)"),
    ("tune_speed", ["--search_space", "resnet.yaml"], "model: unknown model 'resnet'; choose from auto, fast"),
    ("tune_speed", ["--dataset", "cifar10"], "unknown dataset 'cifar10'; choose from mnist, fashion_mnist"),
    ("serving", ["--repeats", "0"], "--repeats 0 is not allowed; it must be >= 1"),
    ("serving", ["--users", "-1"], "--users -1 is not allowed; it must be >= 1"),
    ("serving", ["--data_dir", "/nonexistent"], "--data_dir '/nonexistent' is not allowed; give a folder holding MNIST/raw/"),
    ("startup", ["--repeats", "0"], "--repeats 0 is not allowed; it must be >= 1"),
    ("startup", ["--rows", "help,boot"], "--rows 'help,boot' is not allowed; give some of help, servers, imports, run"),
    ("startup", ["--rows", "help,help"], "--rows 'help,help' is not allowed; give some of help, servers, imports, run"),
    ("startup", ["--repo", "/nonexistent"], "--repo '/nonexistent' is not allowed; give a checkout of this project"),
    ("startup", ["--train_samples", "3"], "--train_samples 3 is not allowed; it must be >= 10"),
    ("startup", ["--data_dir", "/nonexistent"], "--data_dir '/nonexistent' is not allowed; give a folder holding MNIST/raw/"),
])
def test_bad_bench_input_is_one_line_and_writes_nothing(tiny_data, tmp_path, monkeypatch, capsys, script, args, message):
    """In this process (the CLI itself is run by the test below), with the scratch space the
    bench would put its stores in watched."""
    (tmp_path / "resnet.yaml").write_text("model: resnet\n")
    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    line = refused_script(monkeypatch, capsys, os.path.join(ROOT, "bench", f"{script}.py"), "--data_dir", tiny_data, *args)
    assert line.startswith(f"{script}: error: ") and message in line
    assert os.listdir(tmp_path / "scratch") == []


def test_tune_speed_refuses_a_bad_count_through_its_command_line(tiny_data, tmp_path):
    result = run_step(sys.executable, "bench/tune_speed.py", "--data_dir", tiny_data, "--minutes", "-2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["tune_speed: error: --minutes -2 is not allowed; it must be in (0, 1440]"]


# locustfile.py is Locust's to run, load.py runs it for serving.py and the tests, picture_flags.py
# holds flags three benches share
BENCHES = sorted(name for name in os.listdir(os.path.join(ROOT, "bench")) if name.endswith(".py")
                 and name not in ("no_telemetry.py", "locustfile.py", "load.py", "picture_flags.py"))


@pytest.mark.parametrize("script", BENCHES)
def test_a_bench_run_by_hand_keeps_mlflow_telemetry_off(script):
    # Outside pytest and CI, MLflow starts its telemetry client (which sends to the internet) when
    # it is imported: the bench must turn it off first, for itself and every process it starts.
    env = {name: value for name, value in step_env().items()
           if name not in ("PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY")}
    check = ("import runpy, sys\n"
             f"sys.argv = [{script!r}, '--help']\n"
             "sys.path.insert(0, '.')\n"  # as `python bench/<script>` puts its folder first
             "try:\n"
             f"    runpy.run_path({script!r}, run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "import os, mlflow\n"
             "from mlflow.telemetry import get_telemetry_client\n"
             "print('client', get_telemetry_client(), 'env', os.environ.get('MLFLOW_DISABLE_TELEMETRY'))\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=os.path.join(ROOT, "bench"), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "client None env true"
