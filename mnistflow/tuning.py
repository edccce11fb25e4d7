"""Hyperparameter search with Optuna, every trial a nested MLflow run under one parent run per study.

The study lives in an Optuna RDB storage (SQLite by default, PostgreSQL across machines). It
keeps its MLflow parent run id as a study attribute, so a resumed study and every worker,
in whatever process or machine, log their trials under the same parent run.
"""
import dataclasses
import functools
import os
import socket
import tempfile
import warnings

import mlflow
import numpy as np
import optuna
import optuna.visualization.matplotlib as optuna_plots
import sqlalchemy
import torch
import yaml

from mnistflow import data as datasets
from mnistflow import logged_model, models, report, tracking
from mnistflow.config import STORAGE_ENV, TrainConfig, TuneConfig
from mnistflow.errors import ConfigError, NotFound, StoreError
from mnistflow.flags import parse_bool
from mnistflow.train import fit, seed_everything, select_device

DEFAULT_STORAGE = "sqlite:///optuna.db"
PARENT_RUN_ATTR = "mlflow_parent_run_id"   # study attribute
STUDY_PARENT_TAG = "study_parent_run_id"   # on a run `mlflow run` opened for trials added to an older study
RUN_ID_ATTR = "mlflow_run_id"              # trial attribute: the trial's child run
BEST_TRIAL_TAG = "best_trial"               # "true" on the best trial's child run
OBJECTIVE = "val_accuracy"                  # what each trial returns, by its name in the study
WORKER_ATTR = "worker"                      # trial attribute: <host>:<pid> of the process training it
SLURM_JOB_ATTR = "slurm_array_job"          # trial attribute: the Slurm array job whose task trains it
WEIGHTS = "model_state.pt"                 # a complete trial's best weights, on its child run
MAX_RETRY = 2                              # reruns of a trial whose worker died
# Settings a trial may vary; the rest describe the study and are the same for every trial.
SEARCHABLE = ("model", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "lr_schedule",
              "label_smoothing", "patience")
FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(TrainConfig)}


# --- the search space ------------------------------------------------------------------------

def load_search_space(path: str) -> dict:
    """Read and check a search-space YAML file: {setting: spec or fixed value}.

    A spec is {type: float|int, low, high, log?, step?} or {type: categorical, choices: [...]};
    a plain value fixes the setting for every trial. Every value a spec can produce is checked
    against the train step's own rules, so a bad bound fails here, not in trial 7.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"search space file {path!r} not found; pass search_space=<a YAML file>")
    try:
        with open(path) as f:
            space = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"search space {path}: must be a mapping of setting: spec, like 'lr: "
                          "{type: float, low: 0.001, high: 0.03, log: true}'")
    return {name: _check_entry(path, name, entry) for name, entry in space.items()}


def _check_entry(path: str, name, entry):
    where = f"search space {path}: {name}"
    if name not in SEARCHABLE:
        raise ConfigError(f"{where}: unknown setting; allowed: {', '.join(SEARCHABLE)}")
    if not isinstance(entry, dict):
        value = _as_type(where, name, entry)
        _check_values(where, name, [value])
        return value
    kind = entry.get("type")
    if kind in ("float", "int"):
        allowed_keys = {"type", "low", "high", "log", "step"}
        if "low" not in entry or "high" not in entry:
            raise ConfigError(f"{where}: a {kind} range needs low and high")
        low, high = _as_type(where, name, entry["low"], kind), _as_type(where, name, entry["high"], kind)
        if not low < high:
            raise ConfigError(f"{where}: low={low} must be below high={high}")
        if entry.get("log") and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, not {low}")
        values = [low, high]
    elif kind == "categorical":
        allowed_keys = {"type", "choices"}
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
        values = [_as_type(where, name, choice) for choice in choices]
    else:
        raise ConfigError(f"{where}: type {kind!r} is not one of float, int, categorical")
    extra = set(entry) - allowed_keys
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}; a {kind} spec takes "
                          f"{', '.join(sorted(allowed_keys))}")
    _check_values(where, name, values)
    return {**entry, **({"choices": values} if kind == "categorical" else {"low": values[0], "high": values[1]})}


def _as_type(where: str, name: str, value, kind: str | None = None):
    """YAML reads `1e-3` as a string and `0` as an int; bring a value to the setting's type."""
    target = {"float": float, "int": int}.get(kind, FIELD_TYPES[name])
    try:
        return parse_bool(str(value)) if target is bool else target(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a {target.__name__}")


def _check_values(where: str, name: str, values) -> None:
    for value in values:
        try:
            TrainConfig(**{name: value}).validate()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}")


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """The settings of one trial: sampled where the space has a spec, fixed elsewhere."""
    params = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            params[name] = spec
        elif spec["type"] == "float":
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step", 1),
                                             log=spec.get("log", False))
        else:
            params[name] = trial.suggest_categorical(name, spec["choices"])
    return params


