"""MLflow helpers: the run's life cycle, what makes it reproducible, checkpoints, results and the model."""
import dataclasses
import getpass
import os
import platform
import signal
import subprocess
import tempfile
import warnings
from contextlib import contextmanager

import mlflow
import numpy as np
import torch
import torchvision
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from mnistflow import metrics, plots
from mnistflow.config import AUTO, ConfigError
from mnistflow.data import Data
from mnistflow.models import count_params, servable
from mnistflow.train import evaluate

CHECKPOINTS = "checkpoints"


class AsyncMetrics:
    """Logs metrics without blocking the training loop; `flush` waits and raises on any failed write."""

    def __init__(self):
        self._pending = []

    def __call__(self, metrics: dict, step: int) -> None:
        self._pending.append(mlflow.log_metrics(metrics, step=step, synchronous=False))

    def flush(self) -> None:
        mlflow.flush_async_logging()  # write what is buffered now, not at the next tick
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def tracked_run(**start_run_args):
    """Start or continue a run; yield (run, log_metrics).

    The run ends FINISHED only when the body succeeds and every metric was written; an error
    ends it FAILED, Ctrl-C or SIGTERM ends it KILLED.
    """
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    log_metrics = AsyncMetrics()
    run = mlflow.start_run(**start_run_args)
    try:
        yield run, log_metrics
        log_metrics.flush()
    except BaseException as exc:
        # Finish the bookkeeping even when a second Ctrl-C or SIGTERM arrives meanwhile
        # (`mlflow run` sends SIGTERM to the step after the Ctrl-C that both received).
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                log_metrics.flush()  # keep what was measured before the failure
            except MlflowException as flush_error:
                print(f"warning: some metrics were not written: {flush_error}", flush=True)
            mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def existing_run(run_id: str, what: str = "run_id") -> mlflow.entities.Run:
    """The run with this id; ConfigError naming the id and the tracking store when there is none."""
    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"unknown {what} {run_id!r}: no such run in {mlflow.get_tracking_uri()}") from None


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def run_tags(phase: str, dataset: str, note: str = "") -> dict:
    """Who ran what: git commit/branch/dirty, user, phase, dataset, and the note."""
    tags = {
        "git_commit": git_commit(),
        "git_branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "user": getpass.getuser(),
        "phase": phase,
        "dataset": dataset,
    }
    if note:
        tags["mlflow.note.content"] = note
    return tags


def library_versions() -> dict:
    return {
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mlflow_version": mlflow.__version__,
    }


def log_config(cfg) -> None:
    """The resolved config both as params (searchable) and as config.yaml (re-runnable).

    `mlflow run` has already logged the entry point's -P values as params, in its own
    spelling; MLflow refuses to change a param, so only the keys it did not log are added.
    """
    config = dataclasses.asdict(cfg)
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({key: value for key, value in config.items() if key not in logged})
    mlflow.log_dict(config, "config.yaml")


def logged_config(run_id: str) -> dict:
    """The config.yaml that log_config wrote for a run.

    Runs from before `mirror` and `shift` existed trained without them, so their config reads off.
    """
    return {"mirror": "off", "shift": "off", **yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))}


def log_datasets(data: Data, contexts=("training", "validation", "test")) -> None:
    splits = {"training": data.train, "validation": data.val, "test": data.test}
    for context in contexts:
        split = splits[context]
        with warnings.catch_warnings():
            # MLflow registers two local-path source types under one name and warns that it
            # picked one of them; either is right for a local data directory.
            warnings.filterwarnings("ignore", message="The specified dataset source")
            dataset = mlflow.data.from_numpy(split.images.numpy(), targets=split.labels.numpy(),
                                             source=data.root, name=f"{data.name}-{context}",
                                             digest=split.digest)
        mlflow.log_input(dataset, context=context)


