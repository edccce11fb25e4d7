"""The `predict` step: classify image files with a logged or registered model.

    python -m steps.predict --model models:/MNIST_CNN@production --image a.png b.jpg
    python -m steps.predict --image a.png --plot predictions.png --payload payload.json
    mlflow run . -e predict -P images="a.png b.png" --env-manager local

Images of any size, colour or polarity are first brought to the MNIST convention (see
mnistflow/images.py). `--payload` writes them as the JSON body `mlflow models serve` takes.
Only models mnistflow logs are loaded unless --allow_pickled_models true (see mnistflow/inference.py).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

from mnistflow import auth, images, inference, plots
from mnistflow.config import ConfigError, OneLineParser, parse_bool


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/MNIST_CNN@production", help="any MLflow model URI")
    parser.add_argument("--image", nargs="+", required=True, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top", type=int, default=3, help="how many classes to show per image")
    parser.add_argument("--plot", default="", help="write a PNG of each image, its 28x28 input and its scores")
    parser.add_argument("--payload", default="", help="write the inputs as a JSON body for /invocations")
    parser.add_argument(f"--{inference.PICKLED_FLAG}", type=parse_bool, default=False,
                        help="load models mnistflow did not log (they may run code on load)")
    args = parser.parse_args(argv)
    # `mlflow run -P images="a.png b.png"` passes one argument; split those that name no file.
    args.image = [path for arg in args.image for path in ([arg] if os.path.exists(arg) else arg.split())]
    if not args.image:
        parser.error("--image: give at least one image file")
    if not 1 <= args.top <= 10:
        parser.error(f"--top {args.top} is not allowed; it must be in 1..10")
    for flag in ("plot", "payload"):  # before any work, so that nothing is done for an output that cannot be written
        reason = unwritable(getattr(args, flag))
        if reason:
            parser.error(f"--{flag} {getattr(args, flag)}: cannot write this file ({reason})")
    return args


def unwritable(path: str) -> str:
    """Why no file can be written at `path` ("" when it can, or when no path is given); leaves nothing behind."""
    if not path:
        return ""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a folder"
    if not os.path.isdir(folder):
        return f"no folder {folder}"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is read-only"
    try:
        tempfile.TemporaryFile(dir=folder).close()  # what the folder allows, even to root on a read-only disk
    except OSError as exc:
        return f"{folder}: {exc.strerror}"
    return ""


def class_names(model) -> list[str]:
    # Models logged by mnistflow carry their class names; others are shown by index.
    metadata = model.metadata.metadata or {}
    return metadata.get("classes") or [str(i) for i in range(10)]


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        originals = [images.read(path) for path in args.image]
        inputs = np.stack([images.to_mnist(image, path) for image, path in zip(originals, args.image)])[:, None]
        auth.check_access()
        model = inference.load(args.model, args.allow_pickled_models)
    except (images.ImageError, ConfigError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        sys.exit(2)

    probs = inference.probabilities(model, inputs)
    names = class_names(model)
    for path, p in zip(args.image, probs):
        top = np.argsort(p)[::-1][:args.top]
        print(f"{path}: {names[top[0]]}  (" + ", ".join(f"{names[k]} {p[k]:.4f}" for k in top) + ")", flush=True)
    if args.plot:
        figure = plots.predictions(originals, inputs, probs, names, [os.path.basename(p) for p in args.image])
        figure.savefig(args.plot, dpi=100)
        plots.close(figure)
        print(f"wrote {args.plot}")
    if args.payload:
        with open(args.payload, "w") as f:
            json.dump({"inputs": inputs.round(4).tolist()}, f)
        print(f"wrote {args.payload} ({len(inputs)} images) for POST /invocations")


if __name__ == "__main__":
    main()
