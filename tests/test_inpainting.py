"""Inpainting (ldm/inpainting.py): on a text-to-image model by keeping the unmasked latents on the init image, on an
inpainting model (RunwayML's 9-channel UNet) by showing it the mask; both against diffusers'
`StableDiffusionInpaintPipeline` on the same weights, and the rules of a masked request."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError, read_state_dict, split_state_dict
from ldm.config import ConfigError, load_config, parse_config
from ldm.generation_request import GenerationError, GenerationRequest
from ldm.inpainting import MAX_MASK_BLUR, blurred, filled, latent_mask, mask_band, mask_pixels
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline, Progress, encode_image
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from tests.reference import FLOAT_TOLERANCE, REFERENCE, TINY_CONFIG, TINY_SAFETENSORS, load_image

INPAINTING_CONFIG = Path(__file__).parent / "fixtures" / "tiny-inpainting.yaml"
INIT = load_image(REFERENCE / "init_dev_80x64.png")


def _mask(width: int = 80, height: int = 64) -> Image.Image:
    """White (repaint) on the left 40 % and in a gray-ish band that rounds to white; black (keep) elsewhere."""
    array = np.zeros((height, width), np.uint8)
    array[:, : width * 2 // 5] = 255
    array[: height // 4, width // 2 :] = 140  # ≥ 50 % white: repainted
    array[height // 2 :, width // 2 :] = 120  # < 50 % white: kept
    return Image.fromarray(array)


REQUEST = GenerationRequest(
    "a red door in a stone wall", negative_prompt="blurry", steps=6, seed=11, init_image=INIT, mask_image=_mask()
)


@pytest.fixture(scope="module")
def inpainting_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ldm.random_weights import random_state_dict, save_checkpoint

    path = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting.safetensors"
    save_checkpoint(random_state_dict(load_config(INPAINTING_CONFIG), seed=5), path)
    return path


@pytest.fixture(scope="module")
def inpainting_model(inpainting_checkpoint: Path) -> StableDiffusion:
    from ldm.parts import load_checkpoint

    return load_checkpoint(inpainting_checkpoint, INPAINTING_CONFIG)


def test_the_fast_path_warms_an_inpainting_unet_and_its_decoder(inpainting_model: StableDiffusion) -> None:
    """The UNet reads 9 channels, the decoder the latent's 4: both routes are prepared (on the CPU here, eagerly:
    the shapes are what is checked; tests/test_gpu.py runs the compiled ones)."""
    from ldm.fast_path import FastCalls, FastPath, ShapeDispatch, warm_up

    model = inpainting_model
    calls = FastCalls(
        ShapeDispatch(model.unet, model.unet, False), ShapeDispatch(model.vae.decode, model.vae.decode, False)
    )
    with torch.inference_mode():
        warm_up(model, calls, FastPath(shapes=("64x80x1",)))
    assert [key[0][0] for key in calls.unet.routes] == [(2, 9, 8, 10)]
    assert [key[0][0] for key in calls.decode.routes] == [(1, 4, 8, 10)]


def test_masks_are_read_as_diffusers_reads_them() -> None:
    """Grayscale, resized to the image, 1 from half white up; nearest-neighbour at latent size."""
    pixels = mask_pixels(_mask(), 80, 64)
    assert pixels.shape == (1, 1, 64, 80) and set(pixels.unique().tolist()) == {0.0, 1.0}
    assert pixels[0, 0, :, :32].all() and pixels[0, 0, :16, 40:].all()
    assert not pixels[0, 0, 32:, 40:].any() and not pixels[0, 0, 20:28, 40:].any()
    small = latent_mask(pixels, 8)
    assert small.shape == (1, 1, 8, 10)
    assert torch.equal(small, pixels[:, :, ::8, ::8])  # nearest: each cell takes its top-left pixel
    rgb = Image.merge("RGB", [_mask()] * 3)
    assert torch.equal(mask_pixels(rgb, 80, 64), pixels)


def _rgba(colour: int, alpha: list[int]) -> Image.Image:
    """A 1×N image of one gray colour over N alpha values."""
    return Image.merge("RGBA", [Image.new("L", (len(alpha), 1), colour)] * 3 + [Image.frombytes("L", (len(alpha), 1),
                       bytes(alpha))])  # fmt: skip


@pytest.mark.parametrize(
    ("image", "mask"),
    [
        # Transparency: opaque beyond half (128 is not) is repainted, whatever the colour.
        (_rgba(255, [0, 128, 129, 255]), [0, 0, 255, 255]),
        (_rgba(0, [0, 128, 129, 255]), [0, 0, 255, 255]),
        (_rgba(255, [0, 0, 0, 0]), [0, 0, 0, 0]),
        (_rgba(200, [0, 255, 0, 255]).convert("LA"), [0, 255, 0, 255]),
        (_rgba(200, [0, 255, 0, 255]).convert("PA"), [0, 255, 0, 255]),
        # Opaque: its gray, as before (the page's masks are white on opaque black).
        (_rgba(255, [255] * 4), [255] * 4),
        (Image.frombytes("L", (4, 1), bytes([0, 100, 200, 255])).convert("RGBA"), [0, 100, 200, 255]),
        (Image.frombytes("L", (4, 1), bytes([0, 100, 200, 255])), [0, 100, 200, 255]),
    ],
)
def test_a_mask_with_transparency_is_its_alpha(image: Image.Image, mask: list[int]) -> None:
    band = mask_band(image)
    assert band.mode == "L" and np.asarray(band)[0].tolist() == mask


def test_a_palette_mask_with_a_transparent_colour_is_its_alpha() -> None:
    image = Image.frombytes("P", (3, 1), bytes([0, 1, 0]))
    image.putpalette([255, 255, 255, 0, 0, 0])
    image.info["transparency"] = 0  # white is transparent, black opaque: the middle pixel is repainted
    assert np.asarray(mask_band(image))[0].tolist() == [0, 255, 0]


def a1111_overlay(decoded: np.ndarray, request: GenerationRequest) -> np.ndarray:
    """`decoded` (H, W, 3) in [0, 255] with the init image laid over it as A1111 lays it, re-derived here in
    float64 from its definition: the repaint mask (half white and up, at the image's size) blurred by a Gaussian of
    σ = mask_blur (2⌊2.5σ + 0.5⌋ + 1 taps, along rows then columns, each index past an edge mirrored back without
    repeating the edge pixel, as often as it takes), doubled and clipped to 1 (A1111's `mask_for_overlay`), then
    a·decoded + (1 − a)·init."""
    width, height = request.width, request.height
    assert width and height and request.init_image is not None and request.mask_image is not None
    gray = request.mask_image.convert("L").resize((width, height), resample=Image.Resampling.LANCZOS)
    mask = (np.asarray(gray, np.float64) / 255.0 >= 0.5).astype(np.float64)
    alpha = np.minimum(1.0, 2.0 * a1111_blur(mask, request.mask_blur))
    init = np.asarray(request.init_image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS), np.float64)
    return alpha[..., None] * decoded + (1.0 - alpha[..., None]) * init


def a1111_blur(mask: np.ndarray, sigma: int) -> np.ndarray:
    """A mask (H, W) blurred as A1111 blurs it, in float64: 2⌊2.5σ + 0.5⌋ + 1 taps of a Gaussian of σ, along rows then
    columns, each index past an edge mirrored back without repeating the edge pixel, as often as it takes."""
    if not sigma:
        return mask
    height, width = mask.shape
    radius = int(2.5 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-(taps**2) / (2.0 * sigma**2))
    kernel /= kernel.sum()

    def mirrored(index: np.ndarray, size: int) -> np.ndarray:
        period = 2 * (size - 1)
        index = np.abs(index) % period
        return np.where(index >= size, period - index, index)

    columns = mirrored(np.arange(width)[:, None] + taps, width)  # (W, taps)
    mask = (mask[:, columns] * kernel).sum(-1)
    rows = mirrored(np.arange(height)[:, None] + taps, height)  # (H, taps)
    return (mask[rows, :] * kernel[:, None]).sum(1)


def test_a_mask_touching_an_edge_is_blurred_mirrored_there() -> None:
    """The blur itself, not doubled and clipped as the overlay's is (which hides most of it): a stroke along the
    left edge, up to a blur wider than the image."""
    mask = np.zeros((16, 20))
    mask[3:9, 0:3] = 1.0
    for sigma in (1, 4, MAX_MASK_BLUR):
        ours = blurred(torch.from_numpy(mask).float()[None, None], sigma)[0, 0].numpy()
        assert np.abs(ours - a1111_blur(mask, sigma)).max() < 1e-6


def test_a_mask_of_another_size_is_lanczos_scaled_then_cut_at_half() -> None:
    """A 40×32 mask with soft edges read at 80×64: PIL's LANCZOS resize, then at least half white (128 of 255)."""
    gray = np.zeros((32, 40), np.uint8)
    gray[8:24, 10:30] = 255
    gray[7, 10:30] = gray[24, 10:30] = 140
    gray[8:24, 9] = gray[8:24, 30] = 110
    mask = Image.fromarray(gray)
    expected = np.asarray(mask.resize((80, 64), Image.Resampling.LANCZOS)) >= 128
    assert np.array_equal(mask_pixels(mask, 80, 64)[0, 0].numpy() == 1.0, expected)
    assert 0 < expected.sum() < 80 * 64


def test_mask_blur_is_a1111s_gaussian() -> None:
    """Against the re-derivation above, up to a blur wider than the image (mirrored again and again)."""
    pixels = mask_pixels(_mask(), 80, 64)
    for sigma in (1, 4, MAX_MASK_BLUR):
        request = dataclasses.replace(resolve(REQUEST), mask_blur=sigma)
        # Decoded all white, init all black: the overlay is its alpha, min(1, 2·blurred mask).
        black = dataclasses.replace(request, init_image=Image.new("RGB", (80, 64)))
        expected = a1111_overlay(np.full((64, 80, 3), 1.0), black)[..., 0]
        alpha = (2 * blurred(pixels, sigma)[0, 0]).clamp(max=1).numpy()
        assert np.abs(alpha - expected).max() < 1e-6
    assert torch.equal(blurred(pixels, 0), pixels)


def test_kept_pixels_are_the_init_images_exactly_and_the_seam_is_blurred(pipeline: Pipeline) -> None:
    """Mask blur 0 pastes every kept pixel back as it was (CompVis' paste); 4 (A1111's default: a kernel 10
    pixels each way) fades the painted image into the kept side of a straight seam, and only there: the repainted
    left part is as at 0 (a repainted corner, the band's, would fade too, as in A1111), and so is every kept pixel
    farther than 10 pixels from a repainted one."""
    hard = pipeline.generate(dataclasses.replace(REQUEST, mask_blur=0))
    keep = np.asarray(_mask()) < 128
    assert np.array_equal(hard.images[0][keep], np.asarray(INIT.convert("RGB"))[keep])
    soft = pipeline.generate(REQUEST)
    changed = np.abs(soft.pixels[0] - hard.pixels[0]).max(-1) > FLOAT_TOLERANCE
    assert changed[:, 32:36].mean() > 0.5 and not changed[:, :32].any() and not changed[40:, 60:].any()
    assert "Mask blur: 4" in parameters_text(soft.request, soft.seeds[0])


def test_kept_latents_end_on_the_init_image_and_the_masked_ones_do_not(pipeline: Pipeline) -> None:
    """On a text-to-image model the kept cells of the final latents are z₀ exactly, for DDIM and a σ-space sampler
    alike; the masked ones are painted."""
    request = resolve(REQUEST)
    z0 = pipeline.init_latent(pipeline.init_picture(request))
    keep = latent_mask(mask_pixels(REQUEST.mask_image, 80, 64), 8).expand_as(z0) < 0.5
    for sampler in ("ddim", "euler_a"):
        steps: list[Progress] = []
        pipeline.generate(dataclasses.replace(request, sampler=sampler), steps.append)
        final = steps[-1].latents
        assert torch.equal(final[keep], z0[keep])
        assert (final[~keep] - z0[~keep]).abs().mean() > 0.1


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(
    ("sampler", "strength", "size", "blur"),
    [("ddim", 1.0, None, 4), ("ddim", 0.5, (48, 64), 0), ("euler_a", 0.7, None, 9)],
)
def test_text_to_image_model_inpaints_as_diffusers(
    tiny_model: StableDiffusion,
    pipeline: Pipeline,
    sampler: str,
    strength: float,
    size: tuple[int, int] | None,
    blur: int,
) -> None:
    """diffusers' inpainting with a 4-channel UNet puts the kept region back after every step too; it is handed our
    z₀ (it would sample the VAE posterior where we take its mean), and its image gets the init image laid over it
    as A1111 lays it (diffusers does not). At another size than the init image's, the mask is resized with it."""
    height, width = size or (None, None)
    request = resolve(
        dataclasses.replace(REQUEST, sampler=sampler, strength=strength, height=height, width=width, mask_blur=blur)
    )
    ours = pipeline.generate(request).pixels[0]
    z0 = pipeline.init_latent(pipeline.init_picture(request))
    decoded = _diffusers_inpaint(tiny_model, TINY_SAFETENSORS, TINY_CONFIG, request, z0, torch.zeros_like(z0))
    assert np.abs(ours - a1111_overlay(decoded, request)).max() < FLOAT_TOLERANCE
    # Not img2img: the kept region changes the image.
    plain = pipeline.generate(dataclasses.replace(request, mask_image=None)).pixels[0]
    assert np.abs(ours - plain).mean() > 1


def test_a_mask_of_another_size_is_stretched_over_the_init_image(pipeline: Pipeline) -> None:
    """As A1111 and diffusers read one: the same as the mask LANCZOS-resized to the init image's size first."""
    small = _mask().resize((40, 24), Image.Resampling.LANCZOS)
    stretched = small.resize((80, 64), Image.Resampling.LANCZOS)
    for change in ({}, {"height": 48, "width": 64}):
        ours, theirs = (
            pipeline.generate(dataclasses.replace(REQUEST, mask_image=mask, **change)).images
            for mask in (small, stretched)
        )
        assert np.array_equal(ours, theirs)


def test_an_inverted_mask_repaints_its_black_part(pipeline: Pipeline) -> None:
    """A1111's "Inpaint not masked": the same as the mask's negative, and its PNG says so."""
    inverted = pipeline.generate(dataclasses.replace(REQUEST, invert_mask=True))
    negative = Image.fromarray(255 - np.asarray(_mask()))
    assert np.array_equal(inverted.images, pipeline.generate(dataclasses.replace(REQUEST, mask_image=negative)).images)
    assert "Mask mode: Inpaint not masked, Mask blur: 4" in parameters_text(inverted.request, inverted.seeds[0])


def test_fill_paints_the_repainted_part_in_the_colours_around_it() -> None:
    """A1111's "fill": kept pixels come back exactly; a hole in one colour is that colour, whatever it held; a hole
    across two colours takes each side's near its edge."""
    hole = torch.zeros(1, 1, 48, 64)
    hole[0, 0, 10:38, 20:44] = 1.0
    holed = hole[0, 0].bool().numpy()
    red = np.full((48, 64, 3), (200, 40, 10), np.uint8)
    halves = red.copy()
    halves[:, 32:] = (20, 60, 220)
    outs = []
    for picture in (red, halves):
        scribbled = picture.copy()
        scribbled[holed] = (255, 255, 0)
        outs.append(out := np.asarray(filled(Image.fromarray(scribbled), hole)).astype(int))
        assert np.array_equal(out[~holed], picture[~holed])
    # Within the rounding of A1111's 8-bit premultiplied layers (a faint layer's colour loses its low bits).
    assert np.abs(outs[0] - red).max() <= 4
    assert (out[10:38, 20:23, 0] > out[10:38, 20:23, 2]).all() and (out[10:38, 41:44, 2] > out[10:38, 41:44, 0]).all()


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize("content", ["fill", "latent_noise", "latent_nothing"])
def test_masked_content_is_what_the_repainted_part_starts_from(
    tiny_model: StableDiffusion, pipeline: Pipeline, content: str
) -> None:
    """A1111's "Masked content": diffusers' inpainting handed the latent of the init image with its repainted part
    filled (its pixels, through the blurred mask), and then, for the latent contents, that part's cells the image's
    starting noise or 0, paints our image."""
    request = resolve(dataclasses.replace(REQUEST, strength=0.6, masked_content=content))
    ours = pipeline.generate(request).pixels[0]
    pixels = mask_pixels(_mask(), 80, 64)
    repaint = latent_mask(pixels, 8) > 0.5
    z0 = pipeline.encode_pixels(encode_image(filled(INIT.convert("RGB"), blurred(pixels, 4)), 80, 64))
    if content == "latent_noise":
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(request.seed or 0))
        z0 = torch.where(repaint, noise, z0)
    elif content == "latent_nothing":
        z0 = z0 * ~repaint
    decoded = _diffusers_inpaint(tiny_model, TINY_SAFETENSORS, TINY_CONFIG, request, z0, torch.zeros_like(z0))
    assert np.abs(ours - a1111_overlay(decoded, request)).max() < FLOAT_TOLERANCE
    as_it_was = pipeline.generate(dataclasses.replace(request, masked_content="original")).pixels[0]
    assert np.abs(ours - as_it_was).mean() > 1
    assert f"Masked content: {content.replace('_', ' ')}" in parameters_text(request, request.seed or 0)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 1.0), ("ddim", 0.5), ("euler_a", 1.0)])
