"""A1111's variation seeds (ldm/variation.py): the seed kept, its noise bent toward each image's variation seed's."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.generation_request import MAX_SEED, GenerationError, GenerationRequest
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from ldm.variation import slerp
from tests.reference import FLOAT_TOLERANCE, TINY_CONFIG, TINY_SAFETENSORS

REQUEST = GenerationRequest("a lighthouse", seed=40, height=64, width=64, steps=5, n_samples=2, subseed=900,
                            subseed_strength=0.3)  # fmt: skip


def cosine(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The cosine between each (channel, column) vector along axis 1 of one (C, h, w) noise and the same of another."""
    low_unit = low / np.linalg.norm(low, axis=1, keepdims=True)
    high_unit = high / np.linalg.norm(high, axis=1, keepdims=True)
    return (low_unit * high_unit).sum(1)


def spherical(value: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The spherical interpolation of (C, h, w) noise along axis 1, in float64: the angle between the vectors, then
    sin((1 − v)ω)/sin ω of the one plus sin(vω)/sin ω of the other."""
    omega = np.arccos(cosine(low, high))
    start = np.sin((1 - value) * omega) / np.sin(omega)
    end = np.sin(value * omega) / np.sin(omega)
    return start[:, None] * low + end[:, None] * high


def a1111_slerp(value: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111 1.6's `slerp` on one image's (C, h, w) noise, in float64: `spherical`, but where the mean cosine of the
    vectors is above 0.9995 a straight mix, which A1111 writes as v of the one plus 1 − v of the other."""
    if cosine(low, high).mean() > 0.9995:
        return low * value + high * (1 - value)
    return spherical(value, low, high)


def noise_of(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.999])
def test_slerp_is_a1111s_along_axis_1(strength: float) -> None:
    low, high = noise_of(1)[0], noise_of(2)[0]
    ours = slerp(strength, low, high)
    expected = a1111_slerp(strength, low.double().numpy(), high.double().numpy())
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4, atol=1e-5)
    # Along axis 1, not over the whole tensor: the two differ.
    flat = a1111_slerp(strength, low.double().numpy().reshape(1, -1, 1), high.double().numpy().reshape(1, -1, 1))
    assert np.abs(flat.reshape(low.shape) - expected).max() > 1e-3
    # Equal noises need no angle: the interpolation is the noise itself.
    torch.testing.assert_close(slerp(strength, low, low), low)


def nearly(noise: np.ndarray, cosines: np.ndarray) -> np.ndarray:
    """`noise` with each (channel, column) vector along axis 1 turned, at its norm, toward a random direction until
    its cosine with the vector it was is the one `cosines` (C, w) gives it."""
    other = np.random.default_rng(5).standard_normal(noise.shape)
    unit = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    across = other - (other * unit).sum(1, keepdims=True) * unit
    across /= np.linalg.norm(across, axis=1, keepdims=True)
    turned = cosines[:, None] * unit + np.sqrt(1 - cosines[:, None] ** 2) * across
    return turned * np.linalg.norm(noise, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "cosines",
    [np.full((4, 64), 0.99), np.where(np.arange(4 * 64).reshape(4, 64) == 0, 0.9, 1.0)],
    ids=["each at 0.99", "one at 0.9, the rest equal"],
)
def test_which_noises_a1111_mixes_straight(cosines: np.ndarray) -> None:
    """A1111 mixes straight where the mean cosine of the vectors is above 0.9995, and only there: near noises at 0.99
    are interpolated on the sphere; noises equal but for one vector at 0.9 (a mean of 0.9996) are mixed straight,
    that vector too. At strength 0.5 A1111's straight mix, which weighs the two the other way round, is ours."""
    low = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(3)).double().numpy()
    high = nearly(low, cosines)
    ours = slerp(0.5, torch.from_numpy(low).float(), torch.from_numpy(high).float())
    np.testing.assert_allclose(ours.numpy(), a1111_slerp(0.5, low, high), rtol=1e-4, atol=1e-5)
    # On the vectors turned apart, the two ways differ by far more than the rounding checked to.
    apart = [noise.transpose(0, 2, 1)[cosines < 1][..., None] for noise in (low, high)]
    assert np.abs(spherical(0.5, *apart) - (apart[0] + apart[1]) / 2).max() > 1e-3


def test_strength_0_and_1_are_the_two_noises_however_near() -> None:
    """Noises too near for the angle's sine (mean cosine above 0.9995) are mixed straight, which is the
    interpolation but for a part in ω²/6 (ω the small angle): the seed's noise at strength 0, the variation seed's
    at 1, and the spherical formula in between. (A1111's straight mix weighs them the other way round, the
    variation seed's noise at 0; it runs it in practice only for a variation seed whose noise is the seed's, where
    the two ways agree.)"""
    low = noise_of(3)[0].double().numpy()
    high = nearly(low, np.full((4, 8), 0.9999))
    mixed = {
        strength: slerp(strength, torch.from_numpy(low).float(), torch.from_numpy(high).float()).numpy()
        for strength in (0.0, 0.2, 1.0)
    }
    np.testing.assert_allclose(mixed[0.0], low, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[1.0], high, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[0.2], spherical(0.2, low, high), rtol=1e-4, atol=1e-4)


