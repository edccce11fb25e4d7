"""Any picture of a digit or garment, brought to the MNIST convention the models were trained on.

MNIST was made like this (LeCun et al.): the ink, light on a black background, was fitted into a
20x20 box keeping its aspect ratio, with anti-aliasing, then placed in a 28x28 field so that its
center of mass sits at the center. `to_mnist` does the same to a photo or a drawing of any size,
colour or polarity, and first undoes what a photo or a coarse scan adds that MNIST's clean scans
lack: a page lit unevenly, the printed lines of ruled or squared paper and a form's box, a faint
halo of blur or noise around the strokes, and strokes greyed by blur or downscaling where MNIST's
are mostly at full brightness. Each of those steps was chosen by its effect on
bench/robustness.py (docs/results.md, Robustness).
"""
import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from mnistflow.errors import ImageError

BOX = 20    # the ink's longer side, in pixels
FIELD = 28  # the image side
INK = 0.1   # a pixel counts as ink above this fraction of the brightest one; fainter ones are halo
STROKE = 75  # the percentile of the ink's brightness that is brought to full brightness
LINE = 0.8    # a straight run of ink across this share of the picture's width or height is a printed line,
GAP = 2       # ... its ink averaged over 2 GAP + 1 pixels along it, and no thicker than
THICKEST = 6  # ... this fraction of the picture's side (or 4 pixels)
# How each dataset's images were made: the box their longer side was fitted into (MNIST's digits
# into 20x20, Fashion-MNIST's products into the whole field: Xiao et al., 2017), and whether their
# ink is strokes at full brightness (pen on paper) or shading that tells the class (a garment's folds).
CONVENTIONS = {"mnist": {"box": BOX, "strokes": True}, "fashion_mnist": {"box": FIELD, "strokes": False}}


