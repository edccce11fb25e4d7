"""How well a model holds up on pictures that did not come from its test set as it is.

Each condition turns one test image into a picture as a user's file would hold it (a coarse
scan, a thick marker, a tilted or off-centre drawing, a photo of dark ink on paper...); the
picture then goes through the same preprocessing `predict` gives a user's file
(`images.to_mnist`), and the model is scored on the result. The reference condition `clean` is
the test image as it is, without preprocessing; `clean_png` is the same image as a user's 28x28
PNG, so the gap between the two is what the preprocessing alone costs.

Everything is seeded: the same test images for every condition, and each condition's random
choices (a rotation's sign, the noise) drawn from a generator of its own, so scores repeat.
"""
import io

import numpy as np
from PIL import Image, ImageFilter

from mnistflow import images, logged_model
from mnistflow.data import Data
from mnistflow.errors import ImageError

CLEAN = "clean"  # the reference: no picture, no preprocessing
LIGHT_PAPER = 0.95  # the page's brightness where the light falls on it ...
SHADOW = 0.65       # ... and at its far, shadowed side
INK_ON_PAPER = 0.15  # dark ink's brightness on a lit page


def picture(pixels: np.ndarray) -> Image.Image:
    """[0, 1] pixels as an 8-bit greyscale picture, as a PNG would store them."""
    return Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def pixels_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def as_png(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return picture(image)


def low_resolution(side: int):
    def reduced(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
        # Pillow's BOX filter averages the pixels each coarse one covers, as a coarse sensor would.
        small = picture(image).resize((side, side), Image.Resampling.BOX)
        return small.resize((images.FIELD, images.FIELD), Image.Resampling.BILINEAR)
    return reduced


def stroke_width(size: int, thicker: bool):
    """Strokes one 28x28 pixel thicker or thinner, drawn at `size` x `size`: a grey-level
    dilation or erosion whose square window is one 28x28 pixel wider than a point at that size,
    so that every stroke gains or loses exactly that width."""
    grow = size // images.FIELD  # one 28x28 pixel, in pixels of the drawing
    extreme = np.maximum if thicker else np.minimum

    def changed(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
        drawn = picture(image)
        if size != images.FIELD:
            drawn = drawn.resize((size, size), Image.Resampling.BILINEAR)
        pixels = pixels_of(drawn)
        padded = np.pad(pixels, (0, grow))
        for down in range(grow + 1):
            for right in range(grow + 1):
                pixels = extreme(pixels, padded[down:down + size, right:right + size])
        return picture(pixels)
    return changed


def rotated(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    # Exactly 15 degrees, either way: a fixed angle makes the score say how much 15 degrees costs.
    angle = 15.0 * rng.choice([-1, 1])
    return picture(image).rotate(angle, Image.Resampling.BILINEAR, expand=True)


def sheared(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Slanted handwriting: x shifted by 0.3 of the height from the middle row (about 17 degrees), either way."""
    shear = 0.3 * rng.choice([-1, 1])
    margin = int(np.ceil(abs(shear) * images.FIELD / 2))
    page = Image.new("L", (images.FIELD + 2 * margin, images.FIELD))
    page.paste(picture(image), (margin, 0))
    # Pillow maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    centre = images.FIELD / 2
    return page.transform(page.size, Image.Transform.AFFINE, (1, shear, -shear * centre, 0, 1, 0),
                          Image.Resampling.BILINEAR)


PAGE = 100   # off_centre's page side
CORNER = 16  # the digit's top-left corner lies within this many pixels of a page corner


def off_centre(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The digit near one of the corners of a larger page, never in its middle."""
    far = PAGE - images.FIELD
    top, left = (int(rng.integers(0, CORNER + 1)) if rng.random() < 0.5 else far - int(rng.integers(0, CORNER + 1))
                 for _ in range(2))
    page = Image.new("L", (PAGE, PAGE))
    page.paste(picture(image), (left, top))
    return page


def stretched(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """1.5 times as wide or 1.5 times as tall: another writer's proportions."""
    long_side = round(images.FIELD * 1.5)
    size = (long_side, images.FIELD) if rng.random() < 0.5 else (images.FIELD, long_side)
    return picture(image).resize(size, Image.Resampling.BILINEAR)


def lighting(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A page's brightness under light from one side: falling from LIGHT_PAPER to SHADOW across
    it, in a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = np.indices(shape) / (max(shape) - 1) - 0.5
    along = np.cos(angle) * cols + np.sin(angle) * rows  # in [-0.71, 0.71]
    return LIGHT_PAPER + (SHADOW - LIGHT_PAPER) * (along - along.min()) / (along.max() - along.min())


def on_paper(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark ink on a page lit from one side."""
    return lighting(image.shape, rng) * (1 - image * (1 - INK_ON_PAPER))


def paper_light(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return picture(on_paper(image, rng))


BLUR_RADIUS = 1.0   # Gaussian, in 28x28 pixels
NOISE_STD = 0.1     # sensor noise, in [0, 1] brightness
JPEG_QUALITY = 30


def blurred(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return picture(image).filter(ImageFilter.GaussianBlur(BLUR_RADIUS))


def with_noise(pixels: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    return np.clip(pixels + rng.normal(0, std, pixels.shape), 0, 1)


def noisy(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return picture(with_noise(image, rng, NOISE_STD))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded


def compressed(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return jpeg(picture(image), JPEG_QUALITY)


PHOTO_SIZE = 84


def photographed(page: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A phone's photo of a page, (H, W) grey or (H, W, 3) colour brightness: slightly out of
    focus, noisy, a colour JPEG. Each effect milder than in its own condition, as they add up."""
    blur = ImageFilter.GaussianBlur(BLUR_RADIUS / 2 * PHOTO_SIZE / images.FIELD)
    focused = np.asarray(picture(page).filter(blur), dtype=np.float32) / 255.0
    return jpeg(picture(with_noise(focused, rng, NOISE_STD / 2)).convert("RGB"), 2 * JPEG_QUALITY)


def enlarged(image: np.ndarray) -> np.ndarray:
    return pixels_of(picture(image).resize((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.BILINEAR))


def photo(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A phone photo of a digit on paper: larger, lit unevenly, slightly out of focus, noisy, a colour JPEG."""
    return photographed(on_paper(enlarged(image), rng), rng)


# Paper with printed lines, as PHOTO_SIZE pictures where the digit is about 60 pixels tall. Colours
# are RGB brightness; printed lines, ink and graphite each let through a share of the light.
PAPER_RGB = np.array([0.97, 0.97, 0.95])
RULING_RGB = np.array([0.62, 0.72, 0.92])  # the pale blue of notebook lines: about 0.73 grey
BOX_RGB = np.array([0.25, 0.25, 0.3])      # a form's printed box, as dark as the pen
PEN_RGB = np.array([0.1, 0.12, 0.4])       # blue-black ballpoint
PENCIL_RGB = np.array([0.3, 0.3, 0.32])    # graphite, laid down PENCIL of the way ...
PENCIL = 0.6
GRAIN = 0.35                               # ... less up to this share where the paper's grain skips it
RULED_SPACING = (54, 66)   # a line every digit's height or so, one under the digit
SQUARE_SIDE = (26, 36)     # 5 mm squares: a digit about two squares tall
BOX_INSET = (2, 6)         # the box's sides from the picture's edges (the photo is cropped to the box)


def printed_lines(kind: str, rng: np.random.Generator) -> np.ndarray:
    """(PHOTO_SIZE, PHOTO_SIZE): 1 where a printed line of `kind` (ruled, squared, boxed) lies, else 0."""
    lines = np.zeros((PHOTO_SIZE, PHOTO_SIZE), dtype=np.float32)
    width = int(rng.integers(1, 3))
    if kind == "ruled":
        spacing, baseline = int(rng.integers(*RULED_SPACING)), int(rng.integers(68, 76))  # the digit sits on it
        for row in range(baseline % spacing, PHOTO_SIZE, spacing):
            lines[row:row + width] = 1
    elif kind == "squared":
        side = int(rng.integers(*SQUARE_SIDE))
        top, left = rng.integers(0, side, 2)
        for extra in range(width):
            lines[top + extra::side] = 1
            lines[:, left + extra::side] = 1
    else:
        top, left, bottom, right = rng.integers(*BOX_INSET, 4)
        lines[top:PHOTO_SIZE - bottom, left:PHOTO_SIZE - right] = 1
        lines[top + 2:PHOTO_SIZE - bottom - 2, left + 2:PHOTO_SIZE - right - 2] = 0
    return lines


def on_printed_lines(kind: str, tool: str):
    """The digit written in `tool` (pen or pencil) on paper with printed lines of `kind`,
    photographed. Pencil strokes are thinner (a third of a 28x28 pixel off each side), paler and grainy."""
    line_rgb = BOX_RGB if kind == "boxed" else RULING_RGB

    def written(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
        lines = printed_lines(kind, rng)[..., None]
        ink = enlarged(image)
        if tool == "pencil":
            ink = pixels_of(picture(ink).filter(ImageFilter.MinFilter(3)))
            ink = ink * PENCIL * (1 - GRAIN * rng.random(ink.shape))
            ink_rgb = PENCIL_RGB
        else:
            ink_rgb = PEN_RGB
        ink = ink[..., None]
        page = PAPER_RGB * (1 - lines * (1 - line_rgb / PAPER_RGB)) * (1 - ink * (1 - ink_rgb / PAPER_RGB))
        return photographed(page * (lighting(ink.shape[:2], rng) / LIGHT_PAPER)[..., None], rng)
    return written


# name -> the picture a user's file would hold. The order fixes each condition's seed: append new ones.
CONDITIONS = {
    CLEAN: as_png,
    "clean_png": as_png,
    "lowres_8": low_resolution(8),
    "lowres_12": low_resolution(12),
    "thick_28": stroke_width(28, thicker=True),
    "thin_28": stroke_width(28, thicker=False),
    "thick_84": stroke_width(84, thicker=True),
    "thin_84": stroke_width(84, thicker=False),
    "rotate_15": rotated,
    "shear": sheared,
    "off_centre": off_centre,
    "aspect": stretched,
    "paper_light": paper_light,
    "blur": blurred,
    "noise": noisy,
    "jpeg": compressed,
    "photo": photo,
    **{f"{kind}_{tool}": on_printed_lines(kind, tool) for kind in ("ruled", "squared", "boxed")
       for tool in ("pen", "pencil")},
}
# A garment has no stroke width, its proportions tell its class (a stretched shirt is a dress), and
# nobody draws one on lined paper.
NOT_FOR_CLOTHES = {"thick_28", "thin_28", "thick_84", "thin_84", "aspect",
                   *(name for name in CONDITIONS if name.startswith(("ruled_", "squared_", "boxed_")))}


def conditions_for(dataset: str) -> list[str]:
    return [name for name in CONDITIONS if dataset == "mnist" or name not in NOT_FOR_CLOTHES]


def chosen(data: Data, n: int, seed: int) -> np.ndarray:
    """Which test images are scored: n of them (all when n is larger), the same for every condition."""
    count = len(data.test)
    return np.sort(np.random.default_rng(seed).choice(count, size=min(n, count), replace=False))


def condition_rng(condition: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, list(CONDITIONS).index(condition)])


def preprocessed(image: Image.Image, dataset: str) -> np.ndarray:
    """What `predict` makes of the picture. A picture it would refuse as blank (a thin stroke
    eroded away) is an empty input here, which the model gets wrong unless by chance."""
    try:
        return images.to_mnist(image, dataset=dataset)
    except ImageError:
        return np.zeros((images.FIELD, images.FIELD), dtype=np.float32)


def pictures(data: Data, condition: str, n: int = 2000, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    """(the pictures a user's files would hold, labels (n,)): the chosen test images under the condition."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")
    which = chosen(data, n, seed)
    make, rng = CONDITIONS[condition], condition_rng(condition, seed)
    return [make(image[0], rng) for image in data.pixels(data.test)[which].numpy()], data.test.labels[which].numpy()


def inputs(data: Data, condition: str, n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (n, 1, 28, 28) float32 in [0, 1], labels (n,)): the chosen test images under the
    condition, as the model gets them; `clean` without pictures or preprocessing."""
    if condition == CLEAN:
        which = chosen(data, n, seed)
        return data.pixels(data.test)[which].numpy(), data.test.labels[which].numpy()
    given, labels = pictures(data, condition, n, seed)
    changed = np.stack([preprocessed(picture, data.name) for picture in given])
    return changed[:, None].astype(np.float32), labels


def scores(model, data: Data, n: int = 2000, seed: int = 0, conditions: list[str] | None = None) -> dict[str, float]:
    """Condition name -> the model's accuracy on it, for the dataset's conditions unless given."""
    results = {}
    for condition in conditions or conditions_for(data.name):
        pixels, labels = inputs(data, condition, n, seed)
        results[condition] = float((logged_model.probabilities(model, pixels).argmax(1) == labels).mean())
    return results


def worst(results: dict[str, float]) -> tuple[str, float]:
    """The condition (other than the clean reference) with the lowest accuracy, and that accuracy."""
    name = min((name for name in results if name != CLEAN), key=results.get)
    return name, results[name]


def examples(data: Data, seed: int = 0) -> list[tuple[str, Image.Image, np.ndarray]]:
    """(condition, the picture a user's file would hold, the model's 28x28 input) for one test image."""
    image = data.pixels(data.test)[chosen(data, 1, seed)[0]].numpy()[0]
    shown = []
    for condition in conditions_for(data.name):
        given = CONDITIONS[condition](image, condition_rng(condition, seed))
        shown.append((condition, given, image if condition == CLEAN else preprocessed(given, data.name)))
    return shown


# Numbers as a hand writes them (bench/read_numbers.py): test digits side by side, a row or two up
# or down, with gaps between their bounding boxes, in 28x28 pixels, of one of these kinds.
GAPS = {"spaced": (2, 6), "touching": (-2, -1), "overlapping": (-5, -3)}
PAGE_BRIGHTNESS = 0.95  # the paper; ink takes 85 % of it


def compose(digits: list[np.ndarray], gaps: list[int], rng: np.random.Generator) -> Image.Image:
    """28x28 [0, 1] digits (light on black) cropped to their ink and set side by side `gaps`
    apart, each a row or two up or down, as dark ink on a light page."""
    crops = []
    for digit in digits:
        cols = np.nonzero((digit > 0.1).any(0))[0]
        crops.append(digit[:, cols.min():cols.max() + 1])
    width = sum(crop.shape[1] for crop in crops) + sum(gaps) + 16
    page = np.zeros((images.FIELD + 8, width), dtype=np.float32)
    left = 8
    for crop, gap in zip(crops, [*gaps, 0]):
        top = 4 + int(rng.integers(-2, 3))
        window = page[top:top + images.FIELD, left:left + crop.shape[1]]
        np.maximum(window, crop, out=window)  # overlapping strokes: the darker ink shows
        left += crop.shape[1] + gap
    return Image.fromarray(np.round(PAGE_BRIGHTNESS * (1 - 0.85 * page) * 255).astype(np.uint8))


def numbers(data: Data, length: int, spacing: str, n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """n (picture, the number's digits) of `length` test digits with `spacing` between them."""
    rng = np.random.default_rng([seed, length, list(GAPS).index(spacing)])
    pixels, labels = data.pixels(data.test).numpy()[:, 0], data.test.labels.numpy()
    made = []
    for _ in range(n):
        which = rng.integers(0, len(labels), length)
        gaps = [int(rng.integers(GAPS[spacing][0], GAPS[spacing][1] + 1)) for _ in range(length - 1)]
        made.append((compose(list(pixels[which]), gaps, rng), "".join(str(d) for d in labels[which])))
    return made
