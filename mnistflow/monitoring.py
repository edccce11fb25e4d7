"""The monitor's judgement: a window of the inference log, per model version, against the reference
the version's model was logged with (mnistflow/logged_model.py: its validation pictures as the
serve step sees them, and what it answered on them).

Per version: how much of the traffic it took, its latency and confidence, its live accuracy where
feedback gave labels, and drift per column: each of the picture's FEATURES, the confidence and the
predicted class. Each column's drift is scored as Evidently scores it for a reference of more than
1000 rows: a number by the Wasserstein distance in units of the reference's standard deviation, a
class (or a number with at most 5 values in both tables) by the Jensen-Shannon distance between
the shares of its values. Evidently's limit for the first, 0.1, flags the MNIST test set itself
(its writers centre their digits a little differently): the limit here is 0.2, chosen with
bench/drift.py. scipy computes both; docs/serving.md says why not Evidently itself.
"""
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from mnistflow import inference_log
from mnistflow.errors import Breached, ConfigError, NotFound, StepError, first_line
from mnistflow.inference_log import FEATURES

NUMBERS = [*FEATURES, "confidence"]
CLASS = "class_index"
CANARY_TAG = "mnistflow.canary"  # on a model version: how its canary ended (aborted by the serve step, promoted by register)
LIMITS = {"Wasserstein (std)": 0.2, "Jensen-Shannon": 0.1}  # drift above these
FEW_VALUES = 5      # Evidently's: a number with at most this many values is scored as classes are
STD_FLOOR = 0.001   # Evidently's: the unit of a number nearly constant in the reference
ERROR_GAP_SE = 3    # a canary's error gap must exceed this many standard errors too (one-sided p < 0.0014)

@dataclass
class Drift:
    column: str
    method: str
    score: float
    moved: str  # in words: the median, or the share of the window's most common value, from reference to window

    @property
    def drifted(self) -> bool:
        return self.score > LIMITS[self.method]


@dataclass
class Version:
    version: str
    rows: int
    share: float  # of the window's predictions
    latency_p50_ms: float
    latency_p95_ms: float
    confidence: float  # mean
    labelled: int
    live_accuracy: float | None  # None without feedback
    drift: list[Drift] = field(default_factory=list)  # empty when not judged
    unjudged: str = ""  # why the drift was not judged

    @property
    def drifted(self) -> list[Drift]:
        return [d for d in self.drift if d.drifted]


def drift(reference, window) -> list[Drift]:
    """Drift of each column from the `reference` table to the `window` table (pandas)."""
    from scipy.stats import wasserstein_distance

    found = []
    for column in [*NUMBERS, CLASS]:
        expected, seen = reference[column].to_numpy(float), window[column].to_numpy(float)
        values = np.union1d(expected, seen)
        if column == CLASS or len(values) <= FEW_VALUES:
            common = most_common(seen)
            found.append(Drift(column, "Jensen-Shannon", shares_distance(expected, seen, values),
                               f"{common:g} in {np.mean(expected == common):.0%} -> {np.mean(seen == common):.0%}"))
        else:
            score = float(wasserstein_distance(expected, seen) / max(expected.std(), STD_FLOOR))
            found.append(Drift(column, "Wasserstein (std)", score,
                               f"median {np.median(expected):.3g} -> {np.median(seen):.3g}"))
    return found


def most_common(values: np.ndarray) -> float:
    """The most common value."""
    found, counts = np.unique(values, return_counts=True)
    return found[counts.argmax()]


