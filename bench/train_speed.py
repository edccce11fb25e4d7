"""How fast is the train step, and what do the in-memory pipeline and tracking cost?

    python bench/train_speed.py --data_dir ../shared/data [--repeats 5] [--train_samples 20000]

Prints one table of medians, measured side by side (interleaved) in one run:
  1. epoch time (its training passes) of mnistflow's in-memory tensor pipeline vs. a torchvision
     DataLoader with ToTensor/Normalize on the same model and loop (goal: ratio <= 0.5), for the
     `baseline` net, whose epoch is mostly data handling, and for the default
     net, whose epoch is mostly convolutions. A third source, one ready batch reused for every
     step, costs no data handling at all: its epoch is the model's own work, the floor under any
     pipeline, so floor / DataLoader is the best ratio that any data pipeline could reach;
  2. wall time of a training run of the default net with MLflow tracking on (run start and end,
     async metrics, checkpoints, system metrics as the train step samples them) vs. off (goal <= 1.05);
  3. epoch time (its training passes) of the default net with each `--augment` setting against
     `shift` alone, the cheapest one (goal <= 1.10).
All run the real `fit` loop; only the source of batches, the logging callbacks or the
augmentation differ.
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import mlflow
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets as torchvision_datasets, transforms

from mnistflow import checkpoints, models, tracking
from mnistflow import data as datasets
from mnistflow.config import AUTO, TrainConfig
from mnistflow.errors import ConfigError, DataError
from mnistflow.flags import OneLineParser
from mnistflow.train import fit, seed_everything


class DataLoaderSplit:
    """The same training images, served the classic way: PIL image -> ToTensor -> Normalize per sample."""

    def __init__(self, cfg: TrainConfig, data: datasets.Data, indices: torch.Tensor):
        source = datasets.DATASETS[cfg.dataset]
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((source.mean,), (source.std,))])
        torchvision_class = getattr(torchvision_datasets, source.folder)
        dataset = torchvision_class(data.root, train=True, download=False, transform=transform)
        self.subset = Subset(dataset, indices.tolist())

    def __len__(self):
        return len(self.subset)

    def batches(self, batch_size, generator=None):
        return iter(DataLoader(self.subset, batch_size=batch_size, shuffle=True, generator=generator))


class ReusedBatchSplit:
    """No data handling: the split's first batch, ready in memory, served again for every step."""

    def __init__(self, split: datasets.Split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def batches(self, batch_size, generator=None):
        images, labels = self.split.images[:batch_size], self.split.labels[:batch_size]
        for start in range(0, len(self), batch_size):
            size = min(batch_size, len(self) - start)  # the same batch sizes as a real epoch
            yield images[:size], labels[:size]


def train_once(cfg, data, log_metrics=lambda metrics, step: None, save_checkpoint=None) -> tuple[float, float]:
    """(wall time of fit, seconds of its training passes alone, without validation)."""
    seed_everything(cfg.seed, cfg.deterministic)
    net = models.build(cfg.model, cfg.mirror)
    start = time.perf_counter()
    state = fit(cfg, net, data, torch.device("cpu"), log_metrics=log_metrics, save_checkpoint=save_checkpoint)
    wall = time.perf_counter() - start
    return wall, sum(len(data.train) / epoch["images_per_s"] for epoch in state["history"])


def tracked_once(cfg, data) -> float:
    """Wall time of the same training inside an MLflow run: async metrics, checkpoints, system metrics."""
    start = time.perf_counter()
    with tracking.tracked_run(run_name=f"bench-tracked-{cfg.model}", log_system_metrics=True) as (_, log_metrics), \
            tempfile.TemporaryDirectory() as tmp:
        train_once(cfg, data, log_metrics, checkpoints.saver(tmp))
    return time.perf_counter() - start


def main():
    parser = OneLineParser(prog="train_speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--pipeline_models", default=f"baseline,{AUTO['mnist']['model']}",
                        help="comma-separated nets to compare the two pipelines on")
    parser.add_argument("--augment", action="append", default=[],
                        help="an augment setting to time against shift (repeatable; default: MNIST's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train_samples", type=int, default=20000,
                        help="images per measured epoch (a slice of the training set keeps the bench short; 0 = all)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is not allowed; it must be >= 1")
    if args.train_samples < 0:
        parser.error(f"--train_samples {args.train_samples} is not allowed; it must be >= 0 (0 = all)")

    pipeline_models = args.pipeline_models.split(",")
    unknown = [name for name in pipeline_models if name not in models.MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} in --pipeline_models; choose from {', '.join(models.MODELS)}")

    augments = ["shift", *dict.fromkeys(args.augment or [AUTO["mnist"]["augment"]])]
    for augment in augments:
        try:
            TrainConfig(augment=augment).validate()
        except ConfigError as exc:
            parser.error(str(exc))

    # augment none: the DataLoader reference serves the images as they are, so the pipeline does too.
    cfg = TrainConfig(epochs=1, data_dir=args.data_dir, max_train_samples=args.train_samples, log_every=50,
                      augment="none").validate()
    try:
        data = datasets.load(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_train_samples)
    except DataError as exc:
        parser.error(str(exc))
    sources = {
        "in-memory tensors": data,
        "DataLoader + ToTensor": dataclasses.replace(data, train=DataLoaderSplit(cfg, data, data.train.indices)),
        "one reused batch (floor)": dataclasses.replace(data, train=ReusedBatchSplit(data.train)),
    }

    tmp = tempfile.mkdtemp()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/bench.db")
    mlflow.set_experiment("bench")

    # Pipelines: the training passes of one epoch (validation is the same for both).
    # Tracking: the whole run, start to end, with and without MLflow.
    times = {}
    for r in range(args.repeats):  # interleaved, so drift in machine load hits every measure alike
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        # Every other repeat runs the sources in reverse, so no source always follows the same one.
        order = list(sources) if r % 2 == 0 else list(reversed(sources))
        for name in pipeline_models:
            net_cfg = dataclasses.replace(cfg, model=name)
            for source in order:
                times.setdefault(f"{name}: {source}", []).append(train_once(net_cfg, sources[source])[1])
        times.setdefault(f"{cfg.model}: tracking off", []).append(train_once(cfg, data)[0])
        times.setdefault(f"{cfg.model}: tracking on", []).append(tracked_once(cfg, data))
        for augment in augments if r % 2 == 0 else reversed(augments):
            times.setdefault(f"{cfg.model}: augment {augment}", []).append(
                train_once(dataclasses.replace(cfg, augment=augment), data)[1])

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{len(data.train)} training images per epoch, batch {cfg.batch_size}, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats}\n")
    print(f"{'measure':<38}{'median s':>10}   runs s")
    for name, values in times.items():
        print(f"{name:<38}{median[name]:>10.2f}   {'  '.join(f'{v:.2f}' for v in values)}")
    print(f"\n{'ratio':<38}{'value':>10}{'goal':>10}")
    for name in pipeline_models:
        reference = median[f"{name}: DataLoader + ToTensor"]
        ratio = median[f"{name}: in-memory tensors"] / reference
        floor = median[f"{name}: one reused batch (floor)"] / reference
        print(f"{f'{name}: pipeline / DataLoader epoch':<38}{ratio:>10.2f}{'<= 0.50':>10}")
        print(f"{f'{name}: floor / DataLoader epoch':<38}{floor:>10.2f}{'(best any pipeline can reach)':>31}")
    overhead = median[f"{cfg.model}: tracking on"] / median[f"{cfg.model}: tracking off"]
    print(f"{f'{cfg.model}: tracking on / off':<38}{overhead:>10.3f}{'<= 1.05':>10}")
    for augment in augments[1:]:
        ratio = median[f"{cfg.model}: augment {augment}"] / median[f"{cfg.model}: augment shift"]
        name = f"{cfg.model}: augment {augment} / shift epoch"
        print(f"{name:<38}{ratio:>10.3f}{'<= 1.10':>10}" if len(name) <= 38 else f"{name}\n{'':<38}{ratio:>10.3f}{'<= 1.10':>10}")


if __name__ == "__main__":
    main()
