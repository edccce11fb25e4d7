"""plot_loss (the step and researcher/log_plot.py) on real runs: a train run, a tune parent (plotted in
test_tune_step.py's tune, with the checks here), bad input."""
import os
import runpy
import sys

import mlflow
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT
from PIL import Image

from conftest import EXPERIMENT, ROOT, run_step
from mnistflow.plot_loss import ARTIFACT, draw
from steps import plot_loss


def logged(run_id: str) -> set[str]:
    return {f.path for f in mlflow.MlflowClient().list_artifacts(run_id, "plots")}


def labelled_lines(figure) -> dict:
    """label -> number of points, for the curves of a figure (not the epoch markers)."""
    return {line.get_label(): len(line.get_xdata()) for line in figure.axes[0].lines
            if not line.get_label().startswith("_")}


def test_mlflow_run_plot_loss_on_a_train_run(registry_store, tmp_path):
    out = tmp_path / "loss.png"
    result = run_step("mlflow", "run", ".", "-e", "plot_loss", "--env-manager", "local",
                      "-P", f"run_id={registry_store.good}", "-P", f"out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out).size[0] >= 800 and ARTIFACT in logged(registry_store.good)
    # The run `mlflow run` opened for the step logs nothing itself; its name and note say what it did.
    [launcher] = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list", filter_string=(
        f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = 'plot_loss' AND params.run_id = '{registry_store.good}'"))
    assert launcher.info.run_name == "plot_loss-train-fast-mnist"  # the train step named the plotted run
    assert launcher.data.tags["mlflow.note.content"] == f"plotted the losses of run {registry_store.good} as its {ARTIFACT}"

    figure = draw(registry_store.good)
    # 2 epochs of 9 steps, `loss` logged every 50 steps by default: no step-level points here.
    assert labelled_lines(figure) == {"train_loss (per epoch)": 2, "val_loss (per epoch)": 2}
    epoch_ends = [line.get_xdata()[0] for line in figure.axes[0].lines if line.get_label().startswith("_")]
    assert epoch_ends == [9, 18]


def assert_one_line_per_trial(parent_id: str) -> None:
    """The plot of a tune parent run overlays its trials' val_loss, each labelled with its number
    and state, a pruned trial's one epoch long (test_tune_step.py's tune, which prunes some)."""
    trials = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    lines = labelled_lines(draw(parent_id))
    assert len(lines) == len(trials)
    for trial in trials:
        label = f"trial {trial.data.tags['trial_number']} ({trial.data.tags['trial_state']})"
        assert lines[label] == (1 if trial.data.tags["trial_state"] == "PRUNED" else 2), label
    assert any("PRUNED" in label for label in lines)


def assert_mlflow_run_plot_loss_logs_to_the_parent(parent_id: str, out) -> None:
    result = run_step("mlflow", "run", ".", "-e", "plot_loss", "--env-manager", "local",
                      "-P", f"run_id={parent_id}", "-P", f"out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ARTIFACT in logged(parent_id) and out.exists()


def test_log_plot_takes_both_flag_spellings_and_a_config(registry_store, tmp_path, monkeypatch):
    config = tmp_path / "plot.yaml"
    config.write_text(f"tracking_uri: {registry_store.uri}\nrun_id: ''\nout: {tmp_path / 'loss.png'}\n")
    # The spelling the guide gives, as typed; the other in this process (the script is the same).
    result = run_step("python", "researcher/log_plot.py", "--config", str(config), "--run-id", registry_store.poor)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "loss.png").exists() and ARTIFACT in logged(registry_store.poor)
    other = run_with_losses()
    config.write_text(f"tracking_uri: {registry_store.uri}\nrun_id: ''\nout: {tmp_path / 'other.png'}\n")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "researcher"))
    monkeypatch.setattr(sys, "argv", ["log_plot.py", "--config", str(config), "--run_id", other])
    runpy.run_path(os.path.join(ROOT, "researcher", "log_plot.py"), run_name="__main__")
    assert (tmp_path / "other.png").exists() and ARTIFACT in logged(other)


def test_bad_run_ids_are_one_line_and_log_nothing(registry_store, tmp_path, capsys):
    with mlflow.start_run() as bare:  # a run with no loss metrics
        mlflow.log_metric("accuracy", 0.5)
    for run_id, message in (("0123456789abcdef0123456789abcdef", "unknown run_id"),
                            (bare.info.run_id, "has no loss metrics")):
        out = tmp_path / f"{run_id}.png"
        with pytest.raises(SystemExit) as exited:
            plot_loss.main(["--run_id", run_id, "--out", str(out)])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.startswith("plot_loss: error: ") and message in err
        assert err.count("\n") == 1 and not out.exists()
    assert logged(bare.info.run_id) == set()

    result = run_step("python", "researcher/log_plot.py", "--run-id", bare.info.run_id)
    assert result.returncode == 2 and "has no loss metrics" in result.stderr
    assert logged(bare.info.run_id) == set()

    # Through `mlflow run`: its own run is not described as having plotted anything.
    result = run_step("mlflow", "run", ".", "-e", "plot_loss", "--env-manager", "local", "-P", f"run_id={bare.info.run_id}")
    assert result.returncode != 0 and "plot_loss: error: " in result.stderr and "has no loss metrics" in result.stderr
    [launcher] = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                    filter_string="tags.`mlflow.project.entryPoint` = 'plot_loss'"
                                                  f" and params.run_id = '{bare.info.run_id}'")
    assert launcher.info.status == "FAILED" and "mlflow.note.content" not in launcher.data.tags



def run_with_losses() -> str:
    with mlflow.start_run() as run:
        for epoch in (1, 2):
            mlflow.log_metrics({"train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch}, step=epoch)
    return run.info.run_id


@pytest.mark.parametrize("name, reason", [
    ("loss.txt", "its name must end in a format matplotlib writes: "),
    ("l" * 300 + ".png", "its name is longer than the 255 bytes "),
])
def test_an_out_that_cannot_be_saved_is_refused_before_drawing(store, tmp_path, capsys, name, reason):
    run_id, out = run_with_losses(), tmp_path / "plots" / name
    out.parent.mkdir()
    with pytest.raises(SystemExit) as exited:
        plot_loss.main(["--run_id", run_id, "--out", str(out)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"plot_loss: error: out={out}: cannot write this file ({reason}")
    assert err.count("\n") == 1 and list(out.parent.iterdir()) == [] and logged(run_id) == set()


def test_an_out_that_fails_to_write_is_one_line_and_logs_nothing(store, tmp_path, capsys):
    run_id, out = run_with_losses(), tmp_path / "loss.png"
    out.symlink_to("/dev/full")  # writable by every check made before drawing, full when written
    with pytest.raises(SystemExit) as exited:
        plot_loss.main(["--run_id", run_id, "--out", str(out)])
    assert exited.value.code == 2 and logged(run_id) == set()
    assert capsys.readouterr().err == f"plot_loss: error: cannot write {out}: No space left on device\n"