def test_every_image_keeps_the_seed_and_takes_the_next_variation_seed(pipeline: Pipeline) -> None:
    generation = pipeline.generate(REQUEST)
    assert (generation.seeds, generation.subseeds) == ([40, 40], [900, 901])
    text = parameters_text(generation.request, 40, "0123456789", subseed=901)
    assert "Seed: 40, Size: 64x64, Model hash: 0123456789, Variation seed: 901, Variation seed strength: 0.3" in text
    plain = pipeline.generate(dataclasses.replace(REQUEST, subseed_strength=0.0))
    assert plain.seeds == [40, 41] and plain.subseeds == [None, None]
    assert "Variation" not in parameters_text(plain.request, 40)
    # Both images share the seed, yet differ: their variation seeds do.
    assert np.abs(generation.pixels[0] - generation.pixels[1]).mean() > 1


def test_strength_1_is_the_variation_seeds_own_image(pipeline: Pipeline) -> None:
    """At 1 an image's noise is its variation seed's (DDIM with η 0 draws nothing more), so the images are those of
    seeds 900 and 901; in the hires fix's second pass too, whose noise is bent alike."""
    full = dataclasses.replace(REQUEST, subseed_strength=1.0)
    alone = dataclasses.replace(REQUEST, seed=900, subseed_strength=0.0)
    assert np.abs(pipeline.generate(full).pixels - pipeline.generate(alone).pixels).max() < FLOAT_TOLERANCE
    hires = {"hr_scale": 1.5, "hr_steps": 3, "n_samples": 1}
    upscaled = pipeline.generate(dataclasses.replace(full, **hires)).pixels
    assert np.abs(upscaled - pipeline.generate(dataclasses.replace(alone, **hires)).pixels).max() < FLOAT_TOLERANCE


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
def test_image_equals_diffusers_from_the_interpolated_noise(tiny_model: StableDiffusion, pipeline: Pipeline) -> None:
    """diffusers' pipeline started from A1111's interpolation of the two seeds' noise, computed apart in float64."""
    from scripts.peers import call_arguments, diffusers_pipeline

    request = resolve(dataclasses.replace(REQUEST, n_samples=1, subseed_strength=0.4))
    ours = pipeline.generate(request).pixels[0]
    mixed = a1111_slerp(0.4, noise_of(40)[0].double().numpy(), noise_of(900)[0].double().numpy())
    latents = torch.from_numpy(mixed).float()[None]
    pipe: Any = diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    theirs = pipe(**call_arguments(request), latents=latents).images[0] * 255
    assert np.abs(ours - theirs).max() < FLOAT_TOLERANCE
    plain = pipeline.generate(dataclasses.replace(request, subseed_strength=0.0)).pixels[0]
    assert np.abs(ours - plain).mean() > 1


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
def test_an_ancestral_samplers_step_noise_still_comes_from_the_seed(
    tiny_model: StableDiffusion, pipeline: Pipeline
) -> None:
    """Euler a at strength 1 starts from the variation seed's noise but draws its steps' noise from the seed's
    generator, after the noise it drew first, as A1111's generators run: diffusers' Euler a given the variation
    seed's noise and that generator paints the same image."""
    from scripts.peers import call_arguments, diffusers_pipeline
    from tests.peer_schedulers import peer_scheduler

    request = resolve(dataclasses.replace(REQUEST, n_samples=1, subseed_strength=1.0, sampler="euler_a"))
    ours = pipeline.generate(request).pixels[0]
    pipe: Any = diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    pipe.scheduler = peer_scheduler("euler_a", pipe.scheduler.config)
    pipe.scheduler.set_timesteps(request.steps)
    generator = torch.Generator().manual_seed(40)
    torch.randn(1, 4, 8, 8, generator=generator)  # the seed's own starting noise, drawn and set aside
    start = noise_of(900) * float(pipe.scheduler.sigmas[0]) / pipe.scheduler.init_noise_sigma
    theirs = pipe(**{**call_arguments(request), "generator": generator}, latents=start).images[0] * 255
    assert np.abs(ours - theirs).max() < FLOAT_TOLERANCE
    alone = pipeline.generate(dataclasses.replace(request, seed=900, subseed_strength=0.0)).pixels[0]
    assert np.abs(ours - alone).mean() > 1  # the variation seed's own run draws its steps from 900


def test_a_missing_variation_seed_is_drawn_and_reported() -> None:
    resolved = resolve(dataclasses.replace(REQUEST, subseed=None))
    assert resolved.subseed is not None and 0 <= resolved.subseed <= MAX_SEED - 1
    assert resolve(dataclasses.replace(REQUEST, subseed=None, subseed_strength=0.0)).subseed is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"subseed_strength": 1.5}, "subseed_strength"),
        ({"subseed_strength": -0.1}, "subseed_strength"),
        ({"subseed_strength": float("nan")}, "subseed_strength"),
        ({"subseed": -1}, "subseed"),
        ({"subseed": MAX_SEED}, "subseed"),  # image 1's would be 2³²
    ],
)
def test_variation_requests_the_pipeline_cannot_run_name_their_field(change: dict, field: str) -> None:
    with pytest.raises(GenerationError) as info:
        resolve(dataclasses.replace(REQUEST, **change))
    assert info.value.field == field


def test_with_variation_seeds_the_seed_is_every_images_so_any_32_bit_seed_runs() -> None:
    assert resolve(dataclasses.replace(REQUEST, seed=MAX_SEED)).seeds == [MAX_SEED, MAX_SEED]
    with pytest.raises(GenerationError, match=r"seed \+ i"):
        resolve(dataclasses.replace(REQUEST, seed=MAX_SEED, subseed_strength=0.0))