def test_inpainting_model_inpaints_as_diffusers(
    inpainting_model: StableDiffusion, inpainting_checkpoint: Path, sampler: str, strength: float
) -> None:
    """The 9-channel UNet reads [latent, mask, masked-image latent], as in RunwayML's scripts and diffusers; the
    masked-image latent is checked on its own against the VAE's posterior mean of the blanked image."""
    pipeline = Pipeline(inpainting_model)
    request = resolve(dataclasses.replace(REQUEST, sampler=sampler, strength=strength))
    ours = pipeline.generate(request).pixels[0]
    pixels = np.asarray(INIT.convert("RGB"), np.float32) / 127.5 - 1.0
    keep = np.asarray(_mask()) < 128
    blanked = torch.from_numpy(pixels * keep[..., None]).permute(2, 0, 1)[None]
    masked_latent = inpainting_model.config.scale_factor * inpainting_model.vae.encode_mean(blanked)
    condition = pipeline.image_condition(mask_pixels(_mask(), 80, 64), pipeline.init_picture(request))
    assert torch.allclose(condition[:, 1:], masked_latent, atol=1e-5)
    z0 = pipeline.init_latent(pipeline.init_picture(request))
    decoded = _diffusers_inpaint(inpainting_model, inpainting_checkpoint, INPAINTING_CONFIG, request, z0, masked_latent)
    assert np.abs(ours - a1111_overlay(decoded, request)).max() < FLOAT_TOLERANCE


