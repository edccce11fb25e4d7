"""Images brought to the MNIST convention, and the predict step on PNGs written here."""
import json
import os
import re
import struct
import zlib

import mlflow
import numpy as np
import pytest
from PIL import Image

from conftest import EXPERIMENT, python_step, run_step
from mnistflow import data as datasets
from mnistflow import images, logged_model, models
from mnistflow.errors import ImageError
from steps import predict


def digit(height: int = 60, width: int = 40) -> np.ndarray:
    """A light, lopsided "7" on black: a bar on top and a thick diagonal stroke, in [0, 1]."""
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[: height // 10, :] = 1.0
    for row in range(height):
        col = int((width - 1) * (1 - row / height))
        canvas[row, max(0, col - width // 8):col + 1] = 1.0
    return canvas


def on_page(ink: np.ndarray, size: tuple[int, int], at: tuple[int, int], dark_on_light: bool, rgb: bool) -> Image.Image:
    """The ink placed somewhere on a larger page, optionally as dark-on-light and in colour."""
    page = np.zeros(size, dtype=np.float32)
    page[at[0]:at[0] + ink.shape[0], at[1]:at[1] + ink.shape[1]] = ink
    if dark_on_light:
        page = 0.95 - 0.9 * page  # off-white paper, dark grey ink
    image = Image.fromarray((page * 255).astype(np.uint8), "L")
    return image.convert("RGB") if rgb else image


def center_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(pixels.shape)
    return (rows * pixels).sum() / pixels.sum(), (cols * pixels).sum() / pixels.sum()


@pytest.mark.parametrize("size, at, dark_on_light, rgb", [
    ((100, 73), (5, 30), False, False),   # odd size, off-center
    ((100, 73), (30, 2), True, True),     # the same digit, dark on light, in colour
    ((61, 41), (0, 0), True, False),      # the digit touches the border
])
def test_to_mnist_follows_the_mnist_convention(size, at, dark_on_light, rgb):
    pixels = images.to_mnist(on_page(digit(), size, at, dark_on_light, rgb))
    assert pixels.shape == (28, 28) and pixels.dtype == np.float32
    assert pixels.max() == pytest.approx(1.0, abs=0.02) and pixels.min() >= 0
    rows, cols = np.nonzero(pixels > 0.3)
    assert rows.max() - rows.min() + 1 in (19, 20, 21)        # the longer side fits 20 pixels
    assert cols.max() - cols.min() + 1 < 20                    # and the aspect ratio is kept
    assert all(abs(c - 14) <= 0.5 for c in center_of_mass(pixels))
    assert pixels[0].max() == 0 and pixels[:, 0].max() == 0  # a black border, as in MNIST


def test_polarity_and_placement_do_not_change_the_result():
    light_ink = images.to_mnist(on_page(digit(), (90, 90), (10, 12), False, False))
    dark_ink = images.to_mnist(on_page(digit(), (120, 70), (50, 20), True, True))
    assert np.abs(light_ink - dark_ink).max() < 0.1


def test_transparent_background_counts_as_paper():
    rgba = np.zeros((50, 50, 4), dtype=np.uint8)
    rgba[..., 2] = 140                         # dark blue ink...
    rgba[5:45, 5:45, 3] = (digit(40, 40) * 255).astype(np.uint8)  # ...only where it is opaque
    pixels = images.to_mnist(Image.fromarray(rgba, "RGBA"))
    assert pixels[0].max() == 0 and pixels.max() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "the file is empty"),
    (b"this is not a picture", "not an image"),
])
def test_unreadable_files_are_named(tmp_path, content, message):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        images.read(str(path))


def test_a_blank_image_has_no_digit():
    with pytest.raises(ImageError, match="no digit found"):
        images.to_mnist(Image.new("L", (40, 40), 255), "blank.png")


def png_of_size(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG of width x height pixels in a few kB: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)  # filter byte, then the bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def write_pngs(folder) -> list[str]:
    paths = []
    for i, (size, at, dark, rgb) in enumerate([((100, 73), (5, 30), False, False), ((45, 57), (2, 9), True, True)]):
        path = str(folder / f"digit{i}.png")
        on_page(digit(40, 30), size, at, dark, rgb).save(path)
        paths.append(path)
    return paths