# --- storage, sampler, pruner ----------------------------------------------------------------

def open_storage(cfg: TuneConfig) -> optuna.storages.RDBStorage:
    """The study's RDB storage, with heartbeats so a trial whose worker died is failed and retried.

    SQLite serves parallel workers on one machine only when every transaction takes the write
    lock up front (BEGIN IMMEDIATE) and waits for it: otherwise two workers that read, then
    write, fail with "database is locked". PostgreSQL needs none of this and spans machines.
    """
    url = with_installed_driver(storage_url(cfg))
    try:
        sqlite = sqlalchemy.engine.make_url(url).get_backend_name() == "sqlite"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            storage = optuna.storages.RDBStorage(
                url,
                # isolation_level None: the sqlite3 module leaves transactions to the BEGIN below.
                engine_kwargs={"connect_args": {"timeout": 600, "isolation_level": None}} if sqlite else None,
                heartbeat_interval=cfg.heartbeat_s, grace_period=2 * cfg.heartbeat_s,
                heartbeat_stale_trial_callback=_fail_run_and_retry,
            )
    except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StoreError(f"cannot open storage {storage_label(cfg)}: {reason}")
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def storage_url(cfg: TuneConfig) -> str:
    """The storage parameter, else the whole URL in $MNISTFLOW_OPTUNA_STORAGE (which may hold a
    password), else SQLite in the current directory."""
    return cfg.storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def with_installed_driver(url: str) -> str:
    """A PostgreSQL URL that names no driver, with the one the project installs: SQLAlchemy would
    pick psycopg 3 (`postgresql+psycopg://`), the project has psycopg2."""
    scheme, separator, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if separator and scheme.lower() == "postgresql" else url


def storage_label(cfg: TuneConfig) -> str:
    """How messages name the storage: its URL without a password, or only the variable's name."""
    if not cfg.storage and os.environ.get(STORAGE_ENV):
        return f"${STORAGE_ENV}"
    return redacted(storage_url(cfg))


def redacted(url: str) -> str:
    """The URL with any password masked, for messages and the params of the parent run."""
    if not url:
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return repr(url)


def _fail_run_and_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial went silent (its worker died): end its MLflow run FAILED, then queue a rerun."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "trial_state", "FAIL")
        client.set_terminated(run_id, "FAILED")
    print(f"trial {trial.number}: its worker stopped answering; marked failed and queued again", flush=True)
    _queue_again(study, trial)


