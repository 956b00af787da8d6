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

from ldm import hires
from ldm.checkpoint import read_state_dict
from ldm.generation_request import GenerationError, GenerationRequest, hires_pass, without_hires
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from ldm.request_texts import text_schedules, unread_warnings
from ldm.tokenizer import READ_TOKENS, CLIPTokenizer
from tests.peer_schedulers import peer_scheduler
from tests.reference import FLOAT_TOLERANCE, REFERENCE, TINY_CONFIG, TINY_SAFETENSORS, case, load_image, request_for

# A1111 1.6's latent upscalers, written out again from its table (torch mode, antialias).
A1111_LATENT_MODES = {
    "latent": ("bilinear", False),
    "latent_antialiased": ("bilinear", True),
    "latent_bicubic_antialiased": ("bicubic", True),
    "latent_nearest_exact": ("nearest-exact", False),
}


def a1111_resized(
    latents: torch.Tensor, height: int, width: int, resize_x: int, resize_y: int, mode: str, antialias: bool = False
) -> torch.Tensor:
    """A1111 1.6's "Hires resize" of (height, width) first latents, written out again from its
    `calculate_target_resolution` and `sample_hr_pass`: the size upscaled to, interpolated to, then cut (to the first
    image's own size too: 1.6 has no "do nothing" case, where 1.5 and before ran no second pass)."""
    truncate_x = truncate_y = 0
    if resize_y == 0:
        to_x, to_y = resize_x, resize_x * height // width
    elif resize_x == 0:
        to_x, to_y = resize_y * width // height, resize_y
    else:
        if width / height < resize_x / resize_y:
            to_x, to_y = resize_x, resize_x * height // width
        else:
            to_x, to_y = resize_y * width // height, resize_y
        truncate_x, truncate_y = (to_x - resize_x) // 8, (to_y - resize_y) // 8
    samples = F.interpolate(latents, size=(to_y // 8, to_x // 8), mode=mode, antialias=antialias)
    rows, columns = samples.shape[2:]
    return samples[
        :, :, truncate_y // 2 : rows - (truncate_y + 1) // 2, truncate_x // 2 : columns - (truncate_x + 1) // 2
    ]


# "Hires resize" sides (width, height): one side, both in and out of proportion, sides not a multiple of 8, and
# some that are the size of a 512×512 or 512×768 first image (a second pass at that size, and its cut).
RESIZES = [(1024, 0), (0, 1024), (1024, 1024), (1000, 1500), (1536, 1024), (88, 64), (1001, 777), (512, 513), (512, 0),
           (0, 768), (512, 256), (516, 0)]  # fmt: skip


@pytest.fixture(scope="module")
def peer(tiny_model: StableDiffusion) -> Any:
    from scripts.peers import diffusers_pipeline

    return diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))


def with_scheduler(pipe: Any, sampler: str, steps: int) -> Any:
    """`pipe` with the diffusers scheduler of our `sampler` (DDIM as the peer is made), set to `steps`."""
    if sampler != "ddim":
        pipe.scheduler = peer_scheduler(sampler, pipe.scheduler.config)
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
    run = int(steps / min(request.strength, 0.999))
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
        ("dpm2", "latent_antialiased", 2.0, 5, 1.0),  # the whole run, from the upscaled latent noised to σ_max
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


