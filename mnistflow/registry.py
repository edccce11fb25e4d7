"""The model registry: choose a run, gate its model, compare it with the champion, promote, roll back.

Nothing here changes the registry until every check has passed (or `force` says to go on), so a
refused or failed promotion leaves versions and aliases as they were. Aliases, not the deprecated
stages, mark what is in production; the version an alias leaves keeps a `previous` alias.
"""
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from mnistflow import data as datasets
from mnistflow import logged_model, metrics, monitoring, robustness, tracking
from mnistflow.config import RegisterConfig
from mnistflow.data import Data
from mnistflow.errors import AccessError, ConfigError, NotFound, Refused, StoreError, first_line

SANITY_IMAGES = 10
LATENCY_ROUNDS = 3      # how often a p95 over the limit is measured before the gate says no
LATENCY_PAUSE_S = 2.0   # between those rounds, so that a moment of load has passed
ROBUST_IMAGES = 1000    # test images per robustness condition: half the bench's, to keep register quick


def previous_alias(alias: str) -> str:
    return "previous" if alias == "production" else f"{alias}-previous"


def experiment_id() -> str:
    """The experiment this process logs to: the one `mlflow run` or MLFLOW_EXPERIMENT_* name, else Default."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    experiment = mlflow.get_experiment_by_name(name) if name else None
    if name and experiment is None:
        raise NotFound(f"experiment {name!r} (MLFLOW_EXPERIMENT_NAME) does not exist in {mlflow.get_tracking_uri()}")
    return experiment.experiment_id if experiment else "0"


# --- which model ------------------------------------------------------------------------------

@dataclass
class Candidate:
    run: mlflow.entities.Run
    model_uri: str   # models:/<logged model id>: exactly the model the run logged
    model_id: str
    cfg: RegisterConfig  # with the run's dataset and that dataset's defaults filled in
    data: Data
    model: mlflow.pyfunc.PyFuncModel  # loaded, once checked (see logged_model.download)
    size_mb: float
    checkpoint: str = ""  # which checkpoint model of the run, and why ("epoch 3, best val_accuracy 0.99"); "" = the run's model


def logged_models(experiment: str) -> dict:
    """run id -> the newest model the train or tune step logged (named "model") in that run.

    A tune parent run logs a model each time trials are added to its study: its newest one is
    the best trial's, the one its best_trial_* tags describe.
    """
    found = mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"name = '{logged_model.MODEL}'",
                                        output_format="list")
    return {model.source_run_id: model for model in sorted(found, key=lambda model: model.creation_timestamp)}


def best_checkpoint(run: mlflow.entities.Run, metric: str) -> tuple[mlflow.entities.LoggedModel, str]:
    """The run's checkpoint model (train's checkpoint_models=true) with the best value of `metric`,
    the lowest for metrics named *loss, the later epoch of equals; and a line saying which.

    Ranked by mlflow.search_logged_models, on the metrics logged with each model: NotFound when
    the run logged no checkpoint models or none of them has that metric.
    """
    run_id = run.info.run_id
    ranked = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run_id}' AND name LIKE '{logged_model.CHECKPOINT}%'",
        order_by=[{"field_name": f"metrics.{metric}", "ascending": metric.endswith("loss")},
                  {"field_name": "creation_timestamp", "ascending": False}])
    if not ranked:
        raise NotFound(f"run {run_id} logged no checkpoint models; train with checkpoint_models=true, "
                       "or leave checkpoint_metric empty to register the run's model")
    best = {m.key: m for m in ranked[0].metrics or []}.get(metric)
    if best is None:  # models without the metric come last: none has it
        known = sorted({m.key for model in ranked for m in model.metrics or []})
        raise NotFound(f"checkpoint_metric {metric!r}: no checkpoint model of run {run_id} has it; "
                       f"theirs are {', '.join(known)}")
    return ranked[0], f"epoch {best.step}, best {metric} {best.value:.6g}"


def best_run(cfg: RegisterConfig, experiment: str, models: dict) -> mlflow.entities.Run:
    dataset = cfg.dataset or "mnist"
    descending = not cfg.metric.endswith("loss")
    runs = mlflow.search_runs(experiment_ids=[experiment], output_format="list",
                              filter_string=f"attributes.status = 'FINISHED' AND tags.dataset = '{dataset}'",
                              order_by=[f"metrics.`{cfg.metric}` {'DESC' if descending else 'ASC'}"])
    for run in runs:
        if cfg.metric in run.data.metrics and run.info.run_id in models:
            return run
    raise NotFound(f"no FINISHED {dataset} run with a logged model and a {cfg.metric!r} metric "
                      f"in experiment {experiment} of {mlflow.get_tracking_uri()}; train one first")


def prepare(cfg: RegisterConfig, data: Data | None = None) -> Candidate:
    """Resolve the run to register (given, or the best one), load its model and its dataset's test split.

    Raises, before anything is written, NotFound for a run that does not exist or logged no
    model, ConfigError for a run of another dataset, ModelError for a model that cannot be loaded
    or may not be (see logged_model.download).
    """
    experiment = experiment_id()
    if cfg.from_alias:
        return prepare_version(cfg, data)
    if cfg.run_id:
        run = tracking.existing_run(cfg.run_id)
        models = logged_models(run.info.experiment_id)
        if cfg.run_id not in models:
            raise NotFound(f"run {cfg.run_id} logged no model; give the id of a finished train or tune run")
    else:
        models = logged_models(experiment)
        run = best_run(cfg, experiment, models)
    dataset = run.data.tags.get("dataset", cfg.dataset or "mnist")
    if cfg.dataset and cfg.dataset != dataset:
        raise ConfigError(f"run {run.info.run_id} was trained on {dataset}, not on dataset={cfg.dataset}")
    cfg = cfg.with_dataset(dataset)
    logged, checkpoint = models[run.info.run_id], ""
    if cfg.checkpoint_metric:
        logged, checkpoint = best_checkpoint(run, cfg.checkpoint_metric)
    return candidate(run, logged, cfg, data, checkpoint)


def prepare_version(cfg: RegisterConfig, data: Data | None) -> Candidate:
    """The candidate when cfg.from_alias names it: the model of the version that alias holds."""
    name = cfg.with_dataset(cfg.dataset or "mnist").model_name
    version = champion(name, cfg.from_alias)
    if version is None:
        raise NotFound(f"{name}@{cfg.from_alias}: no such registered model or alias in {mlflow.get_tracking_uri()}")
    # MLflow fills model_id when it registers a logged model by its models:/<id> URI, not by runs:/.
    model_id = version.model_id or version.source.removeprefix("models:/")
    if not model_id.startswith("m-"):
        raise ConfigError(f"{name} version {version.version} (@{cfg.from_alias}) comes from files, not from a logged "
                          "model to measure; give the run_id of its run instead")
    print(f"{name}@{cfg.from_alias}: version {version.version}", flush=True)
    run = tracking.existing_run(version.run_id)
    return candidate(run, mlflow.get_logged_model(model_id),
                     cfg.with_dataset(run.data.tags.get("dataset", cfg.dataset or "mnist")), data)


def candidate(run, logged, cfg: RegisterConfig, data: Data | None, checkpoint: str = "") -> Candidate:
    """The run's logged model `logged`, downloaded, checked and loaded, with its dataset's test split."""
    dataset = cfg.dataset
    with tempfile.TemporaryDirectory() as tmp:
        local = logged_model.download(logged.model_uri, tmp, cfg.allow_pickled_models)
        size_mb = logged_model.size_mb(local)
        model = logged_model.load_local(local, logged.model_uri, cfg.allow_pickled_models)
    logged_model.dataset_for(model, logged.model_uri, dataset)
    if data is None:
        data = datasets.load(dataset, cfg.data_dir)
    return Candidate(run, logged.model_uri, logged.model_id, cfg, data, model, size_mb, checkpoint)


# --- the checks -------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    value: float
    rule: str     # the limit, as people read it: ">= 0.99"
    passed: bool
    detail: str = ""


def test_figures(model, data: Data) -> dict:
    """test_loss, test_accuracy and per-class metrics of a loaded model on the test split."""
    log_probs = logged_model.log_probabilities(model, data.pixels(data.test).numpy())
    results, _, _ = metrics.test_metrics(log_probs, data.test.labels.numpy(), data.classes)
    return results


def latency_p95_ms(model, image: np.ndarray, limit_ms: float) -> tuple[float, int]:
    """p95 of single-image predictions and how many rounds of them it took.

    A round over the limit is measured again after a pause, keeping the lowest p95: a slow model
    is slow every time, while a busy moment on the machine (another job starting up) can stall
    one round of a fast model a hundredfold.
    """
    best = float("inf")
    for round_number in range(1, LATENCY_ROUNDS + 1):
        if round_number > 1:
            time.sleep(LATENCY_PAUSE_S)
        best = min(best, float(np.percentile(logged_model.latencies_ms(model, image), 95)))
        if best < limit_ms:
            break
    return best, round_number


def gate(model, size_mb: float, figures: dict, cfg: RegisterConfig, data: Data) -> list[Check]:
    """The production criteria, measured on the loaded model: test accuracy, single-image latency,
    model size, no class whose recall falls far below the others', and accuracy that holds on
    pictures unlike the test set (the worst condition of mnistflow/robustness.py)."""
    recalls = np.array([figures[f"test_recall_class_{i}"] for i in range(len(data.classes))])
    worst = int(recalls.argmin())
    gap = float(recalls.mean() - recalls[worst])
    p95, rounds = latency_p95_ms(model, data.pixels(data.test)[0].numpy(), cfg.max_latency_ms)
    accuracy = figures["test_accuracy"]
    condition, robust_accuracy = robustness.worst(robustness.scores(model, data, ROBUST_IMAGES))
    return [
        Check("test_accuracy", accuracy, f">= {cfg.min_accuracy}", accuracy >= cfg.min_accuracy),
        Check("latency_p95_ms", p95, f"< {cfg.max_latency_ms}", p95 < cfg.max_latency_ms,
              "one image" + (f", lowest of {rounds} rounds" if rounds > 1 else "")),
        Check("size_mb", size_mb, f"< {cfg.max_size_mb}", size_mb < cfg.max_size_mb),
        Check("recall_gap", gap, f"<= {cfg.recall_margin}", gap <= cfg.recall_margin,
              f"class {data.classes[worst]!r}: recall {recalls[worst]:.4f} vs mean {recalls.mean():.4f}"),
        Check("robust_accuracy", robust_accuracy, f">= {cfg.min_robust_accuracy}",
              robust_accuracy >= cfg.min_robust_accuracy,
              f"worst condition {condition!r} (bench/robustness.py; {min(ROBUST_IMAGES, len(data.test))} "
              "test images each)"),
    ]


@contextmanager
def registry_calls(name: str):
    """Turns a registry call on model `name` that failed into one line: AccessError or StoreError."""
    try:
        yield
    except MlflowException as exc:
        where = mlflow.get_tracking_uri()
        if exc.error_code == "PERMISSION_DENIED":
            raise AccessError(f"the registered model name {name!r} belongs to another user on {where} (HTTP 403); "
                              "choose another name with model_name=<name> (--model_name <name>)") from None
        raise StoreError(f"registered model {name!r} on {where}: {first_line(exc)}") from None


def does_not_exist(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def champion(name: str, alias: str):
    """The version holding the alias, or None when there is no such model or the alias is unset.

    Any other failure (refused, a server error) is an error: a champion that cannot be read
    is not an absent one, and treating it so would promote past it.
    """
    client = mlflow.MlflowClient()
    with registry_calls(name):
        try:
            model = client.get_registered_model(name)
        except MlflowException as exc:
            if does_not_exist(exc):
                return None
            raise
        return client.get_model_version(name, model.aliases[alias]) if alias in model.aliases else None


def check_table(checks: list[Check]) -> str:
    rows = [f"{'check':<16}{'value':>12}  {'rule':<12}{'verdict':<8}"]
    rows += [f"{c.name:<16}{c.value:>12.4g}  {c.rule:<12}{'pass' if c.passed else 'FAIL':<8}{c.detail}"
             for c in checks]
    return "\n".join(rows)


# --- the outcome ------------------------------------------------------------------------------

@dataclass
class Outcome:
    run_id: str
    model_name: str
    alias: str
    checks: list[Check]
    figures: dict                 # the candidate's test metrics, as measured here
    version: str | None = None    # the registered version; None when nothing was registered
    promoted: bool = False
    refused: str = ""             # why the alias was not moved; "" when it was (or would be)

    def as_tags(self) -> dict:
        tags = {f"gate_{c.name}": f"{c.value:.6g}" for c in self.checks}
        tags.update({f"gate_{c.name}_passed": str(c.passed).lower() for c in self.checks})
        return tags


def register(candidate: Candidate) -> Outcome:
    """Gate the candidate, compare it with the alias holder, then register and promote it.

    A refusal (a failed check, a better champion) is returned in Outcome.refused with the
    registry untouched, unless cfg.force; cfg.dry_run never touches it.
    """
    cfg, data, run_id = candidate.cfg, candidate.data, candidate.run.info.run_id
    print(f"candidate: run {run_id} ({candidate.run.data.tags.get('mlflow.runName', '')}), "
          f"model {candidate.model_uri}" + (f" (checkpoint: {candidate.checkpoint})" if candidate.checkpoint else "")
          + f", {cfg.dataset}", flush=True)
    holder = champion(cfg.model_name, cfg.alias)  # first: a champion that cannot be read stops here
    holds = holder is not None and holder.run_id == run_id and holder.source == candidate.model_uri
    figures = test_figures(candidate.model, data)
    checks = gate(candidate.model, candidate.size_mb, figures, cfg, data)
    if holder is not None and not holds:
        holder_uri = f"models:/{cfg.model_name}/{holder.version}"
        holder_model = logged_model.load(holder_uri, cfg.allow_pickled_models)
        logged_model.dataset_for(holder_model, holder_uri, cfg.dataset)
        holder_accuracy = test_figures(holder_model, data)["test_accuracy"]
        checks.append(Check("vs_champion", figures["test_accuracy"], f">= {holder_accuracy:.4f}",
                            figures["test_accuracy"] >= holder_accuracy,
                            f"version {holder.version} holds @{cfg.alias}; same test set"))
    print(check_table(checks), flush=True)

    failed = [c.name for c in checks if not c.passed]
    outcome = Outcome(run_id, cfg.model_name, cfg.alias, checks, figures)
    if failed and not cfg.force:
        stays = f"@{cfg.alias} stays unset" if holder is None else \
            f"@{cfg.alias} stays on version {holder.version}" + (" (this run's model)" if holds else "")
        outcome.refused = f"{', '.join(failed)} failed (see the table above); {stays}" \
                          + ("" if holds else "; pass force=true to promote anyway")
    if holds and not outcome.refused:
        print(f"{cfg.model_name} version {holder.version} (this run's model) already holds @{cfg.alias}; "
              "nothing to do", flush=True)
        outcome.version = holder.version
        return outcome
    if cfg.dry_run:
        print("dry run: nothing registered, no alias moved"
              + (f"; it would be refused: {outcome.refused}" if outcome.refused else ""), flush=True)
    if cfg.dry_run or outcome.refused:
        return outcome

    with registry_calls(cfg.model_name):
        version = register_version(candidate, outcome, forced=bool(failed))
        outcome.version = version.version
        before = mlflow.MlflowClient().get_registered_model(cfg.model_name).aliases
        try:
            move_alias(cfg.model_name, cfg.alias, version.version, holder.version if holder else None)
            sanity_check(cfg.model_name, cfg.alias, data, cfg.allow_pickled_models)
        except BaseException:
            restore_aliases(cfg.model_name, before, [cfg.alias, previous_alias(cfg.alias)])
            raise
        if cfg.from_alias:  # its canary ended in promotion
            drop(cfg.model_name, cfg.from_alias, f"promoted by register onto @{cfg.alias}")
    outcome.promoted = True
    return outcome


def register_version(candidate: Candidate, outcome: Outcome, forced: bool):
    """The version of the candidate's model (an existing one is reused), described and tagged."""
    client, cfg, run = mlflow.MlflowClient(), candidate.cfg, candidate.run
    try:
        client.get_registered_model(cfg.model_name)
    except MlflowException as exc:
        if not does_not_exist(exc):
            raise
        client.create_registered_model(
            cfg.model_name, description=f"CNN classifier for {cfg.dataset}, trained and registered by mnistflow. "
                                        "Input: (N, 1, 28, 28) float32 pixels in [0, 1]; output: class probabilities.")
    tags = {
        "source_run_id": run.info.run_id, "dataset": cfg.dataset,
        "git_commit": run.data.tags.get("git_commit", "unknown"),
        "test_accuracy": f"{outcome.figures['test_accuracy']:.6g}", "test_loss": f"{outcome.figures['test_loss']:.6g}",
        **outcome.as_tags(), "gate_forced": str(forced).lower(),
    }
    if "best_trial_run_id" in run.data.tags:  # a tune parent run: its model is the best trial's
        tags["best_trial_run_id"] = run.data.tags["best_trial_run_id"]
    if candidate.checkpoint:
        tags["checkpoint"] = candidate.checkpoint
    description = (f"From run {run.info.run_id} ({run.data.tags.get('mlflow.runName', '')})"
                   + (f", its checkpoint model of {candidate.checkpoint}," if candidate.checkpoint else "")
                   + f" on {cfg.dataset}: test accuracy {outcome.figures['test_accuracy']:.4f}"
                   + (" (promoted with force=true despite failed checks)" if forced else ""))
    existing = [v for v in client.search_model_versions(f"name = '{cfg.model_name}' AND run_id = '{run.info.run_id}'")
                if v.source == candidate.model_uri]
    if existing:
        version = existing[0]
        client.update_model_version(cfg.model_name, version.version, description=description)
        for key, value in tags.items():
            client.set_model_version_tag(cfg.model_name, version.version, key, value)
    else:
        version = client.create_model_version(cfg.model_name, candidate.model_uri, run_id=run.info.run_id,
                                              tags=tags, description=description, model_id=candidate.model_id)
    link_logged_model(candidate.model_id, cfg.model_name, version.version)
    print(f"registered {cfg.model_name} version {version.version}", flush=True)
    return version


