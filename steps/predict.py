"""The `predict` step: read the digits (or the garment) in image files with a logged or registered model.

    python -m steps.predict --images a.png b.jpg                 # with MNIST_CNN@production
    python -m steps.predict --model_uri runs:/<run_id>/model --images a.png --plot predictions.png
    python -m steps.predict --images a.png --payload payload.json
    mlflow run . -e predict -P images="a.png b.png" --env-manager local

Images of any size, colour or polarity are first brought to the MNIST convention (see
mnistflow/images.py); a number's digits are read left to right (mnistflow/reading.py), and a
digit the model is unsure of is answered "unsure". `--payload` writes what the model saw as the
JSON body `mlflow models serve` takes.
Only models mnistflow logs are loaded unless --allow_pickled_models true (see mnistflow/logged_model.py).
"""
import json
import os

from mnistflow import cli
from mnistflow.config import PredictConfig
from mnistflow.errors import ImageError, OutputError


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

    from mnistflow import images, logged_model, plots, reading, tracking

    # A picture that cannot be read or shows no digit gets its own line; the others are answered.
    originals, unanswered = images.each(lambda path, _: images.read(path), dict.fromkeys(cfg.images))
    if not originals:
        raise ImageError(next(iter(unanswered.values())))
    model = logged_model.load(cfg.model_uri, cfg.allow_pickled_models)
    inks, blank = images.each(lambda path, image: images.ink_of(image, path), originals)
    unanswered.update(blank)
    # Made as the model's training images were: digits into 20x20 at full brightness, garments filling the field.
    found = dict(zip(inks, reading.read(model, list(inks.values()), logged_model.trained_on(model) or "mnist",
                                        cfg.one_digit))) if inks else {}
    classes = logged_model.class_names(model)
    lines = {path: f"{why} (not answered)" for path, why in unanswered.items()}
    lines.update({path: f"{path}: {read.describe(classes, cfg.top, cfg.abstain)}" for path, read in found.items()})
    predictions = [lines[path] for path in cfg.images]
    print("\n".join(predictions), flush=True)
    if cfg.plot and found:
        figure = plots.predictions([originals[path] for path in found], list(found.values()), classes,
                                   [os.path.basename(path) for path in found], cfg.abstain)
        try:
            plots.save(figure, cfg.plot)
        finally:
            plots.close(figure)
        print(f"wrote {cfg.plot}")
    if cfg.payload and found:
        inputs = np.concatenate([read.inputs for read in found.values()])[:, None]
        write_payload(cfg.payload, inputs)
        print(f"wrote {cfg.payload} ({len(inputs)} images) for POST /invocations")
    tracking.describe_launcher(f"predict-{len(cfg.images)}-images",
                               f"classified with {cfg.model_uri}:\n\n" + "\n".join(f"- {line}" for line in predictions))
    if unanswered:
        raise ImageError(f"{len(unanswered)} of {len(lines)} pictures not answered: {', '.join(unanswered)}")


def main(argv=None) -> None:
    cli.run("predict", predict, PredictConfig, __doc__, argv)


if __name__ == "__main__":
    main()
