"""What a run shows about its model: test loss, accuracy and per-class scores as metrics, the
classification report, and figures (curves, confusion matrix, misclassified images).
"""
import mlflow
import numpy as np
import torch

from mnistflow import metrics, models, plots, tracking
from mnistflow.data import Data
from mnistflow.train import evaluate, steps_per_epoch


def log_test_results(net: torch.nn.Module, data: Data, device: torch.device, model_id: str | None = None) -> dict:
    """Final metrics of a trained net on the test split (see log_test_scores)."""
    _, _, logits = evaluate(net, data.test, device)
    return log_test_scores(torch.log_softmax(logits, 1).numpy(), data, model_id)


def log_test_scores(log_probs: np.ndarray, data: Data, model_id: str | None = None) -> dict:
    """Log test loss, accuracy and per-class precision/recall/F1 as metrics, the classification
    report (text and JSON), the confusion matrix and misclassified images; return the metrics.

    The metrics name the test dataset and, given its id, the logged model they measure, so the
    model's page in the UI says what it was measured on.
    """
    labels = data.test.labels.numpy()
    results, report, cm = metrics.test_metrics(log_probs, labels, data.classes)
    mlflow.log_metrics(results, model_id=model_id, dataset=tracking.split_dataset(data, "test"))
    mlflow.log_dict(report, "test/classification_report.json")
    preds = log_probs.argmax(1)
    mlflow.log_text(metrics.classification_report(labels, preds, data.classes), "test/classification_report.txt")
    log_figure(plots.confusion_matrix(cm, data.classes), "plots/test_confusion_matrix.png")
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


def log_net_summary(cfg, net: torch.nn.Module, device: torch.device, data: Data) -> None:
    """A new train run's net (size, summary), device, libraries and data sizes."""
    mlflow.log_params({**tracking.model_params(cfg, net, device), "train_size": len(data.train),
                       "val_size": len(data.val), "test_size": len(data.test),
                       "steps_per_epoch": steps_per_epoch(cfg, data)})
    mlflow.log_text(models.summary(net), "model_summary.txt")
