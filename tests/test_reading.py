"""Reading numbers and answering "unsure" (mnistflow/reading.py), with a model trained on the real
MNIST files: in the reading itself, through the predict step, and in bench/read_numbers.py and
bench/abstain.py."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, python_step, registry_of, run_step, steps_in_this_process
from mnistflow import data as datasets
from mnistflow import images, logged_model, reading
from mnistflow.robustness import compose, numbers
from test_serve import REAL_DATA, require_real_mnist


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(its runs:/ URI, the loaded model, the store's URI, MNIST) of a 1-epoch model of 10,000 real MNIST pictures."""
    require_real_mnist()
    root = tmp_path_factory.mktemp("reading")
    uri, [run] = registry_of(root, [(REAL_DATA, "10000")], [])
    with steps_in_this_process(uri):
        loaded = logged_model.load(f"runs:/{run}/model")
    return f"runs:/{run}/model", loaded, uri, datasets.load("mnist", REAL_DATA)


def read(loaded, pictures, **kwargs) -> list[reading.Reading]:
    return reading.read(loaded, [images.ink_of(picture) for picture in pictures], **kwargs)


def test_the_abstain_threshold_is_chosen_on_validation_and_logged_with_the_model(model):
    uri, loaded, store, _ = model
    with steps_in_this_process(store):
        reference = logged_model.reference_of(uri)
    threshold = logged_model.abstain_threshold(loaded)
    assert threshold == round(float(np.quantile(reference["confidence"], logged_model.ABSTAIN_SHARE)), 4)
    assert 0.3 < threshold < 1
    assert (loaded.metadata.metadata or {})[logged_model.ABSTAIN_KEY] == threshold  # in the MLmodel file
    assert np.mean(reference["confidence"] < threshold) == pytest.approx(logged_model.ABSTAIN_SHARE, abs=0.005)


def test_digits_written_apart_are_read_left_to_right_and_single_digits_stay_whole(model):
    _, loaded, _, mnist = model
    made = numbers(mnist, 3, "spaced", 40, seed=1)
    found = read(loaded, [picture for picture, _ in made])
    assert all(len(one.probabilities) == 3 for one in found)
    assert sum(one.number(abstain=False) == truth for one, (_, truth) in zip(found, made)) >= 34
    singles = [Image.fromarray(np.round(255 * (1 - digit)).astype(np.uint8)) for digit in
               mnist.pixels(mnist.test).numpy()[:200, 0]]
    assert sum(len(one.probabilities) == 1 for one in read(loaded, singles)) >= 197
    # With one_digit, a number is read whole, as before: one answer.
    assert [len(one.probabilities) for one in read(loaded, [made[0][0]], one_digit=True)] == [1]


def test_digits_that_touch_are_cut_apart(model, monkeypatch):
    _, loaded, _, mnist = model
    made = numbers(mnist, 2, "touching", 40, seed=1)
    right = sum(one.number(abstain=False) == truth for one, (_, truth) in zip(read(loaded, [p for p, _ in made]), made))
    monkeypatch.setattr(reading, "WIDE", np.inf)  # no cuts: each stroke read whole
    uncut = sum(one.number(abstain=False) == truth for one, (_, truth) in zip(read(loaded, [p for p, _ in made]), made))
    assert right >= 24 and right >= uncut + 10, (right, uncut)


def test_a_detached_bar_joins_its_digit_and_specks_and_garments_are_not_cut_into_digits(model):
    _, loaded, _, _ = model
    five = np.zeros((40, 30), dtype=np.float32)
    five[4:7, 8:26] = 1            # the bar, apart from the body
    five[9:22, 8:11] = 1           # the body: down, ...
    five[19:22, 8:24] = five[19:36, 21:24] = five[33:36, 6:24] = 1
    five[38, 1] = 1                # a speck
    assert len(reading.strokes(five)) == 1
    assert reading.cut_points(np.full((30, 90), 0.5), 30) == []  # never across a filled shape
    # Slices of a shoe or a bag read as 1s; a garment is one thing, read whole (and mostly "unsure").
    fashion = datasets.load("fashion_mnist", REAL_DATA)
    garments = [Image.fromarray(np.round(255 * (1 - pixels)).astype(np.uint8))
                for pixels in fashion.pixels(fashion.test).numpy()[:50, 0]]
    assert sum(len(found.probabilities) > 1 for found in read(loaded, garments)) <= 2


