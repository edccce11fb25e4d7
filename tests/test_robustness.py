"""The robustness conditions (mnistflow/robustness.py), their scores, and bench/robustness.py."""
import os
import re
import sys

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, refused_script, run_step
from mnistflow import data as datasets
from mnistflow import images, logged_model, robustness
from test_predict import digit

CONDITIONS = list(robustness.CONDITIONS)
BENCH = os.path.join(ROOT, "bench", "robustness.py")
LINED = [name for name in CONDITIONS if name.startswith(("ruled_", "squared_", "boxed_"))]
RANDOM = {"rotate_15", "shear", "off_centre", "aspect", "paper_light", "noise", "photo", *LINED}


def seven() -> np.ndarray:
    """A digit as MNIST draws it: light strokes about 3 pixels wide, fitted into 20x20 at the centre."""
    return images.to_mnist(Image.fromarray((digit(60, 40) * 255).astype(np.uint8)))


def made(condition: str, seed: int = 0) -> Image.Image:
    return robustness.CONDITIONS[condition](seven(), robustness.condition_rng(condition, seed))


def ink(picture: Image.Image) -> np.ndarray:
    return robustness.pixels_of(picture) > 0.5


@pytest.mark.parametrize("condition", CONDITIONS)
def test_each_condition_repeats_with_its_seed_and_gives_predict_a_valid_input(condition):
    first, again = made(condition), made(condition)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    pixels = images.to_mnist(first)  # what predict makes of the user's file
    assert pixels.shape == (28, 28) and pixels.dtype == np.float32 and 0 <= pixels.min() and pixels.max() <= 1
    assert pixels.max() > 0.5  # the digit survived
    others = [np.asarray(made(condition, seed)) for seed in range(1, 8)]
    if condition in RANDOM:  # its random choice (a sign, a place, the noise) follows the seed
        assert any(not np.array_equal(np.asarray(first), other) for other in others)
    else:
        assert all(np.array_equal(np.asarray(first), other) for other in others)


def test_strokes_get_thicker_and_thinner_at_both_sizes():
    original = ink(robustness.picture(seven())).sum()
    assert ink(made("thick_28")).sum() > 1.3 * original and ink(made("thin_28")).sum() < 0.8 * original
    large = ink(robustness.picture(seven()).resize((84, 84), Image.Resampling.BILINEAR)).sum()
    thick_84, thin_84 = made("thick_84"), made("thin_84")
    assert thick_84.size == thin_84.size == (84, 84)
    assert ink(thick_84).sum() > 1.3 * large and ink(thin_84).sum() < 0.8 * large


@pytest.mark.parametrize("condition, side", [("lowres_8", 8), ("lowres_12", 12)])
def test_low_resolution_keeps_no_detail_finer_than_its_grid(condition, side):
    # Brought back from a side x side grid, each coarse pixel's step is spread over 28/side
    # pixels: no two neighbours differ by more than side/28, where the original's sharp edges did.
    def steepest(pixels):
        return max(np.abs(np.diff(pixels, axis=axis)).max() for axis in (0, 1))
    picture = robustness.pixels_of(made(condition))
    assert picture.shape == (28, 28)
    assert steepest(picture) <= side / 28 + 0.01 < steepest(seven())


def test_geometry_conditions_change_the_shape_and_place_of_the_page():
    assert made("rotate_15").size == (36, 36)  # 28 turned by 15 degrees, the page grown to hold it
    assert made("shear").size[0] > 28 and made("shear").size[1] == 28
    assert sorted(made("aspect").size) == [28, 42]

    page = made("off_centre")
    assert page.size == (100, 100)
    rows, cols = np.nonzero(ink(page))
    centre_row, centre_col = rows.mean(), cols.mean()
    assert max(abs(centre_row - 50), abs(centre_col - 50)) > 25  # near a corner, not the middle


def test_photo_like_conditions_look_like_photos():
    paper = robustness.pixels_of(made("paper_light"))
    border = np.concatenate([paper[0], paper[-1], paper[:, 0], paper[:, -1]])
    assert np.median(border) > 0.5 and paper.min() < 0.3          # dark ink on light paper
    assert border.max() - border.min() > 0.25                     # lit unevenly
    assert made("jpeg").format == "JPEG" and made("photo").mode == "RGB" and made("photo").size == (84, 84)
    blurred = robustness.pixels_of(made("blur"))
    assert np.abs(np.diff(blurred, axis=1)).max() < np.abs(np.diff(seven(), axis=1)).max()
    noisy = robustness.pixels_of(made("noise"))
    assert (noisy[seven() == 0] > 0).mean() > 0.3                 # the black background is no longer black