def link_logged_model(model_id: str, name: str, version: str) -> None:
    """List the version on its logged model, as mlflow.register_model does: the UI's page of the
    logged model reads this tag to show it registered and link to the version.

    A tracking server's create_model_version adds the link itself (its version a number), a
    database or file store does not. So it is added only where missing, which also keeps a reused
    version listed once.
    """
    client = mlflow.MlflowClient()
    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if not any(link.get("name") == name and str(link.get("version")) == str(version) for link in listed):
        link = {"name": name, "version": str(version)}
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, link])})


def move_alias(name: str, alias: str, version: str, old_version: str | None) -> None:
    client = mlflow.MlflowClient()
    if old_version is not None:
        client.set_registered_model_alias(name, previous_alias(alias), old_version)
    client.set_registered_model_alias(name, alias, version)
    print(f"@{alias} -> version {version}"
          + (f"; @{previous_alias(alias)} -> version {old_version}" if old_version else ""), flush=True)


def restore_aliases(name: str, before: dict, aliases: list[str]) -> None:
    """Put `aliases` back as they were in `before` (alias -> version), unsetting new ones."""
    client = mlflow.MlflowClient()
    for alias in aliases:
        if alias in before:
            client.set_registered_model_alias(name, alias, before[alias])
        else:
            client.delete_registered_model_alias(name, alias)
    print(f"aliases of {name} restored", flush=True)