def test_predict_prints_classes_and_writes_plot_and_payload(registry_store, tmp_path):
    paths = write_pngs(tmp_path)
    plot, payload = tmp_path / "predictions.png", tmp_path / "payload.json"
    result = python_step("steps.predict", "--model_uri", f"runs:/{registry_store.good}/model", "--images", *paths,
                         "--top", "2", "--plot", str(plot), "--payload", str(payload))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(tuple(paths))]
    assert len(lines) == 2
    for line in lines:  # "<path>: <class>  (<class> <p>, <class> <p>)"; classes are named ("7 - seven")
        assert " - " in line
        probabilities = [float(p) for p in re.findall(r"\d\.\d{4}", line.split("(", 1)[1])]
        assert len(probabilities) == 2 and probabilities[0] >= probabilities[1] and sum(probabilities) <= 1.0001
    assert Image.open(plot).size[0] > 500
    inputs = np.array(json.loads(payload.read_text())["inputs"])
    assert inputs.shape == (2, 1, 28, 28) and inputs.max() <= 1 and inputs.min() >= 0


def test_a_fashion_mnist_model_gets_garments_filling_the_field(store, tiny_data, tmp_path, capsys):
    # Fashion-MNIST's products fill 28 pixels, not MNIST's 20: a garment fitted as a digit would be
    # shrunk to 5/7 of the size the model was trained on.
    with mlflow.start_run() as run:
        logged_model.log(models.build("fast", "off"), datasets.load("fashion_mnist", tiny_data))
    dress = np.full((56, 56), 0.9, dtype=np.float32)  # a dark dress on light paper, top to bottom
    dress[:, 14:42] = 0.2
    Image.fromarray((dress * 255).astype(np.uint8)).save(tmp_path / "dress.png")
    payload = tmp_path / "payload.json"
    predict.main(["--model_uri", f"runs:/{run.info.run_id}/model", "--images", str(tmp_path / "dress.png"),
                  "--payload", str(payload)])
    capsys.readouterr()
    pixels = np.array(json.loads(payload.read_text())["inputs"])[0, 0]
    rows, cols = np.nonzero(pixels > 0.5)
    assert rows.max() - rows.min() + 1 == 28 and cols.max() - cols.min() + 1 == 14


def test_mlflow_run_predict_takes_several_images_in_one_parameter(registry_store, tmp_path):
    paths = write_pngs(tmp_path)
    result = run_step("mlflow", "run", ".", "-e", "predict", "--env-manager", "local",
                      "-P", f"model_uri=runs:/{registry_store.good}/model", "-P", f"images={' '.join(paths)}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(f"{path}: " in result.stdout for path in paths)
    [launcher] = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                    filter_string="attributes.run_name = 'predict-2-images'")
    assert launcher.info.status == "FINISHED"
    assert all(f"- {path}: " in launcher.data.tags["mlflow.note.content"] for path in paths)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), (b"", "the file is empty"), (b"GIF89a broken", "not an image"),
    # Over Pillow's limit (where it only warns) and over twice that (where it refuses).
    (png_of_size(10_000, 10_000), "refused, Image size (100000000 pixels) exceeds limit of 89478485 pixels"),
    (png_of_size(20_000, 20_000), "refused, Image size (400000000 pixels) exceeds limit of 178956970 pixels"),
])
def test_predict_bad_image_is_reported_on_its_line_the_others_answered_and_exit_2(registry_store, tmp_path, capsys,
                                                                                 content, message):
    bad = tmp_path / "bad.png"
    if content is not None:
        bad.write_bytes(content)
    good = write_pngs(tmp_path)
    with pytest.raises(SystemExit) as exited:
        predict.main(["--model_uri", f"runs:/{registry_store.good}/model", "--images", good[0], str(bad), good[1]])
    out = capsys.readouterr()
    assert exited.value.code == 2
    assert out.err == f"predict: error: 1 of 3 pictures not answered: {bad}\n"
    first, second, third = out.out.splitlines()
    assert re.match(rf"{good[0]}: \d - \w+  \(", first) and re.match(rf"{good[1]}: \d - \w+  \(", third)
    assert second.startswith(f"{bad}: {message}") and second.endswith("(not answered)")
    with pytest.raises(SystemExit) as exited:  # alone, it is the one line, before any model is loaded
        predict.main(["--model_uri", "models:/Nope@production", "--images", str(bad)])
    out = capsys.readouterr()
    assert exited.value.code == 2 and out.err.startswith(f"predict: error: {bad}: {message}") and out.err.count("\n") == 1
    assert out.out == ""


