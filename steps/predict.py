"""The `predict` step: classify image files with a logged or registered model.

    python -m steps.predict --images a.png b.jpg                 # with MNIST_CNN@production
    python -m steps.predict --model_uri runs:/<run_id>/model --images a.png --plot predictions.png
    python -m steps.predict --images a.png --payload payload.json
    mlflow run . -e predict -P images="a.png b.png" --env-manager local

Images of any size, colour or polarity are first brought to the MNIST convention (see
mnistflow/images.py). `--payload` writes them as the JSON body `mlflow models serve` takes.
Only models mnistflow logs are loaded unless --allow_pickled_models true (see mnistflow/logged_model.py).
"""
import json
import os

from mnistflow import cli
from mnistflow.config import PredictConfig
from mnistflow.errors import OutputError


def write_payload(path: str, inputs) -> None:
    """The inputs as the JSON body `mlflow models serve` takes; OutputError if the file cannot be written."""
    try:
        with open(path, "w") as f:
            json.dump({"inputs": inputs.round(4).tolist()}, f)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def predict(cfg: PredictConfig) -> None:
    # Here, not at the top: --help and a bad flag answer without loading torch, MLflow or numpy.
    import numpy as np

    from mnistflow import images, logged_model, plots, tracking

    originals = [images.read(path) for path in cfg.images]
    model = logged_model.load(cfg.model_uri, cfg.allow_pickled_models)
    # Made as the model's training images were: digits into 20x20 at full brightness, garments filling the field.
    dataset = logged_model.trained_on(model) or "mnist"
    inputs = np.stack([images.to_mnist(image, path, dataset) for image, path in zip(originals, cfg.images)])[:, None]

    probs = logged_model.probabilities(model, inputs)
    names = logged_model.class_names(model)
    predictions = []
    for path, p in zip(cfg.images, probs):
        top = np.argsort(p)[::-1][:cfg.top]
        predictions.append(f"{path}: {names[top[0]]}  (" + ", ".join(f"{names[k]} {p[k]:.4f}" for k in top) + ")")
        print(predictions[-1], flush=True)
    if cfg.plot:
        figure = plots.predictions(originals, inputs, probs, names, [os.path.basename(p) for p in cfg.images])
        try:
            plots.save(figure, cfg.plot)
        finally:
            plots.close(figure)
        print(f"wrote {cfg.plot}")
    if cfg.payload:
        write_payload(cfg.payload, inputs)
        print(f"wrote {cfg.payload} ({len(inputs)} images) for POST /invocations")
    tracking.describe_launcher(f"predict-{len(cfg.images)}-images",
                               f"classified with {cfg.model_uri}:\n\n" + "\n".join(f"- {line}" for line in predictions))


def main(argv=None) -> None:
    cli.run("predict", predict, PredictConfig, __doc__, argv)


if __name__ == "__main__":
    main()