def checkpoint_saver(directory: str):
    """A `save_checkpoint(state, is_best)` for `fit` that logs last.pt (and best.pt) to the run."""
    def save(state: dict, is_best: bool) -> None:
        path = os.path.join(directory, "last.pt")
        torch.save(state, path)
        mlflow.log_artifact(path, CHECKPOINTS)
        if is_best:
            best = os.path.join(directory, "best.pt")
            torch.save({"epoch": state["epoch"], "model": state["model"]}, best)
            mlflow.log_artifact(best, CHECKPOINTS)
    return save


def load_checkpoint(run_id: str) -> dict | None:
    """The run's last checkpoint, or None when it has none yet."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{CHECKPOINTS}/last.pt", dst_path=tmp)
        except (MlflowException, OSError):
            return None
        # weights_only: a checkpoint is data; never let it run code while loading.
        return torch.load(path, weights_only=True)


def log_missing_epochs(run_id: str, history: list[dict], log_metrics) -> None:
    """Log the epochs a checkpoint holds but the run lacks (a crash between the two writes)."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_loss")}
    for epoch, epoch_metrics in enumerate(history, start=1):
        if epoch not in logged:
            log_metrics(epoch_metrics, epoch)


def log_test_results(net: torch.nn.Module, data: Data, device: torch.device) -> dict:
    """Final metrics of a trained net on the test split (see log_test_scores)."""
    _, _, logits = evaluate(net, data.test, device)
    return log_test_scores(torch.log_softmax(logits, 1).numpy(), data)


def log_test_scores(log_probs: np.ndarray, data: Data) -> dict:
    """Log test loss, accuracy and per-class precision/recall/F1 as metrics, the classification
    report (text and JSON), the confusion matrix and misclassified images; return the metrics."""
    labels = data.test.labels.numpy()
    results, report, cm = metrics.test_metrics(log_probs, labels, data.classes)
    mlflow.log_metrics(results)
    mlflow.log_dict(report, "test/classification_report.json")
    mlflow.log_text(metrics.report_text(report), "test/classification_report.txt")
    log_figure(plots.confusion_matrix(cm, data.classes), "plots/test_confusion_matrix.png")
    preds = log_probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    log_figure(plots.misclassified(data.pixels(data.test)[wrong], labels[wrong], preds[wrong], data.classes),
               "plots/test_misclassified.png")
    return results


def log_figure(figure, path: str) -> None:
    """Log a matplotlib figure as a PNG artifact and free it."""
    mlflow.log_figure(figure, path)
    plots.close(figure)


def log_curves(history: list[dict]) -> None:
    log_figure(plots.curves(history), "plots/loss_accuracy_curves.png")


def log_model(net: torch.nn.Module, data: Data) -> mlflow.models.model.ModelInfo:
    """Log the net as a servable model: [0, 1] pixels (N, 1, 28, 28) in, class probabilities out."""
    model = servable(net.cpu(), data.mean, data.std)
    example = data.pixels(data.test)[:5].numpy()
    with torch.no_grad():
        probabilities = model(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        model, name="model",
        signature=infer_signature(example, probabilities),
        input_example=example,
        # Listed, not inferred: inference imports the model in a subprocess and costs ~15 s.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                          f"numpy=={np.__version__}"],
        # pt2 (torch.export) stores a traced graph: loading runs no pickled code and needs no
        # mnistflow import, unlike the pickle format.
        serialization_format="pt2",
        metadata={"dataset": data.name, "classes": data.classes},  # so predictions can be named
    )


def model_params(cfg, net: torch.nn.Module, device: torch.device) -> dict:
    """Size, device and libraries, and what each "auto" setting became (`mlflow run` has logged the
    -P value, "auto", under the setting's own name, and MLflow params cannot change)."""
    return {"num_params": count_params(net), "resolved_device": str(device),
            **{f"resolved_{name}": getattr(cfg, name) for name in AUTO[cfg.dataset]},
            **library_versions()}
