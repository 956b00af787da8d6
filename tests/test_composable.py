"""A1111's `AND` (ldm/composable.py): sub-prompts guided toward apart, their pulls summed by weight."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.composable import ComposableError, split
from ldm.conditioning import BatchConditions, ImageConditioning
from ldm.generation_request import GenerationError, GenerationRequest
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.request_checks import resolve
from tests.reference import FLOAT_TOLERANCE, TINY_CONFIG, TINY_SAFETENSORS, embed_each

REQUEST = GenerationRequest("a castle", seed=21, height=64, width=64, steps=6, emphasis=True)
LONG = "a castle on a hill by the sea at dawn with towers and flags, " * 8  # 120 tokens: two chunks


@pytest.mark.parametrize(
    ("prompt", "parts"),
    [
        ("a castle", [("a castle", 1.0)]),
        ("a castle AND a forest:0.6", [("a castle", 1.0), (" a forest", 0.6)]),
        ("a castle :2", [("a castle", 2.0)]),  # a weight without AND counts too, as in A1111
        ("a castle: -0.5 AND b:.5 AND c:5.", [("a castle", -0.5), (" b", 0.5), (" c", 5.0)]),
        ("a castle:+2 AND b:+.5", [("a castle", 2.0), (" b", 0.5)]),  # A1111's number takes a sign either way
        ("a castle:100 AND b:-100", [("a castle", 100.0), (" b", -100.0)]),  # within ±100: the ends too
        ("(red:1.3) castle", [("(red:1.3) castle", 1.0)]),  # emphasis is not a sub-prompt weight
        ("a castle:1e3", [("a castle:1e3", 1.0)]),  # no exponent: the number is text
        ("an ANDROID and a BRAND", [("an ANDROID and a BRAND", 1.0)]),  # AND alone, in capitals
        ("[a AND b]", [("[a", 1.0), (" b]", 1.0)]),  # anywhere, brackets or not
        ("a\nAND b:2\n", [("a", 1.0), (" b", 2.0)]),
        ("AND b", [("", 1.0), (" b", 1.0)]),
    ],
)
def test_split_reads_a1111s_and_and_weights(prompt: str, parts: list[tuple[str, float]]) -> None:
    assert [(text.rstrip(), weight) for text, weight in split(prompt)] == parts


@pytest.mark.parametrize("prompt", ["a castle:101", "a AND b:-1000"])
def test_a_weight_past_100_is_an_error(prompt: str) -> None:
    with pytest.raises(ComposableError, match=r"is not within ±100"):
        split(prompt)


def test_guide_sums_each_sub_prompts_pull_in_order() -> None:
    """Row 0: plain at s = 3 (ε_u + s·(ε_c − ε_u), bit for bit); row 1: two sub-prompts; row 2: plain at s = 1
    (ε_c itself); row 3: one sub-prompt of weight 0.5."""
    generator = torch.Generator().manual_seed(0)
    e_u = torch.randn(4, 2, 3, 3, generator=generator)
    e_c = torch.randn(5, 2, 3, 3, generator=generator)
    text = ((1, torch.zeros(1, 4, 2)),)
    rows = [
        ImageConditioning((text,), text),
        ImageConditioning((text, text), text, (1.0, -0.7)),
        ImageConditioning((text,), text),
        ImageConditioning((text,), text, (0.5,)),
    ]
    scales = torch.tensor([3.0, 7.5, 1.0, 2.0])
    guided = BatchConditions(rows).guide(e_u, e_c, scales)
    u, c = e_u.double(), e_c.double()
    expected = [u[0] + 3 * (c[0] - u[0]), u[1] + 7.5 * (c[1] - u[1]) - 0.7 * 7.5 * (c[2] - u[1]), c[3],
                u[3] + 0.5 * 2 * (c[4] - u[3])]  # fmt: skip
    torch.testing.assert_close(guided.double(), torch.stack(expected), rtol=0, atol=1e-5)
    assert torch.equal(guided[0], e_u[0] + 3.0 * (e_c[0] - e_u[0])) and torch.equal(guided[2], e_c[3])
    assert torch.equal(BatchConditions(rows).prompt_rows(torch.arange(4)), torch.tensor([0, 1, 1, 2, 3]))


@pytest.mark.parametrize(
    ("prompt", "scale", "same_as", "run"),
    [
        ("a castle AND a castle", 4.0, {"scale": 8.0}, {}),  # twice the pull
        ("a castle:0.5", 7.5, {"scale": 3.75}, {}),
        ("a castle:0.5", 1.0, {"scale": 0.5}, {}),  # at scale 1 the unconditional ε is still needed
        ("a castle AND a castle", 4.0, {"scale": 8.0}, {"sampler": "euler_a"}),  # a k-diffusion sampler
        ("a castle AND a castle", 4.0, {"scale": 8.0}, {"sampler": "dpm2", "hr_scale": 1.5, "hr_steps": 2}),
    ],
    ids=["sum", "weight", "scale-1", "euler-a", "dpm2-hires"],
)
def test_sums_of_one_text_are_its_guidance_scaled(
    pipeline: Pipeline, prompt: str, scale: float, same_as: dict, run: dict
) -> None:
    """u + Σ w_j·s·(c − u) over sub-prompts of one text c is u + (Σ w_j)·s·(c − u): the plain image at that scale,
    but for rounding; and not the plain image at the request's scale. With every sampler's ε, in both passes."""
    request = dataclasses.replace(REQUEST, **run)
    composed = pipeline.generate(dataclasses.replace(request, prompt=prompt, scale=scale)).pixels
    plain = pipeline.generate(dataclasses.replace(request, **same_as)).pixels
    assert np.abs(composed - plain).max() < FLOAT_TOLERANCE
    unscaled = pipeline.generate(dataclasses.replace(request, scale=scale)).pixels
    assert np.abs(composed - unscaled).mean() > 1


def test_a_weight_of_1_without_and_is_the_plain_image(pipeline: Pipeline) -> None:
    plain = pipeline.generate(REQUEST).images
    assert np.array_equal(pipeline.generate(dataclasses.replace(REQUEST, prompt="a castle:1")).images, plain)
    # Without A1111's syntax the colon and the word AND are text.
    as_text = dataclasses.replace(REQUEST, prompt="a castle AND a forest:0.6", emphasis=False)
    assert resolve(as_text).prompt == "a castle AND a forest:0.6"
    assert not np.array_equal(pipeline.generate(as_text).images, plain)


@torch.inference_mode()
def composed_by_diffusers(
    peer: Any, pipeline: Pipeline, request: GenerationRequest, parts: list[tuple[str, float]]
) -> np.ndarray:
    """diffusers' DDIM, UNet and VAE, one UNet call per text per step, ε = ε_u + Σ_j w_j·s·(ε_j − ε_u); the texts
    encoded as A1111's syntax encodes them, each sub-prompt padded to the longest by repeating its last vector (A1111's
    `reconstruct_multicond_batch`)."""
    assert request.seed is not None and request.height is not None and request.width is not None
    scheduler = peer.scheduler
    scheduler.set_timesteps(request.steps)
    shape = (1, 4, request.height // 8, request.width // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed))
    (uncond,) = embed_each(pipeline, [request.negative_prompt])
    conds = embed_each(pipeline, [text for text, _ in parts])
    longest = max(cond.shape[1] for cond in conds)
    conds = [torch.cat([c] + [c[:, -1:]] * (longest - c.shape[1]), dim=1) for c in conds]
    for t in scheduler.timesteps:
        e_u = peer.unet(latents, t, encoder_hidden_states=uncond).sample
        eps = e_u.clone()
        for cond, (_, weight) in zip(conds, parts, strict=True):
            eps += (peer.unet(latents, t, encoder_hidden_states=cond).sample - e_u) * (weight * request.scale)
        latents = scheduler.step(eps, t, latents).prev_sample
    image = peer.vae.decode(latents / peer.vae.config.scaling_factor).sample
    return ((image[0] / 2 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0).numpy()


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
@pytest.mark.parametrize(
    ("parts", "lengths"),
    [
        ([("a castle", 1.0), ("a forest", 0.6)], {77}),
        # Two chunks and one: the short ones padded, and all apart from the negative prompt's one chunk.
        ([(LONG, 1.0), ("a forest", -0.4), ("a lake", 0.8)], {154, 77}),
    ],
    ids=["one-length", "padded"],
)
def test_image_equals_diffusers_guided_toward_each_sub_prompt(
    tiny_model: StableDiffusion, pipeline: Pipeline, parts: list[tuple[str, float]], lengths: set[int]
) -> None:
    from scripts.peers import diffusers_pipeline

    assert {text.shape[1] for text in embed_each(pipeline, [text for text, _ in parts])} == lengths

    prompt = " AND ".join(f"{text}:{weight}" for text, weight in parts)
    request = resolve(dataclasses.replace(REQUEST, prompt=prompt, negative_prompt="blurry"))
    ours = pipeline.generate(request).pixels[0]
    peer = diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    assert np.abs(ours - composed_by_diffusers(peer, pipeline, request, parts)).max() < FLOAT_TOLERANCE
    first_alone = pipeline.generate(dataclasses.replace(request, prompt=parts[0][0])).pixels[0]
    assert np.abs(ours - first_alone).mean() > 1


def test_each_sub_prompt_keeps_its_own_prompt_editing(pipeline: Pipeline) -> None:
    """`[a castle:a tower:2] AND a lake`: UNet calls 0–2 read the castle, 3 on the tower, beside the lake
    throughout; the negative prompt's AND is text."""
    request = resolve(dataclasses.replace(REQUEST, prompt="[a castle:a tower:2] AND a lake", negative_prompt="x AND y"))
    (conditioning,) = pipeline.prompts.conditions([request])
    contexts = BatchConditions([conditioning])
    castle, tower, lake, negative = embed_each(pipeline, ["a castle", "a tower", " a lake", "x AND y"])
    for call, first in ((0, castle), (2, castle), (3, tower), (5, tower)):
        prompts, uncond = contexts(call)
        assert torch.equal(prompts, torch.cat([first, lake])) and torch.equal(uncond, negative)


