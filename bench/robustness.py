"""How well do models hold up on pictures unlike their test set? One accuracy per condition.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python bench/robustness.py [--model_uri models:/MNIST_CNN@production]
        [--model_uri runs:/<run_id>/model ...] [--n 2000] [--seed 0] [--data_dir ../shared/data] [--plot conditions.png]

Scores each model on the same seeded test images of its dataset, transformed the way real
inputs differ (low resolution, stroke width, rotation, shear, placement, proportions, photos of
dark ink on paper...), each picture going through the preprocessing `predict` gives a user's file
(see mnistflow/robustness.py). Prints one table: a row per condition, a column per model
(accuracy %), and the worst condition of each. `--plot` draws one test image under every
condition, as the user's picture and as the model's input. Models are given in one run so that
they are compared on the very same pictures; they must share a dataset.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import datetime
import socket
import sys
import time
from typing import NoReturn

from mnistflow import data as datasets
from mnistflow import logged_model, plots, robustness
from mnistflow.errors import DataError, ModelError, OutputError
from mnistflow.flags import OneLineParser, parse_bool, unwritable_image

import picture_flags  # bench/picture_flags.py

DEFAULT_MODEL = "models:/MNIST_CNN@production"


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="robustness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_uri", "--model-uri", dest="model_uris", action="append", default=[],
                        help=f"a model to score; give it again for more (default {DEFAULT_MODEL})")
    picture_flags.add(parser, 2000, "test images per condition")
    parser.add_argument("--plot", default="", help="write a PNG of one test image under every condition")
    parser.add_argument(f"--{logged_model.PICKLED_FLAG}", type=parse_bool, default=False,
                        help="load models mnistflow did not log (they may run code on load)")
    args = parser.parse_args(argv)
    args.model_uris = args.model_uris or [DEFAULT_MODEL]
    picture_flags.check(parser, args)
    if unwritable_image(args.plot):
        parser.error(f"--plot {args.plot}: cannot write this file ({unwritable_image(args.plot)})")
    return args


def load_models(args: argparse.Namespace) -> tuple[dict, str]:
    """URI -> loaded model, and the dataset they were all trained on."""
    models, trained_on = {}, {}
    for uri in args.model_uris:
        models[uri] = logged_model.load(uri, args.allow_pickled_models)
        trained_on[uri] = logged_model.dataset_for(models[uri], uri)
    if len(set(trained_on.values())) > 1:
        raise ModelError("the models were trained on different datasets ("
                         + ", ".join(f"{uri}: {name}" for uri, name in trained_on.items())
                         + "); score them in separate runs")
    return models, trained_on[args.model_uris[0]]


def table(results: dict, dataset: str) -> str:
    """A row per condition, a column per model, accuracies in %, then each model's worst condition."""
    uris = list(results)
    width = max(10, *(len(uri) + 2 for uri in uris))
    rows = [f"{'condition':<14}" + "".join(f"{uri:>{width}}" for uri in uris)]
    for condition in robustness.conditions_for(dataset):
        rows.append(f"{condition:<14}" + "".join(f"{100 * results[uri][condition]:>{width}.1f}" for uri in uris))
    worst = [robustness.worst(results[uri]) for uri in uris]
    rows.append(f"{'worst':<14}" + "".join(f"{f'{100 * accuracy:.1f} {name}':>{width}}" for name, accuracy in worst))
    return "\n".join(rows)


def refuse(exc: Exception) -> NoReturn:
    print(f"robustness: error: {exc}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        models, dataset = load_models(args)
        data = datasets.load(dataset, args.data_dir)
    except (ModelError, DataError) as exc:
        refuse(exc)
    start = time.perf_counter()
    results = {uri: robustness.scores(model, data, args.n, args.seed) for uri, model in models.items()}
    took = time.perf_counter() - start
    count = len(robustness.chosen(data, args.n, args.seed))
    print(f"robustness of {dataset} models on {count} test images per condition (seed {args.seed}), "
          f"{socket.gethostname()}, {datetime.date.today().isoformat()}; {took:.1f} s\n")
    print(table(results, dataset))
    if args.plot:
        figure = plots.conditions(robustness.examples(data, args.seed),
                                  f"{dataset}: one test image under each condition (seed {args.seed})")
        try:
            plots.save(figure, args.plot)
        except OutputError as exc:
            refuse(exc)
        finally:
            plots.close(figure)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
