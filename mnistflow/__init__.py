"""mnistflow: data, models, the training loop and MLflow helpers shared by the project's steps.

Importing any part of it sets these MLflow defaults (a value already in the environment wins).
"""
import os

# Artifact downloads (resume, register) would draw progress bars on stderr, where errors go.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's async logging thread otherwise blocks in a 1 s queue timeout, which every end_run
# waits out; buffering makes it sleep on its stop event instead, and merges queued metrics
# into one write per second.
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
# Logged models are pt2 programs exported on the CPU, and MLflow will not move those to a GPU:
# on a CUDA machine its default device would make every pyfunc load fail (log_model's check of
# the input example, register, evaluate, predict).
os.environ.setdefault("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
# System metrics (`system_metrics=true`) are sampled every 5 s, not MLflow's 10 s, so a 1-epoch run
# or a short tune trial shows a few points; a sample costs milliseconds (docs/results.md).
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
