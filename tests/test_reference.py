"""Every case of the CompVis reference set, reproduced from the original-format checkpoint (both file formats),
and the `basic` and `img2img` intermediates checked one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.ddim import DDIMSchedule, add_noise
from ldm.parts import load_checkpoint
from ldm.pipeline import Pipeline
from tests.reference import (
    BF16_MIN_PSNR_DB,
    CASES,
    FLOAT_TOLERANCE,
    REFERENCE,
    TINY_CONFIG,
    TINY_SAFETENSORS,
    assert_reproduces,
    case,
    psnr,
    reference_png,
)
from tests.reference import request_for as request_of

# Embeddings and first-step UNet outputs agree with the original to about 3e-6 (reference README).
INTERMEDIATE_TOLERANCE = 2e-5


def intermediate(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(REFERENCE / "intermediates" / f"{name}.npy"))


@pytest.mark.parametrize("case_data", CASES, ids=lambda c: c["id"])
def test_case_from_safetensors(pipeline: Pipeline, case_data: dict) -> None:
    generation = pipeline.generate(request_of(case_data))
    assert generation.seeds == [image["seed"] for image in case_data["images"]]
    assert_reproduces(case_data, generation)


@pytest.fixture(scope="module")
def ckpt_pipeline(tiny_ckpt) -> Pipeline:
    return Pipeline(load_checkpoint(tiny_ckpt, TINY_CONFIG))


@pytest.fixture(scope="module")
def bf16_pipeline() -> Pipeline:
    return Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, "cpu", torch.bfloat16))


@pytest.mark.parametrize("case_data", CASES, ids=lambda c: c["id"])
def test_bf16_on_the_cpu_is_the_original_within_its_rounding(bf16_pipeline: Pipeline, case_data: dict) -> None:
    """`precision: bf16` (`--precision bf16`) runs the CPU about twice as fast where it has AMX, and only rounds
    coarser: the half-precision path the GPU takes (group norms in float32, latents in float32 between steps)."""
    assert {p.dtype for p in bf16_pipeline.model.unet.parameters()} == {torch.bfloat16}
    generation = bf16_pipeline.generate(request_of(case_data))
    for image, rounded in zip(case_data["images"], generation.images, strict=True):
        assert psnr(rounded, reference_png(image)) >= BF16_MIN_PSNR_DB


@pytest.mark.parametrize("case_data", CASES, ids=lambda c: c["id"])
def test_case_from_original_ckpt(ckpt_pipeline: Pipeline, case_data: dict) -> None:
    generation = ckpt_pipeline.generate(request_of(case_data))
    for image, pixels in zip(case_data["images"], generation.pixels, strict=True):
        assert np.abs(pixels - np.load(REFERENCE / image["npy"])).max() < FLOAT_TOLERANCE


def test_basic_intermediates(pipeline: Pipeline) -> None:
    data = case("basic")
    request = request_of(data)
    model = pipeline.model
    cond, uncond = pipeline.prompts.embed([request.prompt, ""]).chunk(2)
    assert torch.allclose(cond, intermediate("basic_cond_embedding"), atol=INTERMEDIATE_TOLERANCE, rtol=0)
    assert torch.allclose(uncond, intermediate("basic_uncond_embedding"), atol=INTERMEDIATE_TOLERANCE, rtol=0)

    x_t = torch.randn(pipeline.latent_shape(request), generator=torch.Generator("cpu").manual_seed(request.seed))
    assert torch.equal(x_t, intermediate("basic_x_T"))

    t = torch.tensor([data["schedule"]["timesteps_run"][0]] * 2)
    with torch.inference_mode():
        eps_u, eps_c = model.unet(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond])).chunk(2)
    assert torch.allclose(eps_u, intermediate("basic_eps_uncond_step0"), atol=INTERMEDIATE_TOLERANCE, rtol=0)
    assert torch.allclose(eps_c, intermediate("basic_eps_cond_step0"), atol=INTERMEDIATE_TOLERANCE, rtol=0)
    guided = eps_u + request.scale * (eps_c - eps_u)
    assert torch.allclose(guided, intermediate("basic_eps_guided_step0"), atol=1e-4, rtol=0)

    final: list[torch.Tensor] = []
    pipeline.generate(request, callback=lambda p: final.append(p.latents) if p.step == p.total else None)
    assert torch.allclose(final[0], intermediate("basic_final_latent"), atol=1e-4, rtol=0)
    with torch.inference_mode():
        decoded = model.vae.decode(intermediate("basic_final_latent") / model.config.scale_factor)
    assert torch.allclose(decoded, intermediate("basic_decoded"), atol=1e-4, rtol=0)


def test_img2img_intermediates(pipeline: Pipeline) -> None:
    data = case("img2img")
    request = request_of(data)
    z0 = pipeline.init_latent(pipeline.init_picture(request))
    assert torch.allclose(z0, intermediate("img2img_init_latent"), atol=1e-4, rtol=0)

    schedule = DDIMSchedule(pipeline.model.alphas_cumprod, request.steps)
    steps = schedule.tail(request.img2img_steps())
    assert [s.t for s in steps] == data["schedule"]["timesteps_run"]
    assert steps[0].alpha == pytest.approx(data["img2img"]["noise_alphas_cumprod"], abs=1e-6)
    noise = torch.randn(pipeline.latent_shape(request), generator=torch.Generator("cpu").manual_seed(request.seed))
    noised = add_noise(z0, noise, steps[0].alpha)
    assert torch.allclose(noised, intermediate("img2img_noised_latent_iter0"), atol=1e-4, rtol=0)
