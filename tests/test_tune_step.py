"""The tune step end to end on tiny data: real Optuna storages (SQLite, PostgreSQL), a real MLflow
store, the real `mlflow run` CLI, and real worker processes, one of them killed."""
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.storages._rdb.models import MAX_INDEXED_STRING_LENGTH

from conftest import EXPERIMENT, ROOT, python_step, refused_step, run_step, step_env, wait_until
import test_plot_loss
from mnistflow import tuning
from mnistflow.config import TuneConfig

PLOTS = {f"plots/{name}.png" for name in tuning.STUDY_PLOTS}


def tune_args(storage: str, data_dir: str, *extra: str) -> list[str]:
    return ["--storage", storage, "--data_dir", data_dir, "--study_name", "s", *extra]


def load(storage: str, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def best_trials(parent_id: str) -> list[str]:
    """The runs among the parent's trials that are tagged the best one."""
    return [run.info.run_id for run in children(parent_id) if run.data.tags.get(tuning.BEST_TRIAL_TAG) == "true"]


def children(parent_id: str):
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_mlflow_run_tune_nests_trials_prunes_and_resumes(store, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    result = run_step("mlflow", "run", ".", "-e", "tune", "--env-manager", "local", "-P", "n_trials=7",
                      "-P", "epochs=2", "-P", f"storage={storage}", "-P", f"data_dir={tiny_data}",
                      "-P", "study_name=s")
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(storage)
    parent_id = study.user_attrs[tuning.PARENT_RUN_ATTR]
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-s"  # the run `mlflow run` opened
    assert parent.data.tags["study_name"] == "s" and parent.data.tags["phase"] == "tuning"
    assert study.metric_names == ["val_accuracy"]  # what Optuna's CLI and dashboard call the objective

    # one child run per trial, its state as a tag; pruned trials end cleanly and early
    runs = {r.info.run_id: r for r in children(parent_id)}
    assert len(runs) == len(study.trials) == 7
    client = mlflow.MlflowClient()
    for trial in study.trials:
        run = runs[trial.user_attrs[tuning.RUN_ID_ATTR]]
        assert run.data.tags["trial_state"] == trial.state.name
        assert run.info.status == "FINISHED"
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert epochs == ([1, 2] if trial.state.name == "COMPLETE" else [1])
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
    states = [t.state.name for t in study.trials]
    assert "PRUNED" in states and "COMPLETE" in states

    # the parent: best trial, its model, plots and the table of trials
    best = study.best_trial
    assert parent.data.metrics["best_val_accuracy"] == best.value
    assert parent.data.tags["best_trial_run_id"] == best.user_attrs[tuning.RUN_ID_ATTR]
    assert parent.data.tags["best_lr"] == str(best.params["lr"])
    assert best_trials(parent_id) == [best.user_attrs[tuning.RUN_ID_ATTR]]  # marked on its own run too
    assert parent.data.metrics["trials_complete"] + parent.data.metrics["trials_pruned"] == 7
    artifacts = {f.path for d in ("", "plots", "test") for f in client.list_artifacts(parent_id, d or None)}
    assert PLOTS | {"trials.csv", "best_params.json", "search_space.yaml", "test/classification_report.json"} <= artifacts
    csv = mlflow.artifacts.load_text(f"runs:/{parent_id}/trials.csv")
    assert len(csv.strip().splitlines()) == 1 + 7
    model = mlflow.pyfunc.load_model(f"runs:/{parent_id}/model")
    assert np.asarray(model.predict(np.zeros((2, 1, 28, 28), np.float32))).shape == (2, 10)
    assert "test_accuracy" in parent.data.metrics
    test_plot_loss.assert_one_line_per_trial(parent_id)  # this tune's study, plotted (no run opened)

    # the same command again adds trials to the same study and parent run
    again = run_step("mlflow", "run", ".", "-e", "tune", "--env-manager", "local", "-P", "n_trials=2",
                     "-P", "epochs=2", "-P", f"storage={storage}", "-P", f"data_dir={tiny_data}", "-P", "study_name=s")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 trials added, 9 in all" in again.stdout
    study = load(storage)
    assert [t.number for t in study.trials] == list(range(9))
    assert study.user_attrs[tuning.PARENT_RUN_ATTR] == parent_id
    assert mlflow.get_run(parent_id).info.status == "FINISHED"
    assert len(children(parent_id)) == 9
    assert best_trials(parent_id) == [study.best_trial.user_attrs[tuning.RUN_ID_ATTR]]
    # no new run besides the parent, its children and the one this `mlflow run` opened, which says where they went
    [launcher] = [run for run in mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
                  if run.info.run_id != parent_id and run.data.tags.get(MLFLOW_PARENT_RUN_ID) != parent_id]
    assert launcher.info.run_name == "add-trials-s" and launcher.data.tags[tuning.STUDY_PARENT_TAG] == parent_id
    test_plot_loss.assert_mlflow_run_plot_loss_logs_to_the_parent(parent_id, tmp_path / "study.png")


def two_workers(storage: str, tiny_data: str, name: str):
    result = python_step("steps.tune", "--storage", storage, "--data_dir", tiny_data, "--study_name", name,
                         "--workers", "2", "--n_trials", "5", "--epochs", "1", "--pruner", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stdout + result.stderr
    study = load(storage, name)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3, 4]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    parent_id = study.user_attrs[tuning.PARENT_RUN_ATTR]
    assert sorted(r.data.tags["trial_number"] for r in children(parent_id)) == ["0", "1", "2", "3", "4"]


def test_two_workers_on_sqlite_run_exactly_the_asked_trials(store, tiny_data, tmp_path):
    two_workers(f"sqlite:///{tmp_path}/optuna.db", tiny_data, "sqlite-workers")


def test_two_workers_on_postgresql_run_exactly_the_asked_trials(store, tiny_data, postgres_url):
    two_workers(postgres_url, tiny_data, f"pg-workers-{time.time_ns()}")


def test_a_plain_postgresql_url_takes_the_installed_driver_and_a_longer_name_than_it_holds_is_refused(
        store, tiny_data, postgres_url):
    plain = postgres_url.replace("postgresql+psycopg2://", "postgresql://")  # SQLAlchemy's default is psycopg 3
    longest = f"pg-{time.time_ns()}-".ljust(MAX_INDEXED_STRING_LENGTH, "n")  # the study_name column's size
    cfg = TuneConfig(storage=plain, study_name=longest).validate()
    assert tuning.open_study(cfg, tuning.open_storage(cfg)).study_name == longest
    result = python_step("steps.tune", *tune_args(plain, tiny_data), "--study_name", longest + "n")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"tune: error: study_name {longest[:40]!r}... (513 characters) is not allowed; "
                                    "an Optuna storage holds names of at most 512 characters")
    assert longest + "n" not in optuna.get_all_study_names(postgres_url)
    assert mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list") == []


def test_a_killed_worker_leaves_a_failed_trial_that_is_retried(store, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = tune_args(storage, tiny_data, "--heartbeat_s", "1", "--pruner", "none")
    worker = subprocess.Popen([sys.executable, "-m", "steps.tune", *args, "--n_trials", "1", "--epochs", "500"],
                              cwd=ROOT, env=step_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until the trial is training under its own run
            time.sleep(1)
            try:
                trials = load(storage).trials
            except KeyError:  # the study is not created yet
                continue
            if trials and tuning.RUN_ID_ATTR in trials[0].user_attrs:
                break
        else:
            pytest.fail("the trial never started")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    [dead] = load(storage).trials
    assert dead.state.name == "RUNNING"  # nobody is left to say otherwise

    # A new worker fails the trial once its last heartbeat is older than the grace period (2 heartbeats),
    # as the storage judges it.
    heartbeats = tuning.open_storage(TuneConfig(study_name="s", storage=storage, heartbeat_s=1).validate())
    wait_until(lambda: heartbeats._get_stale_trial_ids(load(storage)._study_id) == [dead._trial_id],
               "the killed worker's trial to go stale", timeout=60)
    result = python_step("steps.tune", *args, "--n_trials", "1", "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 0: its worker stopped answering" in result.stdout
    first, retry = load(storage).trials
    assert first.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == first.params
    dead_run = mlflow.get_run(first.user_attrs[tuning.RUN_ID_ATTR])
    assert dead_run.info.status == "FAILED" and dead_run.data.tags["trial_state"] == "FAIL"
    assert mlflow.get_run(load(storage).user_attrs[tuning.PARENT_RUN_ATTR]).info.status == "FINISHED"


def test_a_worker_killed_as_soon_as_its_trial_has_a_run_leaves_a_trial_the_step_fails(store, tmp_path,
                                                                                       monkeypatch):
    # The killed-worker tests kill a worker once its trial has a run id. The trial must name its
    # worker by then, or the step cannot tell the trial is the dead worker's and leaves it RUNNING.
    cfg = TuneConfig(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db").validate()
    study = tuning.open_study(cfg, tuning.open_storage(cfg))
    trial = study.ask()

    class Killed(BaseException):
        pass

    write = study._storage.set_trial_user_attr

    def killed_once_the_run_id_is_written(trial_id, key, value):
        write(trial_id, key, value)
        if key == tuning.RUN_ID_ATTR:
            raise Killed

    monkeypatch.setattr(study._storage, "set_trial_user_attr", killed_once_the_run_id_is_written)
    with mlflow.start_run() as parent, pytest.raises(Killed):
        tuning.objective(trial, cfg, {"model": "fast"}, None, parent)
    monkeypatch.setattr(study._storage, "set_trial_user_attr", write)
    tuning.fail_trials_of(study, tuning.WORKER_ATTR, tuning.worker_name(os.getpid()))
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING"]


@pytest.mark.parametrize("args, message", [
    (["--sampler", "grid"], "unknown sampler 'grid'; choose from tpe, random"),
    (["--pruner", "asha"], "unknown pruner 'asha'; choose from median, hyperband, none"),
    (["--n_trials", "0"], "n_trials=0 with no timeout would never stop"),
    (["--search_space", "missing.yaml"], "search space file 'missing.yaml' not found"),
    (["--search_space", "tests/bad_space.yaml"], "dropout: unknown setting"),
    (["--storage", "sqlite:////no/such/dir/o.db"], "cannot open storage sqlite:////no/such/dir/o.db"),
])
def test_bad_input_fails_in_one_line_before_any_study_or_run(monkeypatch, capsys, store, tiny_data, tmp_path, args,
                                                            message):
    (tmp_path / "bad.yaml").write_text("dropout: {type: float, low: 0, high: 0.5}\n")
    args = [str(tmp_path / "bad.yaml") if a == "tests/bad_space.yaml" else a for a in args]
    storage = f"sqlite:///{tmp_path}/optuna.db"
    line = refused_step(monkeypatch, capsys, "steps.tune", *tune_args(storage, tiny_data), *args)
    assert line.startswith("tune: error: ") and message in line, line
    assert_no_study_or_run(storage, tmp_path)


def test_bad_input_through_python_m_fails_in_one_line_before_any_study_or_run(store, tiny_data, tmp_path):
    # The table above runs in this process; the command line once here, and through `mlflow run`
    # in test_config.py.
    storage = f"sqlite:///{tmp_path}/optuna.db"
    result = python_step("steps.tune", *tune_args(storage, tiny_data), "--sampler", "grid")
    assert result.returncode == 2
    assert result.stderr == "tune: error: unknown sampler 'grid'; choose from tpe, random\n"
    assert_no_study_or_run(storage, tmp_path)


def assert_no_study_or_run(storage: str, tmp_path) -> None:
    assert mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list") == []
    if os.path.exists(tmp_path / "optuna.db"):
        assert optuna.get_all_study_names(storage) == []


def test_tune_exits_1_when_every_trial_of_the_invocation_failed(store, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # An earlier trial of the study searched lr on a log scale; Optuna refuses any other scale
    # for the same parameter of the same study, so every trial of this search space fails.
    optuna.create_study(study_name="s", storage=storage, direction="maximize").add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"lr": 0.01},
        distributions={"lr": optuna.distributions.FloatDistribution(0.001, 0.03, log=True)}))
    (tmp_path / "linear.yaml").write_text("lr: {type: float, low: 0.001, high: 0.03}\n")
    result = python_step("steps.tune", *tune_args(storage, tiny_data, "--n_trials", "2", "--epochs", "1",
                                                  "--search_space", str(tmp_path / "linear.yaml")))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("tune: error: all 2 trials of this invocation failed; "
                                                      "Optuna's warnings above say why")
    assert [t.state.name for t in load(storage).trials] == ["FAIL"] * 3
    [parent] = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
    assert parent.info.status == "FAILED" and parent.data.metrics["trials_fail"] == 3


def worker_processes(pid: int) -> list[int]:
    """The worker processes the tune step `pid` spawned (not multiprocessing's resource tracker)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(child) for child in f.read().split()]
    workers = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    workers.append(child)
        except FileNotFoundError:
            pass
    return workers


def test_tune_exits_1_when_a_worker_process_died(store, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    step = subprocess.Popen([sys.executable, "-m", "steps.tune", *tune_args(storage, tiny_data),
                             "--workers", "2", "--n_trials", "2", "--epochs", "20", "--pruner", "none"],
                            cwd=ROOT, env=step_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while True:  # until both workers are training a trial
        assert step.poll() is None and time.time() < deadline, step.stderr.read()[-3000:]
        time.sleep(0.2)
        try:
            if sum(tuning.RUN_ID_ATTR in t.user_attrs for t in load(storage).trials) == 2:
                break
        except KeyError:  # the study is not created yet
            pass
    [worker] = worker_processes(step.pid)
    # Frozen first, then checked: the worker must die mid-trial, not after its trial completed
    # (it may have started well before the other worker).
    os.kill(worker, signal.SIGSTOP)
    [victim] = [t for t in load(storage).trials if t.user_attrs.get(tuning.WORKER_ATTR) == tuning.worker_name(worker)]
    assert victim.state.name == "RUNNING", "the worker completed its trial before it was stopped: raise --epochs"
    os.kill(worker, signal.SIGKILL)
    _, stderr = step.communicate(timeout=300)
    assert step.returncode == 1
    # multiprocessing's resource tracker may warn after it about a semaphore the dead worker held
    [line] = [line for line in stderr.splitlines() if line.startswith("tune: error: ")]
    assert line.startswith("tune: error: worker 1 died (exit code -9); its trial was marked failed and is queued again")
    study = load(storage)
    parent = mlflow.get_run(study.user_attrs[tuning.PARENT_RUN_ATTR])
    assert parent.info.status == "FAILED"
    # Nothing is left RUNNING: the dead worker's trial and its run are failed, and a rerun is queued.
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL", "WAITING"]
    [dead] = [t for t in study.trials if t.state.name == "FAIL"]
    assert mlflow.get_run(dead.user_attrs[tuning.RUN_ID_ATTR]).info.status == "FAILED"
    assert not mlflow.search_runs(filter_string="attributes.status = 'RUNNING'", search_all_experiments=True,
                                  output_format="list")
