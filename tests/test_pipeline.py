"""Request-level behaviour: batch invariance, seeds, sizes, img2img rules, PNG parameters."""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from front.png_info import parse_infotext
from ldm.config import load_config
from ldm.ddim import DDIMSchedule, alphas_cumprod
from ldm.generation_request import MAX_SEED, SAMPLERS, GenerationError, GenerationRequest
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline, Progress
from ldm.png_info import encode_with_parameters, parameters_text, read_parameters
from ldm.request_checks import resolve
from tests.peer_schedulers import peer_scheduler, starts_from_sigma_max
from tests.reference import (
    FLOAT_TOLERANCE,
    REFERENCE,
    TINY_CONFIG,
    TINY_SAFETENSORS,
    assert_matches_png,
    case,
    load_image,
    reference_png,
    request_for,
)

SMALL = GenerationRequest("a lighthouse in a storm", height=64, width=64, steps=3, seed=41)


def test_image_is_the_same_alone_or_anywhere_in_a_batch(pipeline: Pipeline) -> None:
    batch = pipeline.generate(dataclasses.replace(SMALL, n_samples=2, n_iter=2, eta=0.5))
    assert batch.seeds == [41, 42, 43, 44]
    for index, seed in enumerate(batch.seeds):
        alone = pipeline.generate(dataclasses.replace(SMALL, seed=seed, eta=0.5))
        assert np.abs(alone.pixels[0] - batch.pixels[index]).max() < FLOAT_TOLERANCE


def test_reference_batch_positions_equal_their_single_images(pipeline: Pipeline) -> None:
    data = case("batch3")
    request = request_for(data)
    for index, image in enumerate(data["images"]):
        alone = pipeline.generate(dataclasses.replace(request, n_samples=1, seed=image["seed"]))
        assert_matches_png(alone.images[0], reference_png(image))
        assert index == image["index"]


def test_missing_seed_is_drawn_and_reported(pipeline: Pipeline) -> None:
    first = pipeline.generate(dataclasses.replace(SMALL, seed=None, n_samples=2))
    seed = first.request.seed
    assert seed is not None and 0 <= seed <= MAX_SEED
    assert first.seeds == [seed, seed + 1]
    again = pipeline.generate(dataclasses.replace(SMALL, seed=seed, n_samples=2))
    assert np.array_equal(first.images, again.images)


def test_different_seeds_give_different_images(pipeline: Pipeline) -> None:
    a = pipeline.generate(SMALL)
    b = pipeline.generate(dataclasses.replace(SMALL, seed=42))
    assert np.abs(a.pixels - b.pixels).mean() > 5


def test_sizes_that_are_not_multiples_of_64(pipeline: Pipeline) -> None:
    generation = pipeline.generate(dataclasses.replace(SMALL, height=72, width=40))
    assert generation.images.shape == (1, 72, 40, 3)


def test_default_size_is_the_models_native_size(pipeline: Pipeline) -> None:
    assert resolve(GenerationRequest("x", seed=1), default_size=64).height == 64


def test_img2img_size_defaults_to_init_image_rounded_down_to_8() -> None:
    init = Image.new("RGB", (83, 70))
    request = resolve(GenerationRequest("x", seed=1, init_image=init, steps=10, strength=0.5))
    assert (request.width, request.height) == (80, 64)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"strength": 0.05}, "strength"),  # ⌊0.05·10⌋ = 0 steps
        ({"strength": 1.5}, "strength"),
        ({"strength": 0.0}, "strength"),
        ({"height": 60}, "H"),
        ({"width": 0}, "W"),
        ({"sampler": "k_euler"}, "sampler"),
        ({"sampler": "plms"}, "sampler"),  # txt2img only
        ({"sampler": "plms", "eta": 0.5}, "sampler"),  # the rule no eta can fix, first
        ({"sampler": "plms", "init_image": None, "eta": 0.1}, "eta"),
        ({"sampler": "lms", "init_image": None, "eta": 0.5}, "eta"),
    ],
)
def test_requests_the_pipeline_cannot_run_name_their_field(change: dict, field: str) -> None:
    init = load_image(REFERENCE / "init_dev_80x64.png")
    request = dataclasses.replace(GenerationRequest("x", seed=1, steps=10, init_image=init), **change)
    with pytest.raises(GenerationError) as info:
        resolve(request)
    assert info.value.field == field


