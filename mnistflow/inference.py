"""Using a logged model: load it from any MLflow model URI, score images, time it.

Logged models are servable: [0, 1] pixels (N, 1, 28, 28) in, class probabilities out
(see tracking.log_model), so these helpers work for every run, version and alias alike.
"""
import os
import time

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from mnistflow.config import ConfigError

BATCH_SIZE = 1000


def load(uri: str):
    """The pyfunc model at a runs:/, models:/ or local URI; ConfigError when there is none."""
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load model {uri!r}: {first_line}") from None


def probabilities(model, pixels: np.ndarray) -> np.ndarray:
    """(N, 10) class probabilities for (N, 1, 28, 28) float32 pixels in [0, 1]."""
    return np.concatenate([np.asarray(model.predict(pixels[i:i + BATCH_SIZE]))
                           for i in range(0, len(pixels), BATCH_SIZE)])


def log_probabilities(model, pixels: np.ndarray) -> np.ndarray:
    # A probability that rounded to 0 would make the loss infinite; floor it at float32's tiniest.
    return np.log(np.maximum(probabilities(model, pixels), np.finfo(np.float32).tiny))


def latencies_ms(model, image: np.ndarray, repeats: int = 200, warmup: int = 20) -> np.ndarray:
    """Wall time of `repeats` single-image predictions, in milliseconds, after a warm-up."""
    image = image.reshape(1, 1, 28, 28).astype(np.float32)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model.predict(image)
        times.append(time.perf_counter() - start)
    return np.array(times[warmup:]) * 1000


def size_mb(local_path: str) -> float:
    """Size of a downloaded model directory: every file a server would have to fetch."""
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(local_path) for name in names) / 2 ** 20
