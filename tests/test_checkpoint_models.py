"""Checkpoints as logged models (train's checkpoint_models=true) and register's checkpoint_metric,
through `mlflow run` on a real SQLite store and the tiny data; and the test metrics' links to the
test dataset and the final model."""
import mlflow
import numpy as np
import pytest

from conftest import EXPERIMENT, run_step
from mnistflow import data as datasets
from mnistflow import logged_model, models, registry
from mnistflow.errors import NotFound
from steps import register

EPOCHS = 3
BATCH_SIZE = 8  # 68 optimizer steps an epoch on the tiny data
# The tiny data's checkpoints score from about 0.9 to 1.0, and the machine may be busy: these
# limits let every checkpoint through the gate.
LENIENT = {"min_accuracy": "0.1", "recall_margin": "1", "max_latency_ms": "10000", "min_robust_accuracy": "0"}
LENIENT_P = [arg for name, value in LENIENT.items() for arg in ("-P", f"{name}={value}")]
LENIENT_FLAGS = [arg for name, value in LENIENT.items() for arg in (f"--{name}", value)]


class Checkpointed:
    """A store holding one train run made with checkpoint_models=true."""

    def __init__(self, uri: str, run: mlflow.entities.Run, data_dir: str):
        self.uri, self.run, self.data_dir = uri, run, data_dir


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("checkpointed")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        # A system metrics sample every 2 s: samples 0, 1, 2… are there before any model is logged.
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")
        mlflow.set_tracking_uri(uri)
        mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
        result = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", f"epochs={EPOCHS}",
                          "-P", f"batch_size={BATCH_SIZE}", "-P", f"data_dir={tiny_data}", "-P", "checkpoint_models=true")
        assert result.returncode == 0, result.stderr[-3000:]
        [run] = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
        yield Checkpointed(uri, run, tiny_data)
        mlflow.set_tracking_uri(None)


def models_of(run: mlflow.entities.Run) -> dict:
    """name -> logged model, of every model the run logged."""
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run.info.run_id}'")
    return {model.name: model for model in found}


def history_of(run: mlflow.entities.Run, key: str) -> dict:
    """step -> value of one of the run's metrics."""
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, key)}


def linked(model) -> dict:
    """metric -> (step, dataset name) of the metrics logged with the model."""
    return {m.key: (m.step, m.dataset_name) for m in model.metrics}


def ranked(run: mlflow.entities.Run, metric: str, ascending: bool) -> list:
    return mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run.info.run_id}' AND name LIKE 'checkpoint-%'",
        order_by=[{"field_name": f"metrics.{metric}", "ascending": ascending}])


def versions(name: str) -> list:
    return mlflow.MlflowClient().search_model_versions(f"name = '{name}'")


def register_runs() -> list:
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string="attributes.run_name LIKE 'register-%'")


def scores(model_id: str, data_dir: str) -> tuple[float, float]:
    """(test accuracy, test cross-entropy) of a logged model, computed here from its predictions."""
    data = datasets.load("mnist", data_dir)
    probabilities = np.asarray(mlflow.pyfunc.load_model(f"models:/{model_id}").predict(data.pixels(data.test).numpy()))
    labels = data.test.labels.numpy()
    return (float((probabilities.argmax(1) == labels).mean()),
            float(-np.log(probabilities[np.arange(len(labels)), labels]).mean()))


