"""A1111's prompt editing and alternation (ldm/prompt_editing.py): the schedules A1111 documents, and whole images
against diffusers whose text embeddings are swapped between UNet calls as A1111 counts them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from handler.errors import RequestError
from handler.request import check_chunks
from handler.settings import HandlerSettings
from ldm.checkpoint import read_state_dict
from ldm.embeddings import Vocabulary
from ldm.generation_request import GenerationError, GenerationRequest
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.prompt_editing import schedule, text_at
from ldm.request_checks import resolve
from ldm.request_texts import text_schedules
from ldm.tokenizer import CLIPTokenizer
from tests.reference import FLOAT_TOLERANCE, TINY_CONFIG, TINY_SAFETENSORS

RED, BLUE = "a red door, stone wall", "a blue gate, brick wall"
REQUEST = GenerationRequest(
    f"[{RED}:{BLUE}:2]", negative_prompt="blurry", height=64, width=64, steps=6, seed=5, emphasis=True
)


@pytest.mark.parametrize(
    ("text", "entries"),
    [
        # The examples of A1111's `get_learned_conditioning_prompt_schedules` docstring, at 10 steps.
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [b:3 ] [c:d:5\t]", [(3, "a  c"), (5, "a b c"), (10, "a b d")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)]),
        ("[fe|]male", [(step, "female" if step % 2 else "male") for step in range(1, 11)]),
        # Its A1111 entries are female, male, male, male, female, …: ours merge the neighbours that repeat a text.
        ("[fe|||]male", [(1, "female"), (4, "male"), (5, "female"), (8, "male"), (9, "female"), (10, "male")]),
        # `when`: a decimal point makes a fraction (2. is 20 steps); at the steps or past them an edit never
        # switches, at 0 or below it has switched from the start.
        ("[a:b:1e1] [c:d:1.5] [e:f:0] [g:h:-2] [i:j:2.]", [(10, "a c f h i")]),
        ("[a:b:9] [c::0.95]", [(9, "a c"), (10, "b ")]),
        # None of A1111's syntax: a bar outside an alternation, a backslash at the end, three colons, bad numbers.
        ("a | b [c:d:3]", [(10, "a | b [c:d:3]")]),
        ("[a:b:3] \\", [(10, "[a:b:3] \\")]),
        ("[a:b:c:3] [d:e:f] [g:1x] [h:--1]", [(10, "[a:b:c:3] [d:e:f] [g:1x] [h:--1]")]),
        # A colon in an alternation, a backslash before a line's end: A1111's parser gives up, spaces and all.
        (" [a|b:c] [d:e:3] ", [(10, " [a|b:c] [d:e:3] ")]),
        ("[a:b:3] \\\nc", [(10, "[a:b:3] \\\nc")]),
        # An escaped bracket stays escaped (ldm/emphasis.py reads it as the character); emphasis inside an edit.
        ("\\[a:b:3\\] [(c:1.2):d:5]", [(5, "\\[a:b:3\\] (c:1.2)"), (10, "\\[a:b:3\\] d")]),
    ],
)  # fmt: skip
def test_schedules_as_a1111_documents(text: str, entries: list[tuple[int, str]]) -> None:
    assert list(schedule(text, 10)) == entries


def test_a1111_landscape_example() -> None:
    """The example at the top of A1111's prompt_parser.py, at 100 steps."""
    text = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert [end for end, _ in schedule(text, 100)] == [25, 50, 60, 75, 100]
    assert schedule(text, 100)[2][1] == "fantasy landscape with a lake and an oak in foreground in background masterful"


def test_unet_call_c_reads_the_first_text_ending_at_or_after_c() -> None:
    """A1111's sampler counts calls from 0 against ends counted from 1: `[a:b:3]` reads `a` on four calls, and an
    alternation's first option on the first two."""
    edit = schedule("[a:b:3]", 10)
    assert [edit[text_at(edit, call)][1] for call in range(10)] == ["a"] * 4 + ["b"] * 6
    alternation = schedule("[fe|||]male", 10)
    calls = [alternation[text_at(alternation, call)][1] for call in range(11)]
    assert calls == ["female", "female", "male", "male", "male", "female", "male", "male", "male", "female", "male"]


def test_two_call_samplers_count_two_steps_a_step_and_plain_prompts_no_syntax() -> None:
    for sampler, steps in (("ddim", 6), ("euler_a", 6), ("heun", 12), ("dpm2_a_karras", 12), ("dpmpp_2s_a", 12)):
        assert text_schedules(dataclasses.replace(REQUEST, sampler=sampler), "prompt")[0] == ((2, RED), (steps, BLUE))
    plain = dataclasses.replace(REQUEST, emphasis=False)
    assert text_schedules(plain, "prompt")[0] == ((6, REQUEST.prompt),)


