import os

import pytest
import torch

from conftest import make_dataset
from mnistflow import data
from mnistflow.errors import DataError


def test_load_splits_normalises_and_caps(tiny_data):
    d = data.load("mnist", tiny_data, val_fraction=0.1, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (540, 60, 200)
    assert d.train.images.shape == (540, 1, 28, 28) and d.train.images.dtype == torch.float32
    # normalised with MNIST's statistics: a 0 pixel maps to -mean/std
    assert d.train.images.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert d.classes[:2] == ["0 - zero", "1 - one"]

    capped = data.load("mnist", tiny_data, val_fraction=0.25, seed=0, max_train_samples=100)
    assert (len(capped.train), len(capped.val), len(capped.test)) == (75, 25, 200)


@pytest.mark.parametrize("val_fraction, max_train_samples, message", [
    (1e-9, 0, "val_fraction=1e-09 of 600 training images holds out none for validation; give at least 0.00167"),
    (0.1, 4, "val_fraction=0.1 of 4 training images holds out none for validation; give at least 0.25"),
    (0.9995, 0, "val_fraction=0.9995 of 600 training images leaves none to train on"),
])
def test_a_split_with_an_empty_side_is_refused(tiny_data, val_fraction, max_train_samples, message):
    with pytest.raises(DataError) as refused:
        data.load("mnist", tiny_data, val_fraction=val_fraction, max_train_samples=max_train_samples)
    assert str(refused.value) == message
    assert len(data.load("mnist", tiny_data, val_fraction=0.00167).val) == 1  # the fraction it suggests works


def test_split_is_seeded(tiny_data):
    a, b = data.load("mnist", tiny_data, seed=1), data.load("mnist", tiny_data, seed=1)
    c = data.load("mnist", tiny_data, seed=2)
    assert a.val.digest == b.val.digest and torch.equal(a.val.labels, b.val.labels)
    assert a.val.digest != c.val.digest
    assert a.test.digest == c.test.digest  # the test set never depends on the seed
    # train and validation are disjoint and together the whole training file
    assert sorted(a.train.indices.tolist() + a.val.indices.tolist()) == list(range(600))


def test_fashion_mnist_has_its_class_names(tiny_data):
    d = data.load("fashion_mnist", tiny_data)
    assert d.classes[0] == "T-shirt/top" and len(d.classes) == 10


def test_batches_cover_every_image_once(tiny_data):
    split = data.load("mnist", tiny_data).train
    seen = torch.cat([y for _, y in split.batches(64, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(split.labels.tolist())
    ordered = [x for x, _ in split.batches(100)]
    assert [len(x) for x in ordered] == [100] * 5 + [40]
    assert torch.equal(torch.cat(ordered), split.images)


def test_data_dir_from_environment(tiny_data, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, tiny_data)
    assert data.resolve_data_dir("") == (tiny_data, False)
    assert len(data.load("mnist").test) == 200
    monkeypatch.delenv(data.DATA_DIR_ENV)
    root, download = data.resolve_data_dir("")
    assert download and root == os.path.expanduser(data.DEFAULT_DATA_DIR)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        data.load("mnist", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and data.DATA_DIR_ENV in message
    assert "\n" not in message


def test_corrupt_file_is_reported(tmp_path):
    make_dataset(str(tmp_path))
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated download
    with pytest.raises(DataError, match="not found or unreadable"):
        data.load("mnist", str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; choose from mnist, fashion_mnist"):
        data.load("cifar")


@pytest.mark.parametrize("name", data.DATASETS)
def test_files_on_disk_are_read_as_torchvision_reads_them(tiny_data, name):
    # data.py reads the IDX files itself (torchvision takes seconds to import) and loads
    # torchvision only to download: the same pixels, labels and class names either way.
    from torchvision import datasets

    source = data.DATASETS[name]
    theirs = getattr(datasets, source.folder)(tiny_data, train=False)
    images, labels = data._read(name, tiny_data, train=False, download=False)
    assert torch.equal(images, theirs.data) and torch.equal(labels, theirs.targets)
    assert list(source.classes) == theirs.classes