def test_inpainting_model_without_a_mask_repaints_everything(inpainting_model: StableDiffusion) -> None:
    """txt2img on an inpainting model is inpainting under an all-white mask: the masked image is all blank whatever
    the init image, and at strength 1 both start from the noise alone."""
    pipeline = Pipeline(inpainting_model)
    white = Image.new("L", INIT.size, 255)
    masked = pipeline.generate(dataclasses.replace(REQUEST, mask_image=white, strength=1.0)).pixels
    txt2img = pipeline.generate(
        dataclasses.replace(REQUEST, init_image=None, mask_image=None, height=64, width=80)
    ).pixels
    assert np.array_equal(masked, txt2img)


def test_an_inpainting_model_reads_a_long_prompt_in_its_own_unet_calls(inpainting_model: StableDiffusion) -> None:
    """A1111's syntax: a prompt of two chunks beside a negative prompt of one runs in two UNet calls, each fed the
    mask and the masked image (9 channels), as in the same request batched with another of the same lengths."""
    pipeline = Pipeline(inpainting_model)
    long = dataclasses.replace(REQUEST, prompt="a red door in a stone wall, " * 10, emphasis=True)
    inputs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    hook = inpainting_model.unet.register_forward_pre_hook(
        lambda _, args: inputs.append((tuple(args[0].shape), tuple(args[2].shape)))
    )
    try:
        alone = pipeline.generate(long).pixels
    finally:
        hook.remove()
    assert inputs[:2] == [((1, 9, 8, 10), (1, 77, 32)), ((1, 9, 8, 10), (1, 154, 32))]
    other = dataclasses.replace(long, seed=12, prompt="a blue gate in a brick wall, " * 10)
    together = pipeline.generate_many([long, other])
    assert np.abs(together[0].pixels - alone).max() < FLOAT_TOLERANCE
    assert np.abs(together[1].pixels - pipeline.generate(other).pixels).max() < FLOAT_TOLERANCE