@pytest.fixture(scope="module")
def peer(tiny_model: StableDiffusion) -> Any:
    from scripts.peers import diffusers_pipeline

    return diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))


def edited_by_diffusers(
    peer: Any,
    request: GenerationRequest,
    prompt_at: Callable[[int], str],
    negative_at: Callable[[int], str],
    **extra: Any,
) -> np.ndarray:
    """diffusers' image of `request`, its UNet call c conditioned on prompt_at(c) and negative_at(c), each encoded
    by diffusers (its tokenizer, not ours): its step callback swaps the embeddings for the next call. `extra`
    goes to the pipeline's call."""
    from scripts.peers import call_arguments

    def embeddings(call: int) -> torch.Tensor:
        prompt, negative = peer.encode_prompt(prompt_at(call), "cpu", 1, True, negative_at(call))
        return torch.cat([negative, prompt])

    def swap(_pipe: Any, index: int, _t: Any, _tensors: dict) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": embeddings(index + 1)}

    arguments = call_arguments(request)
    del arguments["prompt"], arguments["negative_prompt"]
    negative, prompt = embeddings(0).chunk(2)
    theirs = peer(
        **arguments,
        prompt_embeds=prompt,
        negative_prompt_embeds=negative,
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        **extra,
    )
    return theirs.images[0] * 255.0


def test_an_edit_switches_texts_after_its_step_as_in_a1111(pipeline: Pipeline, peer: Any) -> None:
    """`[red:blue:2]` over 6 DDIM steps: calls 0–2 read red, 3–5 blue; the negative prompt's edit drops a word
    after call 3."""
    request = dataclasses.replace(REQUEST, negative_prompt="blurry[, dark::3]")
    ours = pipeline.generate(request).pixels[0]
    theirs = edited_by_diffusers(
        peer, resolve(request), lambda c: RED if c <= 2 else BLUE, lambda c: "blurry, dark" if c <= 3 else "blurry"
    )
    assert np.abs(ours - theirs).max() < FLOAT_TOLERANCE
    for text in (RED, BLUE):  # neither text alone
        alone = pipeline.generate(dataclasses.replace(request, prompt=text)).pixels[0]
        assert np.abs(ours - alone).mean() > 1