def _queue_again(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A copy of the failed trial, with its params, queued for the study's next worker."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def worker_name(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}"


def fail_trials_of(study: optuna.Study, attr: str, value: str) -> None:
    """Workers that died left trials RUNNING: fail those whose trial attribute `attr` is `value`
    (WORKER_ATTR: a process of this machine; SLURM_JOB_ATTR: the tasks of an ended array job)
    now, their runs FAILED and each queued again, instead of when the next tune finds them silent."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(attr) == value:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            _fail_run_and_retry(study, trial)


def retry_interrupted_trials_of(study: optuna.Study, attr: str, value: str) -> None:
    """Queue again, as a dead worker's, the trials whose attribute `attr` is `value` that a signal
    stopped (Slurm's time limit or scancel): each ended FAIL with its run KILLED."""
    client = mlflow.MlflowClient()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if trial.user_attrs.get(attr) == value and run_id and client.get_run(run_id).info.status == "KILLED":
            print(f"trial {trial.number}: stopped by a signal; queued again", flush=True)
            _queue_again(study, trial)


def existing_parent_run(cfg: TuneConfig, storage) -> str | None:
    """The parent run id of an existing study (checked to be in this tracking store), else None."""
    if cfg.study_name not in optuna.get_all_study_names(storage):
        return None
    run_id = optuna.load_study(study_name=cfg.study_name, storage=storage).user_attrs.get(PARENT_RUN_ATTR)
    if run_id:
        try:
            mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise NotFound(f"study {cfg.study_name!r} logs to parent run {run_id}, which is not in the "
                              f"tracking store {mlflow.get_tracking_uri()}; use that store or another study_name")
    return run_id


def make_sampler(cfg: TuneConfig, worker: int) -> optuna.samplers.BaseSampler:
    # Each worker its own seed: with one seed, parallel workers would propose identical trials.
    seed = cfg.seed + worker
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        # Compare from the first epoch on, once 3 trials have set the median.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig, storage, worker: int = 0) -> optuna.Study:
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, load_if_exists=True,
                                direction="maximize", sampler=make_sampler(cfg, worker),
                                pruner=make_pruner(cfg))
    if study.metric_names is None:  # else Optuna's CLI, dashboard and plots call it "value", "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])
    return study


# --- trials ----------------------------------------------------------------------------------

def trial_config(cfg: TuneConfig, params: dict) -> TrainConfig:
    return TrainConfig(dataset=cfg.dataset, epochs=cfg.epochs, seed=cfg.seed, data_dir=cfg.data_dir,
                       max_train_samples=cfg.max_train_samples, system_metrics=cfg.system_metrics,
                       phase="tuning", **params).validate()


def objective(trial: optuna.Trial, cfg: TuneConfig, space: dict, data, parent) -> float:
    """Train one trial as a child run of `parent`; returns the validation accuracy of its best epoch."""
    # Who trains it, first: a worker that dies later leaves a trial the step can tell is its own.
    trial.set_user_attr(WORKER_ATTR, worker_name(os.getpid()))
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        trial.set_user_attr(SLURM_JOB_ATTR, os.environ["SLURM_ARRAY_JOB_ID"])
    train_cfg = trial_config(cfg, suggest(trial, space))
    seed_everything(train_cfg.seed, train_cfg.deterministic)
    device = select_device(train_cfg.device)
    net = models.build(train_cfg.model, train_cfg.mirror)

    def report_epoch(epoch: int, metrics: dict) -> None:
        trial.report(metrics["val_accuracy"], epoch)
        # After the last epoch there is nothing left to save: the trial is complete, not pruned.
        if epoch < train_cfg.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"val_accuracy {metrics['val_accuracy']:.4f} after epoch {epoch}")

    pruned = None
    with tracking.step_run(f"trial-{trial.number}", train_cfg, "tuning", parent=parent,
                           tags={"trial_number": str(trial.number)},
                           log_system_metrics=train_cfg.system_metrics) as (run, log_metrics):
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        mlflow.log_params(tracking.model_params(train_cfg, net, device))
        try:
            state = fit(train_cfg, net, data, device, log_metrics=log_metrics, on_epoch_end=report_epoch)
        except optuna.TrialPruned as exc:
            pruned = exc  # a pruned trial is a normal outcome: its run ends FINISHED
            mlflow.set_tag("trial_state", "PRUNED")
        except BaseException:
            mlflow.set_tag("trial_state", "FAIL")
            raise
        else:
            mlflow.set_tag("trial_state", "COMPLETE")
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(net.state_dict(), os.path.join(tmp, WEIGHTS))
                mlflow.log_artifact(os.path.join(tmp, WEIGHTS))
            best = state["history"][state["best"]["epoch"] - 1]
    if pruned:
        raise pruned
    return best["val_accuracy"]


