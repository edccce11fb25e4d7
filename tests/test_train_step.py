"""The train step end to end: the real `mlflow run` CLI and `python -m steps.train` on tiny data."""
import dataclasses
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from conftest import EXPERIMENT, ROOT, python_step, refused_step, run_step, sigint_as_in_a_terminal, step_env
from mnistflow import tracking
from mnistflow.config import TuneConfig
from steps import train as train_step

EPOCH_METRICS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_time_s",
                 "images_per_s"}


def runs():
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")


def test_mlflow_run_train_tracks_everything(store, tiny_data):
    result = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local",
                      "-P", "epochs=2", "-P", "batch_size=64", "-P", f"data_dir={tiny_data}", "-P", "log_every=4",
                      "-P", "note=smoke test", "-P", "phase=tuning")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs()
    client = mlflow.MlflowClient()
    assert run.info.status == "FINISHED" and run.info.run_name == "train-fast-mnist"  # the run `mlflow run` opened
    # torch.export took the trained conv weights, channels_last, for slices of a larger tensor and said so.
    assert "No complete tensor found" not in result.stderr

    params = run.data.params
    assert params["epochs"] == "2" and params["dataset"] == "mnist"
    # mlflow run logs the -P values as given; what "auto" became is logged beside them
    assert params["model"] == params["mirror"] == params["augment"] == "auto"
    assert (params["resolved_model"], params["resolved_mirror"], params["resolved_augment"]) == ("fast", "off", "affine")
    assert params["num_params"] == "185658"
    assert {"torch_version", "torchvision_version", "mlflow_version", "python_version"} <= set(params)
    tags = run.data.tags
    assert tags["phase"] == "tuning" and tags["dataset"] == "mnist"
    assert tags["mlflow.note.content"] == "smoke test"
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    assert tags["git_branch"] and tags["user"]

    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    # step-level loss every 4 of the 2 x 9 steps (540 images / 64)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [4, 8, 12, 16]
    metrics = run.data.metrics
    assert 0.9 < metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert {f"test_{k}_class_{i}" for k in ("precision", "recall", "f1") for i in range(10)} <= set(metrics)

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-training", "mnist-validation", "mnist-test"}
    assert all(len(d.dataset.digest) == 16 for d in inputs.values())

    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    artifacts |= {f.path for d in ("plots", "test", "checkpoints") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"config.yaml", "model_summary.txt", "plots/test_confusion_matrix.png",
            "plots/loss_accuracy_curves.png", "plots/test_misclassified.png",
            "test/classification_report.txt", "test/classification_report.json",
            "checkpoints/epoch_001.pt", "checkpoints/epoch_002.pt"} <= artifacts
    png = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plots/test_confusion_matrix.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    pixels = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    scores = np.asarray(model.predict(pixels))
    assert scores.shape == (4, 10)
    assert np.allclose(scores.sum(axis=1), 1, atol=1e-5)
    assert model.metadata.get_input_schema() is not None
    assert model.metadata.saved_input_example_info is not None


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs=0 is not allowed; it must be >= 1"),
    (["--lr", "-1"], "lr=-1.0 is not allowed; it must be in (0, 10]"),
    (["--lr", "inf"], "lr=inf is not allowed; it must be a finite number"),
    (["--seed", "-1"], "seed=-1 is not allowed; it must be in [0, 4294967295]"),
    (["--model", "resnet"], "unknown model 'resnet'; choose from auto, fast, wide, baseline, enhanced, cnn_bn, simple"),
    (["--dataset", "cifar10"], "unknown dataset 'cifar10'; choose from mnist, fashion_mnist"),
    (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'; choose from adamw, adam, sgd"),
    (["--val_fraction", "1.5"], "val_fraction=1.5 is not allowed; it must be in (0, 1)"),
    (["--epochs", "five"], "argument --epochs: invalid int value: 'five'"),
    (["--resume", "0123456789abcdef"], "unknown resume run id '0123456789abcdef'"),
])
def test_bad_input_fails_in_one_line_without_a_run(monkeypatch, capsys, store, tiny_data, args, message):
    line = refused_step(monkeypatch, capsys, "steps.train", "--data_dir", tiny_data, *args)
    assert line.startswith("train: error: ") and message in line, line
    assert runs() == []


def test_bad_input_through_python_m_is_one_line_without_a_run(store, tiny_data):
    # The table above runs in this process; the command line once here, and through `mlflow run`
    # in test_config.py.
    result = python_step("steps.train", "--data_dir", tiny_data, "--epochs", "0")
    assert result.returncode == 2
    assert result.stderr == "train: error: epochs=0 is not allowed; it must be >= 1\n"
    assert runs() == []


