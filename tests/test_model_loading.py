"""Loading a model runs no one else's code: the steps refuse models mnistflow did not log (before
anything of them is loaded) unless allow_pickled_models=true, and score a model on its own dataset."""
import os
import sys

import cloudpickle
import mlflow
import numpy as np
import pytest
import torch

from conftest import EXPERIMENT, ROOT, run_step
from mnistflow import data as datasets
from mnistflow import logged_model, models
from steps import evaluate, predict, register
from test_predict import write_pngs

sys.path.insert(0, os.path.join(ROOT, "bench"))
import serve_latency  # noqa: E402  (a script, not a package)


class MarkerModel(mlflow.pyfunc.PythonModel):
    """What a hostile model can do: its code runs the moment it is unpickled (here: it writes a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(self.marker, "w") as f:
            f.write("this model's code ran")

    def predict(self, context, model_input, params=None):
        probabilities = np.full((len(model_input), 10), 0.05, dtype=np.float32)
        probabilities[:, 3] = 0.55
        return probabilities


@pytest.fixture
def pickled(store, tmp_path) -> dict:
    """A run of a fresh store (tagged mnist, as train runs are) with a cloudpickled python_function
    model that writes a marker file when loaded, and one with a pickled pytorch model."""
    marker = tmp_path / "marker"
    # By value: the class travels inside the pickle, as a stranger's code would, and loads anywhere.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with mlflow.start_run() as run:
            mlflow.set_tag("dataset", "mnist")
            logged = mlflow.pyfunc.log_model(name="model", python_model=MarkerModel(str(marker)))
            torch_model = mlflow.pytorch.log_model(torch.nn.Flatten(), name="torch_pickle",
                                                   serialization_format="pickle")
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    marker.unlink(missing_ok=True)
    return {"run_id": run.info.run_id, "uri": f"runs:/{run.info.run_id}/model", "logged_uri": logged.model_uri,
            "marker": marker, "torch_uri": torch_model.model_uri}


def exit_code(main, args: list) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def runs() -> int:
    return len(mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list"))


REFUSAL = ("is {kind}, not one mnistflow logs (pytorch pt2 with its dataset and classes); loading it "
           "could run code it carries. To load it anyway: allow_pickled_models=true (--allow_pickled_models true)\n")


def test_a_pickled_model_is_refused_by_every_step_until_allowed(pickled, tiny_data, tmp_path, capsys):
    image = write_pngs(tmp_path)[0]
    uri, marker = pickled["uri"], pickled["marker"]
    steps = {  # step: its main, its arguments, the URI it names (register: the model its run logged)
        "predict": (predict.main, ["--model_uri", uri, "--images", image], uri),
        "evaluate": (evaluate.main, ["--model_uri", uri, "--data_dir", tiny_data], uri),
        "register": (register.main, ["--run_id", pickled["run_id"], "--model_name", "Pickled", "--data_dir", tiny_data],
                     pickled["logged_uri"]),
    }
    runs_before = runs()
    for name, (main, args, named) in steps.items():
        assert exit_code(main, args) == 2, name
        assert capsys.readouterr().err == f"{name}: error: model {named!r} " + REFUSAL.format(
            kind="a python_function model (loader mlflow.pyfunc.model)")
        assert not marker.exists(), name
    assert runs() == runs_before  # no run left behind, RUNNING or otherwise
    assert mlflow.MlflowClient().search_registered_models() == []

    # A pickled pytorch model carries code just the same.
    assert exit_code(predict.main, ["--model_uri", pickled["torch_uri"], "--images", image]) == 2
    assert capsys.readouterr().err == f"predict: error: model {pickled['torch_uri']!r} " + REFUSAL.format(
        kind="a pytorch model without mnistflow's dataset and classes")

    # The user's explicit choice: then it loads, and its code runs.
    assert exit_code(predict.main, ["--model_uri", uri, "--images", image, "--allow_pickled_models", "true"]) == 0
    assert f"{image}: 3  (3 0.5500" in capsys.readouterr().out and marker.read_text() == "this model's code ran"


def test_a_model_of_no_flavour_is_named_as_such():
    assert logged_model.foreign_kind(mlflow.models.Model()) == "an MLmodel file with no flavours"


def test_mlflow_run_and_the_bench_refuse_it_too(pickled, tmp_path):
    image = write_pngs(tmp_path)[0]
    uri, marker = pickled["uri"], pickled["marker"]
    result = run_step("mlflow", "run", ".", "-e", "predict", "--env-manager", "local",
                      "-P", f"model_uri={uri}", "-P", f"images={image}")
    assert result.returncode != 0 and "predict: error: model " + repr(uri) + " is a python_function model" in result.stderr
    assert "allow_pickled_models=true" in result.stderr and not marker.exists()
    result = run_step(sys.executable, "bench/serve_latency.py", "--model_uri", uri)
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr == f"serve_latency: error: model {uri!r} " + REFUSAL.format(
        kind="a python_function model (loader mlflow.pyfunc.model)")
    result = run_step("mlflow", "run", ".", "-e", "predict", "--env-manager", "local",
                      "-P", f"model_uri={uri}", "-P", f"images={image}", "-P", "allow_pickled_models=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{image}: 3  (3 0.5500" in result.stdout and marker.exists()


def test_serve_latency_bad_input_is_one_line(store, capsys):
    for args, message in [
        (["--requests", "0"], "serve_latency: error: --requests 0 is not allowed; it must be >= 1"),
        (["--batch", "-5"], "serve_latency: error: --batch -5 is not allowed; it must be >= 1"),
        (["--model_uri", "models:/NoSuchModel@production"], "serve_latency: error: cannot load model "
                                                        "'models:/NoSuchModel@production': "),
    ]:
        assert exit_code(serve_latency.main, args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


@pytest.fixture
def fashion_model(store, tiny_data) -> str:
    """A Fashion-MNIST model, logged as the train step logs one (its metadata names its dataset)."""
    with mlflow.start_run() as run:
        mlflow.set_tag("dataset", "fashion_mnist")
        logged_model.log(models.build("fast", "off"), datasets.load("fashion_mnist", tiny_data))
    return f"runs:/{run.info.run_id}/model"


def test_evaluate_scores_a_model_on_its_own_dataset_only(fashion_model, tiny_data, capsys):
    runs_before = runs()
    assert exit_code(evaluate.main, ["--model_uri", fashion_model, "--dataset", "mnist", "--data_dir", tiny_data]) == 2
    assert capsys.readouterr().err == (f"evaluate: error: model {fashion_model!r} was trained on fashion_mnist, not on "
                                       "mnist; its scores on mnist would mean nothing\n")
    assert runs() == runs_before

    assert exit_code(evaluate.main, ["--model_uri", fashion_model, "--data_dir", tiny_data]) == 0
    assert f"evaluated {fashion_model} on the fashion_mnist test set" in capsys.readouterr().out
    [run] = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                               filter_string="attributes.run_name = 'evaluate-fashion_mnist'")
    assert run.data.params["resolved_dataset"] == "fashion_mnist" and run.data.tags["dataset"] == "fashion_mnist"
    assert os.path.basename(run.data.tags["model_uri"]) == "model"