def test_clothes_get_no_stroke_width_or_proportions():
    assert robustness.conditions_for("mnist") == CONDITIONS
    clothes = robustness.conditions_for("fashion_mnist")
    assert "clean" in clothes and "photo" in clothes
    assert not {"thick_28", "thin_84", "aspect", *LINED} & set(clothes)


def test_digits_on_lined_paper_are_written_in_pen_and_pencil_and_photographed():
    assert LINED == [f"{kind}_{tool}" for kind in ("ruled", "squared", "boxed") for tool in ("pen", "pencil")]
    for name in LINED:
        picture = made(name)
        assert picture.mode == "RGB" and picture.size == (84, 84) and picture.format == "JPEG"
    rng = np.random.default_rng(0)
    ruled, squared, boxed = (robustness.printed_lines(kind, rng) for kind in ("ruled", "squared", "boxed"))
    full_rows, full_cols = (lambda lines: np.nonzero(lines.all(1))[0]), (lambda lines: np.nonzero(lines.all(0))[0])
    assert len(full_rows(ruled)) >= 1 and len(full_cols(ruled)) == 0 and ruled.sum() == 84 * len(full_rows(ruled))
    assert 2 <= len(full_rows(squared)) and 2 <= len(full_cols(squared))  # 84 pixels, a square every 26 to 36
    assert len(full_rows(boxed)) == len(full_cols(boxed)) == 0 and boxed[10:74, 10:74].sum() == 0  # a frame
    assert boxed[:8].sum(0)[10:74].min() == 2 and boxed[:, -8:].sum(1)[10:74].min() == 2  # two pixels wide
    grey = {name: robustness.pixels_of(made(name)) for name in LINED}
    # Pencil: paler than pen, and uneven (the paper's grain), on the same digit and page.
    assert grey["ruled_pencil"].min() > grey["ruled_pen"].min() + 0.15
    colour = np.asarray(made("ruled_pen"), dtype=np.float32)
    strokes = colour[grey["ruled_pen"] < 0.3]
    assert (strokes[:, 2] > strokes[:, 0] + 0.05 * 255).mean() > 0.5  # blue ink


def test_inputs_are_the_same_test_images_under_each_condition(tiny_data):
    data = datasets.load("mnist", tiny_data)
    clean, labels = robustness.inputs(data, "clean", 50, seed=3)
    assert clean.shape == (50, 1, 28, 28) and clean.dtype == np.float32
    which = robustness.chosen(data, 50, 3)
    assert np.array_equal(clean, data.pixels(data.test)[which].numpy())
    thick, thick_labels = robustness.inputs(data, "thick_28", 50, seed=3)
    assert np.array_equal(labels, thick_labels) and thick.shape == clean.shape and 0 <= thick.min() <= thick.max() <= 1
    assert np.array_equal(thick, robustness.inputs(data, "thick_28", 50, seed=3)[0])
    assert not np.array_equal(robustness.inputs(data, "noise", 50, seed=3)[0], robustness.inputs(data, "noise", 50, seed=4)[0])
    assert len(robustness.inputs(data, "clean", 10_000)[0]) == len(data.test)  # n caps at the test split
    with pytest.raises(ValueError, match="unknown condition 'smudge'"):
        robustness.inputs(data, "smudge", 10)


def test_scores_give_one_accuracy_per_condition(registry_store, tiny_data):
    model = logged_model.load(f"runs:/{registry_store.good}/model")
    data = datasets.load("mnist", tiny_data)
    scores = robustness.scores(model, data, n=50)
    assert list(scores) == CONDITIONS and all(0 <= accuracy <= 1 for accuracy in scores.values())
    assert scores["clean"] == 1.0  # the tiny data's good model, on its own test images
    name, accuracy = robustness.worst(scores)
    assert name != "clean" and accuracy == min(value for key, value in scores.items() if key != "clean")
    assert robustness.scores(model, data, n=50, conditions=["clean", "jpeg"]).keys() == {"clean", "jpeg"}


