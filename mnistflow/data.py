"""MNIST and Fashion-MNIST as in-memory tensors.

Each split is read once from its IDX files (in torchvision's layout, `<root>/MNIST/raw/...`),
scaled and normalised once, and served as batches by index slicing: no per-sample PIL transforms
in the hot loop. torchvision is loaded only to download files that are not there yet: it takes
seconds to import.
"""
import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterator

import torch

from mnistflow.errors import DataError

DATA_DIR_ENV = "MNISTFLOW_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/mnistflow"


@dataclass(frozen=True)
class Source:
    folder: str               # torchvision's dataset class, and the folder its files are in
    classes: tuple[str, ...]  # as torchvision names them (tests/test_data.py keeps them equal)
    mean: float               # of its training pixels in [0, 1]
    std: float


DATASETS = {
    "mnist": Source("MNIST", ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six",
                              "7 - seven", "8 - eight", "9 - nine"), 0.1307, 0.3081),
    "fashion_mnist": Source("FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                             "Shirt", "Sneaker", "Bag", "Ankle boot"), 0.2860, 0.3530),
}
PREFIXES = {True: "train", False: "t10k"}  # the training and the test split's files
FILES = [f"{prefix}-{kind}" for prefix in PREFIXES.values() for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]


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


def _read(name: str, root: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's (images, labels): uint8 (N, 28, 28) and int64 (N,)."""
    source = DATASETS[name]
    raw = os.path.join(root, source.folder, "raw")
    prefix = PREFIXES[train]
    try:
        if download and not all(os.path.exists(os.path.join(raw, file)) for file in FILES):
            _download(source, root)
        images = _read_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), dimensions=3)
        labels = _read_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), dimensions=1)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
    except Exception as exc:  # OSError, ValueError, and torchvision's RuntimeError, URLError, ...
        how = ("download failed" if download else "not found or unreadable")
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{name} data {how} in {raw} (expected {', '.join(FILES)}; {detail}); "
            f"pass --data_dir or set {DATA_DIR_ENV} to a directory holding {source.folder}/raw/"
        ) from exc
    return images, labels.long()


def _download(source: Source, root: str) -> None:
    """torchvision's download of a dataset's files into `root`, checked against their MD5 sums."""
    from torchvision import datasets

    getattr(datasets, source.folder)(root, download=True)


def _read_idx(path: str, dimensions: int) -> torch.Tensor:
    """An IDX file of unsigned bytes, the format of the MNIST files: a magic number that gives the
    type (8) and the number of dimensions, each dimension's size as a big-endian int32, the bytes."""
    with open(path, "rb") as f:
        content = bytearray(f.read())
    header = 4 + 4 * dimensions
    if content[:4] != bytes([0, 0, 8, dimensions]):
        raise ValueError(f"{os.path.basename(path)} is not an IDX file of {dimensions}-d unsigned bytes")
    shape = struct.unpack(f">{dimensions}I", content[4:header])
    if len(content) != header + math.prod(shape):
        raise ValueError(f"{os.path.basename(path)} holds {len(content) - header} bytes for a {shape} array")
    return torch.frombuffer(content, dtype=torch.uint8, offset=header).view(shape)


def _digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:16]


def _split(all_images: torch.Tensor, all_labels: torch.Tensor, indices: torch.Tensor, mean: float, std: float
           ) -> Split:
    images, labels = all_images[indices], all_labels[indices]
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
    source = DATASETS[name]
    root, download = resolve_data_dir(data_dir)
    train_images, train_labels = _read(name, root, train=True, download=download)
    test_images, test_labels = _read(name, root, train=False, download=download)

    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed))
    if max_train_samples:
        order = order[:max_train_samples]
    n_val = round(val_fraction * len(order))
    if n_val < 1:  # a validation set of nothing, or of one image, would pick the best epoch by chance
        raise DataError(f"val_fraction={val_fraction} of {len(order)} training images holds out none for "
                        f"validation; give at least {1 / len(order):.3g}")
    if n_val >= len(order):
        raise DataError(f"val_fraction={val_fraction} of {len(order)} training images leaves none to train on")
    val_idx, train_idx = order[:n_val], order[n_val:]
    mean, std = source.mean, source.std
    return Data(
        name=name, classes=list(source.classes), mean=mean, std=std, root=root,
        train=_split(train_images, train_labels, train_idx, mean, std),
        val=_split(train_images, train_labels, val_idx, mean, std),
        test=_split(test_images, test_labels, torch.arange(len(test_labels)), mean, std),
    )