def drop(name: str, alias: str, why: str) -> str:
    """Remove the alias, noting `why` on the version it held (the canary's end); that version."""
    client = mlflow.MlflowClient()
    version = champion(name, alias)
    if version is None:
        raise NotFound(f"{name}@{alias}: no such registered model or alias in {mlflow.get_tracking_uri()}")
    with registry_calls(name):
        client.delete_registered_model_alias(name, alias)
        client.set_model_version_tag(name, version.version, monitoring.CANARY_TAG, why)
    print(f"@{alias} removed from version {version.version}: {why}", flush=True)
    return version.version


def rollback(cfg: RegisterConfig) -> tuple[str, str]:
    """Swap the alias and its previous alias; (name@alias, the version it now points to).
    Rolling back twice undoes the rollback."""
    cfg = cfg.with_dataset(cfg.dataset or "mnist")
    previous = champion(cfg.model_name, previous_alias(cfg.alias))
    if previous is None:
        raise NotFound(f"{cfg.model_name} has no @{previous_alias(cfg.alias)} version to roll back to "
                          f"in {mlflow.get_tracking_uri()}")
    current = champion(cfg.model_name, cfg.alias)
    with registry_calls(cfg.model_name):
        move_alias(cfg.model_name, cfg.alias, previous.version, current.version if current else None)
    return f"{cfg.model_name}@{cfg.alias}", previous.version


