"""MLflow's system metrics on train runs and tune trials: on by default, none with system_metrics=false,
and the run still ends FINISHED with the process exiting (the monitor is a thread of the step)."""
import mlflow
import pytest
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from conftest import EXPERIMENT, python_step, run_step
from steps import train as train_step, tune as tune_step

# The metrics MLflow's monitor logs on any machine; GPU ones come only with an NVIDIA GPU.
SYSTEM = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
          "system/system_memory_usage_percentage"}
TINY = ["--epochs", "1", "--batch_size", "64"]


@pytest.fixture(autouse=True)
def fast_sampling(monkeypatch):
    """Samples every 0.02 s. MLflow's monitor logs nothing for a run shorter than one interval, and a
    tune trial on the tiny data lasts a fraction of a second."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.02")


def runs():
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")


def system_metrics(run) -> set:
    return {name for name in run.data.metrics if name.startswith("system/")}


def test_a_train_run_has_system_metrics_by_default(store, tiny_data):
    result = python_step("steps.train", "--data_dir", tiny_data, *TINY, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs()
    assert run.info.status == "FINISHED"
    assert SYSTEM <= system_metrics(run)
    if torch.cuda.is_available():
        assert "system/gpu_0_utilization_percentage" in system_metrics(run)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= m.value <= 100 for m in history)
    assert [m.step for m in history] == list(range(len(history)))
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    # MLflow's monitor says at INFO that it starts and stops; the step's output stays its own.
    assert "system metrics" not in result.stderr


def test_system_metrics_false_through_mlflow_run_logs_none(store, tiny_data):
    result = run_step("mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "epochs=1",
                      "-P", "batch_size=64", "-P", f"data_dir={tiny_data}", "-P", "system_metrics=false")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs()
    assert run.info.status == "FINISHED" and run.data.params["system_metrics"] == "false"
    assert system_metrics(run) == set() and "test_accuracy" in run.data.metrics


def test_each_tune_trial_has_system_metrics_and_the_parent_none(store, tiny_data, tmp_path):
    result = python_step("steps.tune", "--data_dir", tiny_data, "--storage", f"sqlite:///{tmp_path}/optuna.db",
                         "--n_trials", "2", "--epochs", "1", "--pruner", "none", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    parents = [run for run in runs() if MLFLOW_PARENT_RUN_ID not in run.data.tags]
    trials = [run for run in runs() if MLFLOW_PARENT_RUN_ID in run.data.tags]
    assert len(parents) == 1 and len(trials) == 2
    assert all(run.info.status == "FINISHED" and SYSTEM <= system_metrics(run) for run in trials)
    assert system_metrics(parents[0]) == set()


@pytest.mark.parametrize("step", [train_step, tune_step])
def test_a_bad_system_metrics_value_is_one_line_and_no_run(store, tiny_data, capsys, step):
    with pytest.raises(SystemExit) as exit:
        step.main(["--data_dir", tiny_data, "--system_metrics", "sometimes"])
    assert exit.value.code == 2
    name = step.__name__.split(".")[-1]
    assert capsys.readouterr().err == (f"{name}: error: argument --system_metrics/--system-metrics: 'sometimes' "
                                       "is not a boolean; use true or false\n")
    assert runs() == []
