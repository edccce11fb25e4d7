"""The researcher examples end to end on tiny Fashion-MNIST files, as a reader would run them,
and their one-line refusals of bad input."""
import os

import mlflow
import numpy as np
import pytest

from conftest import EXPERIMENT, ROOT, refused_script, run_step


def runs(filter_string: str = "") -> list:
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list", filter_string=filter_string)


def example(name: str, *args: str):
    # The store fixture's experiment keeps the artifacts in the test's temporary directory.
    return run_step("python", f"researcher/{name}", "--experiment", EXPERIMENT, *args)


def test_example1_is_one_tracked_run_with_a_model(store, tiny_data):
    result = example("example1.py", "--data_dir", tiny_data, "--epochs", "2", "--lr", "0.005")
    assert result.returncode == 0, result.stderr[-2000:]
    [run] = runs()
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "fashion_mnist"
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.005"
    assert {"test_accuracy", "test_loss", "val_loss", "train_loss"} <= set(run.data.metrics)
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.metadata["dataset"] == "fashion_mnist"
    # Fashion-MNIST trains with mirror=on: the logged model averages both views, so an image and
    # its mirror image get the same class probabilities.
    pixels = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    probabilities = model.predict(pixels)
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert np.allclose(model.predict(pixels[..., ::-1].copy()), probabilities, atol=1e-5)
    assert f"log_plot.py --run-id {run.info.run_id}" in result.stdout


def test_example2_nests_one_child_run_per_trial(store, tiny_data):
    result = example("example2.py", "--data_dir", tiny_data, "--trials", "3", "--epochs", "1",
                      "--batch_sizes", "[32, 64]")
    assert result.returncode == 0, result.stderr[-2000:]
    [parent] = runs("attributes.run_name = 'example2-study'")
    children = runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert all(child.info.status == "FINISHED" and child.data.params["batch_size"] in ("32", "64") for child in children)
    best = max(child.data.metrics["best_val_accuracy"] for child in children)
    assert parent.data.metrics["best_val_accuracy"] == best
    assert {"best_lr", "best_batch_size"} <= set(parent.data.params)


def test_a_bad_override_is_refused(store, tiny_data):
    result = example("example1.py", "--no_such_setting", "1")
    assert result.returncode == 2 and "unrecognized arguments: --no_such_setting" in result.stderr
    assert runs() == []


@pytest.mark.parametrize("script, args, message", [
    ("example1.py", ["--epochs", "five"], "argument --epochs: invalid int value: 'five'"),
    ("example1.py", ["--epochs", "-1"], "epochs=-1 is not allowed; it must be >= 1"),
    ("example1.py", ["--max_train_samples", "-5"], "max_train_samples=-5 is not allowed; it must be >= 0"),
    ("example1.py", ["--model", "resnet"], "unknown model 'resnet'; choose from auto, fast"),
    ("example2.py", ["--trials", "-2"], "trials=-2 is not allowed; it must be >= 1"),
    ("example2.py", ["--batch_sizes", "[0, 64]"], "batch_sizes=[0, 64] is not allowed; give a list of whole numbers >= 1"),
    ("example2.py", ["--batch_sizes", "64"], "argument --batch-sizes/--batch_sizes: '64' is not a list"),
    ("example2.py", ["--lr_low", "0.1"], "lr_low=0.1, lr_high=0.03 are not allowed; they must be 0 < lr_low < lr_high"),
    ("example1.py", ["--lr", "inf"], "lr=inf is not allowed; it must be a finite number"),
    ("example1.py", ["--lr", "nan"], "lr=nan is not allowed; it must be a finite number"),
    ("example1.py", ["--seed", "-1"], "seed=-1 is not allowed; it must be in [0, 4294967295]"),
    ("example1.py", ["--seed", "12345678901234567890"], "seed=12345678901234567890 is not allowed"),
    ("example2.py", ["--seed", "-1"], "seed=-1 is not allowed; it must be in [0, 4294967295]"),
    ("example2.py", ["--lr_high", "inf"], "lr_low=0.001, lr_high=inf are not allowed; they must be 0 < lr_low < "
                                          "lr_high <= 10"),
    ("example2.py", ["--lr_low", "nan"], "lr_low=nan, lr_high=0.03 are not allowed"),
    ("log_plot.py", ["--run-id", "abc", "--out", "loss.txt"], "out=loss.txt: cannot write this file (its name must "
                                                              "end in a format matplotlib writes: "),
    ("log_plot.py", [], "give a run id: --run-id <id>"),
    ("log_plot.py", ["--run-id", "nope"], "unknown run_id 'nope'"),
])
def test_bad_input_is_one_line_and_writes_nothing(store, tiny_data, monkeypatch, capsys, script, args, message):
    """In this process; the command line itself is run by the tests around this one."""
    if script.startswith("example"):  # an experiment of its own, which must not be created
        args = ["--experiment", "not-created", "--data_dir", tiny_data, *args]
    monkeypatch.syspath_prepend(os.path.join(ROOT, "researcher"))
    line = refused_script(monkeypatch, capsys, os.path.join(ROOT, "researcher", script), *args)
    assert line.startswith(f"{script}: error: ") and message in line
    assert mlflow.get_experiment_by_name("not-created") is None and runs() == []


