"""The train step's tensorboard=true: event files among the run's artifacts, read back the way the
README says (`mlflow artifacts download`, then TensorBoard), and one line when TensorBoard is missing."""
import json
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import EXPERIMENT, free_port, run_step, step_env
from steps import train as train_step

EPOCH_METRICS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_time_s", "images_per_s"}


def runs():
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")


def test_the_readme_commands_show_a_runs_tensorboard_events(store, tiny_data, tmp_path):
    # 2 epochs at a low rate leave some test images misclassified.
    train_step.main(["--data_dir", tiny_data, "--epochs", "2", "--batch_size", "64", "--lr", "0.0001",
                     "--log_every", "3", "--tensorboard", "true", "--system_metrics", "false"])
    [run] = runs()
    run_id, client = run.info.run_id, mlflow.MlflowClient()

    # README: mlflow artifacts download -r <run_id> -a tensorboard -d tb && tensorboard --logdir tb
    download = run_step("mlflow", "artifacts", "download", "-r", run_id, "-a", "tensorboard",
                        "-d", str(tmp_path / "tb"))
    assert download.returncode == 0, download.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == EPOCH_METRICS | {"loss"}
    for name in EPOCH_METRICS | {"loss"}:  # the same values at the same steps as in MLflow
        logged, written = client.get_metric_history(run_id, name), events.Scalars(name)
        assert [e.step for e in written] == [m.step for m in logged], name
        assert [e.value for e in written] == pytest.approx([m.value for m in logged], rel=1e-6), name  # float32
    [image] = events.Images("test_misclassified")
    assert image.step == 2 and image.width > 100 and image.encoded_image_string.startswith(b"\x89PNG")
    assert run.data.metrics["test_accuracy"] < 1  # so the image shows some

    port = free_port()
    server = subprocess.Popen(["tensorboard", "--logdir", str(tmp_path / "tb"), "--host", "127.0.0.1",
                               "--port", str(port)], env=step_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert set(scalar_tags(f"http://127.0.0.1:{port}", server)) == EPOCH_METRICS | {"loss"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def scalar_tags(url: str, server: subprocess.Popen, timeout: float = 120) -> dict:
    """The scalar tags of the run `tensorboard` as TensorBoard's server lists them, once it has read them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[1][-2000:]
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
                tags = json.load(response)
            if tags.get("tensorboard"):
                return tags["tensorboard"]
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"TensorBoard at {url} listed no scalars within {timeout} s")


def test_no_tensorboard_package_is_one_line_before_any_run(store, tiny_data, capsys, monkeypatch):
    # As if tensorboard were not installed: None in sys.modules makes its import fail.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(SystemExit) as exit:
        train_step.main(["--data_dir", tiny_data, "--tensorboard", "true"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("train: error: tensorboard=true needs the tensorboard package: "
                                       "pip install -e '.[tensorboard]', or give tensorboard=false\n")
    assert runs() == []

