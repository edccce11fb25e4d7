"""MNIST and Fashion-MNIST as in-memory tensors.

Each split is read once through torchvision, scaled and normalised once, and served as
batches by index slicing: no per-sample PIL transforms in the hot loop.
"""
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torchvision import datasets

from mnistflow.errors import DataError

DATA_DIR_ENV = "MNISTFLOW_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/mnistflow"

# name -> (torchvision dataset class, mean and std of its training pixels in [0, 1])
DATASETS = {
    "mnist": (datasets.MNIST, 0.1307, 0.3081),
    "fashion_mnist": (datasets.FashionMNIST, 0.2860, 0.3530),
}


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, 28, 28) float32, normalised
    labels: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # positions of these images in the official train or test file
    digest: str           # of the raw uint8 pixels and labels, to tell data versions apart

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) batches, shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, batch_size):
            if order is None:
                yield self.images[start:start + batch_size], self.labels[start:start + batch_size]
            else:
                idx = order[start:start + batch_size]
                yield self.images[idx], self.labels[idx]


@dataclass
class Data:
    name: str
    classes: list[str]
    mean: float
    std: float
    root: str  # the directory the files were read from
    train: Split
    val: Split
    test: Split

    def pixels(self, split: Split) -> torch.Tensor:
        """A split's images as [0, 1] pixels: what a logged (servable) model takes."""
        return split.images * self.std + self.mean


def resolve_data_dir(data_dir: str = "") -> tuple[str, bool]:
    """(root, download): an explicit or $MNISTFLOW_DATA_DIR directory is used offline as is;
    otherwise torchvision downloads into the default cache directory."""
    given = data_dir or os.environ.get(DATA_DIR_ENV, "")
    if given:
        return os.path.abspath(os.path.expanduser(given)), False
    return os.path.expanduser(DEFAULT_DATA_DIR), True


def _read(name: str, root: str, train: bool, download: bool):
    cls = DATASETS[name][0]
    raw = os.path.join(root, cls.__name__, "raw")
    files = ", ".join(os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources)
    try:
        return cls(root, train=train, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, ValueError, URLError, ...
        how = ("download failed" if download else "not found or unreadable")
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{name} data {how} in {raw} (expected {files}; {detail}); "
            f"pass --data_dir or set {DATA_DIR_ENV} to a directory holding {cls.__name__}/raw/"
        ) from exc


def _digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:16]


def _split(source, indices: torch.Tensor, mean: float, std: float) -> Split:
    images, labels = source.data[indices], source.targets[indices]
    normalised = ((images.float() / 255.0 - mean) / std).unsqueeze(1).contiguous()
    return Split(normalised, labels.long(), indices, _digest(images, labels))


def load(name: str, data_dir: str = "", val_fraction: float = 0.1, seed: int = 0,
         max_train_samples: int = 0) -> Data:
    """Read a dataset and split its official training set into train/validation.

    The split is a seeded permutation, so the same seed always holds out the same images.
    `max_train_samples` caps the training pool before the split (for smoke runs); the test
    set always stays whole, since it is only used for final metrics.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    _, mean, std = DATASETS[name]
    root, download = resolve_data_dir(data_dir)
    train_set = _read(name, root, train=True, download=download)
    test_set = _read(name, root, train=False, download=download)

    order = torch.randperm(len(train_set.targets), generator=torch.Generator().manual_seed(seed))
    if max_train_samples:
        order = order[:max_train_samples]
    n_val = round(val_fraction * len(order))
    if n_val < 1:  # a validation set of nothing, or of one image, would pick the best epoch by chance
        raise DataError(f"val_fraction={val_fraction} of {len(order)} training images holds out none for "
                        f"validation; give at least {1 / len(order):.3g}")
    if n_val >= len(order):
        raise DataError(f"val_fraction={val_fraction} of {len(order)} training images leaves none to train on")
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Data(
        name=name, classes=list(train_set.classes), mean=mean, std=std, root=root,
        train=_split(train_set, train_idx, mean, std),
        val=_split(train_set, val_idx, mean, std),
        test=_split(test_set, torch.arange(len(test_set.targets)), mean, std),
    )
