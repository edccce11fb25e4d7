"""The training augmentations: each does what its name says, per image, seeded, blank stays blank."""
import pytest
import torch
from torch.nn import functional as F

from mnistflow import augment

FILL = -1.0  # the normalised value of a blank pixel, in these tests


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blocks(n: int = 200) -> torch.Tensor:
    """n blank images, each with a 8x4 block of its own value at rows 10-17, columns 12-15."""
    images = torch.full((n, 1, 28, 28), FILL)
    images[:, 0, 10:18, 12:16] = torch.arange(n, dtype=torch.float).view(n, 1, 1)
    return images


def centre_of_mass(ink: torch.Tensor) -> torch.Tensor:
    """(n, 2) row and column of each image's ink centre."""
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = ink[:, 0].sum((1, 2))
    return torch.stack([(ink[:, 0] * rows).sum((1, 2)) / mass, (ink[:, 0] * cols).sum((1, 2)) / mass], 1)


def test_shift_moves_each_image_whole_by_at_most_the_given_pixels():
    images = blocks()
    shifted = augment.shift_randomly(images, 2, fill=FILL, generator=seeded())
    assert shifted.shape == images.shape
    offsets = set()
    for i in range(200):
        rows, cols = torch.nonzero(shifted[i, 0] != FILL, as_tuple=True)
        assert len(rows) == 32 and (shifted[i, 0][rows, cols] == i).all()  # the whole block, its own value
        offsets.add((rows.min().item() - 10, cols.min().item() - 12))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # every offset, none farther
    assert torch.equal(shifted, augment.shift_randomly(images, 2, fill=FILL, generator=seeded()))


def test_max_3x3_is_a_stride_1_max_pool_with_blank_outside():
    ink = torch.rand(5, 1, 28, 28)
    assert torch.equal(augment._max_3x3(ink), F.max_pool2d(F.pad(ink, (1, 1, 1, 1)), 3, stride=1))


def test_strokes_get_thicker_and_thinner_per_image():
    ink = torch.zeros(400, 1, 28, 28)
    ink[:, 0, 8:20, 12:15] = 1.0  # a stroke 3 pixels wide
    changed = augment.change_strokes(ink, seeded())
    width = changed[:, 0, 14].sum(1)  # the ink across the stroke's middle row
    assert width.max() > 4.5 and width.min() < 2.1  # up to a pixel each side thicker, up to half a pixel thinner
    assert width.min() >= 2.0 - 1e-6 and width.max() <= 5.0 + 1e-6
    assert (changed >= 0).all() and (changed <= 1).all()


@pytest.mark.parametrize("kinds", [("affine",), ("elastic",), ("affine", "stroke", "elastic")])
def test_warps_move_each_image_its_own_way_keep_it_near_the_centre_and_repeat_when_seeded(kinds):
    images = blocks()
    images[:, 0, 10:18, 12:16] = 1.0
    out = augment.augment(images, kinds, fill=FILL, generator=seeded())
    assert out.shape == images.shape
    assert torch.equal(out, augment.augment(images, kinds, fill=FILL, generator=seeded()))
    assert not torch.equal(out, augment.augment(images, kinds, fill=FILL, generator=seeded(1)))
    assert (out[:, 0, :2, :2] == FILL).all()  # the corners stay blank: nothing came in from outside
    ink = out - FILL
    assert len({tuple(x.round(decimals=3).tolist()) for x in ink[:, 0, 14]}) > 150  # per image, not per batch
    moved = (centre_of_mass(ink) - centre_of_mass(images - FILL)).norm(dim=1)
    assert moved.max() < 6 and moved.mean() > 0.2  # translation moves by up to 2.5 * sqrt(2) pixels


def test_affine_rotates_by_up_to_the_limit():
    line = torch.full((500, 1, 28, 28), FILL)
    line[:, 0, 4:24, 13:15] = 1.0  # an upright bar
    ink = augment.warp(line - FILL, ("affine",), seeded())
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    # the bar's slant: its covariance's main axis, measured from the vertical
    mass = ink[:, 0].sum((1, 2))
    r, c = centre_of_mass(ink).unbind(1)
    dr, dc = rows - r.view(-1, 1, 1), cols - c.view(-1, 1, 1)
    crr, ccc, crc = ((ink[:, 0] * x).sum((1, 2)) / mass for x in (dr * dr, dc * dc, dr * dc))
    slant = torch.rad2deg(0.5 * torch.atan2(2 * crc, crr - ccc)).abs()
    # shear slants the bar too, by up to atan(0.3) = 17 degrees
    assert slant.max() < augment.ROTATE_DEGREES + 17 + 2 and slant.max() > augment.ROTATE_DEGREES


def test_none_and_shift_alone_do_not_resample():
    images = blocks(10)
    assert augment.augment(images, (), FILL, seeded()) is images
    assert set(augment.augment(images, ("shift",), FILL, seeded()).unique().tolist()) <= set(images.unique().tolist())


def test_parse():
    assert augment.parse("none") == ()
    assert augment.parse("affine,stroke") == ("affine", "stroke")
