"""bench/train_speed.py on tiny files: it runs its real comparisons and prints the table of ratios."""
import re
import sys

from conftest import run_step


def test_train_speed_prints_medians_and_ratios(tiny_data):
    result = run_step(sys.executable, "bench/train_speed.py", "--data_dir", tiny_data,
                      "--repeats", "1", "--train_samples", "300")
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("baseline: pipeline / DataLoader epoch", "fast: pipeline / DataLoader epoch",
                "fast: tracking on / off"):
        assert re.search(rf"{re.escape(row)}\s+\d+\.\d+\s+<= ", result.stdout), row
    for row in ("baseline: floor / DataLoader epoch", "fast: floor / DataLoader epoch"):
        assert re.search(rf"{re.escape(row)}\s+\d+\.\d+\s+\(best any pipeline can reach\)", result.stdout), row
    for source in ("in-memory tensors", "DataLoader + ToTensor", "one reused batch (floor)"):
        assert re.search(rf"fast: {re.escape(source)}\s+\d+\.\d+", result.stdout), source
    assert "270 training images per epoch" in result.stdout  # 300 capped, 10 % held out for validation


def test_train_speed_rejects_an_unknown_model_in_one_line(tiny_data):
    result = run_step(sys.executable, "bench/train_speed.py", "--data_dir", tiny_data, "--pipeline_models", "fast,resnet")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("unknown model 'resnet' in --pipeline_models; "
                                                            "choose from fast, wide, baseline, enhanced, cnn_bn, simple")
