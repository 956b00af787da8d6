"""AUTOMATIC1111's prompt syntax (ldm/emphasis.py): its parser against the examples A1111 documents, the chunks of
75 tokens, the weighting against a float64 re-derivation, and the pipeline's use of prompts of several chunks."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from ldm import prompt_editing
from ldm.emphasis import EmphasisError, chunks, parse
from ldm.generation_request import GenerationError, GenerationRequest
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from ldm.text_encoder import weigh_batch
from ldm.tokenizer import CLIPTokenizer
from tests.reference import FLOAT_TOLERANCE, embed_each

TOKENIZER = CLIPTokenizer()
SMALL = GenerationRequest("a red door, stone wall", height=64, width=64, steps=4, seed=3, emphasis=True)


@pytest.mark.parametrize(
    ("text", "runs"),
    [
        # The examples of A1111's `parse_prompt_attention` docstring, with the weights it gives.
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
          (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
        # A1111's reading of more: a stray closing bracket and a weight without its bracket are text; a BREAK (ours:
        # a run of weight -1, where A1111 marks it so too).
        ("a) b:2) c]", [("a) b:2) c]", 1.0)]),
        ("[faded] (x:0.5)", [("faded", 1 / 1.1), (" ", 1.0), ("x", 0.5)]),
        ("sky BREAK sea", [("sky", 1.0), ("BREAK", -1.0), ("sea", 1.0)]),
        ("", [("", 1.0)]),
        # A square bracket left open divides to the end; BREAK only as a word; an escaped backslash is one, and a
        # lone backslash nothing (A1111 keeps what follows it).
        ("a [faded", [("a ", 1.0), ("faded", 1 / 1.1)]),
        ("BREAKfast, aBREAK", [("BREAKfast, aBREAK", 1.0)]),
        ("a \\\\ b \\ c", [("a \\ b  c", 1.0)]),
    ],
)  # fmt: skip
def test_parse_reads_weights_as_a1111_documents(text: str, runs: list[tuple[str, float]]) -> None:
    assert parse(text) == runs


def test_a_weight_that_is_not_a_number_or_too_large_is_named() -> None:
    with pytest.raises(EmphasisError, match=re.escape("'1.2.3' in ':1.2.3)' is not a weight")):
        parse("(red:1.2.3)")
    # 1.1^60 ≈ 304, and 1.1^1000 would overflow float32: A1111 paints NaNs.
    with pytest.raises(
        EmphasisError, match=r"'red' weighs 304\.4\d* once its brackets are multiplied out: at most 100"
    ):
        parse("(" * 60 + "red")
    with pytest.raises(EmphasisError, match="weighs 1000 once"):
        parse("(red:1000)")
    assert parse("(red:-100)") == [("red", -100.0)]


def _words(chunk_ids: tuple[int, ...]) -> list[int]:
    return [i for i in chunk_ids if i not in (TOKENIZER.bos_id, TOKENIZER.eos_id)]


def test_a_short_prompt_is_one_chunk_as_clip_reads_it_plain() -> None:
    [chunk] = chunks(TOKENIZER, "a red door, stone wall")
    assert chunk.ids == tuple(TOKENIZER("a red door, stone wall")) and chunk.weights == (1.0,) * 77


def test_weights_follow_their_tokens() -> None:
    [chunk] = chunks(TOKENIZER, "a (red:1.5) [door]")
    red, door = TOKENIZER.encoder["red</w>"], TOKENIZER.encoder["door</w>"]
    assert chunk.ids[:5] == (TOKENIZER.bos_id, TOKENIZER.encoder["a</w>"], red, door, TOKENIZER.eos_id)
    assert chunk.weights[:5] == (1.0, 1.0, 1.5, 1 / 1.1, 1.0)


def test_long_prompts_are_cut_into_chunks_of_75_moving_words_after_a_near_comma() -> None:
    cat, comma = TOKENIZER.encoder["cat</w>"], TOKENIZER.encoder[",</w>"]
    # 70 words, a comma, 9 words: at the 76th token the comma is 5 back, so the 4 words after it move on.
    first, second = chunks(TOKENIZER, "cat " * 70 + ", " + "cat " * 9)
    assert len(first.ids) == len(second.ids) == 77
    assert _words(first.ids) == [cat] * 70 + [comma] and _words(second.ids) == [cat] * 9
    assert first.ids[0] == TOKENIZER.bos_id and set(first.ids[72:]) == {TOKENIZER.eos_id}
    # A comma more than 20 back is too far: a hard cut at 75.
    first, second = chunks(TOKENIZER, "cat " * 50 + ", " + "cat " * 40)
    assert _words(first.ids) == [cat] * 50 + [comma] + [cat] * 24 and _words(second.ids) == [cat] * 16
    # BREAK starts a chunk wherever it is; at the end it leaves no empty chunk, alone it makes one.
    assert [_words(c.ids) for c in chunks(TOKENIZER, "cat BREAK cat cat")] == [[cat], [cat, cat]]
    assert [_words(c.ids) for c in chunks(TOKENIZER, "cat BREAK")] == [[cat]]
    assert [_words(c.ids) for c in chunks(TOKENIZER, "BREAK")] == [[]]
    # 20 back is near enough, 21 back is not.
    first, second = chunks(TOKENIZER, "cat " * 55 + ", " + "cat " * 20)
    assert _words(first.ids) == [cat] * 55 + [comma] and _words(second.ids) == [cat] * 20
    first, second = chunks(TOKENIZER, "cat " * 54 + ", " + "cat " * 21)
    assert _words(first.ids) == [cat] * 54 + [comma] + [cat] * 20 and _words(second.ids) == [cat]
    # A chunk that took words from the one before starts with no comma of its own: full, it is cut at 75.
    cut = chunks(TOKENIZER, "cat " * 70 + ", " + "cat " * 84)
    assert [_words(c.ids) for c in cut] == [[cat] * 70 + [comma], [cat] * 75, [cat] * 9]
    # A comma as the 76th token closes the chunk before it and opens the next.
    first, second = chunks(TOKENIZER, "cat " * 75 + ", cat")
    assert _words(first.ids) == [cat] * 75 and _words(second.ids) == [comma, cat]


def test_weighing_rescales_to_the_mean_the_batch_had() -> None:
    """Against the same arithmetic in float64 over the batch stacked, a chunk twice as often as it counts; weights
    of 1 leave a chunk alone exactly as it was."""
    hidden = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(2, 77)
    weights[0, 3:6] = torch.tensor([1.5, 0.7, 1.21])
    stacked, stacked_weights = hidden[[0, 1, 1]].double(), weights[[0, 1, 1]].double()
    expected = stacked * stacked_weights[..., None]
    expected = expected * (stacked.mean() / expected.mean())
    weighed = weigh_batch([(hidden[0], weights[0], 1), (hidden[1], weights[1], 2)])
    assert torch.allclose(torch.stack(weighed).double(), expected[:2], atol=1e-5, rtol=0)
    assert torch.equal(weigh_batch([(hidden[1], weights[1], 1)])[0], hidden[1])


def test_each_chunk_of_a_prompt_is_encoded_alone_and_weighted(tiny_model: StableDiffusion, pipeline: Pipeline) -> None:
    """A prompt of two chunks without prompt editing: each CLIP's own call, weighted and rescaled on its own (a batch
    of one text: `a1111_batch` below), end to end."""
    text = "a (red:1.4) door, " * 20
    assert len(chunks(TOKENIZER, text)) == 2
    (together,) = embed_each(pipeline, [text])
    with torch.inference_mode():
        (expected,) = a1111_batch(tiny_model, [text])
    assert together.shape == (1, 154, 32)
    assert torch.allclose(together[0], expected, atol=1e-5, rtol=0)


def a1111_batch(model: StableDiffusion, texts: list[str]) -> list[torch.Tensor]:
    """A1111's encoding of a schedule's texts (`FrozenCLIPEmbedderWithCustomWords.forward`), re-derived: at each
    chunk position, every text's chunk there (or the empty prompt's chunk) through CLIP as one batch, weighted, and
    the whole batch rescaled once to its mean; the positions end to end. Each text (77·k, d)."""
    encoder = model.text_encoder
    pieces = [chunks(TOKENIZER, text) for text in texts]
    empty = chunks(TOKENIZER, "")[0]
    positions = []
    for index in range(max(len(p) for p in pieces)):
        chunk_batch = [p[index] if index < len(p) else empty for p in pieces]
        z = encoder.hidden(encoder.token_ids([c.ids for c in chunk_batch])).float()
        weights = torch.tensor([c.weights for c in chunk_batch])
        weighted = z * weights[..., None]
        positions.append(weighted * (z.mean() / weighted.mean()))
    return [torch.cat([position[i] for position in positions]) for i in range(len(texts))]


DOORS = "a red door, stone wall, " * 12  # two chunks


@pytest.mark.parametrize(
    ("prompt", "steps", "batch"),
    [
        # An edit into a text of two chunks: the first text is padded with the empty prompt's chunk.
        (f"[(cat:1.5):{DOORS}:0.5]", 4, ["(cat:1.5)", DOORS]),
        # An alternation: its texts in step order, repeats counting in the batch's mean.
        ("[(cat:1.5)|dog]", 3, ["(cat:1.5)", "dog", "(cat:1.5)"]),
        # Neighbours alike (the alternation's steps before the edit): one entry of the schedule, two of the batch.
        ("[(cat:1.5):dog:2] [z|z]", 3, ["(cat:1.5) z", "(cat:1.5) z", "dog z"]),
    ],
)
def test_a_prompts_edited_texts_are_encoded_as_a1111_encodes_its_schedule(
    tiny_model: StableDiffusion, pipeline: Pipeline, prompt: str, steps: int, batch: list[str]
) -> None:
    """Against the re-derivation above, over A1111's batch (its schedule unmerged), to float32's summing order
    (A1111 takes one mean over the batch, ours a mean of each text's); each text far from what it would be alone."""
    assert list(prompt_editing.batch(prompt, steps)) == batch
    (schedule,) = pipeline.prompts.conditions([dataclasses.replace(SMALL, prompt=prompt, steps=steps)])[0].prompts
    with torch.inference_mode():
        expected = dict(zip(batch, a1111_batch(tiny_model, batch), strict=True))
        for (_, conditioning), (_, text) in zip(schedule, prompt_editing.schedule(prompt, steps), strict=True):
            assert torch.allclose(conditioning[0], expected[text], atol=1e-4, rtol=0)
        alone = embed_each(pipeline, [batch[0]])[0]
        assert (schedule[0][1][:, :77] - alone).abs().max() > 0.05  # the batch moved its scale


def test_a_prompt_without_the_syntax_conditions_as_written(pipeline: Pipeline) -> None:
    assert torch.equal(embed_each(pipeline, [SMALL.prompt])[0], pipeline.prompts.embed([SMALL.prompt]))
    plain = pipeline.generate(dataclasses.replace(SMALL, emphasis=False)).pixels
    assert np.abs(pipeline.generate(SMALL).pixels - plain).max() < FLOAT_TOLERANCE
    weighted = pipeline.generate(dataclasses.replace(SMALL, prompt="a (red:1.5) door, stone wall")).pixels
    assert np.abs(weighted - plain).mean() > 1


@pytest.mark.parametrize("longer", ["prompt", "negative_prompt"])
def test_a_long_prompt_is_read_whole_in_its_own_unet_calls(
    tiny_model: StableDiffusion, pipeline: Pipeline, longer: str
) -> None:
    """Prompt and negative prompt of different lengths run in two UNet calls (as A1111 runs them); an image is the
    same alone or in a UNet batch with another of the same lengths, and no word is reported unread."""
    long = dataclasses.replace(SMALL, **{longer: "a red door, stone wall, " * 12})
    contexts: list[tuple[int, ...]] = []
    hook = tiny_model.unet.register_forward_pre_hook(lambda _, args: contexts.append(tuple(args[2].shape)))
    try:
        alone = pipeline.generate(long)
        other = dataclasses.replace(long, seed=8, **{longer: "a blue gate, brick wall, " * 12})
        batched = pipeline.generate_many([long, other])
    finally:
        hook.remove()
    assert contexts[: 2 * long.steps : 2] == [(1, 154, 32) if longer == "negative_prompt" else (1, 77, 32)] * 4
    assert contexts[2 * long.steps :: 2] == [(2, 154, 32) if longer == "negative_prompt" else (2, 77, 32)] * 4
    assert len(contexts) == 4 * long.steps and alone.warnings == ()
    assert np.abs(batched[0].pixels - alone.pixels).max() < FLOAT_TOLERANCE
    assert np.abs(batched[1].pixels - pipeline.generate(other).pixels).max() < FLOAT_TOLERANCE
    cut = pipeline.generate(dataclasses.replace(long, emphasis=False))
    assert cut.warnings and np.abs(cut.pixels - alone.pixels).mean() > 1  # plain CLIP reads 75 tokens of it


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"weighted_subprompts": True}, "emphasis", "emphasis and weighted_subprompts read a prompt's colons"),
        ({"negative_prompt": "(blurry:1..1)"}, "negative_prompt", "negative_prompt: '1..1' in"),
        ({"prompt": "(red:.)"}, "prompt", "prompt: '.' in"),
    ],
)
def test_requests_in_the_syntax_that_cannot_run_name_their_field(change: dict, field: str, message: str) -> None:
    with pytest.raises(GenerationError, match=re.escape(message)) as error:
        resolve(dataclasses.replace(SMALL, **change))
    assert error.value.field == field


def test_pngs_say_emphasis_as_a1111_reads_it() -> None:
    """On, A1111's name for it; off, "None", whatever the texts: A1111 (and the page, front/static/infotext.js),
    told nothing, assumes "Original", which reads brackets, AND, weights and long texts otherwise, and encodes each
    text alone."""
    assert "Emphasis: Original" in parameters_text(resolve(SMALL), 3)
    plain = resolve(dataclasses.replace(SMALL, emphasis=False))
    for text in ("", "a red door", "a (red) door", "a castle AND a lake"):
        assert parameters_text(dataclasses.replace(plain, negative_prompt=text), 3).endswith(", Emphasis: None")
