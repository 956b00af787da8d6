"""A1111's "Inpaint area: Only masked" (ldm/only_masked.py): the box around the mask as A1111 cuts it, its fit and
its way back, and the pipeline's answer against the whole-picture inpainting of the box it cuts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.generation_request import GenerationRequest
from ldm.init_images import cover, fit_and_fill
from ldm.inpainting import blurred, mask_pixels
from ldm.only_masked import Crop, crop_box
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from tests.reference import REFERENCE, load_image

INIT = load_image(REFERENCE / "init_dev_80x64.png").convert("RGB").resize((160, 128), Image.Resampling.LANCZOS)


def _mask(box: tuple[int, int, int, int], size: tuple[int, int] = (160, 128)) -> Image.Image:
    """Black, white inside `box` (left, top, right, bottom)."""
    mask = Image.new("L", size)
    mask.paste(255, box)
    return mask


def a1111_box(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's box re-derived from its definition (masking.get_crop_region_v2 and expand_crop_region): PIL's bounding
    box of the non-zero pixels, padded within the image, then the short side grown by int(wanted − side), half of it
    (rounded down) before, the rest after, moved back inside an edge it crosses and cut at the far one."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    left, top, right, bottom = image.getbbox()
    if padding:
        left, top = max(left - padding, 0), max(top - padding, 0)
        right, bottom = min(right + padding, image.width), min(bottom + padding, image.height)
    box = [left, top, right, bottom]
    ratio = width / height
    axis = 1 if (right - left) / (bottom - top) > ratio else 0  # 1: grow the height
    size = (image.width, image.height)[axis]
    wanted = (right - left) / ratio if axis else (bottom - top) * ratio
    low, high = box[axis], box[axis + 2]
    grow = int(wanted - (high - low))
    low -= grow // 2
    high += grow - grow // 2
    if high >= size:
        low, high = low - (high - size), size
    if low < 0:
        low, high = 0, high - low
    box[axis], box[axis + 2] = low, min(high, size)
    return left if axis else box[0], box[1], right if axis else box[2], box[3]


@pytest.mark.parametrize(
    ("touched", "padding", "size", "box"),
    [
        ((100, 40, 130, 60), 0, (64, 64), (100, 35, 130, 65)),  # 30×20 grown to 30×30 about its centre
        ((100, 40, 130, 60), 8, (64, 64), (92, 27, 138, 73)),  # padded first
        ((0, 0, 40, 10), 0, (64, 64), (0, 0, 40, 40)),  # moved down off the top edge
        ((150, 100, 160, 128), 4, (64, 64), (128, 96, 160, 128)),  # padding cut at the corner, moved left
        ((0, 60, 160, 70), 0, (32, 64), (0, 0, 160, 128)),  # wanted 320 tall: the whole height
        ((70, 50, 90, 54), 0, (48, 64), (70, 39, 90, 65)),  # an odd pixel goes after
    ],
)  # fmt: skip
def test_the_box_is_a1111s(
    touched: tuple[int, int, int, int], padding: int, size: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    mask = np.asarray(_mask(touched)) > 0
    assert crop_box(mask, padding, *size) == box == a1111_box(mask, padding, *size)


def test_random_masks_cut_a1111s_box() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        mask = np.zeros((int(rng.integers(8, 120)), int(rng.integers(8, 120))), bool)
        y, x = rng.integers(0, mask.shape[0]), rng.integers(0, mask.shape[1])
        mask[y : y + rng.integers(1, 40), x : x + rng.integers(1, 40)] = True
        padding, width, height = int(rng.integers(0, 40)), int(rng.integers(1, 9)) * 8, int(rng.integers(1, 9)) * 8
        assert crop_box(mask, padding, width, height) == a1111_box(mask, padding, width, height)


def test_fit_and_fill_keeps_the_shape_and_stretches_the_edges() -> None:
    """A wide picture in a square: scaled to the width, centred, the bands above and below its first and last rows
    stretched (LANCZOS samples them about the edge row: one row, much like it)."""
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 60, 3), np.uint8))
    square = np.asarray(fit_and_fill(picture, 48, 48)).astype(int)
    scaled = np.asarray(picture.resize((48, 16), Image.Resampling.LANCZOS)).astype(int)
    assert np.array_equal(square[16:32], scaled)
    for band, edge in ((square[:16], scaled[0]), (square[32:], scaled[-1])):
        assert (band == band[0]).all()  # one row, stretched
        assert np.abs(band[0] - edge).mean() < np.abs(band[0] - scaled[8]).mean() / 3
    same_shape = np.asarray(fit_and_fill(picture, 30, 10))
    assert np.array_equal(same_shape, np.asarray(picture.resize((30, 10), Image.Resampling.LANCZOS)))


def test_fit_and_fill_places_the_picture_whole_and_fills_each_band_from_its_own_edge() -> None:
    """The fitted picture at its centred place, every row of it, with an odd leftover (64×21 in 48×48: 15 rows, 17
    above and 16 below); each band stretched from the edge beside it (left red, right blue); a band one pixel wide
    filled too, beside the picture or above and below it (62×64 and 64×62 in 64×64)."""
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (21, 64, 3), np.uint8))
    fitted = np.asarray(picture.resize((48, 15), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(fit_and_fill(picture, 48, 48))[17:32], fitted)
    halves = np.zeros((60, 20, 3), np.uint8)
    halves[:, :10] = (255, 0, 0)
    halves[:, 10:] = (0, 0, 255)
    tall = np.asarray(fit_and_fill(Image.fromarray(halves), 48, 48)).astype(int)
    assert (tall[:, :16, 0] > 200).all() and (tall[:, :16, 2] < 50).all()
    assert (tall[:, 32:, 2] > 200).all() and (tall[:, 32:, 0] < 50).all()
    for size in ((62, 64), (64, 62)):
        flat = np.asarray(fit_and_fill(Image.new("RGB", size, (200, 100, 50)), 64, 64))
        assert (flat == (200, 100, 50)).all()


def test_a_box_one_pixel_wide_fits_a_wide_request() -> None:
    """16×1800 in 2048×64 rounds to 0 pixels wide: one, whose stretched edges fill the rest."""
    sliver = Image.new("RGB", (16, 1800), (10, 200, 30))
    assert np.asarray(fit_and_fill(sliver, 2048, 64)).reshape(-1, 3).tolist() == [[10, 200, 30]] * 2048 * 64


def test_cover_crops_the_centre_of_the_scaled_picture() -> None:
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 60, 3), np.uint8))
    scaled = np.asarray(picture.resize((144, 48), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(cover(picture, 48, 48)), scaled[:, 48:96])
    # An odd width: A1111 pastes the scaled picture at width // 2 − 144 // 2 = −48, so 49 columns from the 48th.
    assert np.array_equal(np.asarray(cover(picture, 49, 48)), scaled[:, 48:97])
    # A box far from the picture's shape: the middle 64 rows of the 512×8192 it covers, scaled alone.
    tall = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 4, 3), np.uint8))
    whole = np.asarray(tall.resize((512, 8192), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(cover(tall, 512, 64)), whole[4064:4128])


def _request(mask: Image.Image, **change: object) -> GenerationRequest:
    return GenerationRequest(
        "a red door in a stone wall", steps=5, seed=21, init_image=INIT, mask_image=mask, height=64, width=64,
        strength=0.8, inpaint_area="only_masked", **change,  # type: ignore[arg-type]
    )  # fmt: skip


def test_only_masked_is_the_whole_picture_inpainting_of_its_box_put_back(pipeline: Pipeline) -> None:
    """A 40×30 mask padded by 12 cuts a 64×64 box (A1111's) at the request's own size; with a hard seam, the answer
    is the init image outside the mask and, inside the box, what inpainting the box's init image and mask as a
    whole picture paints, level for level; the answer has the init image's size and A1111's PNG fields."""
    mask = _mask((60, 40, 100, 70))
    box = a1111_box(np.asarray(mask) > 0, 12, 64, 64)
    assert box == (48, 23, 112, 87)
    request = _request(mask, mask_blur=0, masked_area_padding=12, n_samples=2)
    ours = pipeline.generate(request)
    assert ours.images.shape == (2, 128, 160, 3)
    whole = pipeline.generate(
        dataclasses.replace(request, init_image=INIT.crop(box), mask_image=mask.crop(box), inpaint_area="whole_picture")
    )
    left, top, right, bottom = box
    assert np.array_equal(ours.images[:, top:bottom, left:right], whole.images)
    keep = np.asarray(mask) == 0
    assert all(np.array_equal(image[keep], np.asarray(INIT)[keep]) for image in ours.images)
    text = parameters_text(ours.request, ours.seeds[0])
    assert "Size: 64x64," in text and "Mask blur: 0, Inpaint area: Only masked, Masked area padding: 12" in text


def test_a_scaled_box_is_painted_at_the_request_size_and_blended_back(pipeline: Pipeline) -> None:
    """A 24×12 mask blurred by 4 touches 10 pixels around it (its kernel's reach, which rounds to a level above 0);
    padded by 8 more, that is a 60×48 box grown to 60×60 and inpainted at 64×64: outside it, and wherever the blurred
    mask is 0, the init image exactly; under the mask, another picture."""
    mask = _mask((70, 60, 94, 72))
    soft = blurred(mask_pixels(mask, 160, 128), 4)[0, 0].numpy()
    left, top, right, bottom = box = a1111_box((soft * 255).round() > 0, 8, 64, 64)
    assert box == (52, 36, 112, 96)
    image = pipeline.generate(_request(mask, masked_area_padding=8)).images[0].astype(int)
    init = np.asarray(INIT).astype(int)
    outside = np.ones((128, 160), bool)
    outside[top:bottom, left:right] = False
    assert np.array_equal(image[outside | (soft == 0)], init[outside | (soft == 0)])
    repainted = np.asarray(mask) > 0
    assert np.abs(image[repainted] - init[repainted]).mean() > 5


def test_a_request_of_another_shape_cuts_a_box_of_its_shape() -> None:
    """A 64×32 request: the 40×30 mask padded by 12 (64×54) is grown to 2:1 about its centre, 108×54."""
    mask = _mask((60, 40, 100, 70))
    crop = Crop.of(dataclasses.replace(_request(mask, mask_blur=0, masked_area_padding=12), width=64, height=32))
    assert crop.box == a1111_box(np.asarray(mask) > 0, 12, 64, 32) == (26, 28, 134, 82)
    assert crop.run.init_image is not None and crop.run.init_image.size == (64, 32)


def test_a_painting_goes_back_over_a_box_of_another_shape_as_a1111_crops_and_resizes_it() -> None:
    """A mask across the whole width, for a 32×64 request: the box grown to 320 rows is cut to the image's 128,
    160×128 where the painting is 32×64. A1111 puts a painting back by its "crop and resize": scaled to cover the box
    (160×320) and its middle 128 rows kept; with a hard seam, the mask's rows are those, the rest the init image."""
    mask = _mask((0, 60, 160, 70))
    crop = Crop.of(dataclasses.replace(_request(mask, mask_blur=0, masked_area_padding=0), width=32, height=64))
    assert crop.box == (0, 0, 160, 128)
    painted = np.random.default_rng(5).integers(0, 256, (64, 32, 3), np.uint8)
    back = crop(torch.from_numpy(painted).float()).numpy()
    covering = np.asarray(Image.fromarray(painted).resize((160, 320), Image.Resampling.LANCZOS))
    assert np.array_equal(back[60:70], covering[96 + 60 : 96 + 70])
    init = np.asarray(INIT)
    assert np.array_equal(back[:60], init[:60]) and np.array_equal(back[70:], init[70:])


def test_the_painting_goes_back_through_the_blurred_mask_undoubled() -> None:
    """A painting put back shows by the blurred mask itself (not doubled and clipped, as a whole picture's overlay),
    so the seam fades both ways: an all-black painting leaves init·(1 − blurred mask) in the box, the init image
    outside it."""
    mask = _mask((70, 60, 94, 72))
    crop = Crop.of(_request(mask, masked_area_padding=8))
    assert crop.box == (52, 36, 112, 96)  # the blurred mask's reach, padded (the test above)
    soft = blurred(mask_pixels(mask, 160, 128), 4)[0, 0].numpy()[:, :, None]
    init = np.asarray(INIT).astype(np.float32)
    expected = init.copy()
    expected[36:96, 52:112] = (init * (1.0 - soft))[36:96, 52:112]
    assert np.abs(crop(torch.zeros(64, 64, 3)).numpy() - expected).max() < 1e-3


def test_a_lone_pixel_under_a_wide_blur_cuts_the_box_of_the_pixel() -> None:
    """Blurred by 64, one pixel spreads below half a level everywhere (A1111's 8-bit mask shows none of it): the box
    is then the pixel's own, padded."""
    mask = _mask((80, 60, 81, 61))
    crop = Crop.of(_request(mask, mask_blur=64))
    assert crop.box == a1111_box(np.asarray(mask) > 0, 32, 64, 64) == (48, 28, 113, 93)


def test_an_inverted_mask_cuts_the_box_around_its_black_part(pipeline: Pipeline) -> None:
    """Inverted, a mask white but for a 40×30 hole repaints that hole: the same box and image as the hole's mask."""
    hole = _mask((60, 40, 100, 70))
    negative = Image.fromarray(255 - np.asarray(hole))
    inverted = pipeline.generate(_request(negative, invert_mask=True, mask_blur=0, masked_area_padding=12))
    plain = pipeline.generate(_request(hole, mask_blur=0, masked_area_padding=12))
    assert np.array_equal(inverted.images, plain.images)


def test_a_mask_that_repaints_nothing_is_an_img2img_of_the_whole_picture(pipeline: Pipeline) -> None:
    """As A1111 falls back: no box to inpaint."""
    blank = _request(Image.new("L", (160, 128)))
    img2img = dataclasses.replace(blank, mask_image=None, inpaint_area="whole_picture")
    assert np.array_equal(pipeline.generate(blank).images, pipeline.generate(img2img).images)
    assert resolve(blank).inpaint_area == "whole_picture"