def shares_distance(expected: np.ndarray, seen: np.ndarray, values: np.ndarray) -> float:
    """The Jensen-Shannon distance between how often each of `values` occurs in the two."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(*((table[:, None] == values).mean(0) for table in (expected, seen))))


def judge(rows, references: dict, min_rows: int) -> list[Version]:
    """Each version's figures from the window's `rows` (pandas), oldest version first.
    `references`: version -> its reference table, or None when its model was logged without one."""
    versions = []
    for version, its in sorted(rows.groupby("version"), key=lambda item: int(item[0])):
        labelled = its[its["label"].notna()]
        figures = Version(
            version=version, rows=len(its), share=len(its) / len(rows),
            latency_p50_ms=float(its["latency_ms"].median()), latency_p95_ms=float(its["latency_ms"].quantile(0.95)),
            confidence=float(its["confidence"].mean()), labelled=len(labelled),
            live_accuracy=float((labelled["label"] == labelled[CLASS]).mean()) if len(labelled) else None)
        if references.get(version) is None:
            figures.unjudged = "its model was logged without a reference (retrain it to get one)"
        elif len(its) < min_rows:
            figures.unjudged = f"{len(its)} predictions, fewer than min_rows={min_rows}"
        else:
            figures.drift = drift(references[version], its)
        versions.append(figures)
    return versions


def breaches(versions: list[Version], min_rows: int, min_accuracy: float) -> list[str]:
    """One line per limit a version breached."""
    found = []
    for v in versions:
        if v.drifted:
            found.append(f"version {v.version}: drift in {', '.join(f'{d.column} ({d.moved})' for d in v.drifted)}")
        if v.live_accuracy is not None and v.labelled >= min_rows and v.live_accuracy < min_accuracy:
            found.append(f"version {v.version}: live accuracy {v.live_accuracy:.4f} < min_accuracy {min_accuracy} "
                         f"({v.labelled} labelled)")
    return found


def canary_breach(rows, served: str, challenger: str, min_rows: int, max_error_gap: float,
                  max_latency_ms: float) -> str:
    """Why the canary of version `challenger` must end, judged on the log's `rows` since it began
    beside version `served`; "" while it may go on. Its error rate must exceed the served
    version's by more than `max_error_gap` and by more than ERROR_GAP_SE standard errors: looked
    at again and again as feedback comes, an equal challenger would otherwise be aborted by chance."""
    figures = {v.version: v for v in judge(rows, {}, min_rows)}
    mine, theirs = figures.get(challenger), figures.get(served)
    if mine is None:
        return ""
    if mine.rows >= min_rows and mine.latency_p95_ms > max_latency_ms:
        return (f"its p95 latency {mine.latency_p95_ms:.1f} ms over {mine.rows} predictions is above "
                f"canary_max_latency_ms={max_latency_ms:g}")
    if theirs is None or min(mine.labelled, theirs.labelled) < min_rows:
        return ""
    errors, their_errors = 1 - mine.live_accuracy, 1 - theirs.live_accuracy
    gap = errors - their_errors
    error = np.sqrt(errors * (1 - errors) / mine.labelled + their_errors * (1 - their_errors) / theirs.labelled)
    if gap > max_error_gap and gap > ERROR_GAP_SE * error:
        return (f"its error rate {errors:.3f} ({mine.labelled} labelled) is {gap:.3f} above version {served}'s "
                f"{their_errors:.3f} ({theirs.labelled} labelled), more than canary_max_error_gap={max_error_gap:g} "
                f"and {ERROR_GAP_SE} standard errors ({error:.3f})")
    return ""


def table_text(versions: list[Version]) -> str:
    """The versions' figures as the monitor prints them, one row each."""
    lines = [f"{'version':>7} {'rows':>6} {'share':>6} {'p50 ms':>7} {'p95 ms':>7} {'confidence':>10} {'labelled':>8} "
             f"{'live acc':>8}  drift"]
    for v in versions:
        accuracy = f"{v.live_accuracy:.4f}" if v.live_accuracy is not None else "-"
        verdict = v.unjudged and f"not judged: {v.unjudged}" or \
            (", ".join(d.column for d in v.drifted) if v.drifted else "none")
        lines.append(f"{v.version:>7} {v.rows:>6} {v.share:>6.1%} {v.latency_p50_ms:>7.2f} {v.latency_p95_ms:>7.2f} "
                     f"{v.confidence:>10.4f} {v.labelled:>8} {accuracy:>8}  {verdict}")
    return "\n".join(lines)


def window_text(cfg) -> str:
    seconds, rows = cfg.span()
    return f"the last {cfg.window}" if seconds else f"the newest {rows} predictions"


