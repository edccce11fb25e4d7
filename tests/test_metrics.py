"""The confusion matrix and classification report, checked against figures worked out by hand."""
import numpy as np
import pytest

from mnistflow import metrics


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
    labels = np.array([0, 0, 1, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 2, 2])
    assert metrics.confusion_matrix(labels, preds, 4).tolist() == [
        [1, 1, 0, 0], [0, 2, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_report_per_class_and_averages():
    # class 0: 1 of 1 predicted right, 1 of 2 found; class 1: 2 of 3, 2 of 3; class 2: 1 of 2, 1 of 1;
    # class 3: absent and never predicted, so its ratios are 0.
    cm = metrics.confusion_matrix(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 2, 2]), 4)
    report = metrics.classification_report(cm, ["a", "b", "c", "d"])
    assert report["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1-score": 2 / 3, "support": 2})
    assert report["b"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1-score": 2 / 3, "support": 3})
    assert report["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1-score": 2 / 3, "support": 1})
    assert report["d"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["macro avg"]["precision"] == pytest.approx((1 + 2 / 3 + 0.5) / 4)
    assert report["weighted avg"]["recall"] == pytest.approx((2 * 0.5 + 3 * 2 / 3 + 1 * 1.0) / 6)
    assert report["weighted avg"]["support"] == 6

    text = metrics.report_text(report).splitlines()
    assert text[0].split() == ["precision", "recall", "f1-score", "support"]
    assert text[2].split() == ["a", "1.0000", "0.5000", "0.6667", "2"]
    assert [line.split()[0] for line in text[7:]] == ["accuracy", "macro", "weighted"]
    assert text[7].split() == ["accuracy", "0.6667", "6"]
