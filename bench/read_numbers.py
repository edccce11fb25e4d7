"""How well does predict read numbers? Whole-number accuracy on numbers composed from MNIST test digits.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python bench/read_numbers.py [--model_uri models:/MNIST_CNN@production]
        [--n 500] [--seed 0] [--data_dir ../shared/data]

Each number is 2 to 6 test digits side by side, as a hand writes them: the same height, a row or
two up or down, and between two digits a gap drawn from how people space them (`spaced`: 2 to 6
pixels of a 28x28 digit), or strokes that touch (`touching`: bounding boxes 1 to 2 pixels into
each other) or overlap (`overlapping`: 3 to 5). The number is drawn in dark ink on a light page
as a PNG would hold it and read as the predict step reads it (mnistflow/reading.py). Prints the
share of numbers read exactly, per length and spacing, and the share of single test digits read
as one digit (a cut into two is a wrong number).
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import datetime
import socket
import sys
import time

import numpy as np
from PIL import Image

from mnistflow import data as datasets
from mnistflow import images, logged_model, reading, robustness
from mnistflow.errors import DataError, ModelError
from mnistflow.flags import OneLineParser

import picture_flags  # bench/picture_flags.py

DEFAULT_MODEL = "models:/MNIST_CNN@production"
LENGTHS = range(2, 7)


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="read_numbers", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_uri", "--model-uri", default=DEFAULT_MODEL)
    picture_flags.add(parser, 500, "numbers per length and spacing")
    args = parser.parse_args(argv)
    picture_flags.check(parser, args)
    return args


def read_numbers(model, pictures: list[Image.Image]) -> list[str]:
    """What the predict step reads in each picture, without abstaining: the digits it found."""
    return [found.number(abstain=False) for found in reading.read(model, [images.ink_of(p) for p in pictures])]


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        model = logged_model.load(args.model_uri)
        dataset = logged_model.dataset_for(model, args.model_uri, "mnist")
        data = datasets.load(dataset, args.data_dir)
    except (ModelError, DataError) as exc:
        print(f"read_numbers: error: {exc}", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    results = {}
    for spacing in robustness.GAPS:
        for length in LENGTHS:
            made = robustness.numbers(data, length, spacing, args.n, args.seed)
            read = read_numbers(model, [picture for picture, _ in made])
            results[spacing, length] = np.mean([got == truth for got, (_, truth) in zip(read, made)])
    which = np.random.default_rng(args.seed).choice(len(data.test), size=min(args.n * 4, len(data.test)), replace=False)
    singles = [Image.fromarray(np.round(digit * 255).astype(np.uint8))
               for digit in data.pixels(data.test).numpy()[which, 0]]
    one = np.mean([len(found) == 1 for found in read_numbers(model, singles)])
    print(f"numbers read by {args.model_uri}, {args.n} per length and spacing (seed {args.seed}), "
          f"{socket.gethostname()}, {datetime.date.today().isoformat()}; {time.perf_counter() - start:.1f} s\n")
    print(f"{'digits':<8}" + "".join(f"{spacing:>13}" for spacing in robustness.GAPS))
    for length in LENGTHS:
        print(f"{length:<8}" + "".join(f"{100 * results[spacing, length]:>12.1f}%" for spacing in robustness.GAPS))
    print(f"\nsingle test digits read as one digit: {100 * one:.1f}% of {len(singles)}")


if __name__ == "__main__":
    main()