def cores_per_worker(workers: int) -> int:
    """The cores each of `workers` local workers may use, none oversubscribed: OMP_NUM_THREADS
    when the user set it (PyTorch's own setting), else this machine's, shared out."""
    cores = os.environ.get("OMP_NUM_THREADS", "").strip()
    return max(1, (int(cores) if cores.isdigit() else os.cpu_count() or 1) // workers)


def work(cfg: TuneConfig, space: dict, parent_run_id: str, worker: int, n_trials: int | None,
         data=None, threads: int = 0) -> None:
    """One worker: load the data, join the study and run its share of the trials on `threads`
    cores (0 = its share of this machine's: `cores_per_worker`).

    Runs in the step's own process (worker 0, with the progress bar), in each extra worker
    process and in each task of a Slurm array (mnistflow/workers.py); workers on other machines
    run it through the same step.
    """
    torch.set_num_threads(threads or cores_per_worker(cfg.workers))
    if data is None:
        data = load_data(cfg)
    parent = mlflow.get_run(parent_run_id)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from `announce`
    study = open_study(cfg, open_storage(cfg), worker)

    def announce(study, trial):
        value = f" val_accuracy={trial.value:.4f}" if trial.value is not None else ""
        print(f"trial {trial.number} {trial.state.name}{value} {trial.params}", flush=True)

    study.optimize(lambda trial: objective(trial, cfg, space, data, parent),
                   n_trials=n_trials, timeout=cfg.timeout or None, callbacks=[announce],
                   # A crashed trial is recorded FAIL (its run FAILED) and the study goes on.
                   catch=(Exception,), show_progress_bar=worker == 0)


def invocation_failure(study: optuna.Study, first_trial: int, dead: list[str]) -> str | None:
    """Why this invocation of the tune step failed, or None: workers died (`dead` says how each,
    e.g. "worker 1 died (exit code -9)"), or every trial it added (numbers from `first_trial` on) failed."""
    if dead:
        return ", ".join(dead) + "; its trial was marked failed and is queued again for the next tune of this study"
    added = [t for t in study.get_trials(deepcopy=False) if t.number >= first_trial and t.state.is_finished()]
    if added and all(t.state == optuna.trial.TrialState.FAIL for t in added):
        return f"all {len(added)} trials of this invocation failed; Optuna's warnings above say why"
    return None


def load_data(cfg: TuneConfig):
    return datasets.load(cfg.dataset, cfg.data_dir, TrainConfig.val_fraction, cfg.seed, cfg.max_train_samples)


# --- the parent run afterwards ---------------------------------------------------------------

STUDY_PLOTS = {  # each axis that shows the objective is named after it
    "optimization_history": functools.partial(optuna_plots.plot_optimization_history, target_name=OBJECTIVE),
    "intermediate_values": optuna_plots.plot_intermediate_values,
    "param_importances": optuna_plots.plot_param_importances,  # names it after the study's metric_names
    "parallel_coordinate": functools.partial(optuna_plots.plot_parallel_coordinate, target_name=OBJECTIVE),
}


def study_figures(study: optuna.Study) -> dict:
    """name -> figure, for each of STUDY_PLOTS that the study's trials allow."""
    figures = {}
    for name, plot in STUDY_PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the plots are experimental, and say so each time
                figure = np.ravel(plot(study))[0].figure
        except (ValueError, RuntimeError) as exc:  # e.g. importances need two complete trials
            print(f"plot {name} skipped: {exc}", flush=True)
            continue
        # Optuna draws into a fixed layout that cuts long labels (`ight_decay`); fit them in.
        figure.tight_layout()
        figures[name] = figure
    return figures


def mark_best_trial(run_id: str) -> None:
    """Tag the best trial's run, and untag the one that was best before (the active parent run's
    best_trial_run_id), so that exactly one trial says it is the best."""
    client = mlflow.MlflowClient()
    previous = mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("best_trial_run_id")
    if previous and previous != run_id and BEST_TRIAL_TAG in client.get_run(previous).data.tags:
        client.delete_tag(previous, BEST_TRIAL_TAG)
    client.set_tag(run_id, BEST_TRIAL_TAG, "true")


def log_study(study: optuna.Study, cfg: TuneConfig, data) -> optuna.trial.FrozenTrial | None:
    """On the active parent run: trial counts, the best trial (value, params, run id, model),
    the study plots and a CSV of every trial. Returns the best trial, or None if none completed.

    The best params go in as tags and best_params.json, not params: MLflow params are write-once
    and a resumed study may find a new best.
    """
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    mlflow.log_metrics({f"trials_{state.name.lower()}": states.count(state) for state in
                        (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                         optuna.trial.TrialState.FAIL)}, step=len(trials))
    with tempfile.TemporaryDirectory() as tmp:
        study.trials_dataframe().to_csv(os.path.join(tmp, "trials.csv"), index=False)
        mlflow.log_artifact(os.path.join(tmp, "trials.csv"))
    if optuna.trial.TrialState.COMPLETE not in states:
        print("no trial completed: no plots, and no best model to log", flush=True)
        return None
    for name, figure in study_figures(study).items():
        report.log_figure(figure, f"plots/{name}.png")

    best = study.best_trial
    run_id = best.user_attrs[RUN_ID_ATTR]
    mark_best_trial(run_id)
    mlflow.log_metric("best_val_accuracy", best.value, step=len(trials))
    mlflow.set_tags({"best_trial_number": best.number, "best_trial_run_id": run_id,
                     **{f"best_{name}": value for name, value in best.params.items()}})
    mlflow.log_dict(best.params, "best_params.json")

    # The best trial's model, tested and logged here so `register` can take it from the parent.
    config = tracking.logged_config(run_id)
    net = models.build(config["model"], config["mirror"])
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=WEIGHTS, dst_path=tmp)
        net.load_state_dict(torch.load(path, weights_only=True))
    report.log_test_results(net, data, select_device("auto"), logged_model.log(net, data))
    return best


def summary_table(study: optuna.Study) -> str:
    """One row per trial (number, state, objective, seconds, parameters): Optuna's own DataFrame."""
    trials = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params"))
    if trials.empty:
        return "no trials"
    trials["duration"] = trials["duration"].dt.total_seconds().round()
    # Optuna prefixes the objective with `value_` and each parameter with `params_`.
    trials.columns = [c.removeprefix("params_").removeprefix("value_") for c in trials.columns]
    trials = trials.rename(columns={"number": "trial", "duration": "seconds"})
    return trials.to_string(index=False, na_rep="-", float_format="{:.4g}".format)