def test_a_run_whose_loss_diverges_ends_failed_in_one_line_and_registers_nothing(store, tiny_data):
    # Within the config's limits, yet far too fast for this net: its weights overflow in the first epoch.
    result = python_step("steps.train", "--data_dir", tiny_data, "--model", "simple", "--optimizer", "sgd",
                         "--lr", "10", "--lr_schedule", "none", "--epochs", "2", "--batch_size", "64",
                         "--register", "true", "--system_metrics", "false")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("train: ")]
    assert line.startswith("train: error: training diverged in epoch 1 (train_loss=nan, val_loss=nan); "
                           "no model is kept: try a lower lr or weight_decay"), line
    [run] = runs()
    assert run.info.status == "FAILED" and "FINISHED" not in result.stdout
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list") == []
    assert mlflow.MlflowClient().search_registered_models() == []


@pytest.mark.parametrize("make_dir", ["empty", "wrong"])
def test_bad_data_dir_fails_in_one_line(monkeypatch, capsys, store, tmp_path, make_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if make_dir == "wrong":
        (data_dir / "MNIST" / "raw").mkdir(parents=True)
        (data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    line = refused_step(monkeypatch, capsys, "steps.train", "--data_dir", str(data_dir))
    assert f"mnist data not found or unreadable in {data_dir}/MNIST/raw" in line
    assert "MNISTFLOW_DATA_DIR" in line
    assert runs() == []


def checkpoints(tmp_path, run_id: str = "*") -> str:
    """The pattern of a run's stored checkpoint files in the `store` fixture's artifact folder."""
    return str(tmp_path / "artifacts" / run_id / "artifacts" / "checkpoints" / "epoch_*.pt")


def wait_for_new(path_pattern: str, existing: set, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not set(glob.glob(path_pattern)) - existing:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no {path_pattern} after {timeout} s"
        time.sleep(0.05)


# The train step as `python -m steps.train ARGS` runs it, except that after storing each checkpoint
# it says so and waits for a line on stdin: the test, not the scheduler, decides how far the run
# has got when it is interrupted or killed.
PAUSING_TRAIN = """import sys
from mnistflow import checkpoints
from steps import train
saver = checkpoints.saver
def pausing_saver(directory):
    save = saver(directory)
    def save_then_wait(state):
        save(state)
        print(f"paused after epoch {state['epoch']}", flush=True)
        sys.stdin.readline()
    return save_then_wait
checkpoints.saver = pausing_saver
train.main(sys.argv[1:])
"""


def pausing_train(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PAUSING_TRAIN, *args], cwd=ROOT, env=step_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def paused_after(proc: subprocess.Popen, epoch: int) -> None:
    """Wait until `proc` (a `pausing_train`) has stored epoch `epoch`'s checkpoint and waits."""
    for line in proc.stdout:
        if line == f"paused after epoch {epoch}\n":
            return
    pytest.fail(f"the step ended before epoch {epoch}: {proc.communicate()[1][-2000:]}")


def go_on(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()


def test_ctrl_c_under_mlflow_run_ends_the_run_killed(store, tiny_data, tmp_path):
    # A terminal's Ctrl-C signals the whole foreground process group: `mlflow run` and the step.
    proc = subprocess.Popen(["mlflow", "run", ".", "-e", "train", "--env-manager", "local",
                             "-P", f"data_dir={tiny_data}", "-P", "epochs=30", "-P", "batch_size=32",
                             "-P", "model=baseline"],
                            cwd=ROOT, env=step_env(), start_new_session=True, preexec_fn=sigint_as_in_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_new(checkpoints(tmp_path), set(), proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    [run] = runs()
    # The step ends its run KILLED; `mlflow run` marks it FAILED if it gets there first.
    assert run.info.status in ("KILLED", "FAILED"), stderr[-2000:]
    assert "test_accuracy" not in run.data.metrics


def test_interrupted_run_is_killed_and_resumes_to_the_uninterrupted_result(store, tiny_data, tmp_path, monkeypatch,
                                                                           capsys):
    args = ["--data_dir", tiny_data, "--epochs", "4", "--batch_size", "32", "--model", "baseline"]
    # Reference: the same training, uninterrupted (in this process: the same code, threads and seed).
    train_step.main(args)
    [reference] = runs()

    proc = pausing_train(*args, preexec_fn=sigint_as_in_a_terminal)
    paused_after(proc, 1)  # Ctrl-C once the first checkpoint is stored, mid-way through the run
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    interrupted = next(r for r in runs() if r.info.run_id != reference.info.run_id)
    assert interrupted.info.status == "KILLED", stderr[-2000:]
    assert "test_accuracy" not in interrupted.data.metrics
    assert interrupted.info.run_name == "train-baseline-mnist"
    mlflow.MlflowClient().update_run(interrupted.info.run_id, name="renamed-in-the-ui")

    result = python_step("steps.train", "--resume", interrupted.info.run_id)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after epoch" in result.stdout
    resumed = mlflow.get_run(interrupted.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.info.run_name == "renamed-in-the-ui"  # a resumed run keeps its name
    assert len(runs()) == 2  # continued the same run, made no new one
    for key in ("test_accuracy", "test_loss", "val_loss", "train_loss"):
        assert resumed.data.metrics[key] == pytest.approx(reference.data.metrics[key], rel=1e-6), key
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")] == [1, 2, 3, 4]

    assert "already FINISHED" in refused_step(monkeypatch, capsys, "steps.train", "--resume", interrupted.info.run_id)


def one_line_error(stderr: str, message: str) -> None:
    """The step's error is one line with `message`; `mlflow run` may add its own lines around it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("train: error: ")]
    assert message in line, line


def test_resume_refuses_a_live_run_and_continues_a_killed_one_from_its_newest_readable_checkpoint(
        store, tiny_data, tmp_path, capsys):
    proc = pausing_train("--data_dir", tiny_data, "--epochs", "4", "--batch_size", "32", "--model", "baseline")
    paused_after(proc, 1)
    [run] = runs()
    run_id = run.info.run_id
    # Its process is training: a second one on the same run would log every epoch twice.
    with pytest.raises(SystemExit) as refused:
        train_step.main(["--resume", run_id])
    assert refused.value.code == 2
    one_line_error(capsys.readouterr().err,
                   f"run {run_id} is held by process {proc.pid} on {socket.gethostname()} (it is running on this machine)")
    go_on(proc)
    paused_after(proc, 2)  # two checkpoints: one stays when the newest is torn
    proc.kill()
    proc.wait()
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # nobody is left to say otherwise

    # Through `mlflow run`: a larger epochs cannot stretch the run's one-cycle schedule.
    result = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local",
                      "-P", f"resume={run_id}", "-P", "epochs=9")
    assert result.returncode != 0
    one_line_error(result.stderr, "epochs=9 cannot be given with resume: the run was started with epochs=4")
    [launcher] = [r for r in runs() if r.info.run_id != run_id]
    assert launcher.info.status == "FAILED"

    # A store that lost the run's files is an error, not a fresh start inside the same run.
    artifacts = tmp_path / "artifacts" / run_id
    artifacts.rename(tmp_path / "moved")
    with pytest.raises(SystemExit) as refused:
        train_step.main(["--resume", run_id])
    assert refused.value.code == 2
    one_line_error(capsys.readouterr().err, f"cannot read config.yaml of run {run_id}")
    (tmp_path / "moved").rename(artifacts)

    # A crash while the newest checkpoint was written leaves it torn: resume from the one before.
    newest = max(glob.glob(checkpoints(tmp_path, run_id)))
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    assert os.path.basename(newest) == "epoch_002.pt"
    assert tracking.Holder.parse(mlflow.get_run(run_id).data.params["lease_1"]).pid == proc.pid  # dead, unreleased
    result = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", f"resume={run_id}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {os.path.basename(newest)} of run {run_id} is unreadable" in result.stdout
    assert "resuming after epoch 1 of 4" in result.stdout
    resumed = mlflow.get_run(run_id)
    assert resumed.info.status == "FINISHED" and "test_accuracy" in resumed.data.metrics
    client = mlflow.MlflowClient()
    for name in ("val_loss", "epoch_time_s"):  # every epoch once: none lost, none doubled
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3, 4], name
    assert sorted(os.path.basename(p) for p in glob.glob(checkpoints(tmp_path, run_id))) == ["epoch_003.pt", "epoch_004.pt"]
    # Besides the run: the refused `mlflow run` and the one that resumed it, which says so.
    [refused, resumer] = sorted((r for r in runs() if r.info.run_id != run_id), key=lambda r: r.info.start_time)
    assert refused.info.status == "FAILED"
    assert resumer.info.run_name == "resume-train-baseline-mnist"
    assert resumer.data.tags["mlflow.note.content"] == f"resumed run {run_id}"


def test_resume_of_a_run_the_train_step_did_not_start_is_refused_in_one_line(store, tiny_data):
    # A tune study's parent run that a failed invocation ended FAILED: params and a config.yaml,
    # but the tune step's.
    with pytest.raises(SystemExit), tracking.tracked_run(run_name="study-s") as (study, _):
        tracking.log_config(TuneConfig().validate())
        sys.exit(1)
    result = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local",
                      "-P", f"resume={study.info.run_id}", "-P", f"data_dir={tiny_data}")
    assert result.returncode != 0
    one_line_error(result.stderr, f"run {study.info.run_id} (study-s) was not started by the train step, "
                                  "so it has no checkpoints to resume")
    assert [r.info.status for r in runs()] == ["FAILED", "FAILED"]  # `mlflow run`'s own run is not left RUNNING

    with mlflow.start_run(run_name="register") as register_run:  # a run of another step, still RUNNING
        mlflow.log_param("model_name", "MNIST_CNN")
        result = python_step("steps.train", "--resume", register_run.info.run_id)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"run {register_run.info.run_id} (register) was not started by the train step" in line


def killed_run(tiny_data, epochs: int) -> str:
    """A train run whose process was killed (-9) after its first checkpoint, the run left RUNNING; its id."""
    proc = pausing_train("--data_dir", tiny_data, "--epochs", str(epochs), "--batch_size", "32", "--model", "baseline")
    paused_after(proc, 1)
    proc.kill()
    proc.wait()
    [run] = runs()
    return run.info.run_id


def leases(run_id: str) -> list[str]:
    return sorted(key for key in mlflow.get_run(run_id).data.params if key.startswith(tracking.LEASE_PARAM))


def written(run_id: str) -> tuple:
    data = mlflow.get_run(run_id).data
    return data.params, data.tags, data.metrics


def trained_once(run_id: str, epochs: int) -> None:
    """The run FINISHED with every epoch logged once and one model."""
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    for name in ("val_loss", "epoch_time_s"):
        assert [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, name)] == list(range(1, epochs + 1))
    assert len(mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")) == 1


# Imports the step, says so, and runs it once a line arrives: two of these start training together.
RESUME_ON_A_LINE = "import sys; from steps import train; print('ready', flush=True); sys.stdin.readline(); " \
                   "train.main(sys.argv[1:])"


def test_two_resumes_started_together_train_the_run_once(store, tiny_data, tmp_path):
    run_id = killed_run(tiny_data, epochs=4)
    resumes = [subprocess.Popen([sys.executable, "-c", RESUME_ON_A_LINE, "--resume", run_id], cwd=ROOT, env=step_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for resume in resumes:
        assert resume.stdout.readline() == "ready\n", resume.communicate()[1][-2000:]
    for resume in resumes:
        resume.stdin.write("\n")
        resume.stdin.flush()
    outputs = [resume.communicate(timeout=300) for resume in resumes]
    [winner] = [resume for resume in resumes if resume.returncode == 0]
    [loser] = [resume for resume in resumes if resume.returncode == 2]
    [line] = outputs[resumes.index(loser)][1].strip().splitlines()
    assert line.startswith(f"train: error: run {run_id} is held by process {winner.pid} on {socket.gethostname()} (")
    trained_once(run_id, epochs=4)
    assert leases(run_id) == ["lease_1", "lease_2"]  # the killed process's and the winner's: the loser wrote none


def test_resume_trusts_neither_a_host_name_nor_a_pid_alone(store, tiny_data, tmp_path, capsys):
    run_id = killed_run(tiny_data, epochs=2)
    client = mlflow.MlflowClient()
    this_process = tracking.Holder.this_process()
    # Another machine of the same name took the run over; here its pid is the killed process's.
    killed = tracking.Holder.parse(mlflow.get_run(run_id).data.params["lease_1"])
    elsewhere = dataclasses.replace(this_process, machine="another boot", pid=killed.pid)
    client.log_param(run_id, "lease_2", elsewhere.value())
    client.set_tag(run_id, tracking.HEARTBEAT_TAG, f"2 {time.time():.0f}")
    before = written(run_id)
    result = python_step("steps.train", "--resume", run_id)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"run {run_id} is held by process {killed.pid} on {socket.gethostname()} (it runs on another machine" in line
    assert written(run_id) == before  # refused without a write

    # Then a process here took it and died; its pid now names another process (this test's).
    client.log_param(run_id, "lease_3", dataclasses.replace(this_process, started="1").value())
    train_step.main(["--resume", run_id])
    trained_once(run_id, epochs=2)


def test_a_holder_whose_run_was_taken_over_stops_without_another_write(store, tiny_data, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "steps.train", "--data_dir", tiny_data, "--epochs", "200",
                             "--batch_size", "32", "--model", "baseline"], cwd=ROOT, env=step_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_new(checkpoints(tmp_path), set(), proc)
    [run] = runs()
    # What a process elsewhere writes when it found this one silent for too long (stopped, cut off).
    elsewhere = dataclasses.replace(tracking.Holder.this_process(), machine="another boot", pid=1)
    mlflow.MlflowClient().log_param(run.info.run_id, "lease_2", elsewhere.value())
    _, stderr = proc.communicate(timeout=120)  # at its next heartbeat
    assert proc.returncode == 1
    assert stderr.strip().splitlines()[-1] == (f"run {run.info.run_id} was taken over by process 1 on "
                                              f"{socket.gethostname()} while this process was silent; "
                                              "stopping without another write")
    after = mlflow.get_run(run.info.run_id)
    assert after.info.status == "RUNNING" and tracking.RELEASED_TAG not in after.data.tags  # left to the new holder
