"""The test figures a run logs, checked against figures worked out by hand."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from mnistflow import metrics

# Class 0: 1 of 1 predicted right, 1 of 2 found; class 1: 2 of 3, 2 of 3; class 2: 1 of 2, 1 of 1;
# class 3: absent and never predicted, so its ratios are 0.
LABELS = np.array([0, 0, 1, 1, 1, 2])
PREDS = np.array([0, 1, 1, 1, 2, 2])
NAMES = ["a", "b", "c", "d"]


def log_probs_predicting(preds: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Log-probabilities whose argmax is `preds`; the true class of image k gets log-probability right[k]."""
    log_probs = np.full((len(preds), len(NAMES)), -60.0)
    log_probs[np.arange(len(preds)), preds] = -0.01
    log_probs[np.arange(len(preds)), LABELS] = np.where(preds == LABELS, -0.01, right)
    return log_probs


def test_figures_report_and_confusion_matrix():
    right = np.array([0.0, -50.0, 0.0, 0.0, -2.0, 0.0])  # image 1 is confidently wrong
    results, report, cm = metrics.test_metrics(log_probs_predicting(PREDS, right), LABELS, NAMES)

    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert results["test_accuracy"] == pytest.approx(4 / 6)
    # The exact mean cross-entropy: 50 counts in full, not clipped as a probability would be.
    assert results["test_loss"] == pytest.approx((0.01 * 4 + 50 + 2) / 6)
    assert [results[f"test_precision_class_{i}"] for i in range(4)] == pytest.approx([1, 2 / 3, 0.5, 0])
    assert [results[f"test_recall_class_{i}"] for i in range(4)] == pytest.approx([0.5, 2 / 3, 1, 0])
    assert [results[f"test_f1_class_{i}"] for i in range(4)] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0])
    assert len(results) == 2 + 3 * 4

    assert report["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1-score": 2 / 3, "support": 2})
    assert report["d"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    assert report["macro avg"]["precision"] == pytest.approx((1 + 2 / 3 + 0.5) / 4)
    assert report["weighted avg"]["recall"] == pytest.approx((2 * 0.5 + 3 * 2 / 3 + 1 * 1.0) / 6)
    assert report["weighted avg"]["support"] == 6


def test_report_text_lists_every_class_to_four_digits():
    text = metrics.classification_report(LABELS, PREDS, NAMES).splitlines()
    assert text[0].split() == ["precision", "recall", "f1-score", "support"]
    assert text[2].split() == ["a", "1.0000", "0.5000", "0.6667", "2"]
    assert text[5].split() == ["d", "0.0000", "0.0000", "0.0000", "0"]
    assert [line.split()[0] for line in text[7:]] == ["accuracy", "macro", "weighted"]
    assert text[7].split() == ["accuracy", "0.6667", "6"]


def test_the_steps_load_scikit_learn_only_when_they_score():
    # Its import takes about a second; predict never needs it, and train only after its last epoch.
    code = ("import sys, steps.train, steps.predict, steps.evaluate, steps.tune, steps.register, steps.main\n"
            "assert 'sklearn' not in sys.modules, 'sklearn was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
