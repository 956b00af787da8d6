"""optimizedSD's weighted sub-prompts: the split, its errors, and the conditioning the UNet gets from them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest
import torch

from ldm.conditioning import BatchConditions
from ldm.generation_request import GenerationError, GenerationRequest
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from ldm.subprompts import SubpromptError, split
from tests.reference import FLOAT_TOLERANCE

# Each worked by hand from optimizedSD's rule: text up to a colon, then its weight up to the next space.
SPLITS = [
    ("a castle:0.7 a forest:0.3", (("a castle", 0.7), ("a forest", 0.3))),
    ("a castle:3 a forest", (("a castle", 0.75), ("a forest", 0.25))),  # the rest weighs 1
    ("portrait: a woman", (("portrait", 0.5), ("a woman", 0.5))),  # a colon and a space: weight 1
    ("a:2 b:-1", (("a", 2.0), ("b", -1.0))),  # negative weights subtract
    ("a:100 b:-99", (("a", 100.0), ("b", -99.0))),  # 100 times the sum is the most a weight may be
    ("a:1  b", (("a", 0.5), (" b", 0.5))),  # one space ends the weight; the next is the sub-prompt's
    (":1 b:3", (("", 0.25), ("b", 0.75))),  # an empty sub-prompt is the empty prompt's embedding
    ("x:1e-1 y:0.1", (("x", 0.5), ("y", 0.5))),  # Python's float() reads the weight
    ("a: 1 b", (("a", 0.5), ("1 b", 0.5))),  # a space right after the colon: no weight, and the 1 is text
    (": :", (("", 0.5), ("", 0.5))),
    # Fewer than two sub-prompts: the prompt as written, colon and all.
    ("a castle:0.7", (("a castle:0.7", 1.0),)),
    ("a castle:", (("a castle:", 1.0),)),
    ("see http://example.com", (("see http://example.com", 1.0),)),  # what follows the only colon is never read
    ("a castle:inf", (("a castle:inf", 1.0),)),
    ("a castle", (("a castle", 1.0),)),
    ("", (("", 1.0),)),
]


@pytest.mark.parametrize(("text", "parts"), SPLITS)
def test_split_as_optimizedsd_read_prompts(text: str, parts: tuple[tuple[str, float], ...]) -> None:
    got = split(text)
    assert [prompt for prompt, _ in got] == [prompt for prompt, _ in parts]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in parts], rel=1e-15)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("style:watercolor x:1", "'watercolor' after 'style:' is not a weight: write a number and a space (not a"),
        ("a castle:0.7\na forest:0.3", "'0.7\\na' after 'a castle:' is not a weight"),
        ("a::b c:1", "':b' after 'a:' is not a weight"),
        ("a:nan b", "the weight of 'a' must be a finite number, got 'nan'"),
        ("a:1e400 b", "the weight of 'a' must be a finite number, got '1e400'"),
        ("a:1 b:-1", "the sub-prompts' weights add up to 0"),
        ("a:1e308 b:1e308", "the sub-prompts' weights add up to more than a number can hold"),
        ("a:1 b:-0.999", "the weight of 'a' divided by the sum of all weights is 1000; it must stay within ±100"),
    ],
)
def test_weights_that_cannot_be_used_are_errors(text: str, says: str) -> None:
    with pytest.raises(SubpromptError, match="^" + re.escape(says)):
        split(text)


def _capture_conditioning(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, ...]]:
    """Record the (cond, uncond) of every denoise call, at its first UNet call (plain prompts keep them throughout)."""
    seen: list[tuple[torch.Tensor, ...]] = []
    denoise = pipeline.denoise

    def spy(x: torch.Tensor, contexts: BatchConditions, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(tuple(context.clone() for context in contexts(0)))
        return denoise(x, contexts, *args, **kwargs)

    monkeypatch.setattr(pipeline, "denoise", spy)
    return seen


@torch.inference_mode()
def _embedding(pipeline: Pipeline, text: str) -> torch.Tensor:
    """CLIP's embedding of one text, encoded alone, in float64."""
    return pipeline.model.text_encoder([text]).double()