def edit(old: str, new: str):
    return lambda default: default.replace(old, new)


# How a --config file is made from the script's own cfg/ file, and the error that names it.
@pytest.mark.parametrize("script, make, message", [
    ("example1.py", lambda _: "- epochs: 3\n", "config {file} must be a mapping of key: value, as {cfg}/ex1.yaml is"),
    ("example1.py", lambda _: "just text\n", "config {file} must be a mapping of key: value"),
    ("example1.py", lambda _: "", "config {file} must be a mapping of key: value"),
    ("example1.py", lambda _: "epochs: [3\n", "config {file} is not valid YAML: while parsing a flow sequence"),
    ("example1.py", edit("epochs: 3", ""), "config {file}: no key 'epochs'; it needs every key of {cfg}/ex1.yaml"),
    ("example1.py", lambda default: default + "epoch: 5\n",
     "config {file}: unknown key 'epoch'; the keys are those of {cfg}/ex1.yaml: tracking_uri, experiment, "),
    ("example1.py", edit("epochs: 3", "epochs: three"),
     "config {file}: epochs='three' is not allowed; it must be a whole number, like 3"),
    ("example1.py", edit("lr: 0.01", "lr: .nan"), "lr=nan is not allowed; it must be a finite number"),  # train's rule
    ("example1.py", edit("lr: 0.01", "lr: 1"), "data not found"),  # a whole number is a number: the data is read
    ("example2.py", edit("trials: 5", "trials: 5.5"),
     "config {file}: trials=5.5 is not allowed; it must be a whole number"),
    ("example2.py", edit("batch_sizes: [64, 128, 256]", "batch_sizes: 64"),
     "config {file}: batch_sizes=64 is not allowed; it must be a list"),
    ("log_plot.py", edit("run_id: \"\"", ""), "config {file}: no key 'run_id'"),
    ("log_plot.py", edit("run_id: \"\"", "run_id: 0123"),
     "config {file}: run_id=83 is not allowed; it must be text (quoted where YAML would read a number)"),
])
def test_a_config_file_that_does_not_fit_is_one_line_naming_file_and_key(store, tmp_path, monkeypatch, capsys,
                                                                          script, make, message):
    cfg = os.path.join(ROOT, "researcher", "cfg")
    default_file = {"example1.py": "ex1.yaml", "example2.py": "ex2.yaml", "log_plot.py": "log_plot.yaml"}[script]
    with open(os.path.join(cfg, default_file)) as f:
        content = make(f.read())
    # No data there and an experiment of its own: a file that passes gets as far as reading the data, no further.
    config_file = tmp_path / "my.yaml"
    config_file.write_text(content.replace('data_dir: ""', f'data_dir: "{tmp_path}"')
                           .replace("experiment: researcher-examples", "experiment: not-created"))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "researcher"))
    line = refused_script(monkeypatch, capsys, os.path.join(ROOT, "researcher", script), "--config", str(config_file))
    assert line.startswith(f"{script}: error: ") and message.format(cfg=cfg, file=config_file) in line, line
    assert mlflow.get_experiment_by_name("not-created") is None and runs() == []


def test_a_bad_value_on_the_command_line_is_one_line(store, tiny_data):
    result = example("example1.py", "--data_dir", tiny_data, "--epochs", "five")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["example1.py: error: argument --epochs: invalid int value: 'five'"]
    assert runs() == []


def test_log_plot_to_an_unwritable_out_is_one_line_and_logs_nothing(store, tmp_path):
    with mlflow.start_run() as run:
        for epoch in (1, 2):
            mlflow.log_metrics({"train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch}, step=epoch)
    out = tmp_path / "no-such-dir" / "loss.png"
    result = run_step("python", "researcher/log_plot.py", "--run-id", run.info.run_id, "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"log_plot.py: error: out={out}: cannot write this file "
                                                  f"(no folder {out.parent})"]
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == [] and not out.parent.exists()
