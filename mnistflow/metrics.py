"""Test figures of a classifier by scikit-learn: per-class precision, recall and F1, the
classification report and the confusion matrix.

scikit-learn is imported where it is used, not with this module: its import takes about a second
that only the end of a run needs, and steps such as predict never do.
"""
import numpy as np


def test_metrics(log_probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> tuple[dict, dict, np.ndarray]:
    """(results, report, confusion matrix) of (N, classes) log-probabilities against the labels.

    results holds test_loss (mean cross-entropy), test_accuracy and test_<precision|recall|f1>_class_<i>;
    report is `classification_report(..., output_dict=True)`; cm[i, j] counts class i predicted as j.
    """
    from sklearn.metrics import confusion_matrix

    preds = log_probs.argmax(1)
    report = classification_report(labels, preds, class_names, output_dict=True)
    # The cross-entropy straight from the log-probabilities: sklearn's log_loss takes probabilities
    # and clips them at machine epsilon, so a confidently wrong image would count for less.
    results = {"test_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
               "test_accuracy": report["accuracy"]}
    for i, name in enumerate(class_names):
        for key in ("precision", "recall", "f1-score"):
            results[f"test_{key.removesuffix('-score')}_class_{i}"] = report[name][key]
    return results, report, confusion_matrix(labels, preds, labels=range(len(class_names)))


def classification_report(labels: np.ndarray, preds: np.ndarray, class_names: list[str], output_dict: bool = False):
    """scikit-learn's report, every class listed (one never predicted or absent scores 0), 4 digits in its text."""
    from sklearn import metrics

    return metrics.classification_report(labels, preds, labels=range(len(class_names)), target_names=class_names,
                                         digits=4, zero_division=0, output_dict=output_dict)