def sanity_check(name: str, alias: str, data: Data, allow_pickled: bool) -> None:
    """Load the promoted model by its alias, as users will, and predict a few test images."""
    uri = f"models:/{name}@{alias}"
    model = logged_model.load(uri, allow_pickled)
    probs = logged_model.probabilities(model, data.pixels(data.test)[:SANITY_IMAGES].numpy())
    predicted, labels = probs.argmax(1), data.test.labels[:SANITY_IMAGES].numpy()
    print(f"sanity check, {uri} on the first {SANITY_IMAGES} test images: predicted {predicted.tolist()}, "
          f"true {labels.tolist()} ({int((predicted == labels).sum())}/{SANITY_IMAGES} right)", flush=True)


def log_outcome(outcome: Outcome) -> None:
    """On the active (register step) run: what was decided, and every figure it was decided on."""
    mlflow.log_metrics({f"gate_{c.name}": c.value for c in outcome.checks})
    mlflow.set_tags({"source_run_id": outcome.run_id, "model_name": outcome.model_name, "alias": outcome.alias,
                     "promoted": str(outcome.promoted).lower(), "model_version": outcome.version or "",
                     **outcome.as_tags(), **({"refused": outcome.refused} if outcome.refused else {})})


def gate_and_promote(cfg: RegisterConfig, data: Data | None = None) -> Outcome:
    """The register step's work, as a run of its own: prepare, gate, promote, and record the outcome.

    A refusal raises Refused, which ends the run FAILED; a dry run returns what it would do.
    """
    candidate = prepare(cfg, data)
    cfg = candidate.cfg
    with tracking.step_run(f"register-{cfg.model_name}", cfg, "production"):
        outcome = register(candidate)
        log_outcome(outcome)
        if outcome.refused and not cfg.dry_run:
            raise Refused(f"{outcome.refused}; the registry is unchanged")
    return outcome
