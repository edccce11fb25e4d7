"""The model a run logs, and using it: how it is logged (the run's model, and with
checkpoint_models=true one per epoch), checked, loaded from any MLflow model URI, and scored.

Every logged model is servable: [0, 1] pixels (N, 1, 28, 28) in, class probabilities out, with
the dataset and class names in its metadata. So the helpers here work for every run, version and
alias alike.

Loading a model may run code it carries: a pickled model (a python_function model's cloudpickled
class, a pytorch model saved with pickle) executes whatever its author put in the pickle. So by
default only models this project logs are loaded: the pytorch flavour in the pt2 format (a traced
graph and tensors), with the project's metadata. The files are checked before anything is
loaded, and MLflow is told to refuse any pickle inside the pt2 archive too.
"""
import copy
import os
import tempfile
import time
from contextlib import contextmanager

import mlflow
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from mnistflow import inference_log, tracking
from mnistflow.data import DATASETS, Data
from mnistflow.errors import ModelError, first_line
from mnistflow.models import servable

BATCH_SIZE = 1000
PICKLED_FLAG = "allow_pickled_models"  # the flag (and MLproject parameter) of every step that loads a model
PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"  # MLflow's own check of pt2 archives
MODEL = "model"  # the run's model: the one register, evaluate and serving take from a run
CHECKPOINT = "checkpoint-"  # + the epoch: the net as it was at the end of that epoch (checkpoint_models=true)
# What a model's traffic is compared with (mnistflow/monitoring.py): REFERENCE_PICTURES of its
# validation pictures as the serve step sees them, with what the model answered, in the model's files.
REFERENCE = "reference.csv"
REFERENCE_PATH = f"extra_files/{REFERENCE}"
REFERENCE_PICTURES = 2000
# The confidence (the largest class probability) below which the model answers "unsure": the
# ABSTAIN_SHARE quantile of its confidence on the reference's validation pictures, as served, in
# the model's metadata under ABSTAIN_KEY (Hendrycks & Gimpel's maximum-softmax baseline).
ABSTAIN_KEY = "abstain_below"
ABSTAIN_SHARE = 0.02
_served = {}  # a split's digest -> its reference pictures as served: the same for each checkpoint


def log(net: torch.nn.Module, data: Data, name: str = MODEL, step: int = 0) -> str:
    """Log a copy of the net as a servable model of the active run, at `step`; its logged model id.

    MLflow links the model to every run metric already logged at `step` without a model: the
    callers give the optimizer step the weights come from, not the epoch, since MLflow's system
    metrics number their samples 0, 1, 2… and sample <epoch> would be linked too. Metrics logged
    after it name it with model_id (report.log_test_scores, with_checkpoint_models).
    """
    # A copy, so that training can go on with the net. Training keeps conv weights channels_last
    # (mnistflow/train.py), which torch.export's weight packer takes for slices of a larger
    # tensor: "No complete tensor found in the group!".
    net = copy.deepcopy(net).cpu().to(memory_format=torch.contiguous_format)
    model = servable(net, data.mean, data.std)
    example = data.pixels(data.test)[:5].numpy()
    with torch.no_grad():
        probabilities = model(torch.from_numpy(example)).numpy()
    with tempfile.TemporaryDirectory() as folder:
        reference_file = os.path.join(folder, REFERENCE)
        table = reference(model, data)
        table.to_csv(reference_file, index=False, float_format="%.6g")
        return mlflow.pytorch.log_model(
            model, name=name, step=step, extra_files=[reference_file],
            signature=infer_signature(example, probabilities),
            input_example=example,
            # Listed, not inferred: MLflow would import the model in a subprocess to infer them, for seconds.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              f"numpy=={np.__version__}"],
            # pt2 (torch.export) stores a traced graph: loading runs no pickled code and needs no
            # mnistflow import, unlike the pickle format.
            serialization_format="pt2",
            # The dataset and classes are what `foreign_kind` checks, and name predictions.
            metadata={"dataset": data.name, "classes": data.classes,
                      ABSTAIN_KEY: round(float(np.quantile(table["confidence"], ABSTAIN_SHARE)), 4)},
        ).model_id