def test_garments_fill_the_field_as_fashion_mnist_products_do(tiny_data):
    # A Fashion-MNIST product's longer side is 28 pixels: fitted into MNIST's 20x20 box, the
    # garment a user's 28x28 picture shows would reach the model at 5/7 of its size.
    data = datasets.load("fashion_mnist", tiny_data)
    garment = np.zeros((28, 28), dtype=np.float32)
    garment[:, 6:22] = 0.8  # a dress, top to bottom
    data.test.images[:] = torch.from_numpy((garment - data.mean) / data.std)
    pixels, _ = robustness.inputs(data, "clean_png", 5)
    rows, cols = np.nonzero(pixels[0, 0] > 0.4)
    assert rows.max() - rows.min() + 1 == 28 and 15 <= cols.max() - cols.min() + 1 <= 17


def test_the_bench_prints_a_table_per_condition_and_model_and_draws_them(registry_store, tiny_data, tmp_path):
    good, poor = (f"runs:/{run}/model" for run in (registry_store.good, registry_store.poor))
    plot = tmp_path / "conditions.png"
    result = run_step(sys.executable, "bench/robustness.py", "--model-uri", good, "--model_uri", poor,
                      "--n", "50", "--data_dir", tiny_data, "--plot", str(plot))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("robustness of mnist models on 50 test images per condition (seed 0), ")
    [header] = [line for line in lines if line.startswith("condition")]
    assert header.split() == ["condition", good, poor]
    rows = {line.split()[0]: line.split()[1:] for line in lines[lines.index(header) + 1:] if line.strip()}
    assert list(rows)[:len(CONDITIONS)] == CONDITIONS and rows["clean"][0] == "100.0"
    assert all(len(values) == 2 and all(0 <= float(v) <= 100 for v in values)
               for name, values in rows.items() if name in CONDITIONS)
    assert len(rows["worst"]) == 4 and rows["worst"][1] in CONDITIONS  # "<accuracy> <condition>" per model
    assert Image.open(plot).size[0] > 1000


def test_the_bench_refuses_a_model_it_cannot_load_in_one_line(store, tiny_data):
    result = run_step(sys.executable, "bench/robustness.py", "--data_dir", tiny_data,
                      "--model_uri", "models:/NoSuchModel@production")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("robustness: error: cannot load model 'models:/NoSuchModel@production'"), line
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "robustness: error: --n 0 is not allowed; it must be >= 1"),
    (["--plot", "/no/such/folder/c.png"], "robustness: error: --plot /no/such/folder/c.png: cannot write this file "
                                          "(no folder /no/such/folder)"),
    (["--plot", "cond.txt"], "robustness: error: --plot cond.txt: cannot write this file (its name must end in a "
                             "format matplotlib writes: .avif, .eps, .gif, .jpeg, .jpg, .pdf, .pgf, .png, .ps, .raw, "
                             ".rgba, .svg, .svgz, .tif, .tiff, .webp)"),
    (["--seed", "-1"], "robustness: error: --seed -1 is not allowed; it must be in [0, 4294967295]"),
])
def test_the_bench_refuses_bad_numbers_and_paths_before_loading_anything(tiny_data, monkeypatch, capsys,
                                                                        args, message):
    assert refused_script(monkeypatch, capsys, BENCH, "--data_dir", tiny_data, *args) == message


def test_the_readme_command_scores_the_production_model(store, tiny_data):
    from steps import train
    train.main(["--data_dir", tiny_data, "--epochs", "1", "--batch_size", "64", "--system_metrics", "false"])
    run = mlflow.last_active_run()
    [model] = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    client = mlflow.MlflowClient()
    client.create_registered_model("MNIST_CNN")
    version = client.create_model_version("MNIST_CNN", model.model_uri, run_id=run.info.run_id, model_id=model.model_id)
    client.set_registered_model_alias("MNIST_CNN", "production", version.version)
    [command] = re.findall(r"`(python bench/robustness\.py[^`]*)`", open(os.path.join(ROOT, "README.md")).read())
    result = run_step(*command.split(), "--n", "20", "--data_dir", tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^worst\s+\d+\.\d \w+$", result.stdout, re.MULTILINE), result.stdout