def test_the_least_strength_an_error_suggests_runs() -> None:
    """A strength too small for any step (img2img's ⌊strength·S⌋ = 0; a hires fix whose run ⌊N / strength⌋ would
    pass the model's 999 steps) is refused with the least strength to try, to three digits rounded up: 1/3 as
    0.333 would be refused again."""
    init = load_image(REFERENCE / "init_dev_80x64.png")
    for steps in range(1, 1000):
        img2img = GenerationRequest("x", seed=1, steps=steps, init_image=init, strength=0.5 / steps)
        hires = dataclasses.replace(SMALL, hr_scale=2.0, hr_steps=min(steps, 998), strength=0.5 * min(steps, 998) / 999)
        for request in (img2img, hires):
            with pytest.raises(GenerationError, match="raise strength to at least") as error:
                resolve(request)
            least = float(re.search(r"at least ([0-9.e-]+)", str(error.value)).group(1))
            resolve(dataclasses.replace(request, strength=least))
            assert least < 1.01 * (1 / steps if request is img2img else request.hr_steps / 999)
    # hr_steps 0 at 999 steps: no strength fits the run (A1111 caps it at 0.999), so the error says what does.
    whole = dataclasses.replace(SMALL, steps=999, hr_scale=2.0, strength=1.0)
    with pytest.raises(GenerationError, match=r"ddim_steps' 999 steps, .* set hr_steps to at most 998") as error:
        resolve(whole)
    assert error.value.field == "hr_steps"
    resolve(dataclasses.replace(whole, hr_steps=998))


def test_steps_stop_where_ddim_timesteps_leave_the_schedule() -> None:
    """t_k = k·⌊T/S⌋ + 1 stays within ᾱ's indices 0..T−1 up to S = T − 1 (999 for SD v1's T = 1000): S = T would
    ask for ᾱ_T, so resolve must refuse it rather than let the sampler index past the schedule."""
    config = load_config(TINY_CONFIG)
    assert config.timesteps == 1000
    longest = resolve(dataclasses.replace(SMALL, steps=999), num_timesteps=config.timesteps)
    assert DDIMSchedule(alphas_cumprod(config), longest.steps).steps[0].t == 999
    with pytest.raises(GenerationError, match=r"^ddim_steps must be in \[1, 999\], got 1000$") as info:
        resolve(dataclasses.replace(SMALL, steps=1000), num_timesteps=config.timesteps)
    assert info.value.field == "ddim_steps"


def test_strength_one_runs_every_step(pipeline: Pipeline) -> None:
    init = load_image(REFERENCE / "init_dev_80x64.png")
    request = GenerationRequest("x", seed=1, steps=4, init_image=init, strength=1.0)
    steps: list[int] = []
    pipeline.generate(request, callback=lambda progress: steps.append(progress.total))
    assert steps == [4, 4, 4, 4]


def test_png_parameters_round_trip(pipeline: Pipeline) -> None:
    request = dataclasses.replace(SMALL, negative_prompt="blurry", eta=0.25)
    generation = pipeline.generate(request)
    text = parameters_text(generation.request, generation.seeds[0], "0123456789")
    (png,) = encode_with_parameters(generation.images[:1], [text])
    assert read_parameters(png) == (
        "a lighthouse in a storm\nNegative prompt: blurry\n"
        "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 41, Size: 64x64, Model hash: 0123456789, Eta DDIM: 0.25, "
        "RNG: CPU, Emphasis: None"
    )
    assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), generation.images[0])