def open_window(url: str, model_name: str, seconds: float, rows: int):
    """`model_name`'s rows of the last `seconds`, or its newest `rows`, in the inference log at `url`."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        return inference_log.InferenceLog(url, create=False).window(model_name, seconds, rows)
    except StepError as exc:
        raise ConfigError(f"inference_log {exc}") from None
    except (ArgumentError, SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"inference_log {url} cannot be read: {first_line(exc)}") from None


def dataset_of(model_name: str) -> str:
    """The dataset the newest version of `model_name` was trained on; NotFound without versions."""
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}'", order_by=["version_number DESC"],
                                                           max_results=1)
    if not versions:
        raise NotFound(f"no registered model named {model_name!r} (or it has no versions); give the model_name the "
                       "serve step serves")
    description = mlflow.models.Model.load(f"models:/{model_name}/{versions[0].version}")
    return (description.metadata or {}).get("dataset", "")


def log_figures(cfg, versions: list[Version], rows, references: dict, log_metrics) -> None:
    """Into the active run: each version's figures as metrics, the drift table, a drift plot per
    version judged."""
    import mlflow

    from mnistflow import plots  # here and below: the serve step judges its canary without torch or matplotlib

    figures = {"rows": len(rows)}
    for v in versions:
        figures.update({f"v{v.version}_{name}": value for name, value in (
            ("rows", v.rows), ("share", v.share), ("latency_p50_ms", v.latency_p50_ms),
            ("latency_p95_ms", v.latency_p95_ms), ("confidence", v.confidence), ("labelled", v.labelled),
            ("live_accuracy", v.live_accuracy), ("drifted_columns", len(v.drifted))) if value is not None})
    log_metrics(figures, 0)
    judged = [(v, d) for v in versions for d in v.drift]
    if judged:
        mlflow.log_table({"version": [v.version for v, _ in judged], "column": [d.column for _, d in judged],
                          "method": [d.method for _, d in judged], "score": [round(d.score, 4) for _, d in judged],
                          "limit": [LIMITS[d.method] for _, d in judged], "drifted": [d.drifted for _, d in judged],
                          "moved": [d.moved for _, d in judged]}, "drift_table.json")
    with tempfile.TemporaryDirectory() as folder:
        for v in versions:
            if v.drift:
                figure = plots.drift(references[v.version], rows[rows["version"] == v.version], v.drift,
                                     f"{cfg.model_name} version {v.version}: {v.rows} of its predictions (window="
                                     f"{cfg.window}) against its reference; red: drifted (limits "
                                     f"{', '.join(f'{method} {limit}' for method, limit in LIMITS.items())})")
                path = os.path.join(folder, f"drift_v{v.version}.png")
                plots.save(figure, path)
                plots.close(figure)
                mlflow.log_artifact(path)


def monitor(cfg, on_breach=None) -> None:
    """Judge the window `cfg` names, as a run, and print it. On a breach, `on_breach(dataset)` in
    that run (retraining, as its child), then Breached: the run ends FAILED, with what breached
    as its description."""
    import mlflow

    from mnistflow import logged_model, tracking

    url = cfg.inference_log or inference_log.default_url(mlflow.get_registry_uri())
    dataset = dataset_of(cfg.model_name)
    rows = open_window(url, cfg.model_name, *cfg.span())
    references = {version: logged_model.reference_of(f"models:/{cfg.model_name}/{version}")
                  for version in rows["version"].unique()}
    versions = judge(rows, references, cfg.min_rows)
    found = breaches(versions, cfg.min_rows, cfg.min_accuracy)
    tags = {"model_name": cfg.model_name, "inference_log": url, "breaches": str(len(found))}
    with tracking.step_run(f"monitor-{cfg.model_name}", cfg, "production", dataset=dataset, tags=tags,
                           note="\n".join(found) or "no limit breached") as (run, log_metrics):
        log_figures(cfg, versions, rows, references, log_metrics)
        if versions:
            print(f"{cfg.model_name}, {window_text(cfg)} of {url}:\n{table_text(versions)}", flush=True)
        else:
            print(f"no predictions of {cfg.model_name} in {window_text(cfg)} of {url}", flush=True)
        for line in found:
            print(f"breach: {line}", flush=True)
        print(f"monitor: run {run.info.run_id}", flush=True)
        if found:
            if on_breach is not None:
                on_breach(dataset)
            raise Breached("; ".join(found))