def test_an_inpainting_model_feeds_the_mask_to_each_and_sub_prompts_row(inpainting_model: StableDiffusion) -> None:
    """A1111's AND on the 9-channel UNet: every sub-prompt's row reads the image's mask and masked image, both when
    the contexts share a UNet call and when a long sub-prompt runs apart: `x AND x` at scale 4 is `x` at 8."""
    pipeline = Pipeline(inpainting_model)
    for text in ("a red door", "a red door in a stone wall, " * 10):
        request = dataclasses.replace(REQUEST, prompt=text, emphasis=True, scale=8.0)
        composed = pipeline.generate(dataclasses.replace(request, prompt=f"{text} AND {text}", scale=4.0)).pixels
        assert np.abs(composed - pipeline.generate(request).pixels).max() < FLOAT_TOLERANCE


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_a_masked_image_batched_with_others_equals_it_alone(pipeline: Pipeline, strength: float) -> None:
    """Rows without a mask in a UNet batch with masked ones (img2img at the same m; txt2img beside a masked image at
    strength 1, which runs all S steps too) repaint everywhere, as they would alone."""
    masked = dataclasses.replace(REQUEST, n_samples=2, strength=strength)
    other = dataclasses.replace(REQUEST, mask_image=None, seed=90, strength=strength)
    if strength == 1.0:
        other = dataclasses.replace(other, init_image=None, height=64, width=80)
    together = pipeline.generate_many([masked, other], max_batch_images=3)
    for request, generation in zip((masked, other), together, strict=True):
        assert np.abs(generation.pixels - pipeline.generate(request).pixels).max() < FLOAT_TOLERANCE


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"init_image": None}, "mask_image", "mask_image needs an init_image"),
        ({"sampler": "plms"}, "sampler", "plms is for txt2img only"),
        ({"mask_blur": 65}, "mask_blur", r"mask_blur must be in \[0, 64\] pixels, got 65"),
        ({"mask_blur": 2.5}, "mask_blur", "mask_blur must be a whole number of pixels, got 2.5"),
        ({"mask_blur": True}, "mask_blur", "mask_blur must be a whole number of pixels, got True"),  # JSON's true
        ({"masked_content": "blur"}, "masked_content",
         "masked_content must be one of fill, original, latent_noise, latent_nothing, got 'blur'"),
        ({"inpaint_area": "masked"}, "inpaint_area", "inpaint_area must be one of whole_picture, only_masked"),
        ({"masked_area_padding": 257}, "masked_area_padding",
         r"masked_area_padding must be in \[0, 256\] pixels, got 257"),
        ({"masked_area_padding": -1}, "masked_area_padding",
         r"masked_area_padding must be in \[0, 256\] pixels, got -1"),
        ({"masked_area_padding": True}, "masked_area_padding",
         r"masked_area_padding must be in \[0, 256\] pixels, got True"),
        ({"mask_image": None, "masked_content": "fill"}, "masked_content", "masked_content needs a mask_image"),
        ({"mask_image": None, "inpaint_area": "only_masked"}, "inpaint_area", "inpaint_area needs a mask_image"),
        ({"mask_image": None, "invert_mask": True}, "invert_mask", "invert_mask needs a mask_image"),
    ],
)  # fmt: skip
def test_masked_requests_the_pipeline_cannot_run(change: dict, field: str, message: str) -> None:
    with pytest.raises(GenerationError, match=message) as error:
        resolve(dataclasses.replace(REQUEST, **change))
    assert error.value.field == field