def test_a_blank_page_in_a_batch_is_reported_for_itself(registry_store, tmp_path, capsys):
    good = write_pngs(tmp_path)
    blank = tmp_path / "blank.png"
    Image.new("L", (60, 60), 250).save(blank)
    payload = tmp_path / "payload.json"
    with pytest.raises(SystemExit) as exited:
        predict.main(["--model_uri", f"runs:/{registry_store.good}/model", "--images", str(blank), *good,
                      "--payload", str(payload)])
    out = capsys.readouterr()
    assert exited.value.code == 2 and out.err == f"predict: error: 1 of 3 pictures not answered: {blank}\n"
    lines = out.out.splitlines()
    assert lines[0] == f"{blank}: no digit found; the image is blank (not answered)"
    assert all(re.match(rf"{path}: \d - \w+  \(", line) for line, path in zip(lines[1:3], good))
    assert np.array(json.loads(payload.read_text())["inputs"]).shape == (2, 1, 28, 28)  # the answered ones


def test_predict_unknown_model_is_one_line_and_exit_2(registry_store, tmp_path):
    result = python_step("steps.predict", "--model_uri", "models:/NoSuchModel@production", "--images", write_pngs(tmp_path)[0])
    assert result.returncode == 2
    assert "cannot load model 'models:/NoSuchModel@production'" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string="attributes.status = 'RUNNING'") == []


@pytest.mark.parametrize("flag, path, reason", [
    ("--plot", "/no/such/folder/p.png", "no folder /no/such/folder"),
    ("--payload", "{tmp}", "it is a folder"),
    ("--plot", "/sys/p.png", "/sys: "),  # sysfs takes no new files, not even from root
    # matplotlib picks the format by the name's ending; with none it writes to <name>.png
    ("--plot", "{tmp}/preds.txt", "its name must end in a format matplotlib writes: .avif, .eps, "),
    ("--plot", "/dev/full", "its name must end in a format matplotlib writes: "),
    ("--plot", "{tmp}/" + "p" * 296 + ".png", "its name is longer than the 255 bytes "),
    ("--payload", "{tmp}/" + "p" * 300, "its name is longer than the 255 bytes "),
])
def test_predict_output_that_cannot_be_written_is_refused_before_any_work(registry_store, tmp_path, capsys,
                                                                          flag, path, reason):
    image, path = write_pngs(tmp_path)[0], path.format(tmp=tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exited:
        predict.main(["--model_uri", f"runs:/{registry_store.good}/model", "--images", image, flag, path])
    out = capsys.readouterr()
    assert exited.value.code == 2 and out.out == ""  # no model loaded, nothing predicted
    assert out.err.startswith(f"predict: error: {flag[2:]}={path}: cannot write this file ({reason}")
    assert out.err.count("\n") == 1 and sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("flag, name", [("--plot", "predictions.png"), ("--payload", "payload.json")])
def test_predict_output_that_fails_to_write_is_one_line_and_exit_2(registry_store, tmp_path, capsys, flag, name):
    full = tmp_path / name  # writable by every check made before the work, full when written
    full.symlink_to("/dev/full")
    with pytest.raises(SystemExit) as exited:
        predict.main(["--model_uri", f"runs:/{registry_store.good}/model", "--images", write_pngs(tmp_path)[0],
                      flag, str(full)])
    out = capsys.readouterr()
    assert exited.value.code == 2 and "digit0.png: " in out.out and "wrote" not in out.out
    assert out.err == f"predict: error: cannot write {full}: No space left on device\n"


def test_mlflow_run_predict_refuses_an_unwritable_payload(registry_store, tmp_path):
    result = run_step("mlflow", "run", ".", "-e", "predict", "--env-manager", "local",
                      "-P", f"model_uri=runs:/{registry_store.good}/model", "-P", f"images={write_pngs(tmp_path)[0]}", "-P", "payload=/no/such/folder/payload.json")
    assert result.returncode != 0 and "digit0.png: " not in result.stdout
    assert "predict: error: payload=/no/such/folder/payload.json: cannot write this file (no folder /no/such/folder)" \
        in result.stderr
