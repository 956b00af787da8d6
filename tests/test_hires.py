"""A1111's hires fix (ldm/hires.py): the first image upscaled and sampled again, against diffusers' txt2img then
img2img pipelines run by hand the way A1111 chains its two passes."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import read_state_dict
from ldm.model import StableDiffusion
from ldm.pipeline import GenerationError, GenerationRequest, Pipeline, hires_pass, resolve, text_schedule
from ldm.png_info import parameters_text
from tests.reference import FLOAT_TOLERANCE, REFERENCE, TINY_CONFIG, TINY_SAFETENSORS, case, load_image, request_for
from tests.test_pipeline import DIFFUSERS_PEERS

# A1111 1.6's latent upscalers, written out again from its table (torch mode, antialias).
A1111_LATENT_MODES = {
    "latent": ("bilinear", False),
    "latent_bicubic_antialiased": ("bicubic", True),
    "latent_nearest_exact": ("nearest-exact", False),
}


@pytest.fixture(scope="module")
def peer(tiny_model: StableDiffusion) -> Any:
    from scripts.peers import diffusers_pipeline

    return diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))


def with_scheduler(pipe: Any, sampler: str, steps: int) -> Any:
    """`pipe` with the diffusers scheduler of our `sampler` (DDIM as the peer is made), set to `steps`."""
    import diffusers

    if sampler != "ddim":
        kind, settings, _ = DIFFUSERS_PEERS[sampler]
        pipe.scheduler = getattr(diffusers, kind).from_config(pipe.scheduler.config, **settings)
    pipe.scheduler.set_timesteps(steps)
    return pipe


def first_latents(peer: Any, request: GenerationRequest) -> torch.Tensor:
    """diffusers' txt2img latents (scaled, before decoding) of a resolved request, from our starting noise."""
    import diffusers

    from scripts.peers import call_arguments

    pipe = with_scheduler(diffusers.StableDiffusionPipeline(**peer.components), request.sampler, request.steps)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(request.seed)
    noise = torch.randn(1, 4, request.height // 8, request.width // 8, generator=generator)
    start = float(pipe.scheduler.sigmas[0]) if request.sampler != "ddim" else 1.0
    arguments = {**call_arguments(request), "generator": generator, "output_type": "latent"}
    return pipe(**arguments, latents=noise * start / pipe.scheduler.init_noise_sigma).images


def second_pass(peer: Any, request: GenerationRequest, z0: torch.Tensor) -> np.ndarray:
    """diffusers' img2img of latent z₀ at the hires size: A1111's hr_steps N as the last N of ⌊N / strength⌋ steps,
    which is diffusers' strength N/⌊N / strength⌋, its noise drawn from a generator seeded anew with the seed."""
    import diffusers

    steps = request.hr_steps
    run = int(steps / request.strength)
    assert int(run * (steps / run)) == steps, "diffusers' int(S·strength) must come out at N"
    pipe = with_scheduler(diffusers.StableDiffusionImg2ImgPipeline(**peer.components), request.sampler, run)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        request.prompt,
        negative_prompt=request.negative_prompt,
        image=z0,
        strength=steps / run,
        num_inference_steps=run,
        guidance_scale=request.scale,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="np",
    ).images[0]
    return image.clip(0, 1) * 255


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(
    ("sampler", "upscaler", "scale", "hr_steps", "strength"),
    [
        ("ddim", "latent", 2.0, 6, 0.7),
        ("euler_a", "latent_bicubic_antialiased", 1.5, 4, 0.5),
        ("dpm2", "latent_nearest_exact", 1.25, 3, 0.6),
    ],
)
def test_latent_hires_fix_equals_diffusers_txt2img_upscaled_then_img2img(
    pipeline: Pipeline, peer: Any, sampler: str, upscaler: str, scale: float, hr_steps: int, strength: float
) -> None:
    """The first pass's latent interpolated as A1111's menu entry says, then sampled again: DDIM, an ancestral
    sampler (its step noise drawn after the second pass's own starting noise) and a two-call one."""
    request = resolve(
        dataclasses.replace(
            request_for(case("basic")),
            sampler=sampler,
            hr_scale=scale,
            hr_upscaler=upscaler,
            hr_steps=hr_steps,
            strength=strength,
        )
    )
    ours = pipeline.generate(request).pixels[0]
    size = (int(64 * scale), int(64 * scale))
    assert ours.shape == (*size, 3)
    mode, antialias = A1111_LATENT_MODES[upscaler]
    z0 = F.interpolate(first_latents(peer, request), size=(size[0] // 8, size[1] // 8), mode=mode, antialias=antialias)
    theirs = second_pass(peer, request, z0)
    assert np.abs(ours - theirs).max() < FLOAT_TOLERANCE
    # Not the image asked for at the larger size in one pass.
    once = pipeline.generate(dataclasses.replace(request, hr_scale=1.0, height=size[0], width=size[1])).pixels[0]
    assert np.abs(ours - once).mean() > 1


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(
    ("upscaler", "resample"), [("lanczos", Image.Resampling.LANCZOS), ("nearest", Image.Resampling.NEAREST)]
)
def test_image_hires_fix_resizes_the_first_image_and_encodes_it_again(
    pipeline: Pipeline, peer: Any, upscaler: str, resample: Image.Resampling
) -> None:
    """The first pass's image, rounded to 8 bits as it would be answered, resized by PIL's filter and encoded by
    the VAE (its posterior mean, as our img2img encodes) for the second pass. The first image is ours, held within a
    level of diffusers' (decodes that agree to 1e-6 still round a few pixels apart, which would move the encoding)."""
    request = resolve(
        dataclasses.replace(request_for(case("basic")), hr_scale=2.0, hr_upscaler=upscaler, hr_steps=4, strength=0.5)
    )
    first = pipeline.generate(dataclasses.replace(request, hr_scale=1.0)).images[0]
    decoded = peer.vae.decode(first_latents(peer, request) / peer.vae.config.scaling_factor).sample
    theirs_first = ((decoded[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy() * 255
    assert np.abs(first - theirs_first).max() <= 0.5 + FLOAT_TOLERANCE
    upscaled = np.asarray(Image.fromarray(first).resize((128, 128), resample), dtype=np.float32) / 127.5 - 1
    pixels = torch.from_numpy(upscaled).permute(2, 0, 1)[None]
    z0 = peer.vae.encode(pixels).latent_dist.mean * peer.vae.config.scaling_factor
    ours = pipeline.generate(request).pixels[0]
    assert np.abs(ours - second_pass(peer, request, z0)).max() < FLOAT_TOLERANCE
    latent = pipeline.generate(dataclasses.replace(request, hr_upscaler="latent")).pixels[0]
    assert np.abs(ours - latent).mean() > 1


def test_hires_pass_counts_prompt_editing_over_its_own_steps() -> None:
    """A1111 schedules the second pass's texts over hr_steps, counted from its first call: `[red:blue:0.5]` reads
    red for 5 of the first pass's 10 steps and 3 of the second pass's 6."""
    request = resolve(
        GenerationRequest("[red:blue:0.5]", seed=1, height=64, width=64, steps=10, emphasis=True, hr_scale=2.0,
                          hr_steps=6)
    )  # fmt: skip
    assert text_schedule(request, "prompt") == ((5, "red"), (10, "blue"))
    second = hires_pass(request, 8)
    assert (second.height, second.width, second.steps, second.hires) == (128, 128, 6, False)
    assert text_schedule(second, "prompt") == ((3, "red"), (6, "blue"))


def test_hires_steps_default_to_the_request_steps_and_count_in_total_steps(pipeline: Pipeline) -> None:
    request = GenerationRequest("x", seed=3, height=64, width=64, steps=4, sampler="euler", hr_scale=1.5)
    assert request.total_steps == 8
    totals: list[int] = []
    generation = pipeline.generate(request, callback=lambda progress: totals.append(progress.total))
    assert generation.request.hr_steps == 4
    assert totals == [4] * 4 + [4] * 4
    assert generation.images.shape == (1, 96, 96, 3)


def test_hires_sizes_round_down_to_the_latent_factor() -> None:
    """int(side·scale), as A1111 computes it, then down to a multiple of 8."""
    request = resolve(GenerationRequest("x", seed=1, height=64, width=72, hr_scale=1.3))
    second = hires_pass(request, 8)
    assert (int(64 * 1.3), int(72 * 1.3)) == (83, 93)
    assert (second.height, second.width) == (80, 88)


def test_png_parameters_name_the_hires_fix_as_a1111_does() -> None:
    request = resolve(
        GenerationRequest("x", seed=5, height=64, width=64, steps=20, hr_scale=2.0, hr_upscaler="latent_bicubic",
                          strength=0.7)
    )  # fmt: skip
    text = parameters_text(request, 5)
    assert "Size: 64x64," in text  # the first pass's, as A1111 writes it
    assert "Denoising strength: 0.7, Hires upscale: 2, Hires steps: 20, Hires upscaler: Latent (bicubic)" in text
    assert "Hires" not in parameters_text(dataclasses.replace(request, hr_scale=1.0), 5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hr_scale": 0.5}, "hr_scale"),
        ({"hr_scale": 4.5}, "hr_scale"),
        ({"hr_scale": float("nan")}, "hr_scale"),
        ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
        ({"hr_steps": -1}, "hr_steps"),
        ({"sampler": "plms"}, "sampler"),  # its second pass is an img2img
        ({"strength": 0.0}, "strength"),
        ({"strength": 0.01, "hr_steps": 20}, "strength"),  # the last 20 of 2,000 steps: past the model's 999
        ({"init_image": "init"}, "hr_scale"),  # txt2img only
    ],
)
def test_hires_requests_the_pipeline_cannot_run_name_their_field(change: dict, field: str) -> None:
    if change.get("init_image") == "init":
        change = {"init_image": load_image(REFERENCE / "init_dev_80x64.png")}
    request = dataclasses.replace(GenerationRequest("x", seed=1, steps=10, hr_scale=2.0), **change)
    with pytest.raises(GenerationError) as info:
        resolve(request)
    assert info.value.field == field
