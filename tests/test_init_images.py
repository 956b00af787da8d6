"""Init images (ldm/init_images.py): transparency shown on white as A1111 flattens it, and A1111's resize modes
bringing an image of another shape to the request's size, mask and all."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from ldm.generation_request import GenerationError, GenerationRequest
from ldm.init_images import rgb
from ldm.pipeline import Pipeline
from ldm.request_checks import resolve
from tests.reference import REFERENCE, load_image

WIDE = load_image(REFERENCE / "init_dev_80x64.png").convert("RGB").resize((128, 64), Image.Resampling.LANCZOS)


def test_transparency_shows_white() -> None:
    """Half opaque red over hidden black: white where transparent, red where opaque, the blend between (a palette
    with a transparent colour and gray with alpha alike); a picture without transparency keeps its colours."""
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (200, 0, 0, 255)
    rgba[:, 3] = (200, 0, 0, 128)
    flat = np.asarray(rgb(Image.fromarray(rgba)))
    assert (flat[:, :3] == (200, 0, 0)).all() and (flat[:, 4:] == (255, 255, 255)).all()
    assert np.abs(flat[:, 3].astype(int) - (227, 127, 127)).max() <= 1
    gray = Image.fromarray(np.stack([np.full((4, 6), 50, np.uint8), rgba[..., 3]], -1), "LA")
    assert (np.asarray(rgb(gray))[:, 4:] == 255).all() and (np.asarray(rgb(gray))[:, :3] == 50).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 9, 99, 199])
    palette.info["transparency"] = 0
    palette.paste(0, (0, 0, 2, 4))
    assert np.asarray(rgb(palette))[:, :2].tolist() == [[[255, 255, 255]] * 2] * 4
    assert (np.asarray(rgb(palette))[:, 2:] == (9, 99, 199)).all()
    assert np.array_equal(np.asarray(rgb(WIDE)), np.asarray(WIDE))


def _request(**change: object) -> GenerationRequest:
    request = GenerationRequest("a red door", steps=4, seed=5, init_image=WIDE, height=64, width=64)
    return dataclasses.replace(request, **change)  # type: ignore[arg-type]


def test_crop_and_resize_cuts_the_overflow(pipeline: Pipeline) -> None:
    """128×64 covering 64×64 needs no scaling: its middle 64 columns, mask too, and their image."""
    mask = Image.new("L", (128, 64))
    mask.paste(255, (40, 10, 70, 50))
    cropped = pipeline.generate(_request(resize_mode="crop_and_resize", mask_image=mask))
    middle = pipeline.generate(_request(init_image=WIDE.crop((32, 0, 96, 64)), mask_image=mask.crop((32, 0, 96, 64))))
    assert np.array_equal(cropped.images, middle.images)
    stretched = pipeline.generate(_request(mask_image=mask))
    assert not np.array_equal(stretched.images, cropped.images)


def test_just_resize_stretches_the_picture_and_its_mask_with_lanczos() -> None:
    """128×64 at 64×64, A1111's default mode: the whole picture squeezed, PIL's LANCZOS, as A1111 resizes (the mask
    along, read at the init image's size)."""
    mask = Image.new("L", (128, 64))
    mask.paste(255, (40, 10, 70, 50))
    resolved = resolve(_request(mask_image=mask))
    assert np.array_equal(np.asarray(resolved.init_image), np.asarray(WIDE.resize((64, 64), Image.Resampling.LANCZOS)))
    assert resolved.mask_image is not None
    assert np.array_equal(np.asarray(resolved.mask_image), np.asarray(mask.resize((64, 64), Image.Resampling.LANCZOS)))


def test_resize_and_fill_keeps_the_whole_picture_and_stretches_its_edges() -> None:
    """128×64 inside 64×64: scaled to 64×32 in the middle rows, the bands above and below one stretched row each."""
    fitted = np.asarray(resolve(_request(resize_mode="resize_and_fill")).init_image).astype(int)
    scaled = np.asarray(WIDE.resize((64, 32), Image.Resampling.LANCZOS)).astype(int)
    assert np.array_equal(fitted[16:48], scaled)
    assert (fitted[:16] == fitted[0]).all() and (fitted[48:] == fitted[63]).all()
    assert np.abs(fitted[0] - scaled[0]).mean() < np.abs(fitted[0] - scaled[16]).mean() / 3


def test_a_resize_mode_needs_an_init_image_and_a_name_it_knows() -> None:
    for change, message in (
        ({"init_image": None, "resize_mode": "crop_and_resize"}, "resize_mode needs an init_image"),
        ({"resize_mode": "crop"}, "resize_mode must be one of just_resize, crop_and_resize, resize_and_fill"),
    ):
        with pytest.raises(GenerationError, match=message) as error:
            resolve(dataclasses.replace(_request(), **change))
        assert error.value.field == "resize_mode"
