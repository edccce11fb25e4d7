"""The researcher examples end to end on tiny Fashion-MNIST files, as a reader would run them."""
import mlflow
import numpy as np

from conftest import EXPERIMENT, run_step


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
