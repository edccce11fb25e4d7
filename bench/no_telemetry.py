"""Imported first by every benchmark, before MLflow: MLflow's usage telemetry off for the bench and
every process it starts, so a benchmark talks to this machine's loopback only. MLflow turns it off
by itself under pytest and in CI, not in a benchmark run by hand; it starts sending when imported."""
import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
