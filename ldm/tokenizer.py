"""CLIP's byte-level BPE tokenizer, exactly as the SD v1 text encoder saw prompts in training.

Why our own: transformers 5.x ships only a "fast" CLIP tokenizer that skips ftfy's text repair and so gives other
ids for ligatures, fullwidth text, curly quotes and HTML entities. This reproduces transformers' original slow
`CLIPTokenizer` with ftfy (see tests/fixtures/GENERATION.md), over the OpenAI vocabulary shipped in `ldm/clip_vocab/`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import ftfy
import regex

VOCAB_DIR = Path(__file__).with_name("clip_vocab")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (BOS, EOS)
CONTEXT_LENGTH = 77
# Tokens of a prompt the text encoder reads: the context less its BOS and EOS; the rest is cut off.
READ_TOKENS = CONTEXT_LENGTH - 2
T = TypeVar("T")

# Pieces BPE runs on: special tokens, English contractions, letter runs, single digits, runs of other symbols.
_PIECE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPECIAL_SPLIT = regex.compile("(" + "|".join(regex.escape(t) for t in SPECIAL_TOKENS) + ")")
_WHITESPACE = regex.compile(r"\s+")
# The bytes that continue a UTF-8 character, never start one.
_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))


def _byte_alphabet() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable characters, so BPE works on text, never raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# The longest piece whose merges are remembered (English words are far shorter).
CACHED_PIECE = 64


class CLIPTokenizer:
    """Prompt → the 77 token ids `[BOS] + tokens[:75] + [EOS]`, padded with EOS."""

    def __init__(self, vocab_dir: Path = VOCAB_DIR) -> None:
        self.encoder: dict[str, int] = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
        merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        self.bpe_ranks = {tuple(line.split()): rank for rank, line in enumerate(merges) if line}
        self.byte_encoder = _byte_alphabet()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        self.decoder = {token_id: token for token, token_id in self.encoder.items()}
        self.bos_id, self.eos_id = self.encoder[BOS], self.encoder[EOS]
        self._cached_bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """`_bpe_uncached`, remembered for pieces of up to `CACHED_PIECE` characters (a prompt's words): the cache
        counts entries, not bytes, and a word of thousands of characters without merges (a rare script's) is a
        tuple of thousands of strings, so long ones remembered would let a client grow a worker by gigabytes."""
        return self._cached_bpe(piece) if len(piece) <= CACHED_PIECE else self._bpe_uncached(piece)

    def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
        """Greedily merge the lowest-ranked adjacent pair until none of the word's pairs is in the merge table."""
        if piece in SPECIAL_TOKENS:
            return (piece,)
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def _clean(self, text: str) -> str:
        """ftfy repair (which also unescapes HTML entities when the text has no '<' or '>'), spaces, lower case."""
        return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()

    def tokenize(self, text: str) -> list[int]:
        """All token ids of `text`, without BOS/EOS framing or truncation."""
        ids: list[int] = []
        # Special-token text in a prompt is that special token; the pieces around it are cleaned on their own.
        for chunk in _SPECIAL_SPLIT.split(text):
            if chunk in SPECIAL_TOKENS:
                ids.append(self.encoder[chunk])
                continue
            for piece in _PIECE.findall(self._clean(chunk)):
                mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder.get(token, self.eos_id) for token in self._bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text: cleaned (lower case, single spaces), with a space wherever a word ended. Ids cut
        from a longer run may start inside a character (a token can hold part of one): that part is left out."""
        text = "".join(self.decoder[i] for i in ids)
        raw = bytes(self.byte_decoder[char] for char in text).lstrip(_UTF8_CONTINUATION)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def frame(self, body: Sequence[T]) -> list[T | int]:
        """The 77 positions the text encoder receives for a text's tokens (or, with embeddings, vectors): BOS, the
        first 75, EOS, EOS padding."""
        return [self.bos_id, *body[:READ_TOKENS], self.eos_id, *[self.eos_id] * (READ_TOKENS - len(body[:READ_TOKENS]))]

    def __call__(self, text: str) -> list[int]:
        """The 77 ids the text encoder receives for `text`."""
        return self.frame(self.tokenize(text))