def a1111_upscaled(image: np.ndarray, width: int, height: int, resample: Image.Resampling) -> np.ndarray:
    """A1111 1.6's `images.resize_image(0, image, width, height, upscaler)` with its Lanczos or Nearest upscaler
    (`Upscaler.upscale`, its `do_upscale`), written out again: by the larger ratio s to int(side·s) with the
    upscaler's filter (again while short of that rounded down to 8, at most 3 times), Lanczos to the rounded size,
    Lanczos to (width, height)."""
    img = Image.fromarray(image)
    scale = max(width / img.width, height / img.height)
    if scale > 1.0:
        dest_w, dest_h = int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8)
        for _ in range(3):
            shape = (img.width, img.height)
            img = img.resize((int(img.width * scale), int(img.height * scale)), resample=resample)
            if shape == (img.width, img.height):
                break
            if img.width >= dest_w and img.height >= dest_h:
                break
        if img.width != dest_w or img.height != dest_h:
            img = img.resize((int(dest_w), int(dest_h)), resample=Image.Resampling.LANCZOS)
    if img.width != width or img.height != height:
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(img)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(
    ("upscaler", "resample", "scale", "side"),
    [
        ("lanczos", Image.Resampling.LANCZOS, 2.0, 128),
        ("nearest", Image.Resampling.NEAREST, 2.0, 128),
        # int(64·1.3) = 83: A1111 resizes to 83, to 80 and back to 83, and its VAE's latent of 83 is 10 wide.
        ("lanczos", Image.Resampling.LANCZOS, 1.3, 83),
        ("nearest", Image.Resampling.NEAREST, 1.3, 83),
    ],
)
def test_image_hires_fix_resizes_the_first_image_and_encodes_it_again(
    pipeline: Pipeline, peer: Any, upscaler: str, resample: Image.Resampling, scale: float, side: int
) -> None:
    """The first pass's image, truncated to 8 bits as A1111 truncates it, resized as A1111 resizes it (above) and
    encoded by the VAE (its posterior mean, as our img2img encodes) for the second pass. The first image is ours,
    held to diffusers' decode (decodes that agree to 1e-6 still truncate a few pixels apart, which would move the
    encoding)."""
    request = resolve(
        dataclasses.replace(request_for(case("basic")), hr_scale=scale, hr_upscaler=upscaler, hr_steps=4, strength=0.5)
    )
    pixels = pipeline.generate(dataclasses.replace(request, hr_scale=1.0)).pixels[0]
    decoded = peer.vae.decode(first_latents(peer, request) / peer.vae.config.scaling_factor).sample
    theirs_first = ((decoded[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy() * 255
    assert np.abs(pixels - theirs_first).max() < FLOAT_TOLERANCE
    first = pixels.astype(np.uint8)  # truncated to 8 bits, as A1111's `x_sample.astype(np.uint8)`
    upscaled = a1111_upscaled(first, side, side, resample).astype(np.float32) / 127.5 - 1
    if scale == 2.0:  # to a multiple of 8, one resize
        once = np.asarray(Image.fromarray(first).resize((side, side), resample))
        assert np.array_equal(a1111_upscaled(first, side, side, resample), once)
    pixels = torch.from_numpy(upscaled).permute(2, 0, 1)[None]
    z0 = peer.vae.encode(pixels).latent_dist.mean * peer.vae.config.scaling_factor
    ours = pipeline.generate(request).pixels[0]
    assert np.abs(ours - second_pass(peer, request, z0)).max() < FLOAT_TOLERANCE
    latent = pipeline.generate(dataclasses.replace(request, hr_upscaler="latent")).pixels[0]
    assert np.abs(ours - latent).mean() > 1


def test_prompt_editing_counts_the_second_pass_on_from_the_first_as_a1111_does() -> None:
    """A1111 1.6 schedules a hires fix as one timeline: steps count on from the first pass's last, fractions run
    from 1 to 2 over the second pass. After 10 first-pass steps, of the 6 hires steps `[red:blue:0.5]` reads blue
    throughout, `[red:blue:1.5]` and `[red:blue:13]` switch after the third; an alternation starts again; a
    two-call sampler counts both passes' calls."""
    request = resolve(GenerationRequest("x", seed=1, height=64, width=64, steps=10, emphasis=True, hr_scale=2.0,
                                        hr_steps=6))  # fmt: skip

    def second(prompt: str, sampler: str = "ddim") -> tuple[tuple[int, str], ...]:
        return text_schedules(dataclasses.replace(request, prompt=prompt, sampler=sampler), "prompt", hires_pass=True)[
            0
        ]

    assert text_schedules(dataclasses.replace(request, prompt="[red:blue:0.5]"), "prompt")[0] == (
        (5, "red"),
        (10, "blue"),
    )
    assert second("[red:blue:0.5]") == ((6, "blue"),)
    assert second("[red:blue:1.5]") == second("[red:blue:13]") == ((3, "red"), (6, "blue"))
    assert second("[red|blue]")[:2] == ((1, "red"), (2, "blue"))
    assert second("[red:blue:26]", "heun") == ((6, "red"), (12, "blue"))  # 2·10 calls, then 6 of the 2·6
    assert (hires_pass(request, 8).height, hires_pass(request, 8).steps) == (128, 6)
    # A hires prompt of its own is scheduled the same way, the first pass reading the prompt.
    own = dataclasses.replace(request, prompt="[cat:dog:5]", hr_prompt="[red:blue:1.5]", hr_negative_prompt="[a|b]")
    assert text_schedules(own, "prompt") == (((5, "cat"), (10, "dog")),)
    assert text_schedules(own, "prompt", hires_pass=True) == (((3, "red"), (6, "blue")),)
    assert text_schedules(own, "negative_prompt", hires_pass=True)[0][:2] == ((1, "a"), (2, "b"))


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
def test_an_edit_in_the_second_pass_equals_diffusers_with_its_embeddings_swapped(pipeline: Pipeline, peer: Any) -> None:
    """`[red:blue:1.5]`: red for the whole first pass, then red for calls 0–3 of the 6 hires steps and blue after,
    against diffusers' img2img with its embeddings swapped by its step callback (tests/test_prompt_editing.py)."""
    import diffusers

    from tests.test_prompt_editing import BLUE, RED, edited_by_diffusers

    request = resolve(
        GenerationRequest(f"[{RED}:{BLUE}:1.5]", negative_prompt="blurry", seed=8, height=64, width=64, steps=10,
                          emphasis=True, hr_scale=2.0, hr_steps=6, strength=0.75)
    )  # fmt: skip
    ours = pipeline.generate(request).pixels[0]
    z0 = F.interpolate(first_latents(peer, dataclasses.replace(request, prompt=RED)), size=(16, 16), mode="bilinear")
    run = int(6 / 0.75)
    image2image = diffusers.StableDiffusionImg2ImgPipeline(**peer.components)
    image2image.set_progress_bar_config(disable=True)

    def theirs(switch: int) -> np.ndarray:
        return edited_by_diffusers(image2image, dataclasses.replace(request, steps=run), lambda c: RED if c <= switch
                                   else BLUE, lambda _: "blurry", image=z0, strength=6 / run)  # fmt: skip

    assert np.abs(ours - theirs(3)).max() < FLOAT_TOLERANCE
    # Scheduled as a run of its own, the 6 steps' 1.5 would be past their end: red throughout.
    assert np.abs(ours - theirs(6)).max() > 1


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(
    ("own", "first_sampler"),
    [
        ({"hr_prompt": "a stormy sea", "hr_negative_prompt": "sunny"}, "ddim"),
        ({"hr_sampler": "euler_a"}, "ddim"),
        ({"hr_prompt": "a stormy sea", "hr_sampler": "dpm2"}, "plms"),  # PLMS may paint the first pass then
    ],
)
def test_the_second_passs_own_prompts_and_sampler_equal_diffusers_img2img_with_them(
    pipeline: Pipeline, peer: Any, own: dict[str, str], first_sampler: str
) -> None:
    """A1111's "Hires prompt", "Hires negative prompt" and "Hires sampler": the first pass as asked, the second an
    img2img of its upscaled latent with the pass's own prompts and sampler (the others as the first pass's)."""
    request = resolve(
        GenerationRequest("a calm lake", negative_prompt="blurry", seed=21, height=64, width=64, steps=8,
                          sampler=first_sampler, hr_scale=1.5, hr_steps=4, strength=0.5, **own)
    )  # fmt: skip
    ours = pipeline.generate(request).pixels[0]
    first = first_latents(peer, request) if first_sampler != "plms" else None
    if first is None:  # diffusers' PNDM is not the original's PLMS: ours, the last step's latent of the first pass
        steps: list[torch.Tensor] = []
        pipeline.generate(without_hires(request), callback=lambda p: steps.append(p.latents))
        first = steps[-1]
    z0 = F.interpolate(first, size=(12, 12), mode="bilinear")
    second = dataclasses.replace(
        request, prompt=request.hr_prompt or request.prompt,
        negative_prompt=request.hr_negative_prompt or request.negative_prompt,
        sampler=request.hr_sampler or request.sampler,
    )  # fmt: skip
    assert np.abs(ours - second_pass(peer, second, z0)).max() < FLOAT_TOLERANCE
    # Not the image of the first pass's prompts and sampler throughout.
    same = pipeline.generate(dataclasses.replace(request, hr_prompt="", hr_negative_prompt="", hr_sampler="euler"))
    assert np.abs(ours - same.pixels[0]).mean() > 1


def test_hires_steps_default_to_the_request_steps_and_count_in_total_steps(pipeline: Pipeline) -> None:
    request = GenerationRequest("x", seed=3, height=64, width=64, steps=4, sampler="euler", hr_scale=1.5)
    assert request.total_steps == 8
    totals: list[int] = []
    generation = pipeline.generate(request, callback=lambda progress: totals.append(progress.total))
    assert generation.request.hr_steps == 4
    assert totals == [4] * 4 + [4] * 4
    assert generation.images.shape == (1, 96, 96, 3)


def test_hires_sizes_round_down_to_the_latent_factor(pipeline: Pipeline) -> None:
    """int(side·scale), as A1111 computes it (83 and 93 here), then down to a multiple of 8. A scale that comes back
    to the size itself still runs a second pass at that size, as A1111 1.6 runs one: 1.1 from 64 pixels (70, down to
    64), and 1.01 (64.64, 64)."""
    request = resolve(GenerationRequest("x", seed=1, height=64, width=72, hr_scale=1.3))
    second = hires_pass(request, 8)
    assert (second.height, second.width) == (80, 88)
    small = GenerationRequest("x", seed=1, height=64, width=64, steps=3, hr_scale=1.1, strength=0.5)
    generation = pipeline.generate(small)
    assert generation.request.hires and generation.images.shape == (1, 64, 64, 3)
    plain = pipeline.generate(dataclasses.replace(small, hr_scale=1.0)).images
    assert not np.array_equal(generation.images, plain)
    same = pipeline.generate(dataclasses.replace(small, hr_scale=1.01))
    assert same.request.hires and "Hires upscale: 1.01" in parameters_text(same.request, 1)
    assert same.images.shape == (1, 64, 64, 3) and np.array_equal(same.images, generation.images)


def test_a_side_is_truncated_before_its_rounding() -> None:
    """int(72·1.55) = 111 (A1111's int, not round's 112), then down to 104; the image upscalers resize to 111."""
    plan = hires.plan(72, 72, 8, 1.55)
    assert (plan.size, plan.upscaled, plan.target) == ((104, 104), (104, 104), (111, 111))


def test_the_most_hires_steps_are_the_most_whose_run_fits() -> None:
    """At strength 1 A1111 divides by 0.999: the most second-pass steps of a run of at most T is the largest N with
    int(N / 0.999) ≤ T, found here by trying every N."""
    for most_run in range(1, 2001):
        fitting = max(n for n in range(1, most_run + 1) if int(n / 0.999) <= most_run)
        assert hires.most_steps(most_run) == fitting


def test_each_latent_upscaler_is_a1111s_interpolation() -> None:
    """A1111's latent upscale modes by the titles it writes (its shared.latent_upscale_modes), up and down (a Hires
    resize below the first size), where antialiasing tells the filters apart."""
    a1111 = {
        "Latent": ("bilinear", False),
        "Latent (antialiased)": ("bilinear", True),
        "Latent (bicubic)": ("bicubic", False),
        "Latent (bicubic antialiased)": ("bicubic", True),
        "Latent (nearest)": ("nearest", False),
        "Latent (nearest-exact)": ("nearest-exact", False),
    }
    latents = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(3))
    ours = {name: title for name, title in hires.UPSCALERS.items() if hires.is_latent(name)}
    assert sorted(ours.values()) == sorted(a1111)
    for name, title in ours.items():
        mode, antialias = a1111[title]
        for size in ((24, 20), (5, 7)):
            expected = F.interpolate(latents, size=size, mode=mode, antialias=antialias)
            assert torch.equal(hires.upscale_latents(latents, *size, name), expected), (name, size)
    down = [hires.upscale_latents(latents, 5, 7, name) for name in ("latent", "latent_antialiased")]
    assert not torch.equal(*down)


def test_hires_and_plain_requests_generated_together_equal_each_alone(pipeline: Pipeline) -> None:
    """The second pass batches across requests as the first does: each image is its request's alone, in order, up
    to a batch's float rounding (which a Lanczos upscale can take past a rounding edge of its 8-bit first image: a
    level there moves the result by hundredths of one)."""
    requests = [
        GenerationRequest("a", seed=3, height=64, width=64, steps=4, n_samples=2, hr_scale=1.5, hr_steps=2),
        GenerationRequest("b", seed=9, height=64, width=64, steps=4),
        GenerationRequest("c", seed=5, height=64, width=64, steps=4, hr_scale=1.5, hr_steps=2, hr_upscaler="lanczos"),
        # A second pass of its own prompts and sampler, batched apart from the others' second passes.
        GenerationRequest(
            "d",
            seed=6,
            height=64,
            width=64,
            steps=4,
            hr_scale=1.5,
            hr_steps=2,
            hr_prompt="e",
            hr_negative_prompt="f",
            hr_sampler="euler",
        ),
    ]
    together = pipeline.generate_many(requests)
    for request, generation in zip(requests, together, strict=True):
        alone = pipeline.generate(request)
        assert generation.images.shape == alone.images.shape
        tolerance = FLOAT_TOLERANCE if hires.is_latent(request.hr_upscaler) else 0.5
        assert np.abs(generation.pixels - alone.pixels).max() < tolerance


def test_png_parameters_name_the_hires_fix_as_a1111_does() -> None:
    request = resolve(
        GenerationRequest("x", seed=5, height=64, width=64, steps=20, hr_scale=2.0, hr_upscaler="latent_bicubic",
                          strength=0.7)
    )  # fmt: skip
    text = parameters_text(request, 5)
    assert "Size: 64x64," in text  # the first pass's, as A1111 writes it
    # Hires steps as many as Steps: left out, as A1111 leaves them.
    assert "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent (bicubic)" in text
    other = parameters_text(dataclasses.replace(request, hr_scale=1.5, hr_steps=12), 5)
    assert "Hires upscale: 1.5, Hires steps: 12, Hires upscaler" in other
    assert "Hires" not in parameters_text(dataclasses.replace(request, hr_scale=1.0), 5)
    # The second pass's own prompts and sampler, quoted as A1111 quotes a value holding a comma, colon or line break;
    # where they are the first pass's, said nowhere.
    own = dataclasses.replace(request, hr_prompt="a sea, stormy", hr_negative_prompt="sunny", hr_sampler="euler_a")
    assert 'Hires upscaler: Latent (bicubic), Hires sampler: Euler a, Hires prompt: "a sea, stormy", Hires negative' \
        " prompt: sunny," in parameters_text(own, 5)  # fmt: skip
    same = dataclasses.replace(request, hr_prompt="x", hr_sampler="ddim")
    assert parameters_text(same, 5) == text


def test_words_clip_leaves_out_are_warned_of_once_for_each_text_read() -> None:
    """The second pass reads the first's prompt unless it has its own: a prompt past CLIP's 75 tokens is one warning,
    not one a pass; a hires prompt of its own past them is warned of under its own field."""
    request = resolve(GenerationRequest("wave " * 76 + "castle", seed=5, height=64, width=64, steps=4, hr_scale=2.0,
                                        strength=0.5))  # fmt: skip
    prompt = f"prompt: CLIP reads {READ_TOKENS} tokens; the 2 after them were left out: wave castle"
    assert unread_warnings(CLIPTokenizer(), request) == (prompt,)
    own = dataclasses.replace(request, hr_prompt="sea " * 76)
    hires_prompt = f"hr_prompt: CLIP reads {READ_TOKENS} tokens; the 1 after them were left out: sea"
    assert unread_warnings(CLIPTokenizer(), own) == (prompt, hires_prompt)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hr_scale": 0.5}, "hr_scale"),
        ({"hr_scale": 4.5}, "hr_scale"),
        ({"hr_scale": float("nan")}, "hr_scale"),
        ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
        ({"hr_steps": -1}, "hr_steps"),
        ({"hr_steps": 999}, "hr_steps"),  # a run of at least 999 / 0.999 = 1,000 steps
        ({"sampler": "plms"}, "sampler"),  # its second pass is an img2img
        ({"strength": 0.0}, "strength"),
        ({"strength": 0.01, "hr_steps": 20}, "strength"),  # the last 20 of 2,000 steps: past the model's 999
        ({"init_image": "init"}, "hr_scale"),  # txt2img only
        ({"hr_scale": 1.0, "hr_prompt": "y"}, "hr_prompt"),  # the second pass's, and there is none
        ({"hr_scale": 1.0, "hr_sampler": "euler"}, "hr_sampler"),
        ({"hr_sampler": "plms"}, "hr_sampler"),
        ({"sampler": "plms", "hr_sampler": "plms"}, "hr_sampler"),
        ({"hr_sampler": "k_euler"}, "hr_sampler"),
        ({"hr_sampler": "euler", "eta": 0.5}, "eta"),  # η is DDIM's, in either pass
        ({"prompt": "x <lora:style:0.5>", "hr_prompt": "y"}, "hr_prompt"),  # both passes run on the same weights
        ({"prompt": "x <lora:style:0.5>", "hr_prompt": "y <lora:style:0.6>"}, "hr_prompt"),
        ({"hr_negative_prompt": "z <lora:style:1>"}, "hr_negative_prompt"),
        ({"hr_prompt": "y AND z:250", "emphasis": True}, "hr_prompt"),
        ({"hr_negative_prompt": "(z:1..5)", "emphasis": True}, "hr_negative_prompt"),
        ({"hr_prompt": "style:watercolor x:1", "weighted_subprompts": True}, "hr_prompt"),
        # Past MAX_TEXTS texts in the second pass alone (an alternation of 70 over 100 steps).
        (
            {"hr_prompt": "[" + "|".join(f"w{i}" for i in range(70)) + "]", "emphasis": True, "hr_steps": 100},
            "hr_prompt",
        ),
        ({"hr_sampler": "plms", "sampler": "euler"}, "hr_sampler"),
        ({"hr_resize_x": 512, "hr_scale": 1.0, "hr_sampler": "nonesuch"}, "hr_sampler"),
    ],
)
def test_hires_requests_the_pipeline_cannot_run_name_their_field(change: dict, field: str) -> None:
    if change.get("init_image") == "init":
        change = {"init_image": load_image(REFERENCE / "init_dev_80x64.png")}
    request = dataclasses.replace(GenerationRequest("x", seed=1, steps=10, hr_scale=2.0), **change)
    with pytest.raises(GenerationError) as info:
        resolve(request)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("height", "width"), [(512, 512), (512, 768), (768, 512), (64, 72), (448, 640), (200, 136)]
)  # fmt: skip
@pytest.mark.parametrize("resize", RESIZES)
def test_hires_resize_upscales_and_cuts_as_a1111_does(height: int, width: int, resize: tuple[int, int]) -> None:
    """The plan's sizes and its cut, against A1111's code written out again (a latent whose every value is its own
    index, so that the cut's every offset shows): upscaled to cover the size asked in the first image's proportions,
    the excess rows or columns cut, the odd one from the bottom or right."""
    plan = hires.plan(height, width, 8, resize=resize)
    latents = torch.arange(float(height // 8 * width // 8)).reshape(1, 1, height // 8, width // 8)
    theirs = a1111_resized(latents, height, width, *resize, mode="nearest")
    big = F.interpolate(latents, size=(plan.upscaled[0] // 8, plan.upscaled[1] // 8), mode="nearest")
    assert torch.equal(plan.crop(big, 8), theirs)
    assert plan.size == (theirs.shape[2] * 8, theirs.shape[3] * 8)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(("resize", "size"), [((88, 64), (64, 88)), ((0, 96), (96, 96))])
def test_latent_hires_resize_equals_diffusers_on_a1111s_cut_latent(
    pipeline: Pipeline, peer: Any, resize: tuple[int, int], size: tuple[int, int]
) -> None:
    """ "Hires resize" to 88×64 from 64×64: the latent upscaled to 11×11, then 3 rows cut, 1 at the top and 2 at the
    bottom; to a height of 96, the width following: 12×12, nothing cut. The second pass is diffusers' img2img of that
    latent."""
    request = resolve(
        dataclasses.replace(request_for(case("basic")), sampler="euler_a", hr_resize_x=resize[0], hr_resize_y=resize[1],
                            hr_steps=4, strength=0.6)
    )  # fmt: skip
    ours = pipeline.generate(request).pixels[0]
    assert ours.shape == (*size, 3)
    z0 = a1111_resized(first_latents(peer, request), 64, 64, *resize, mode="bilinear")
    assert np.abs(ours - second_pass(peer, request, z0)).max() < FLOAT_TOLERANCE
    # The cut matters: the same latent cut evenly is another image.
    if resize == (88, 64):
        uncut = F.interpolate(first_latents(peer, request), size=(11, 11), mode="bilinear")
        assert np.abs(ours - second_pass(peer, request, uncut[:, :, 2:10])).mean() > 1


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
def test_image_hires_resize_encodes_the_upscaled_image_then_cuts_its_latent(pipeline: Pipeline, peer: Any) -> None:
    """An image upscaler's "Hires resize" to 96×72: the first image resized to 96×96 and encoded, then 3 latent rows
    cut from the encoding, as A1111 cuts it (not the image resized to 96×72)."""
    request = resolve(
        dataclasses.replace(request_for(case("basic")), hr_resize_x=96, hr_resize_y=72, hr_upscaler="lanczos",
                            hr_steps=4, strength=0.5)
    )  # fmt: skip
    first = pipeline.generate(dataclasses.replace(request, hr_resize_x=0, hr_resize_y=0)).pixels[0].astype(np.uint8)
    upscaled = np.asarray(Image.fromarray(first).resize((96, 96), Image.Resampling.LANCZOS), dtype=np.float32)
    pixels = torch.from_numpy(upscaled / 127.5 - 1).permute(2, 0, 1)[None]
    z0 = peer.vae.encode(pixels).latent_dist.mean * peer.vae.config.scaling_factor
    ours = pipeline.generate(request).pixels[0]
    assert ours.shape == (72, 96, 3)
    assert np.abs(ours - second_pass(peer, request, z0[:, :, 1:10])).max() < FLOAT_TOLERANCE


def test_a_hires_resize_to_the_first_size_runs_its_pass_and_png_parameters_name_it() -> None:
    """As A1111 1.6: an upscale to the size the image already has still runs a second pass, and a cut asked for
    cuts (a 64-wide first image "resized" to 64×32 is 64×32); the PNG writes A1111's "Hires resize"."""
    plain = GenerationRequest("x", seed=1, height=64, width=64, steps=3)
    cut = resolve(dataclasses.replace(plain, hr_resize_x=64, hr_resize_y=32))
    assert cut.hires and (hires_pass(cut, 8).height, hires_pass(cut, 8).width) == (32, 64)
    resized = resolve(dataclasses.replace(plain, hr_resize_x=96, strength=0.5))
    assert (hires_pass(resized, 8).height, hires_pass(resized, 8).width) == (96, 96)
    assert "Denoising strength: 0.5, Hires resize: 96x0, Hires upscaler: Latent" in parameters_text(resized, 1)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hr_resize_x": -8}, "hr_resize_x"),
        ({"hr_resize_y": 128, "hr_scale": 2.0}, "hr_resize_y"),  # one or the other sizes the fix
        ({"hr_resize_x": 4}, "hr_resize_x"),  # 4×4 pixels: no latent pixel
        ({"hr_resize_y": 128, "init_image": "init"}, "hr_resize_y"),  # txt2img only
    ],
)
def test_hires_resizes_the_pipeline_cannot_run_name_their_field(change: dict, field: str) -> None:
    if change.get("init_image") == "init":
        change = {**change, "init_image": load_image(REFERENCE / "init_dev_80x64.png")}
    with pytest.raises(GenerationError) as info:
        resolve(dataclasses.replace(GenerationRequest("x", seed=1, steps=10, height=64, width=64), **change))
    assert info.value.field == field