def test_png_parameters_keep_line_breaks_backslashes_and_unicode_and_cannot_be_forged() -> None:
    """A1111 writes a prompt's line breaks as they are, and its users write `\\(` for a literal parenthesis: both
    read back as written (by the front's copy of A1111's reader). Only a break before a line that would start the
    negative prompt is written as `\\n`, so no prompt forges one."""
    prompt = "a cat\r\nSteps: 1, Seed: 666, pikachu \\(pokemon\\)\n  Negative prompt: forged"
    request = resolve(GenerationRequest(prompt, negative_prompt="ünïcödé ☃\nlowres", seed=5))
    text = parameters_text(request, 5)
    lines = text.split("\n")
    assert lines[:4] == [
        "a cat", "Steps: 1, Seed: 666, pikachu \\(pokemon\\)\\n  Negative prompt: forged",
        "Negative prompt: ünïcödé ☃", "lowres",
    ]  # fmt: skip
    assert len(lines) == 5 and lines[4].startswith("Steps: 50,")
    read = parse_infotext(text)
    assert read["Prompt"] == "a cat\nSteps: 1, Seed: 666, pikachu \\(pokemon\\)\\n  Negative prompt: forged"
    assert (read["Negative prompt"], read["Steps"], read["Seed"]) == ("ünïcödé ☃\nlowres", "50", "5")
    assert read_parameters(encode_with_parameters([np.zeros((8, 8, 3), np.uint8)], [text])[0]) == text


def test_img2img_png_parameters_name_denoising_strength() -> None:
    request = resolve(GenerationRequest("x", seed=1, steps=10, strength=0.5, init_image=Image.new("RGB", (64, 64))))
    assert parameters_text(request, 1).endswith("Size: 64x64, Denoising strength: 0.5, RNG: CPU, Emphasis: None")


def test_requests_generated_together_equal_each_alone(pipeline: Pipeline) -> None:
    init = load_image(REFERENCE / "init_dev_80x64.png")
    requests = [
        SMALL,
        dataclasses.replace(SMALL, prompt="a different prompt", seed=7, scale=1.0, n_samples=2),
        dataclasses.replace(SMALL, height=72, width=40, eta=0.4),
        dataclasses.replace(SMALL, negative_prompt="fog", seed=99, scale=3.0),
        GenerationRequest("tiles", seed=5, steps=3, init_image=init, strength=1.0),
        dataclasses.replace(SMALL, sampler="plms", n_samples=2),
        dataclasses.replace(SMALL, sampler="plms", seed=3, scale=1.0),
        dataclasses.replace(SMALL, sampler="euler_a", seed=11, n_samples=2),
        dataclasses.replace(SMALL, sampler="dpm2_a", seed=12),
        dataclasses.replace(SMALL, sampler="lms", seed=13),
        dataclasses.replace(SMALL, sampler="dpmpp_2m_karras", seed=14, n_samples=2),
        dataclasses.replace(SMALL, sampler="dpmpp_2m_sde_karras", seed=17, n_samples=2),
        dataclasses.replace(SMALL, sampler="dpmpp_sde_karras", seed=19, n_samples=2),
        dataclasses.replace(SMALL, sampler="dpmpp_2s_a_karras", seed=21, n_samples=2),
        GenerationRequest("tiles", seed=22, steps=4, init_image=init, strength=0.5, sampler="dpmpp_2s_a"),
        GenerationRequest("tiles", seed=20, steps=4, init_image=init, strength=0.5, sampler="dpmpp_sde"),
        GenerationRequest("tiles", seed=18, steps=4, init_image=init, strength=0.5, sampler="dpmpp_2m_sde"),
        GenerationRequest("tiles", seed=15, steps=4, init_image=init, strength=0.5, sampler="euler_a"),
        GenerationRequest("tiles", seed=16, steps=4, init_image=init, strength=1.0, sampler="lms"),
    ]
    together = pipeline.generate_many(requests, max_batch_images=3)
    for request, result in zip(requests, together, strict=True):
        alone = pipeline.generate(request)
        assert result.seeds == alone.seeds
        assert np.abs(result.pixels - alone.pixels).max() < FLOAT_TOLERANCE