def test_img2img_counts_the_steps_it_runs_from_0_against_a_schedule_of_all(pipeline: Pipeline, peer: Any) -> None:
    """Strength 0.75 of 8 steps runs the last 6; `[red:blue:2]` is scheduled over all 8, and the run reads red on
    its calls 0 to 2, as A1111's img2img (and diffusers' step counter) count them. diffusers is handed our z₀
    (tests/test_pipeline.py says why)."""
    import diffusers

    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    edited = dataclasses.replace(REQUEST, init_image=init, strength=0.75, steps=8)
    request = resolve(edited)
    ours = pipeline.generate(request).pixels[0]
    image2image = diffusers.StableDiffusionImg2ImgPipeline(**peer.components)
    image2image.set_progress_bar_config(disable=True)

    def theirs(prompt_at: Callable[[int], str]) -> np.ndarray:
        image = pipeline.init_latent(pipeline.init_picture(request))
        return edited_by_diffusers(image2image, request, prompt_at, lambda _: "blurry", image=image, strength=0.75)

    assert np.abs(ours - theirs(lambda c: RED if c <= 2 else BLUE)).max() < FLOAT_TOLERANCE
    # Counted from the first of all 8 steps (the run's calls as steps 2 to 7), red would end after call 0.
    skipped = request.steps - request.img2img_steps()
    assert np.abs(ours - theirs(lambda c: RED if c + skipped <= 2 else BLUE)).max() > 1


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
def test_alternation_counts_each_unet_call_of_a_two_call_sampler(pipeline: Pipeline, peer: Any) -> None:
    """DPM2 calls the UNet twice a step (2·4 − 1 = 7 calls); A1111 schedules it over 8 steps, whose ends are
    1 … 8, so call c reads option (max(c, 1) − 1) mod 2: red, red, blue, red, blue, red, blue."""

    from tests.peer_schedulers import peer_scheduler

    request = resolve(dataclasses.replace(REQUEST, prompt=f"[{RED}|{BLUE}]", steps=4, sampler="dpm2"))
    ours = pipeline.generate(request).pixels[0]

    def dpm2(prompt_at: Callable[[int], str]) -> np.ndarray:
        ddim = peer.scheduler
        peer.scheduler = peer_scheduler("dpm2", ddim.config)
        try:
            peer.scheduler.set_timesteps(request.steps)
            noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(request.seed))
            # As tests/test_pipeline.py starts diffusers' k-diffusion ports: from noise·σ_max.
            latents = noise * float(peer.scheduler.sigmas[0]) / peer.scheduler.init_noise_sigma
            return edited_by_diffusers(peer, request, prompt_at, lambda _: "blurry", latents=latents)
        finally:
            peer.scheduler = ddim

    options = (RED, BLUE)
    assert np.abs(ours - dpm2(lambda c: options[(max(c, 1) - 1) % 2])).max() < FLOAT_TOLERANCE
    # Counted per step instead (red, red, blue, blue, red, red, blue), some pixels move by levels (8.8 at most).
    assert np.abs(ours - dpm2(lambda c: options[c // 2 % 2])).max() > 1


def test_images_with_other_edits_and_lengths_share_a_batch_as_if_alone(
    tiny_model: StableDiffusion, pipeline: Pipeline
) -> None:
    """Each row of a UNet batch reads its own text at each call; an edit into a text of two chunks makes the prompt
    two chunks from the start (A1111 encodes a schedule's texts as one batch, padding the shorter with an empty
    chunk), so it runs apart throughout (A1111 runs contexts of other lengths apart), and its image is the same
    alone."""
    long = f"{BLUE}, " * 12
    requests = [
        REQUEST,
        dataclasses.replace(REQUEST, prompt=f"[{BLUE}:{RED}:4]", seed=6),
        dataclasses.replace(REQUEST, prompt=RED, seed=7),
        dataclasses.replace(REQUEST, prompt=f"[{RED}:{long}:0.5]", seed=8),
    ]
    contexts: list[tuple[int, ...]] = []
    hook = tiny_model.unet.register_forward_pre_hook(lambda _, args: contexts.append(tuple(args[2].shape)))
    try:
        together = pipeline.generate_many(requests)
    finally:
        hook.remove()
    # Three requests of 77-token contexts throughout in one batch (guidance in one call of 6 rows), the long one
    # apart: two calls of 154 and 77 tokens at every step.
    assert contexts[:6] == [(6, 77, 32)] * 6
    assert contexts[6:] == [(1, 77, 32), (1, 154, 32)] * 6
    for request, generation in zip(requests, together, strict=True):
        assert np.abs(generation.pixels - pipeline.generate(request).pixels).max() < FLOAT_TOLERANCE


def test_every_text_an_edit_reads_is_checked() -> None:
    with pytest.raises(GenerationError, match=re.escape("prompt: '1..2' in")) as error:
        resolve(dataclasses.replace(REQUEST, prompt="[red:(blue:1..2):3]"))
    assert error.value.field == "prompt"
    wide = "x BREAK " * 8 + "x"  # nine chunks, past the server's eight
    request = resolve(dataclasses.replace(REQUEST, negative_prompt=f"[blurry:{wide}:0.5]"))
    settings = HandlerSettings()
    with pytest.raises(RequestError, match="negative_prompt: at most 8 chunks of 75 tokens with emphasis, got 9"):
        check_chunks(request, CLIPTokenizer(), settings, Vocabulary())
    two_chunks = dataclasses.replace(request, negative_prompt="[blurry:x BREAK x:0.5]")
    check_chunks(two_chunks, CLIPTokenizer(), settings, Vocabulary())


def test_a_prompt_reading_too_many_texts_is_refused_before_any_is_encoded() -> None:
    """Alternations of 2, 3, 5 and 7 options read 210 texts over 300 Heun steps; one of 2 reads 2 however long."""
    alternations = "[a|b] [c|d|e] [f|g|h|i|j] [k|l|m|n|o|p|q]"
    with pytest.raises(GenerationError, match="prompt: its prompt editing reads 210 different texts over the run"):
        resolve(dataclasses.replace(REQUEST, prompt=alternations, steps=150, sampler="heun"))
    resolve(dataclasses.replace(REQUEST, prompt="[a|b] castle", steps=150, sampler="heun"))
    # Steps are checked first: a schedule as long as a billion steps is never made.
    with pytest.raises(GenerationError, match="ddim_steps must be in"):
        resolve(dataclasses.replace(REQUEST, prompt="[a|b]", steps=10**9))


def test_when_is_written_in_ascii_digits() -> None:
    assert schedule("[a:b:\uff13] [c:d:\u0662]", 10) == ((10, "[a:b:\uff13] [c:d:\u0662]"),)
