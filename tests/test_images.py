"""images.to_mnist on pictures unlike MNIST's clean scans: what a photo or a coarse scan adds is undone."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from mnistflow import images
from test_predict import digit


def page(ink: np.ndarray, light: np.ndarray | float = 0.95, haze: float = 0.0) -> Image.Image:
    """Dark ink on paper of the given brightness (a float, or one per pixel), with an optional
    faint haze over the square around the digit."""
    size = light.shape if isinstance(light, np.ndarray) else (120, 120)
    drawn = np.zeros(size, dtype=np.float32)
    drawn[30:30 + ink.shape[0], 40:40 + ink.shape[1]] = ink
    drawn[20:100, 30:90] = np.maximum(drawn[20:100, 30:90], haze)
    return Image.fromarray(np.round(light * (1 - 0.85 * drawn) * 255).astype(np.uint8))


def test_a_page_lit_from_one_side_reads_like_one_lit_evenly():
    across = np.linspace(0.95, 0.55, 120, dtype=np.float32)  # light falls off from left to right
    uneven = images.to_mnist(page(digit(), np.tile(across, (120, 1))))
    even = images.to_mnist(page(digit()))
    assert np.abs(uneven - even).max() < 0.15
    assert (uneven[:, :4] == 0).all() and (uneven[:, -4:] == 0).all()  # the shadow is not taken for ink


def test_a_faint_haze_around_the_strokes_is_dropped():
    hazy = images.to_mnist(page(digit(), haze=0.06))
    assert np.allclose(hazy, images.to_mnist(page(digit())), atol=1e-6)


def test_blurred_strokes_are_brought_back_to_full_brightness():
    blurred = page(digit()).filter(ImageFilter.GaussianBlur(4))
    pixels = images.to_mnist(blurred)
    strokes = pixels[pixels > images.INK]
    assert (strokes >= 0.999).mean() >= 0.2  # a quarter of the ink is at full brightness, as in MNIST
    sharp = images.to_mnist(page(digit()))
    assert (sharp[sharp > images.INK] >= 0.999).mean() >= 0.2


def test_a_garments_shading_is_kept():
    garment = np.zeros((28, 28), dtype=np.float32)
    garment[2:26, 6:22] = 0.6
    garment[2:26, 12:16] = 0.3  # a fold, darker
    pixels = images.to_mnist(Image.fromarray(np.round(garment * 255).astype(np.uint8)), dataset="fashion_mnist")
    assert 0.4 < pixels[14, 14] / pixels[14, 8] < 0.6  # as in the picture, not both brought to full brightness
    digit_like = images.to_mnist(Image.fromarray(np.round(garment * 255).astype(np.uint8)))
    assert digit_like[14, 8] == 1.0  # the same picture read as a digit: strokes at full brightness


def lined(ink: np.ndarray, lines: str, pencil: bool = False) -> Image.Image:
    """Dark ink (paler and unevenly laid down in pencil) on 120x120 paper with pale printed lines:
    "ruled" (one under the digit), "squared", or a dark "boxed" frame near the edges."""
    drawn = np.zeros((120, 120), dtype=np.float32)
    drawn[30:30 + ink.shape[0], 40:40 + ink.shape[1]] = ink
    if pencil:
        drawn *= 0.5 * (1 - 0.3 * np.random.default_rng(0).random(drawn.shape))
    printed = np.zeros_like(drawn)
    if lines == "ruled":
        printed[[0, 1, 50, 51, 90, 91, 119]] = 0.25  # one along the top edge, one through the digit
    elif lines == "squared":
        printed[5::24] = printed[:, 7::24] = 0.25
    else:
        printed[4:116, 4:116] = 0.8
        printed[6:114, 6:114] = 0
    return Image.fromarray(np.round(0.95 * (1 - printed) * (1 - 0.85 * drawn) * 255).astype(np.uint8))


@pytest.mark.parametrize("lines", ["ruled", "squared", "boxed"])
@pytest.mark.parametrize("pencil", [False, True])
def test_printed_lines_and_a_forms_box_are_taken_away_and_the_strokes_they_cross_kept(lines, pencil):
    on_lines = images.to_mnist(lined(digit(), lines, pencil))
    alone = images.to_mnist(page(digit()))
    def extent(pixels):
        rows, cols = np.nonzero(pixels > images.INK)
        return np.array([rows.min(), rows.max(), cols.min(), cols.max()])
    assert np.abs(extent(on_lines) - extent(alone)).max() <= 1  # the 7 alone fills the box, no line beside it
    assert np.corrcoef(on_lines.ravel(), alone.ravel())[0, 1] > 0.75  # where a line ran along a stroke, it thins


def test_a_one_drawn_from_edge_to_edge_is_not_taken_for_a_printed_line():
    one = np.zeros((60, 60), dtype=np.float32)
    one[:, 28:33] = 1.0
    pixels = images.to_mnist(Image.fromarray(np.round(one * 255).astype(np.uint8)))
    rows, cols = np.nonzero(pixels > images.INK)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 <= 3
