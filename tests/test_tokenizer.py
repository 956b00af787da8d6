"""The tokenizer gives exactly the ids the SD v1 text encoder saw (shared/reference/tokenizer_cases.json)."""

from __future__ import annotations

import json

import pytest

from ldm.embeddings import Vocabulary
from ldm.tokenizer import CONTEXT_LENGTH, CLIPTokenizer
from tests.reference import REFERENCE

TOKENIZER_CASES = json.loads((REFERENCE / "tokenizer_cases.json").read_text())["cases"]
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.mark.parametrize("entry", TOKENIZER_CASES, ids=lambda e: str(e["index"]))
def test_reference_ids(tokenizer: CLIPTokenizer, entry: dict) -> None:
    assert tokenizer(entry["prompt"]) == entry["ids"]


def test_cases_cover_what_the_fast_tokenizer_gets_wrong() -> None:
    # The reference set must keep exercising ftfy: otherwise a fast tokenizer could pass this suite.
    assert sum("transformers5_fast_ids" in e for e in TOKENIZER_CASES) >= 5
    assert sum(e["truncated"] for e in TOKENIZER_CASES) >= 2


def test_empty_prompt_is_bos_then_eos_padding(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer("") == [BOS] + [EOS] * (CONTEXT_LENGTH - 1)


def test_long_prompt_keeps_first_75_tokens_and_ends_with_eos(tokenizer: CLIPTokenizer) -> None:
    words = tokenizer.tokenize("cat " * 100)
    ids = tokenizer("cat " * 100)
    assert len(ids) == CONTEXT_LENGTH
    assert ids == [BOS, *words[:75], EOS]


@pytest.mark.parametrize("entry", TOKENIZER_CASES, ids=lambda e: str(e["index"]))
def test_decoded_ids_tokenize_back_to_the_same_ids(tokenizer: CLIPTokenizer, entry: dict) -> None:
    ids = tokenizer.tokenize(entry["prompt"])
    assert tokenizer.tokenize(tokenizer.decode(ids)) == ids


@pytest.mark.parametrize("entry", TOKENIZER_CASES, ids=lambda e: str(e["index"]))
def test_unread_counts_what_the_reference_cut_off(tokenizer: CLIPTokenizer, entry: dict) -> None:
    """n_tokens_untruncated counts BOS and EOS: past 77 of them, the rest is what CLIP never saw."""
    count, text = Vocabulary().unread(tokenizer, entry["prompt"])
    assert count == max(0, entry["n_tokens_untruncated"] - CONTEXT_LENGTH)
    assert (text != "") == entry["truncated"]


def test_unread_text_is_the_words_past_the_75th_token(tokenizer: CLIPTokenizer) -> None:
    prompt = "cat " * 73 + "in the style of a watercolor, by a Painter"
    assert Vocabulary().unread(tokenizer, prompt) == (8, "style of a watercolor , by a painter")  # 73 cats, "in", "the"
    assert Vocabulary().unread(tokenizer, "cat " * 75) == (0, "")
    # 龘 is three byte tokens: cut after its first, the rest of it is not shown as text.
    assert Vocabulary().unread(tokenizer, "cat " * 74 + "龘 dog") == (3, "dog")


def test_special_token_text_becomes_the_special_token(tokenizer: CLIPTokenizer) -> None:
    cat = tokenizer.tokenize("cat")
    assert tokenizer.tokenize("cat<|endoftext|>cat") == [*cat, EOS, *cat]
    assert tokenizer.tokenize("<|startoftext|>") == [BOS]


def test_html_entities_unescaped_unless_text_has_angle_brackets(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.tokenize("salt &amp; pepper") == tokenizer.tokenize("salt & pepper")
    assert tokenizer.tokenize("a <b> &amp;") != tokenizer.tokenize("a <b> &")


def test_long_words_are_tokenized_but_not_remembered() -> None:
    """A 2,000-letter word without merges (Old Italic) is thousands of strings: remembering it per request would
    grow a worker without bound; short words are remembered."""
    tokenizer = CLIPTokenizer()
    word = "".join(chr(0x10300 + i % 30) for i in range(2000))
    ids = tokenizer.tokenize(f"cat {word}")
    assert len(ids) == 1 + 2000 * 4  # cat, then the letters' four UTF-8 byte tokens each
    assert tokenizer.tokenize(word) == ids[1:]
    assert tokenizer._cached_bpe.cache_info().currsize == 1  # "cat</w>" alone