@pytest.mark.parametrize(
    "change",
    [{"mask_blur": 0}, {"mask_blur": MAX_MASK_BLUR}, {"masked_area_padding": 0}, {"masked_area_padding": 256}],
    ids=str,
)
def test_the_ends_of_a1111s_sliders_are_taken(change: dict) -> None:
    """A1111's "Mask blur" slider runs from 0 to 64 px, its "Only masked padding" from 0 to 256: both ends are
    settings a client sends."""
    resolved = resolve(dataclasses.replace(REQUEST, **change))
    assert all(getattr(resolved, name) == value for name, value in change.items())


def test_configs_say_which_unet_input_they_feed() -> None:
    from omegaconf import OmegaConf

    raw = OmegaConf.load(INPAINTING_CONFIG)
    assert parse_config(raw).inpainting and load_config("configs/v1-inpainting-inference.yaml").unet.in_channels == 9
    raw.model.params.conditioning_key = "crossattn"
    with pytest.raises(ConfigError, match="in_channels is 9, but conditioning_key 'crossattn' feeds the UNet 4"):
        parse_config(raw)
    raw.model.params.conditioning_key = "concat"
    with pytest.raises(ConfigError, match="conditioning_key is 'concat'"):
        parse_config(raw)


def test_an_inpainting_checkpoint_under_the_text_to_image_config_names_the_right_one(
    inpainting_checkpoint: Path,
) -> None:
    from ldm.checkpoint import is_inpainting_checkpoint

    assert is_inpainting_checkpoint(inpainting_checkpoint) and not is_inpainting_checkpoint(TINY_SAFETENSORS)
    with pytest.raises(CheckpointError, match="9 channels: this is an inpainting checkpoint; use configs/v1-inp"):
        split_state_dict(read_state_dict(inpainting_checkpoint), load_config(TINY_CONFIG))
    with pytest.raises(CheckpointError, match="4 channels: this is a text-to-image checkpoint; use configs/v1-inf"):
        split_state_dict(read_state_dict(TINY_SAFETENSORS), load_config(INPAINTING_CONFIG))


def _diffusers_inpaint(
    model: StableDiffusion,
    checkpoint: Path,
    config: Path,
    request: GenerationRequest,
    z0: torch.Tensor,
    masked_latent: torch.Tensor,
) -> np.ndarray:
    """diffusers' `StableDiffusionInpaintPipeline` on the same weights and request: pixels in [0, 255]."""
    import diffusers

    from scripts.peers import call_arguments, diffusers_pipeline

    text2image = diffusers_pipeline(model, read_state_dict(checkpoint), config, torch.device("cpu"))
    pipe = diffusers.StableDiffusionInpaintPipeline(**text2image.components)
    pipe.set_progress_bar_config(disable=True)
    if request.sampler == "euler_a":
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="linspace"
        )
    image = pipe(
        **call_arguments(request),
        image=z0,
        mask_image=request.mask_image,
        masked_image_latents=masked_latent,
        strength=request.strength,
    ).images[0]
    return image.clip(0, 1) * 255
