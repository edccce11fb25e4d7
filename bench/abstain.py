"""When does predict answer "unsure"? Digits withheld and non-digits caught, at the model's threshold.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python bench/abstain.py [--model_uri models:/MNIST_CNN@production]
        [--n 1000] [--seed 0] [--data_dir ../shared/data]

The threshold a model is logged with (logged_model.ABSTAIN_KEY) is the ABSTAIN_SHARE quantile of
its confidence on its validation pictures. This bench reads pictures as predict does (as numbers;
a picture is withheld when any digit read in it is below the threshold) and counts, at that
threshold and at the quantiles around it (from the model's reference.csv, the same validation
pictures): the MNIST test digits withheld (and of the wrong answers, how many), and the
non-digits caught: Fashion-MNIST test pictures, pages of noise,
letters in the fonts Matplotlib ships (less those shaped like a digit: O, I, l, S, Z, B, G, b, g,
q), and blank pages (predict finds no digit on those before the model is asked).
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import datetime
import os
import socket
import sys

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mnistflow import data as datasets
from mnistflow import images, logged_model, reading, robustness
from mnistflow.errors import DataError, ImageError, ModelError
from mnistflow.flags import OneLineParser

import picture_flags  # bench/picture_flags.py

DEFAULT_MODEL = "models:/MNIST_CNN@production"
SHARES = (0.005, 0.01, 0.02, 0.05)  # validation quantiles compared with the model's own
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf", "cmr10.ttf",
         "STIXGeneral.ttf")
LETTERS = "ACDEFHJKLMNPRTUVWXYacdefhijkmnprtuvwxy"  # no O I l S Z B G b g q: those can be digits


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="abstain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_uri", "--model-uri", default=DEFAULT_MODEL)
    picture_flags.add(parser, 1000, "pictures of each kind")
    args = parser.parse_args(argv)
    picture_flags.check(parser, args)
    return args


def letters(n: int) -> list[Image.Image]:
    """Up to n letters, dark on white 84x84 pages, in Matplotlib's fonts."""
    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    pages = []
    for name in FONTS:
        font = ImageFont.truetype(os.path.join(folder, name), 60)
        for letter in LETTERS:
            page = Image.new("L", (84, 84), 255)
            ImageDraw.Draw(page).text((42, 42), letter, fill=0, font=font, anchor="mm")
            pages.append(page)
    return pages[:n]


def kinds(args, mnist: datasets.Data, fashion: datasets.Data) -> dict[str, list[Image.Image]]:
    rng = np.random.default_rng(args.seed)
    digits, _ = robustness.pictures(mnist, "clean_png", args.n, args.seed)
    garments, _ = robustness.pictures(fashion, "clean_png", args.n, args.seed)
    return {
        "MNIST test digits": digits,
        "Fashion-MNIST test pictures": garments,
        "noise pages": [robustness.picture(rng.random((84, 84))) for _ in range(args.n)],
        "letters": letters(args.n),
        "blank pages": [robustness.picture(np.full((84, 84), 0.9) + rng.normal(0, 0.01, (84, 84)))
                        for _ in range(args.n)],
    }


def read(model, pictures: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(the lowest confidence of its digits, the number read) of each picture as predict reads it;
    (0, "") where it finds no digit."""
    inks, _ = images.each(lambda i, picture: images.ink_of(picture), dict(enumerate(pictures)))
    found = dict(zip(inks, reading.read(model, list(inks.values())))) if inks else {}
    return (np.array([found[i].probabilities.max(1).min() if i in found else 0.0 for i in range(len(pictures))]),
            np.array([found[i].number(abstain=False) if i in found else "" for i in range(len(pictures))]))


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        model = logged_model.load(args.model_uri)
        logged_model.dataset_for(model, args.model_uri, "mnist")
        mnist, fashion = datasets.load("mnist", args.data_dir), datasets.load("fashion_mnist", args.data_dir)
        reference = logged_model.reference_of(args.model_uri)
    except (ModelError, DataError, ImageError) as exc:
        print(f"abstain: error: {exc}", file=sys.stderr)
        sys.exit(2)
    own = logged_model.abstain_threshold(model)
    if not own or reference is None:
        print(f"abstain: error: model {args.model_uri!r} was logged without an abstain threshold or a reference; "
              "log it again (train it) with this version of mnistflow", file=sys.stderr)
        sys.exit(2)
    thresholds = {f"{100 * share:g} % of validation": float(np.quantile(reference["confidence"], share))
                  for share in SHARES}
    thresholds[f"the model's ({100 * logged_model.ABSTAIN_SHARE:g} %)"] = own
    readings = {f"{kind} ({len(pictures)})": read(model, pictures)
                for kind, pictures in kinds(args, mnist, fashion).items()}
    (digits, answered), *_ = readings.values()  # the first kind: MNIST test digits
    wrong = answered != mnist.test.labels[robustness.chosen(mnist, args.n, args.seed)].numpy().astype(str)
    measured = {kind: confidences for kind, (confidences, _) in readings.items()}
    print(f"abstaining by {args.model_uri}, {args.n} pictures per kind (seed {args.seed}), "
          f"{socket.gethostname()}, {datetime.date.today().isoformat()}\n")
    print("| threshold | confidence | " + " | ".join(measured) + " | wrong digits withheld |")
    print("| --- " * (len(measured) + 3) + "|")
    for name, threshold in thresholds.items():
        shares = [f"{100 * np.mean(values < threshold):.1f} %" for values in measured.values()]
        caught = np.mean(digits[wrong] < threshold) if wrong.any() else float("nan")
        print(f"| {name} | {threshold:.3f} | " + " | ".join(shares) + f" | {100 * caught:.0f} % of {wrong.sum()} |")


if __name__ == "__main__":
    main()