def test_words_past_the_75_tokens_clip_reads_are_reported(pipeline: Pipeline) -> None:
    long = "cat " * 73 + "in the style of a watercolor"  # 73 + 2 tokens read, 4 left out
    left_out = "CLIP reads 75 tokens; the 4 after them were left out: style of a watercolor"
    assert pipeline.generate(dataclasses.replace(SMALL, prompt=long)).warnings == (f"prompt: {left_out}",)
    weighted = dataclasses.replace(SMALL, prompt=f"a castle:2 {long}", negative_prompt=long, weighted_subprompts=True)
    assert pipeline.generate(weighted).warnings == (
        f"prompt, sub-prompt 2 of 2: {left_out}",
        f"negative_prompt: {left_out}",
    )
    assert pipeline.generate(dataclasses.replace(SMALL, negative_prompt="cat " * 75)).warnings == ()
    # At scale 1 the negative prompt is not used, so its length does not matter.
    assert pipeline.generate(dataclasses.replace(SMALL, negative_prompt=long, scale=1.0)).warnings == ()


def test_progress_names_the_request_and_image_of_every_row(pipeline: Pipeline) -> None:
    """Two requests of one shape, 3 images per UNet batch: rows [A0 A1 A2] then [A3 B0], 3 steps each."""
    requests = [dataclasses.replace(SMALL, n_samples=2, n_iter=2), dataclasses.replace(SMALL, prompt="b", seed=7)]
    seen: list[Progress] = []
    pipeline.generate_many(requests, max_batch_images=3, callback=seen.append)
    assert [(p.step, p.total, p.images) for p in seen] == [
        *[(k, 3, ((0, 0), (0, 1), (0, 2))) for k in (1, 2, 3)],
        *[(k, 3, ((0, 3), (1, 0))) for k in (1, 2, 3)],
    ]
    assert seen[-1].first_rows() == {0: 0, 1: 1}
    # Each named row holds that image's latents: the last step of each, against the image run alone.
    for progress in (seen[2], seen[5]):
        for row, (request_index, image_index) in enumerate(progress.images):
            request = requests[request_index]
            alone: list[Progress] = []
            single = dataclasses.replace(request, seed=request.seed + image_index, n_samples=1, n_iter=1)
            pipeline.generate(single, alone.append)
            assert torch.allclose(progress.latents[row], alone[-1].latents[0], atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(("sampler", "case_id"), [("plms", "basic"), ("plms", "negative"), ("euler_a", "basic"),
                                                  ("dpm2", "basic")])  # fmt: skip
def test_sampler_image_equals_diffusers_pipeline(
    tiny_model: StableDiffusion, pipeline: Pipeline, sampler: str, case_id: str
) -> None:
    """End to end against diffusers' `StableDiffusionPipeline` with its implementation of the same sampler, on the
    same weights (tests/test_plms.py and test_k_samplers.py hold the samplers alone): guidance, the negative
    prompt, the UNet at fractional timesteps (DPM2's midpoints), and each step's noise drawn from the image's
    generator after its starting noise (Euler a)."""
    from ldm.checkpoint import read_state_dict
    from scripts.peers import call_arguments, diffusers_pipeline

    request = dataclasses.replace(request_for(case(case_id)), sampler=sampler)
    ours = pipeline.generate(request).pixels[0]
    pipe = diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    pipe.scheduler = peer_scheduler(sampler, pipe.scheduler.config)
    pipe.scheduler.set_timesteps(request.steps)
    generator = torch.Generator().manual_seed(request.seed)
    noise = torch.randn(1, 4, request.height // 8, request.width // 8, generator=generator)
    # The pipeline multiplies the latents it is given by its scheduler's `init_noise_sigma` (√(σ_max² + 1) for the
    # k-diffusion ports).
    start = float(pipe.scheduler.sigmas[0]) if starts_from_sigma_max(sampler) else 1.0
    arguments = {**call_arguments(request), "generator": generator}  # the one that drew the noise draws on
    theirs = pipe(**arguments, latents=noise * start / pipe.scheduler.init_noise_sigma).images[0]
    assert np.abs(ours - theirs.clip(0, 1) * 255).max() < FLOAT_TOLERANCE
    # Not DDIM by another name: the same request under DDIM paints another image.
    ddim_image = pipeline.generate(dataclasses.replace(request, sampler="ddim")).pixels[0]
    assert np.abs(ours - ddim_image).mean() > 1
    assert f"Sampler: {SAMPLERS[sampler]}," in parameters_text(request, 0)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize("sampler", ["euler_a", "dpm2"])
def test_k_sampler_img2img_equals_diffusers_img2img_pipeline(
    tiny_model: StableDiffusion, pipeline: Pipeline, sampler: str
) -> None:
    """img2img with a k-diffusion sampler against diffusers' `StableDiffusionImg2ImgPipeline` with the same
    sampler: the last m = ⌊strength·S⌋ levels, from z₀ + σ·noise at the first of them. diffusers is handed our z₀
    (it would sample the VAE posterior where we take its mean; tests/test_reference.py holds our z₀)."""
    import diffusers

    from ldm.checkpoint import read_state_dict
    from scripts.peers import diffusers_pipeline

    request = resolve(dataclasses.replace(request_for(case("img2img")), sampler=sampler))
    ours = pipeline.generate(request).pixels[0]
    text2image = diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**text2image.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = peer_scheduler(sampler, pipe.scheduler.config)
    theirs = pipe(
        request.prompt,
        image=pipeline.init_latent(pipeline.init_picture(request)),
        strength=request.strength,
        num_inference_steps=request.steps,
        guidance_scale=request.scale,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="np",
    ).images[0]
    assert np.abs(ours - theirs.clip(0, 1) * 255).max() < FLOAT_TOLERANCE
    # Not the txt2img image, nor DDIM's img2img.
    for other in (dataclasses.replace(request, init_image=None), dataclasses.replace(request, sampler="ddim")):
        assert np.abs(ours - pipeline.generate(other).pixels[0]).mean() > 1


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_reads_the_layer_a1111_and_diffusers_read(
    tiny_model: StableDiffusion, pipeline: Pipeline, clip_skip: int
) -> None:
    """A1111's "Clip skip" k is diffusers' `clip_skip` k − 1 (layers skipped after the one read): both take the k-th
    hidden state from the end through CLIP's final layer norm. diffusers reads its negative prompt from the last
    layer whatever `clip_skip` says, where A1111 (and we) read both texts alike, so it is handed that embedding,
    computed here with transformers. Checked on whole images, and against a batch that mixes clip skips (each
    embedding comes from its own request's layer)."""
    from ldm.checkpoint import read_state_dict
    from scripts.peers import call_arguments, diffusers_pipeline

    request = resolve(dataclasses.replace(request_for(case("basic")), clip_skip=clip_skip))
    ours = pipeline.generate(request)
    pipe = diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    if not hasattr(pipe.text_encoder, "text_model"):
        # diffusers' clip_skip reaches the norm through `text_model`, a level transformers 5.6 removed: point it at
        # the model itself, outside the module tree (no registered cycle).
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    ids = pipe.tokenizer(request.negative_prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        negative = pipe.text_encoder.text_model.final_layer_norm(states[-clip_skip])
    arguments = call_arguments(request)
    del arguments["negative_prompt"]  # given as embeddings instead
    theirs = pipe(**arguments, negative_prompt_embeds=negative, clip_skip=clip_skip - 1).images
    assert np.abs(ours.pixels - theirs.clip(0, 1) * 255).max() < FLOAT_TOLERANCE
    plain = dataclasses.replace(request, clip_skip=1)
    mixed = pipeline.generate_many([plain, request])
    assert np.abs(mixed[1].pixels - ours.pixels).max() < FLOAT_TOLERANCE
    assert np.abs(mixed[0].pixels - pipeline.generate(plain).pixels).max() < FLOAT_TOLERANCE
    assert np.abs(mixed[0].pixels - ours.pixels).mean() > 1
    assert f"Clip skip: {clip_skip}" in parameters_text(request, 0) and "Clip skip" not in parameters_text(plain, 0)


def test_clip_skip_past_clips_layers_names_the_field(pipeline: Pipeline) -> None:
    layers = pipeline.model.text_encoder.layers
    with pytest.raises(GenerationError, match=rf"clip_skip must be in \[1, {layers}\] .*got {layers + 1}") as error:
        pipeline.generate(dataclasses.replace(request_for(case("basic")), clip_skip=layers + 1))
    assert error.value.field == "clip_skip"