def test_unsure_digits_are_marked_and_the_best_guess_is_kept_on_request():
    confident, doubtful = np.eye(10)[4] * 0.9 + 0.01, np.eye(10)[7] * 0.3 + 0.07
    classes = [f"{k} - k{k}" for k in range(10)]
    number = reading.Reading(np.stack([confident, doubtful, confident]), np.zeros((3, 28, 28)), abstain_below=0.5)
    assert number.unsure and number.number() == "4?4" and number.number(abstain=False) == "474"
    assert number.describe(classes) == "4?4 (unsure)  (4 0.9100, 7 0.3700, 4 0.9100)"
    assert number.describe(classes, abstain=False) == "474  (4 0.9100, 7 0.3700, 4 0.9100)"
    digit = reading.Reading(doubtful[None], np.zeros((1, 28, 28)), abstain_below=0.5)
    assert digit.describe(classes, top=2).startswith("unsure  (7 - k7 0.3700, ")
    assert digit.answer(classes, abstain=False) == "7 - k7"
    nothing_sure = reading.Reading(np.stack([doubtful, doubtful]), np.zeros((2, 28, 28)), abstain_below=0.5)
    assert nothing_sure.answer(classes) == "unsure" and nothing_sure.number() == "??"
    never = reading.Reading(doubtful[None], np.zeros((1, 28, 28)), abstain_below=0.0)  # logged without a threshold
    assert not never.unsure and never.answer(classes) == "7 - k7"


def mixed_folder(folder, mnist: datasets.Data) -> dict[str, str]:
    """A user's folder of pictures: a digit, numbers, a garment-like blob, a blank page; name -> what it shows."""
    pixels, labels = mnist.pixels(mnist.test).numpy()[:, 0], mnist.test.labels.numpy()
    rng = np.random.default_rng(0)
    Image.fromarray(np.round(255 * (1 - pixels[0])).astype(np.uint8)).resize((84, 84)).save(folder / "digit.png")
    compose([pixels[i] for i in (1, 2, 3)], [5, 4], rng).save(folder / "number.png")
    blob = np.full((84, 84), 0.95, dtype=np.float32)
    blob[20:70, 10:75] = 0.35
    Image.fromarray(np.round(255 * blob).astype(np.uint8)).save(folder / "blob.png")
    Image.new("L", (60, 60), 240).save(folder / "blank.png")
    return {"digit.png": str(labels[0]), "number.png": "".join(str(d) for d in labels[1:4])}


def test_predict_reads_a_folder_of_mixed_pictures_as_a_user_runs_it(model, tmp_path, monkeypatch):
    uri, _, store, mnist = model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    truth = mixed_folder(tmp_path, mnist)
    paths = sorted(str(path) for path in tmp_path.glob("*.png"))
    result = python_step("steps.predict", "--model_uri", uri, "--images", *paths, "--payload", str(tmp_path / "p.json"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"predict: error: 1 of 4 pictures not answered: {tmp_path}/blank.png"
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith(str(tmp_path)))
    assert lines[f"{tmp_path}/blank.png"] == "no digit found; the image is blank (not answered)"
    assert lines[f"{tmp_path}/digit.png"].startswith(f"{truth['digit.png']} - ")
    assert re.fullmatch(rf"{truth['number.png']}  \(\d 0\.\d{{4}}, \d 0\.\d{{4}}, \d 0\.\d{{4}}\)", lines[f"{tmp_path}/number.png"])
    assert lines[f"{tmp_path}/blob.png"].startswith("unsure  (")
    # The payload: what the model saw, one input per digit read (1 + 3 + 1).
    assert np.array(json.loads((tmp_path / "p.json").read_text())["inputs"]).shape == (5, 1, 28, 28)
    # Through mlflow run, with today's one-digit answer and no abstaining: one class per picture.
    result = run_step("mlflow", "run", ".", "-e", "predict", "--env-manager", "local", "-P", f"model_uri={uri}",
                      "-P", f"images={tmp_path}/number.png {tmp_path}/blob.png", "-P", "one_digit=true",
                      "-P", "abstain=false")
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(answers) == 2 and all(re.match(r"\d - \w+  \(", answer) for answer in answers), answers


def test_the_benches_print_their_tables(model, monkeypatch):
    uri, _, store, _ = model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    result = run_step("python", os.path.join(ROOT, "bench", "read_numbers.py"), "--model_uri", uri, "--n", "5",
                      "--data_dir", REAL_DATA)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^6 +\d+\.\d% +\d+\.\d% +\d+\.\d%$", result.stdout, re.M)
    assert re.search(r"single test digits read as one digit: \d+\.\d% of 20", result.stdout)
    result = run_step("python", os.path.join(ROOT, "bench", "abstain.py"), "--model_uri", uri, "--n", "20",
                      "--data_dir", REAL_DATA)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| the model's")]
    assert len(rows) == 1 and "| 100.0 % |" in rows[0]  # every blank page: no digit found