def reference(model: torch.nn.Module, data: Data):
    """The model's reference, a table: inference_log.FEATURES, class_index and confidence of
    REFERENCE_PICTURES of the validation split (the training split when there is none), seeded."""
    import pandas

    split = data.val if len(data.val) else data.train
    if split.digest not in _served:
        which = np.sort(np.random.default_rng(0).permutation(len(split))[:REFERENCE_PICTURES])
        _served[split.digest] = inference_log.as_served(data.pixels(split)[which].numpy()[:, 0], data.name)
    features, inputs = _served[split.digest]
    with torch.no_grad():
        probabilities = model(torch.from_numpy(inputs[:, None])).numpy()
    table = pandas.DataFrame(features, columns=list(inference_log.FEATURES))
    table["class_index"], table["confidence"] = probabilities.argmax(1), probabilities.max(1)
    return table


def reference_of(uri: str):
    """The reference table logged with the model at `uri`; None for a model logged without one."""
    import pandas

    try:
        with tempfile.TemporaryDirectory() as folder:
            return pandas.read_csv(mlflow.artifacts.download_artifacts(f"{uri}/{REFERENCE_PATH}", dst_path=folder))
    except (MlflowException, OSError):
        return None


def with_checkpoint_models(net: torch.nn.Module, data: Data, log_metrics, steps_per_epoch: int):
    """A `log_metrics` for `fit` that makes each epoch's net a logged model, with that epoch's metrics.

    The call that carries an epoch's metrics (the one with val_loss) first logs the net as
    model checkpoint-<epoch> at the optimizer step it was saved at, then hands the metrics on linked to it: val_*
    against the validation dataset, train_* against the training dataset, the rest to the model
    alone. So the UI's model view lists each checkpoint with its validation figures, and
    `mlflow.search_logged_models` ranks them (registry.best_checkpoint). Step-level metrics pass through.
    """
    validation, training = tracking.split_dataset(data, "validation"), tracking.split_dataset(data, "training")

    def log_epoch(metrics: dict, step: int) -> None:
        if "val_loss" not in metrics:
            log_metrics(metrics, step)
            return
        model_id = log(net, data, name=f"{CHECKPOINT}{step}", step=step * steps_per_epoch)
        for prefix, dataset in (("val_", validation), ("train_", training)):
            log_metrics({key: value for key, value in metrics.items() if key.startswith(prefix)}, step,
                        model_id=model_id, dataset=dataset)
        log_metrics({key: value for key, value in metrics.items() if not key.startswith(("val_", "train_"))}, step,
                    model_id=model_id)
    return log_epoch


def foreign_kind(description: mlflow.models.Model, files: str = "") -> str:
    """"" for a model this project logged (pytorch pt2 with its dataset and classes), else what it is
    ("a python_function model (loader mlflow.pyfunc.model)").

    Reads the MLmodel file's `description` and, once the model's `files` are downloaded, lists
    its data folder: MLflow's pytorch loader takes data/model.pth (a pickle) when it is there,
    model.pt2 otherwise, whatever MLmodel says. Loads nothing.
    """
    flavors = description.flavors
    pyfunc = flavors.get("python_function", {})
    if not flavors:
        return "an MLmodel file with no flavours"
    if "pytorch" not in flavors:
        loader = f" (loader {pyfunc['loader_module']})" if pyfunc.get("loader_module") else ""
        return f"a {' + '.join(sorted(flavors))} model{loader}"
    if set(flavors) != {"pytorch", "python_function"} or pyfunc.get("loader_module") != "mlflow.pytorch" \
            or pyfunc.get("data") != "data" or pyfunc.get("code") or flavors["pytorch"].get("code"):
        return "a pytorch model with extra code or flavours"
    metadata = description.metadata or {}
    dataset = metadata.get("dataset")
    if dataset not in DATASETS or metadata.get("classes") != list(DATASETS[dataset].classes):
        return "a pytorch model without mnistflow's dataset and classes"
    pickled, exported = (os.path.join(files, "data", name) for name in ("model.pth", "model.pt2"))
    if files and (os.path.exists(pickled) or not os.path.isfile(exported)):
        return "a pytorch model saved with pickle"
    return ""


