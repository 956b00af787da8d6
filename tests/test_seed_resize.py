"""A1111's "Resize seed from" (ldm/seed_resize.py): the seeds' noise at an old size, pasted centred into the new."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.generation_request import GenerationError, GenerationRequest
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from tests.reference import FLOAT_TOLERANCE, TINY_CONFIG, TINY_SAFETENSORS
from tests.test_variation import a1111_slerp

REQUEST = GenerationRequest("a lighthouse", seed=40, height=64, width=64, steps=4)


def randn(seed: int, h: int, w: int) -> np.ndarray:
    """A seed's first draw at a latent size, (4, h, w)."""
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))[0].numpy()


def a1111_resized(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """A1111 1.6's `ImageRNG.first` on one image, its index arithmetic as written there: dx, dy the halved
    differences (floor division), the copied extent shortened by twice a negative one."""
    shape, noise_shape = new.shape, old.shape
    dx = (shape[2] - noise_shape[2]) // 2
    dy = (shape[1] - noise_shape[1]) // 2
    w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
    h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
    tx = 0 if dx < 0 else dx
    ty = 0 if dy < 0 else dy
    dx = max(-dx, 0)
    dy = max(-dy, 0)
    x = new.copy()
    x[:, ty : ty + h, tx : tx + w] = old[:, dy : dy + h, dx : dx + w]
    return x


@pytest.mark.parametrize(
    ("old_h", "old_w"),
    [
        (64, 128),  # wider: the old noise's middle columns kept
        (32, 48),  # smaller on both axes: pasted into the middle
        (88, 40),  # taller by 3 latent rows (odd): A1111 copies 7 of the 8 rows, the last stays the new noise's
        (56, 64),  # shorter by 1 latent row (odd): the paste starts at row 0
    ],
)
def test_the_starting_noise_is_a1111s(pipeline: Pipeline, old_h: int, old_w: int) -> None:
    request = resolve(dataclasses.replace(REQUEST, seed_resize_from_h=old_h, seed_resize_from_w=old_w))
    generator, noise = pipeline.noise(request, 0)
    expected = a1111_resized(randn(40, 8, 8), randn(40, old_h // 8, old_w // 8))
    np.testing.assert_array_equal(noise[0].numpy(), expected)
    assert not np.array_equal(expected, randn(40, 8, 8))
    # The image's own generator drew the new size's noise, as without a resize: the steps' noise that follows is the
    # same.
    after = torch.Generator().manual_seed(40)
    torch.randn(1, 4, 8, 8, generator=after)
    assert torch.equal(generator.get_state(), after.get_state())


def test_variation_seeds_bend_the_old_sizes_noise(pipeline: Pipeline) -> None:
    """The slerp runs at the old size, between the seed's and the variation seed's noise of that size."""
    request = resolve(
        dataclasses.replace(
            REQUEST, n_samples=2, subseed=900, subseed_strength=0.3, seed_resize_from_h=48, seed_resize_from_w=96
        )
    )
    for image in range(2):
        _, noise = pipeline.noise(request, image)
        bent = a1111_slerp(0.3, randn(40, 6, 12).astype(np.float64), randn(900 + image, 6, 12).astype(np.float64))
        expected = a1111_resized(randn(40, 8, 8), bent.astype(np.float32))
        np.testing.assert_allclose(noise[0].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_resizing_from_the_images_own_size_changes_nothing(pipeline: Pipeline) -> None:
    same = resolve(dataclasses.replace(REQUEST, seed_resize_from_h=64, seed_resize_from_w=64))
    assert np.array_equal(pipeline.generate(same).images, pipeline.generate(resolve(REQUEST)).images)
    # Yet it is said, as A1111 says it: the PNG's size is the image's, the resize the seed's.
    assert "Seed: 40, Size: 64x64, Seed resize from: 64x64" in parameters_text(same, 40)
    assert "Seed resize" not in parameters_text(resolve(REQUEST), 40)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
def test_image_equals_diffusers_from_the_pasted_noise(tiny_model: StableDiffusion, pipeline: Pipeline) -> None:
    """diffusers' pipeline started from A1111's paste, computed apart; and a hires fix's second pass, whose noise is
    drawn anew at its own size, pastes the old size's noise too (A1111 gives its second pass the same resize)."""
    from scripts.peers import call_arguments, diffusers_pipeline

    request = resolve(dataclasses.replace(REQUEST, width=96, seed_resize_from_h=64, seed_resize_from_w=64))
    ours = pipeline.generate(request).pixels[0]
    latents = torch.from_numpy(a1111_resized(randn(40, 8, 12), randn(40, 8, 8)))[None]
    pipe: Any = diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    theirs = pipe(**call_arguments(request), latents=latents).images[0] * 255
    assert np.abs(ours - theirs).max() < FLOAT_TOLERANCE
    plain = pipeline.generate(dataclasses.replace(request, seed_resize_from_h=0, seed_resize_from_w=0)).pixels[0]
    assert np.abs(ours - plain).mean() > 1


def test_a_hires_fixs_second_pass_pastes_the_old_size_too(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 gives the second pass's noise, drawn anew at its own size, the same resize."""
    drawn: list[torch.Tensor] = []
    noise = pipeline.noise

    def recorded(request: GenerationRequest, image_index: int) -> tuple[torch.Generator, torch.Tensor]:
        generator, latents = noise(request, image_index)
        drawn.append(latents)
        return generator, latents

    monkeypatch.setattr(pipeline, "noise", recorded)
    resized = {"seed_resize_from_h": 64, "seed_resize_from_w": 64}
    pipeline.generate(resolve(dataclasses.replace(REQUEST, width=96, hr_scale=1.5, hr_steps=2, **resized)))
    first, second = (latents[0].numpy() for latents in drawn)
    np.testing.assert_array_equal(first, a1111_resized(randn(40, 8, 12), randn(40, 8, 8)))
    np.testing.assert_array_equal(second, a1111_resized(randn(40, 12, 18), randn(40, 8, 8)))


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"seed_resize_from_h": 64}, "seed_resize_from_w", "seed_resize_from_w must be set too, since"),
        ({"seed_resize_from_w": 64}, "seed_resize_from_h", "seed_resize_from_h must be set too, since"),
        ({"seed_resize_from_h": 60, "seed_resize_from_w": 64}, "seed_resize_from_h", "a positive multiple of 8"),
        ({"seed_resize_from_h": 64, "seed_resize_from_w": -8}, "seed_resize_from_w", "got -8"),
    ],
)
def test_a_resize_the_pipeline_cannot_run_names_its_field(change: dict, field: str, message: str) -> None:
    with pytest.raises(GenerationError, match=message) as info:
        resolve(dataclasses.replace(REQUEST, **change))
    assert info.value.field == field
