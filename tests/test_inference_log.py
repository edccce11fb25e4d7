"""mnistflow/inference_log.py on a real SQLite file: what describes a picture, the writer, feedback, retention."""
import time

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from conftest import wait_until
from mnistflow import images, inference_log


def picture(size: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """A dark 10x20 bar on white paper, its top-left corner at `at` (row, column)."""
    pixels = np.full(size, 255, dtype=np.uint8)
    pixels[at[0]:at[0] + 20, at[1]:at[1] + 10] = 0
    return Image.fromarray(pixels)


def described(image: Image.Image) -> dict:
    ink = images.ink_of(image)
    return inference_log.features(ink, images.fit(ink))


def test_the_features_say_where_the_ink_is_and_how_big_the_picture_was():
    centred, aside = described(picture((100, 100), (40, 45))), described(picture((100, 100), (5, 80)))
    assert set(centred) == set(inference_log.FEATURES)
    assert (centred["picture_width"], centred["picture_height"]) == (100, 100)
    assert centred["box_x"] == pytest.approx(0.5) and centred["box_y"] == pytest.approx(0.5)
    assert aside["box_x"] == pytest.approx(0.85) and aside["box_y"] == pytest.approx(0.15)
    assert centred["box_width"] == pytest.approx(0.1) and centred["box_height"] == pytest.approx(0.2)
    assert centred["ink_fraction"] == pytest.approx(0.02)
    assert centred["input_mean"] == aside["input_mean"]  # what the model sees does not tell them apart


def row(prediction_id: str, at: float) -> dict:
    return {"id": prediction_id, "time": at, "model_name": "MNIST_CNN", "version": "1", "latency_ms": 3.0,
            "class_index": 7, "confidence": 0.9, **{name: 0.5 for name in inference_log.FEATURES}}


def rows_in(url: str) -> dict:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        found = {r.id: r for r in connection.execute(sa.text("SELECT id, label FROM predictions"))}
    engine.dispose()
    return found


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """A new database's URL: SQLite (the default) or PostgreSQL (a shared server's)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/inference.db"
    return request.getfixturevalue("postgres")("inference_log")


def test_rows_are_written_labelled_once_and_pruned(database):
    url = database
    log = inference_log.InferenceLog(url)
    log.record(row("old", time.time() - 40 * 86400))
    log.record(row("new", time.time()))
    wait_until(lambda: len(rows_in(url)) == 2, "the writer")
    log.label("new", 7)
    with pytest.raises(inference_log.FeedbackError, match="has a label already") as refused:
        log.label("new", 3)
    assert refused.value.status == 409
    with pytest.raises(inference_log.FeedbackError, match="no prediction with id 'nope'") as unknown:
        log.label("nope", 3, wait_s=0)
    assert unknown.value.status == 404
    assert log.prune(30) == 1
    assert {prediction_id: r.label for prediction_id, r in rows_in(url).items()} == {"new": 7}
    assert log.dropped == 0