def _refuse(uri: str, kind: str) -> None:
    if kind:
        raise ModelError(f"model {uri!r} is {kind}, not one mnistflow logs (pytorch pt2 with its dataset and "
                          f"classes); loading it could run code it carries. To load it anyway: {PICKLED_FLAG}=true "
                          f"(--{PICKLED_FLAG} true)")


def download(uri: str, folder: str, allow_pickled: bool = False) -> str:
    """The model at a runs:/, models:/ or local URI, copied into `folder` and checked; its local path.

    Its MLmodel file comes first, alone: a model without one (files deleted, not a model) stops
    here, and one this project did not log is refused before its other files are fetched. The
    files as downloaded are checked again, since they are what will be loaded.
    """
    try:
        description = mlflow.models.Model.load(uri)  # fetches the MLmodel file only
        if not allow_pickled:
            _refuse(uri, foreign_kind(description))
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        description = mlflow.models.Model.load(os.path.join(local, "MLmodel"))
    except ModelError:
        raise
    except (MlflowException, OSError, ValueError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot load model {uri!r}: {first_line(exc)}") from None
    if not allow_pickled:
        _refuse(uri, foreign_kind(description, local))
    return local


@contextmanager
def mlflow_pickle_switch(allowed: bool):
    """MLflow's switch for pickles inside a pt2 archive, off unless the user allowed pickled models."""
    before = os.environ.get(PICKLE_SWITCH)
    if not allowed:
        os.environ[PICKLE_SWITCH] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PICKLE_SWITCH, None)
        else:
            os.environ[PICKLE_SWITCH] = before


def load_local(local: str, uri: str, allow_pickled: bool = False):
    """The pyfunc model that `download` fetched from `uri` to `local` and checked."""
    try:
        with mlflow_pickle_switch(allow_pickled):
            return mlflow.pyfunc.load_model(local)
    except (MlflowException, OSError) as exc:
        raise ModelError(f"cannot load model {uri!r}: {first_line(exc)}") from None


def load(uri: str, allow_pickled: bool = False):
    """The pyfunc model at a runs:/, models:/ or local URI; ModelError when there is none, or when
    it is not a model this project logs and pickled models are not allowed."""
    with tempfile.TemporaryDirectory() as folder:
        return load_local(download(uri, folder, allow_pickled), uri, allow_pickled)


def trained_on(model) -> str | None:
    """The dataset the model was trained on, as mnistflow's models say; None for others."""
    return (model.metadata.metadata or {}).get("dataset")


def abstain_threshold(model) -> float:
    """The confidence below which the model answers "unsure" (ABSTAIN_KEY); 0 for a model logged without one."""
    return float((model.metadata.metadata or {}).get(ABSTAIN_KEY, 0.0))


def class_names(model) -> list[str]:
    """The model's class names: mnistflow's models carry them; others are shown by index."""
    return (model.metadata.metadata or {}).get("classes") or [str(i) for i in range(10)]


def dataset_for(model, uri: str, wanted: str = "") -> str:
    """The dataset to score a model on: the one it was trained on (mnistflow's models say which).

    ModelError when `wanted` is another one (its scores there would mean nothing), or when
    neither is known.
    """
    known = trained_on(model)
    if wanted and known and wanted != known:
        raise ModelError(f"model {uri!r} was trained on {known}, not on {wanted}; "
                          f"its scores on {wanted} would mean nothing")
    if not (wanted or known):
        raise ModelError(f"model {uri!r} does not say which dataset it was trained on; "
                          f"give dataset= ({', '.join(DATASETS)})")
    return wanted or known


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