def test_batched_with_others_and_split_by_rows_each_image_is_as_alone(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A composed request beside a plain one in one call, in UNet batches of at most the rows of `max_batch_images`
    plain images (a composed image of 3 sub-prompts is 4 rows, a plain one 2): the images they make alone (to the
    float rounding that another batch size brings on the CPU)."""
    composed = resolve(dataclasses.replace(REQUEST, prompt="a castle AND a forest:0.6 AND a lake:0.3", n_samples=2))
    plain = resolve(dataclasses.replace(REQUEST, seed=5))
    alone = [pipeline.generate(request).pixels for request in (composed, plain)]
    batches: list[int] = []
    rows: list[int] = []
    denoise = pipeline.denoise
    hook = pipeline.model.unet.register_forward_pre_hook(lambda _, inputs: rows.append(inputs[0].shape[0]))

    def counted(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batches.append(x.shape[0])
        return denoise(x, *args, **kwargs)

    monkeypatch.setattr(pipeline, "denoise", counted)
    try:
        for max_batch_images, images_per_batch in ((1, [1, 1, 1]), (2, [1, 1, 1]), (3, [1, 2]), (8, [3])):
            batches.clear()
            rows.clear()
            together = pipeline.generate_many([composed, plain], max_batch_images=max_batch_images)
            assert batches == images_per_batch
            # A composed image's 4 rows run in UNet calls of at most 2 when the bound is one plain image.
            assert max(rows) == min(2 * max_batch_images, 10)
            for generation, expected in zip(together, alone, strict=True):
                assert np.abs(generation.pixels - expected).max() < FLOAT_TOLERANCE
    finally:
        hook.remove()


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("a castle:101", "prompt: sub-prompt weight 101 of 'a castle' is not within ±100"),
        ("a AND (b:1..2)", "prompt: '1..2' in ':1..2)' is not a weight"),
    ],
)
def test_requests_the_pipeline_cannot_run_name_the_prompt(prompt: str, says: str) -> None:
    with pytest.raises(GenerationError, match=says.replace("(", r"\(").replace(")", r"\)")) as info:
        resolve(dataclasses.replace(REQUEST, prompt=prompt))
    assert info.value.field == "prompt"
