"""Training-time augmentations, drawn per batch on the in-memory tensors.

Real digits differ from MNIST's in placement, slant, size, stroke width and wobble; each kind
below imitates one of those, so the net learns to ignore it. All are whole-batch tensor
operations drawn from the given generator, so a seeded or resumed run repeats them exactly.

    shift    moved by up to 2 whole pixels (exact copies, no resampling)
    affine   rotated, scaled, sheared and moved (one resampling)
    stroke   strokes made thicker or thinner (a blend towards a 3x3 dilation or erosion)
    elastic  a smooth random warp, as a hand's wobble (Simard et al. 2003)
"""
import functools
import math

import torch
from torch.nn import functional as F

KINDS = ("shift", "affine", "stroke", "elastic")
SHIFT_PIXELS = 2        # 2 of 28 keeps every digit whole
ROTATE_DEGREES = 15
SCALE = 0.15            # sizes from 85 % to 115 %
SHEAR = 0.3             # x moves by up to 0.3 of y
TRANSLATE_PIXELS = 2.5
ELASTIC_PIXELS = 1.0    # the warp's typical displacement
ELASTIC_GRID = 4        # its random displacements sit on a 4x4 grid, smoothly interpolated between


def parse(text: str) -> tuple[str, ...]:
    """The kinds named by a validated `augment` setting: "none", or kinds joined by commas."""
    return () if text == "none" else tuple(text.split(","))


def shift_randomly(images: torch.Tensor, pixels: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of up to `pixels` rows and columns.

    The uncovered edge gets `fill`, the normalised value of a blank pixel. One gather on the
    whole batch.
    """
    n, _, height, width = images.shape
    padded = F.pad(images[:, 0], (pixels,) * 4, value=fill)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n, 1, 1), generator=generator)
    rows = dy + torch.arange(height).view(1, height, 1)
    cols = dx + torch.arange(width).view(1, 1, width)
    return padded[torch.arange(n).view(n, 1, 1), rows, cols].unsqueeze(1)


def _uniform(n: int, half_width: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1) * half_width


def _max_3x3(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's largest 3x3 neighbour, outside the image counting as 0 (a dozen times
    faster on a CPU than F.max_pool2d with stride 1)."""
    padded = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])


def change_strokes(ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image's strokes thickened (by up to a pixel on each side) or thinned (by up to half
    that: a whole pixel would erase the thinnest digits)."""
    amount = (torch.rand(len(ink), 1, 1, 1, generator=generator) * 1.5 - 0.5)
    thicker, thinner = _max_3x3(ink), -_max_3x3(-ink)
    return ink + amount.clamp(min=0) * (thicker - ink) + (-amount).clamp(min=0) * (thinner - ink)


@functools.lru_cache
def _identity_grid(height: int, width: int) -> torch.Tensor:
    """(height * width, 3): each output pixel's centre in grid_sample's [-1, 1] units, and a 1."""
    centres = F.affine_grid(torch.eye(2, 3)[None], [1, 1, height, width], align_corners=False).view(-1, 2)
    return torch.cat([centres, torch.ones(height * width, 1)], 1)


@functools.lru_cache
def _spread(size: int) -> torch.Tensor:
    """(size, ELASTIC_GRID): linear interpolation from the coarse grid's points to every pixel."""
    return F.interpolate(torch.eye(ELASTIC_GRID)[None], size=size, mode="linear", align_corners=True)[0].T


def warp(ink: torch.Tensor, kinds: tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    """The random affine map and/or elastic warp of each image, resampled once, bilinearly.

    The sampling grid is built with two small matrix products: F.affine_grid and F.interpolate
    cost more than the convolutions of a batch on a CPU.
    """
    n, _, height, width = ink.shape
    matrix = torch.eye(2, 3).expand(n, 2, 3)
    if "affine" in kinds:
        angle = _uniform(n, math.radians(ROTATE_DEGREES), generator)
        scale = 1 + _uniform(n, SCALE, generator)
        shear = _uniform(n, SHEAR, generator)
        move = _uniform(2 * n, 2 * TRANSLATE_PIXELS / width, generator).view(n, 2)  # in [-1, 1] units
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # The grid maps output to input positions: the inverse of the transform applied to the image.
        matrix = torch.stack([torch.stack([cos, -sin + shear * cos, move[:, 0]], 1),
                              torch.stack([sin, cos + shear * sin, move[:, 1]], 1)], 1)
    grid = (_identity_grid(height, width) @ matrix.transpose(1, 2)).view(n, height, width, 2)
    if "elastic" in kinds:
        coarse = torch.randn(n, ELASTIC_GRID, ELASTIC_GRID, 2, generator=generator) * (2 * ELASTIC_PIXELS / width)
        grid = grid + torch.einsum("hi,nijc,wj->nhwc", _spread(height), coarse, _spread(width))
    return F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(images: torch.Tensor, kinds: tuple[str, ...], fill: float, generator: torch.Generator) -> torch.Tensor:
    """A batch of normalised images with the given kinds of augmentation, each drawn per image.

    `fill` is the normalised value of a blank pixel: the operations work on ink above it, so
    what they move in from outside the image is blank.
    """
    if "shift" in kinds:
        images = shift_randomly(images, SHIFT_PIXELS, fill, generator)
    if not {"affine", "stroke", "elastic"} & set(kinds):
        return images
    ink = images - fill
    if "stroke" in kinds:
        ink = change_strokes(ink, generator)
    if "affine" in kinds or "elastic" in kinds:
        ink = warp(ink, kinds, generator)
    return ink + fill
