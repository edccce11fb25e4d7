"""The search-space file, the trial split over workers, and the storage: checked without training."""
import os
import re
import sqlite3

import optuna
import pytest

from mnistflow import plots, tuning, workers
from mnistflow.config import TuneConfig
from mnistflow.errors import ConfigError, StoreError

SPACE = """
model: fast
weight_decay: 1e-4
lr: {type: float, low: 1e-3, high: 3.0e-2, log: true}
batch_size: {type: categorical, choices: [64, 128]}
patience: {type: int, low: 0, high: 3}
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_search_space_samples_ranges_and_keeps_fixed_values(tmp_path):
    space = tuning.load_search_space(write(tmp_path, SPACE))
    assert space["lr"]["low"] == 0.001  # YAML reads 1e-3 as a string; it is made a float
    params = tuning.suggest(optuna.trial.FixedTrial({"lr": 0.01, "batch_size": 64, "patience": 2}), space)
    assert params == {"model": "fast", "weight_decay": 0.0001, "lr": 0.01, "batch_size": 64, "patience": 2}


def test_the_shipped_search_space_loads():
    assert "lr" in tuning.load_search_space("search_space.yaml")


@pytest.mark.parametrize("text, message", [
    ("lr: [1, 2", "not valid YAML"),
    ("- lr\n- batch_size", "must be a mapping of setting: spec"),
    ("dropout: 0.5", "dropout: unknown setting; allowed: model, batch_size"),
    ("lr: {type: float, low: 0.1}", "lr: a float range needs low and high"),
    ("lr: {type: float, low: 0.1, high: 0.01}", "lr: low=0.1 must be below high=0.01"),
    ("lr: {type: float, low: -1, high: 0.01}", "lr: lr=-1.0 is not allowed; it must be in (0, 10]"),
    ("weight_decay: {type: float, low: 0, high: 0.1, log: true}", "a log range needs low > 0"),
    ("lr: {type: normal, low: 0.1, high: 1}", "type 'normal' is not one of float, int, categorical"),
    ("lr: {type: float, low: 0.1, high: 1, scale: 2}", "unknown key 'scale'"),
    ("optimizer: {type: categorical, choices: []}", "categorical needs a non-empty list of choices"),
    ("optimizer: {type: categorical, choices: [adamw, lion]}", "unknown optimizer 'lion'; choose from adamw"),
    ("batch_size: {type: categorical, choices: [64, big]}", "'big' is not a int"),
    ("model: resnet", "unknown model 'resnet'"),
    ("lr: -1e-3", "lr: lr=-0.001 is not allowed; it must be in (0, 10]"),
])
def test_a_bad_search_space_is_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tuning.load_search_space(write(tmp_path, text))


def test_a_missing_search_space_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="search space file .* not found"):
        tuning.load_search_space(str(tmp_path / "nope.yaml"))


def test_trials_are_shared_exactly_over_the_workers():
    assert workers.shares(5, 2) == [3, 2]
    assert workers.shares(2, 4) == [1, 1]        # no worker with nothing to do
    assert workers.shares(0, 3) == [None] * 3    # timeout only: each runs until it


def test_workers_share_the_cores_the_user_gave_pytorch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the user (or the test suite's worker) set it
    assert tuning.cores_per_worker(1) == 1 and tuning.cores_per_worker(3) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert tuning.cores_per_worker(2) == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert tuning.cores_per_worker(1) == os.cpu_count()


@pytest.mark.parametrize("change, message", [
    ({"sampler": "grid"}, "unknown sampler 'grid'; choose from tpe, random"),
    ({"pruner": "asha"}, "unknown pruner 'asha'; choose from median, hyperband, none"),
    ({"n_trials": 0}, "n_trials=0 with no timeout would never stop"),
    ({"workers": 0}, "workers=0 is not allowed; it must be in [1, 1000]"),
])
def test_bad_tune_settings(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TuneConfig(**change).validate()


@pytest.mark.parametrize("url, message", [
    ("sqlite:////no/such/dir/optuna.db", "cannot open storage sqlite:////no/such/dir/optuna.db: unable to open database file"),
    ("nosuchdb://x", "cannot open storage nosuchdb://x: "),
    ("postgresql+psycopg2://me:secret@127.0.0.1:9/db", "cannot open storage postgresql\\+psycopg2://me:\\*\\*\\*@127.0.0.1:9/db"),
])
def test_a_storage_that_cannot_be_opened_is_one_line_without_the_password(url, message):
    with pytest.raises(StoreError, match=message) as err:
        tuning.open_storage(TuneConfig(storage=url))
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_sqlite_storage_takes_the_write_lock_up_front(tmp_path):
    # A transaction that reads first and writes later must hold the write lock from its start;
    # with SQLite's default (deferred) BEGIN, two such workers deadlock: "database is locked".
    storage = tuning.open_storage(TuneConfig(storage=f"sqlite:///{tmp_path}/o.db"))
    study = optuna.create_study(storage=storage, study_name="s")
    with storage.engine.connect() as reader:
        reader.exec_driver_sql("SELECT 1")
        other = sqlite3.connect(tmp_path / "o.db", timeout=0.1, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            other.execute("BEGIN IMMEDIATE")
        reader.rollback()
    other.execute("BEGIN IMMEDIATE")  # free again once that transaction ended
    other.execute("ROLLBACK")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2


def test_storage_urls_are_logged_without_their_password():
    assert tuning.redacted("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"
    assert tuning.redacted("") == ""  # the default storage stays recognisable


def test_the_study_names_its_objective_and_every_plot_shows_its_whole_labels():
    study = tuning.open_study(TuneConfig(study_name="s").validate(), storage=None)  # in memory, no training
    assert study.metric_names == ["val_accuracy"]

    def objective(trial):
        # The search space's long names: Optuna's own layout cut them to `ight_decay`, `atch_size`.
        weight_decay = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        smoothing = trial.suggest_float("label_smoothing", 0, 0.2)
        batch_size = trial.suggest_categorical("batch_size", [64, 128, 256])
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        for epoch in (1, 2):
            trial.report(0.5 + lr + smoothing * epoch, epoch)
        return 0.9 + lr - weight_decay + smoothing / 10 + batch_size / 1e4

    study.optimize(objective, n_trials=8)
    figures = tuning.study_figures(study)
    assert set(figures) == set(tuning.STUDY_PLOTS)
    for name, figure in figures.items():
        figure.canvas.draw()
        drawn = figure.get_tightbbox(figure.canvas.get_renderer())  # in inches, like the figure's size
        width, height = figure.get_size_inches()
        assert 0 <= drawn.x0 and 0 <= drawn.y0 and drawn.x1 <= width and drawn.y1 <= height, (name, drawn)
    assert figures["optimization_history"].axes[0].get_ylabel() == "val_accuracy"
    importance_labels = {label.get_text() for label in figures["param_importances"].axes[0].get_yticklabels()}
    assert importance_labels == {"weight_decay", "label_smoothing", "batch_size", "lr"}
    for figure in figures.values():
        plots.close(figure)


def test_the_summary_table_shows_every_trial_with_its_state_objective_and_params():
    study = optuna.create_study(direction="maximize")
    assert tuning.summary_table(study) == "no trials"
    study.set_metric_names(["val_accuracy"])

    def objective(trial):
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("optimizer", ["adamw", "sgd"])
        if trial.number == 1:
            raise optuna.TrialPruned()
        return 0.9 + trial.number / 100

    study.optimize(objective, n_trials=3)
    header, *rows = tuning.summary_table(study).splitlines()
    assert header.split() == ["trial", "state", "val_accuracy", "seconds", "lr", "optimizer"]
    assert [row.split()[:3] for row in rows] == [["0", "COMPLETE", "0.9"], ["1", "PRUNED", "-"], ["2", "COMPLETE", "0.92"]]
    assert [row.split()[-1] for row in rows] == [t.params["optimizer"] for t in study.trials]