def test_each_epoch_is_a_logged_model_with_its_metrics_and_the_test_metrics_name_the_final_model(checkpointed):
    run = checkpointed.run
    models = models_of(run)
    assert set(models) == {"model", *(f"checkpoint-{epoch}" for epoch in range(1, EPOCHS + 1))}
    # MLflow links a model to the run's metrics at its step: none of the system metrics' samples.
    assert not [m.key for model in models.values() for m in model.metrics if m.key.startswith("system/")]
    assert any(key.startswith("system/") for key in run.data.metrics)
    # Each model is logged at the optimizer step its weights come from; the final one is the best epoch's.
    steps_per_epoch = int(run.data.params["steps_per_epoch"])
    best_epoch = min(range(1, EPOCHS + 1), key=lambda epoch: (history_of(run, "val_loss")[epoch], epoch))
    steps = {output.model_id: output.step for output in mlflow.get_run(run.info.run_id).outputs.model_outputs}
    assert {name: steps[model.model_id] for name, model in models.items()} == \
        {"model": best_epoch * steps_per_epoch,
         **{f"checkpoint-{epoch}": epoch * steps_per_epoch for epoch in range(1, EPOCHS + 1)}}

    history = {key: history_of(run, key) for key in ("val_loss", "val_accuracy", "train_loss", "lr")}
    for epoch in range(1, EPOCHS + 1):
        checkpoint = models[f"checkpoint-{epoch}"]
        assert checkpoint.metrics and {m.model_id for m in checkpoint.metrics} == {checkpoint.model_id}
        assert {key: linked(checkpoint)[key] for key in history} == {
            "val_loss": (epoch, "mnist-validation"), "val_accuracy": (epoch, "mnist-validation"),
            "train_loss": (epoch, "mnist-training"), "lr": (epoch, None)}
        values = {m.key: m.value for m in checkpoint.metrics}
        assert {key: values[key] for key in history} == {key: history[key][epoch] for key in history}
    # Each epoch's metrics are in the run's history once, linked or not.
    assert [len(history[key]) for key in history] == [EPOCHS] * len(history)

    # The final model's page says what it was measured on: the test split, as the run lists it.
    final = models["model"]
    tests = {key: value for key, value in linked(final).items() if key.startswith("test_")}
    assert len(tests) == 2 + 3 * 10 and set(tests.values()) == {(0, "mnist-test")}
    run_inputs = {(d.dataset.name, d.dataset.digest) for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {(m.dataset_name, m.dataset_digest) for m in final.metrics if m.key.startswith("test_")} <= run_inputs
    assert {m.key: m.value for m in final.metrics}["test_accuracy"] == run.data.metrics["test_accuracy"]


def test_search_logged_models_ranks_the_checkpoints_and_register_takes_the_best_one(checkpointed):
    run = checkpointed.run
    # As a user ranks the checkpoints with MLflow's own search: the best validation accuracy.
    best = ranked(run, "val_accuracy", ascending=False)[0]
    accuracies = history_of(run, "val_accuracy")
    epoch = int(best.name.removeprefix("checkpoint-"))
    assert accuracies[epoch] == max(accuracies.values())

    result = run_step("mlflow", "run", ".", "-e", "register", "--env-manager", "local", "-P", f"run_id={run.info.run_id}",
                      "-P", "checkpoint_metric=val_accuracy", "-P", "model_name=BestCheckpoint",
                      "-P", f"data_dir={checkpointed.data_dir}", *LENIENT_P)
    assert result.returncode == 0, result.stderr[-3000:]
    [version] = versions("BestCheckpoint")
    assert version.source == f"models:/{best.model_id}" and version.run_id == run.info.run_id
    assert version.tags["checkpoint"] == f"epoch {epoch}, best val_accuracy {accuracies[epoch]:.6g}"
    assert f"its checkpoint model of epoch {epoch}" in version.description
    assert f"model models:/{best.model_id} (checkpoint: epoch {epoch}" in result.stdout


def test_the_gate_measures_the_checkpoint_it_registers_and_the_default_is_the_final_model(checkpointed):
    run, data_dir = checkpointed.run, checkpointed.data_dir
    # The one-cycle rate is highest at the end of epoch 1: a metric whose best checkpoint is not
    # the final model (the weights of the lowest val_loss), so their test figures differ.
    first = ranked(run, "lr", ascending=False)[0]
    assert first.name == "checkpoint-1"
    final = models_of(run)["model"]
    assert scores(first.model_id, data_dir) != scores(final.model_id, data_dir)  # so the figures tell them apart

    for name, checkpoint_metric, model in (("FirstCheckpoint", "lr", first), ("FinalModel", "", final)):
        register.main(["--run_id", run.info.run_id, "--checkpoint_metric", checkpoint_metric,
                       "--model_name", name, "--data_dir", data_dir, *LENIENT_FLAGS])
        [version] = versions(name)
        assert version.source == f"models:/{model.model_id}"
        accuracy, loss = scores(model.model_id, data_dir)
        assert float(version.tags["gate_test_accuracy"]) == pytest.approx(accuracy, rel=1e-5)
        assert float(version.tags["test_loss"]) == pytest.approx(loss, rel=1e-4)
    assert "checkpoint" not in versions("FinalModel")[0].tags


def test_a_checkpoint_metric_no_checkpoint_has_is_one_line_and_changes_nothing(checkpointed):
    run = checkpointed.run
    runs_before = len(register_runs())
    result = run_step("mlflow", "run", ".", "-e", "register", "--env-manager", "local", "-P", f"run_id={run.info.run_id}",
                      "-P", "checkpoint_metric=val_acc", "-P", "model_name=NoSuchMetric",
                      "-P", f"data_dir={checkpointed.data_dir}")
    assert result.returncode != 0 and "Traceback" not in result.stderr  # `mlflow run` exits 1 when its step fails
    [line] = [line for line in result.stderr.splitlines() if line.startswith("register: error: ")]
    assert line == (f"register: error: checkpoint_metric 'val_acc': no checkpoint model of run {run.info.run_id} has it; "
                    "theirs are epoch_time_s, images_per_s, lr, train_accuracy, train_loss, val_accuracy, val_loss")
    assert versions("NoSuchMetric") == [] and len(register_runs()) == runs_before

    # A run with only its final model, as checkpoint_models=false leaves it, has none to choose from.
    with mlflow.start_run() as plain:
        logged_model.log(models.build("fast", "off"), datasets.load("mnist", checkpointed.data_dir))
    with pytest.raises(NotFound, match=f"run {plain.info.run_id} logged no checkpoint models; "
                                       "train with checkpoint_models=true"):
        registry.best_checkpoint(mlflow.get_run(plain.info.run_id), "val_loss")