def read(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    with open(path, "rb") as f:
        return decode(f.read(), path)


def decode(data: bytes, name: str = "image") -> Image.Image:
    """The picture in `data` (PNG, JPEG, ...), named `name` in errors."""
    if not data:
        raise ImageError(f"{name}: the file is empty")
    try:
        # Pillow only warns between its pixel limit and twice that; a decompression bomb is
        # refused either way, before its pixels fill the memory.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused, {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{name}: not an image Pillow can read ({type(exc).__name__})") from None


def each(make, named: dict) -> tuple[dict, dict]:
    """(name -> make(name, value), name -> why not) for each item of `named`: a picture that cannot
    be read or shows no digit (ImageError) costs only its own answer."""
    made, failed = {}, {}
    for name, value in named.items():
        try:
            made[name] = make(name, value)
        except ImageError as exc:
            failed[name] = str(exc)
    return made, failed


def grayscale(image: Image.Image) -> np.ndarray:
    """Pixels in [0, 1]; transparent parts become white paper, as if printed."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def page_brightness(pixels: np.ndarray) -> np.ndarray:
    """The background's brightness at every pixel: the plane that fits the picture's border best,
    so that a page lit from one side is as flat as one lit evenly."""
    rows, cols = np.indices(pixels.shape)
    border = np.zeros(pixels.shape, dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    terms = np.stack([np.ones(border.sum()), rows[border], cols[border]], 1)
    (level, down, right), *_ = np.linalg.lstsq(terms, pixels[border], rcond=None)
    return level + down * rows + right * cols


def to_mnist(image: Image.Image, name: str = "image", dataset: str = "mnist") -> np.ndarray:
    """(28, 28) float32 in [0, 1], light ink on black, fitted into the dataset's box and centered by mass."""
    return fit(ink_of(image, name), dataset)


def ink_of(image: Image.Image, name: str = "image") -> np.ndarray:
    """The picture's ink in [0, 1], light on black, at the picture's size: the page's light, its
    printed lines and the strokes' halo taken away."""
    pixels = grayscale(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 0.5:  # dark ink on light paper: turn it into light ink on black
        pixels = 1.0 - pixels
    ink = np.clip(pixels - page_brightness(pixels), 0, None)
    if ink.max() < 0.1:
        raise ImageError(f"{name}: no digit found; the image is blank")
    ink = without_printed_lines(ink)
    return np.clip((ink / ink.max() - INK) / (1 - INK), 0, 1)  # the halo goes, the strokes keep their shading


def long_runs(marked: np.ndarray, length: int) -> np.ndarray:
    """Where `marked` (bool) lies on a horizontal run of at least `length` pixels."""
    width = marked.shape[1]
    if length > width:
        return np.zeros_like(marked)
    counts = np.cumsum(np.pad(marked, ((0, 0), (1, 0))), axis=1, dtype=np.int32)
    full = counts[:, length:] - counts[:, :-length] == length  # the run of `length` starting at each column
    starts = np.cumsum(np.pad(full, ((0, 0), (1, 0))), axis=1, dtype=np.int32)
    cols = np.arange(width)
    return starts[:, np.minimum(cols, width - length) + 1] - starts[:, np.maximum(cols - length + 1, 0)] > 0


def bridged(ink: np.ndarray, line: np.ndarray) -> np.ndarray:
    """`ink` with each `line` pixel given the fainter of the nearest pixels above and below the
    line: a stroke that crosses the line stays whole, the rest of the line goes."""
    height = ink.shape[0]
    rows = np.arange(height)[:, None]
    above = np.maximum.accumulate(np.where(line, -1, rows), axis=0)
    below = np.minimum.accumulate(np.where(line, height, rows)[::-1], axis=0)[::-1]
    padded, cols = np.pad(ink, ((1, 1), (0, 0))), np.arange(ink.shape[1])
    return np.where(line, np.minimum(padded[above + 1, cols], padded[below + 1, cols]), ink)


def printed_lines(ink: np.ndarray) -> np.ndarray:
    """Where `ink` lies on a horizontal printed line: a run across LINE of the picture's width,
    where handwriting is neither that long nor that straight."""
    # Averaged along the run, so that noise as strong as a pale line neither breaks it nor joins
    # it; widened by a row either way, so that a line climbing a row across the picture is one run.
    window = 2 * GAP + 1
    sums = np.cumsum(np.pad(ink, ((0, 0), (GAP + 1, GAP)), mode="edge"), axis=1)
    marked = (sums[:, window:] - sums[:, :-window]) / window > INK * ink.max()
    near = marked.copy()
    near[1:] |= marked[:-1]
    near[:-1] |= marked[1:]
    length = int(np.ceil(LINE * ink.shape[1])) + 2 * GAP  # averaging lengthened runs by 2 GAP
    if np.count_nonzero(near, axis=1).max() < length:  # no row holds a run that long: most pictures
        return np.zeros_like(near)
    line = long_runs(near, length) & near
    # A printed line is thin; long runs stacked thicker than that are a filled shape, a garment's body.
    return line & ~long_runs(line.T, max(4, ink.shape[0] // THICKEST) + 1).T


def without_printed_lines(ink: np.ndarray) -> np.ndarray:
    """`ink` less the lines of ruled or squared paper and a form's box, horizontal and vertical.
    A picture that would be left blank keeps its ink: it is a 1 drawn from edge to edge."""
    across, down = printed_lines(ink), printed_lines(ink.T).T
    kept = bridged(ink, across) if across.any() else ink
    kept = bridged(kept.T, down.T).T if down.any() else kept
    return kept if kept.max() >= 0.1 else ink


def fit(ink: np.ndarray, dataset: str = "mnist") -> np.ndarray:
    """`ink` (from ink_of) fitted into the dataset's box and centered by mass in the 28x28 field."""
    convention = CONVENTIONS.get(dataset, CONVENTIONS["mnist"])
    box, strokes = convention["box"], convention["strokes"]
    rows, cols = np.nonzero(ink)
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = box / max(crop.shape)
    height, width = (max(1, round(side * scale)) for side in crop.shape)
    # Pillow's "F" mode keeps floats; its bilinear resize anti-aliases when shrinking.
    fitted = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.BILINEAR))
    fitted = np.clip(fitted, 0, 1)
    if strokes and (fitted > INK).any():  # blur and downscaling grey the strokes; MNIST's are mostly at full brightness
        fitted = np.clip(fitted / np.percentile(fitted[fitted > INK], STROKE), 0, 1)

    # Where the fitted ink's center of mass lands at the field's center, clipped to the field.
    mass_rows, mass_cols = np.indices(fitted.shape)
    total = fitted.sum()
    top = round(FIELD / 2 - (mass_rows * fitted).sum() / total)
    left = round(FIELD / 2 - (mass_cols * fitted).sum() / total)
    top, left = min(max(top, 0), FIELD - height), min(max(left, 0), FIELD - width)
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    field[top:top + height, left:left + width] = fitted
    return field
