"""images.to_mnist on pictures unlike MNIST's clean scans: what a photo or a coarse scan adds is undone."""
import numpy as np
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
