"""Classification metrics from predicted and true labels: the confusion matrix and a per-class report.

A few lines of numpy instead of scikit-learn, whose import alone adds about a second to every run.
The report has scikit-learn's layout (`classification_report(..., output_dict=True)`), so the
JSON and text a run carries read the way people expect.
"""
import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """cm[i, j] counts the images of class i predicted as class j."""
    return np.bincount(labels * n_classes + preds, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def classification_report(cm: np.ndarray, class_names: list[str]) -> dict:
    """Precision, recall, F1 and support per class, plus accuracy and macro / weighted averages.

    A class never predicted (or never present) gets 0 for the ratio it has no denominator for.
    """
    true_positives = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)

    report = {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                     "f1-score": float(f1[i]), "support": int(support[i])}
              for i, name in enumerate(class_names)}
    total = int(support.sum())
    report["accuracy"] = float(true_positives.sum() / total) if total else 0.0
    weights = support / total if total else np.zeros_like(support, dtype=float)
    for average, w in (("macro avg", np.full(len(class_names), 1 / len(class_names))), ("weighted avg", weights)):
        report[average] = {"precision": float(precision @ w), "recall": float(recall @ w),
                           "f1-score": float(f1 @ w), "support": total}
    return report


def report_text(report: dict) -> str:
    """The report as an aligned table, one row per class, then accuracy and the averages."""
    width = max(len("weighted avg"), *(len(name) for name in report))
    lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
    row = lambda name, r: (f"{name:>{width}}  {r['precision']:9.4f} {r['recall']:9.4f} "
                           f"{r['f1-score']:9.4f} {r['support']:9d}")
    classes = [name for name in report if name not in ("accuracy", "macro avg", "weighted avg")]
    lines += [row(name, report[name]) for name in classes]
    lines += ["", f"{'accuracy':>{width}}  {'':9} {'':9} {report['accuracy']:9.4f} "
                  f"{report['macro avg']['support']:9d}"]
    lines += [row(name, report[name]) for name in ("macro avg", "weighted avg")]
    return "\n".join(lines) + "\n"


def test_metrics(log_probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> tuple[dict, dict, np.ndarray]:
    """(results, report, confusion matrix) of (N, classes) log-probabilities against the labels.

    results holds test_loss (mean cross-entropy), test_accuracy and test_<precision|recall|f1>_class_<i>.
    """
    preds = log_probs.argmax(1)
    cm = confusion_matrix(labels, preds, len(class_names))
    report = classification_report(cm, class_names)
    results = {"test_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
               "test_accuracy": report["accuracy"]}
    for i, name in enumerate(class_names):
        for key in ("precision", "recall", "f1-score"):
            results[f"test_{key.split('-')[0]}_class_{i}"] = report[name][key]
    return results, report, cm
