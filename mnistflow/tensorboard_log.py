"""TensorBoard event files beside a train run's MLflow metrics (`tensorboard=true`): the metrics fit
reports, under the names they have in MLflow, and the misclassified test images, stored with
the run's artifacts under tensorboard/ so that `tensorboard --logdir` shows a downloaded copy.
"""
import tempfile

import mlflow
import numpy as np
import torch

from mnistflow import plots
from mnistflow.data import Data
from mnistflow.errors import ConfigError
from mnistflow.train import predict

ARTIFACT_PATH = "tensorboard"


class EventFiles:
    """A SummaryWriter in a folder of its own, copied to the active run's artifacts after each epoch.

    Made before the run starts, so that a missing tensorboard package stops the step first.
    """

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]', "
                              "or give tensorboard=false") from None
        self._folder = tempfile.TemporaryDirectory(prefix="mnistflow-tensorboard-")
        self._writer = SummaryWriter(self._folder.name)

    def tee(self, log_metrics):
        """`log_metrics` that also writes each metric into the event file at the same step (the
        training step for `loss`, the epoch for the epoch metrics)."""
        def log_both(metrics: dict, step: int, **links) -> None:
            log_metrics(metrics, step, **links)
            for name, value in metrics.items():
                self._writer.add_scalar(name, value, step)

        return log_both

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        """fit's hook: store the events so far, so that a run that stops later keeps them."""
        self._store()

    def close(self, net: torch.nn.Module, data: Data, device: torch.device, epoch: int) -> None:
        """Add the net's misclassified test images at `epoch`, then store and remove the event files."""
        preds = predict(net, data.test, device).argmax(1).numpy()
        labels = data.test.labels.numpy()
        wrong = np.flatnonzero(preds != labels)
        figure = plots.misclassified(data.pixels(data.test)[wrong], labels[wrong], preds[wrong], data.classes)
        self._writer.add_figure("test_misclassified", figure, epoch)  # closes the figure
        self._writer.close()
        self._store()
        self._folder.cleanup()

    def _store(self) -> None:
        self._writer.flush()
        mlflow.log_artifacts(self._folder.name, ARTIFACT_PATH)