SMALL = GenerationRequest("a lighthouse", height=64, width=64, steps=3, seed=23)


def test_conditioning_is_the_weighted_sum_of_each_sub_prompts_embedding(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture_conditioning(pipeline, monkeypatch)
    request = dataclasses.replace(
        SMALL, prompt="a castle:0.7 a forest:0.3", negative_prompt="fog:2 rain", n_samples=2, weighted_subprompts=True
    )
    pipeline.generate(request)
    ((cond, uncond),) = seen
    expected_cond = 0.7 * _embedding(pipeline, "a castle") + 0.3 * _embedding(pipeline, "a forest")
    expected_uncond = (2 * _embedding(pipeline, "fog") + _embedding(pipeline, "rain")) / 3
    for got, expected in ((cond, expected_cond), (uncond, expected_uncond)):
        assert got.shape == (2, *expected.shape[1:])
        assert torch.allclose(got.double(), expected.expand_as(got), atol=1e-5, rtol=0)
    # The sum is not either part alone, nor the whole text read as written.
    for text in ("a castle", "a forest", "a castle:0.7 a forest:0.3"):
        assert (cond[0].double() - _embedding(pipeline, text)[0]).abs().max() > 1e-2


def test_off_by_default_the_prompt_goes_to_clip_as_written(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_conditioning(pipeline, monkeypatch)
    pipeline.generate(dataclasses.replace(SMALL, prompt="a castle:0.7 a forest:0.3"))
    ((cond, _),) = seen
    assert torch.allclose(cond.double(), _embedding(pipeline, "a castle:0.7 a forest:0.3"), atol=1e-5, rtol=0)


def test_a_prompt_of_one_sub_prompt_makes_the_same_image_either_way(pipeline: Pipeline) -> None:
    for prompt in ("a castle:0.7", "see http://example.com"):
        plain = pipeline.generate(dataclasses.replace(SMALL, prompt=prompt))
        weighted = pipeline.generate(dataclasses.replace(SMALL, prompt=prompt, weighted_subprompts=True))
        assert np.array_equal(plain.pixels, weighted.pixels)


def test_weighted_and_plain_requests_generated_together_equal_each_alone(pipeline: Pipeline) -> None:
    requests = [
        dataclasses.replace(SMALL, prompt="a castle:0.7 a forest:0.3", weighted_subprompts=True),
        dataclasses.replace(SMALL, prompt="a castle:0.7 a forest:0.3", seed=24),
        dataclasses.replace(
            SMALL, prompt="a forest:2 a castle:-1", negative_prompt="fog: rain", seed=25, weighted_subprompts=True
        ),
    ]
    together = pipeline.generate_many(requests, max_batch_images=3)
    for request, result in zip(requests, together, strict=True):
        assert np.abs(result.pixels - pipeline.generate(request).pixels).max() < FLOAT_TOLERANCE
    # The same prompt and seed weighted and not: other conditioning, another image.
    assert np.abs(together[0].pixels - pipeline.generate(dataclasses.replace(requests[1], seed=23)).pixels).max() > 1


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_resolve_names_the_field_whose_weights_are_wrong(field: str) -> None:
    request = dataclasses.replace(SMALL, weighted_subprompts=True, **{field: "a:1 b:-1"})
    with pytest.raises(GenerationError, match=f"^{field}: the sub-prompts' weights add up to 0") as error:
        resolve(request)
    assert error.value.field == field
    resolve(dataclasses.replace(request, weighted_subprompts=False))  # as written, the same text is fine


def test_png_parameters_say_the_prompt_was_split() -> None:
    request = resolve(dataclasses.replace(SMALL, prompt="a:1 b:2", weighted_subprompts=True))
    assert parameters_text(request, 23).splitlines() == [
        "a:1 b:2",
        "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 23, Size: 64x64, RNG: CPU, Weighted subprompts: True, "
        "Emphasis: None",
    ]
    assert "Weighted" not in parameters_text(dataclasses.replace(request, weighted_subprompts=False), 23)
