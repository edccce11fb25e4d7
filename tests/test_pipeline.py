"""`mlflow run .` (main: train → tune → register → plot_loss) and `progressive`, through the real CLI."""
import glob
import os

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT

from conftest import EXPERIMENT, ROOT, run_step


def runs_of(entry_point: str) -> list:
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string=f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}'")


def children(parent_id: str) -> dict:
    found = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                               filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")
    return {run.data.tags[MLFLOW_PROJECT_ENTRY_POINT]: run for run in found if MLFLOW_PROJECT_ENTRY_POINT in run.data.tags}


def test_main_runs_the_chain_then_reuses_it_then_force_reruns(store, tiny_data, tmp_path):
    pipeline_args = ["mlflow", "run", ".", "--env-manager", "local", "-P", "epochs=2", "-P", "n_trials=2",
                     "-P", "tune_epochs=1", "-P", f"data_dir={tiny_data}", "-P", f"storage=sqlite:///{tmp_path}/optuna.db",
                     "-P", "model_name=Pipeline", "-P", "min_accuracy=0.5"]
    try:
        first = run_step(*pipeline_args)
        assert first.returncode == 0, first.stderr[-3000:]
        [pipeline_run] = runs_of("main")
        assert pipeline_run.info.status == "FINISHED"
        steps = children(pipeline_run.info.run_id)
        assert set(steps) == {"train", "tune", "register", "plot_loss"}
        assert all(run.info.status == "FINISHED" for run in steps.values())
        # Run ids were passed on: register and plot_loss got the better of train and tune.
        registered = steps["register"].data.tags["source_run_id"]
        assert registered in (steps["train"].info.run_id, pipeline_run.data.tags["tune_run_id"])
        assert steps["plot_loss"].data.params["run_id"] == registered
        assert "plots/loss_history.png" in {f.path for f in mlflow.MlflowClient().list_artifacts(registered, "plots")}
        version = mlflow.MlflowClient().get_model_version_by_alias("Pipeline", "production")
        assert version.run_id == registered
        summary = first.stdout[first.stdout.index("pipeline run"):]
        for step in ("train", "tune", "register", "plot_loss"):
            assert f"\n{step} " in summary
        assert "Pipeline version 1 @production" in summary and "reused" not in summary

        second = run_step(*pipeline_args)
        assert second.returncode == 0, second.stderr[-3000:]
        assert len(runs_of("train")) == 1 and len(runs_of("tune")) == 1 and len(runs_of("register")) == 1
        summary = second.stdout[second.stdout.index("pipeline run"):]
        assert summary.count(" reused ") == 4
        assert "== train: reusing run" in second.stdout

        forced = run_step(*pipeline_args, "-P", "force=true")
        assert forced.returncode == 0, forced.stderr[-3000:]
        assert len(runs_of("train")) == 2 and len(runs_of("tune")) == 2 and len(runs_of("plot_loss")) == 2
        assert " reused " not in forced.stdout[forced.stdout.index("pipeline run"):]
    finally:
        for png in glob.glob(os.path.join(ROOT, "loss_*.png")):  # plot_loss saves its PNG where it runs
            os.remove(png)


def test_bad_main_parameter_is_one_line(store):
    result = run_step("python", "-m", "steps.main", "--n_trials", "0")
    assert result.returncode == 2 and result.stderr == "main: error: n_trials=0 is not allowed; it must be >= 1\n"
    assert runs_of("main") == [] and mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list") == []


def test_progressive_compares_the_three_runs_of_the_pipeline_doc(store, tiny_data):
    result = run_step("mlflow", "run", ".", "-e", "progressive", "--env-manager", "local", "-P", "epochs=1",
                      "-P", f"data_dir={tiny_data}")
    assert result.returncode == 0, result.stderr[-3000:]
    [parent] = runs_of("progressive")
    trains = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
    assert len(trains) == 3
    settings = {(r.data.params["model"], r.data.params["lr"], r.data.params["batch_size"]) for r in trains}
    assert settings == {("baseline", "0.001", "128"), ("enhanced", "0.001", "128"), ("enhanced", "0.0005", "64")}
    assert all(r.data.params["optimizer"] == "adam" and r.data.params["epochs"] == "1" for r in trains)

    csv_text = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/progressive_comparison.csv")
    header, *rows = csv_text.strip().splitlines()
    assert header == "run,model,lr,batch_size,test_accuracy,test_loss,train_time_s,num_params,run_id"
    assert [row.split(",")[0] for row in rows] == ["run_1_baseline", "run_2_enhanced", "run_3_optimized"]
    assert {row.split(",")[7] for row in rows} == {"54410", "1386506"}
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/progressive.png" in artifacts
