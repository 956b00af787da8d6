"""AUTOMATIC1111's prompt syntax (its "Original" emphasis): `(word)`, `(word:1.3)`, `[word]`, `BREAK`, and prompts
longer than the 75 tokens CLIP reads, encoded in chunks of 75.

Why: prompts written for A1111, the web UI most SD v1 prompts are shared from, carry this syntax; read as plain text
CLIP sees the brackets and numbers as words and drops everything past 75 tokens. A1111 reads it so:
- `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies it by w;
  brackets nest (their factors multiply), one left open applies to the end, a stray closing one is text, and `\\(`,
  `\\)`, `\\[`, `\\]`, `\\\\` are the characters themselves. `BREAK` (in capitals, as a word) starts a new chunk.
- The tokens are cut into chunks of 75, each framed by BOS and EOS and padded with EOS to 77; a chunk that would cut
  a phrase moves the words after its last comma (if within the last 20 tokens) to the next chunk.
- Each chunk is encoded by CLIP alone; each token's output is multiplied by its weight, and the chunk rescaled so
  its mean is what it was before (`ldm.text_encoder.weigh`). The chunks' outputs are concatenated: the UNet attends
  over 77·k tokens.

A1111 takes that mean over the batch of texts it encodes at once: a prompt's prompt-editing schedule, its texts' chunks
at each position rescaled together, the shorter texts padded with the empty prompt's chunk (ldm/text_encoder.py's
`weigh_batch`, `PromptEncoder.embed_batches`); so it is here, and never across prompts, so that an image does not depend
on what else is in its batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ldm.tokenizer import READ_TOKENS, CLIPTokenizer

if TYPE_CHECKING:  # ldm.embeddings reads files through ldm.checkpoint, which imports the networks, which import this
    import torch

    from ldm.embeddings import Vocabulary

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
# How far back from a full chunk's end a comma may be for the words after it to move to the next chunk (A1111's
# default `comma_padding_backtrack`).
COMMA_BACKTRACK = 20
# The largest weight a token may end up with, nested brackets multiplied out: past it float32 embeddings overflow
# (eleven hundred '(' would be 1.1^1100) long before an image means anything (A1111 stops on the NaNs).
MAX_WEIGHT = 100.0
BREAK = "BREAK"
# What `parse` gives for a BREAK (as A1111's: text "BREAK" at weight -1, which `(BREAK:-1)` would give too).
_BREAK_MARK = (BREAK, -1.0)
_PIECE = re.compile(
    r"""
      \\[()\[\]\\]              # an escaped bracket or backslash: that character
    | \\                        # a lone backslash
    | \( | \[                   # opening brackets
    | :\s*([+-]?[.\d]+)\s*\)    # ':1.3)': closes a round bracket with that weight
    | \) | \]                   # closing brackets
    | [^\\()\[\]:]+             # text
    | :                         # a colon that closes nothing: text
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


class EmphasisError(ValueError):
    """A prompt the syntax cannot read: a weight that is not a number, or past ±MAX_WEIGHT."""


def parse(text: str) -> list[tuple[str, float]]:
    """`text` as runs of (text, weight), runs of equal weight merged; a BREAK is the run ("BREAK", -1)."""
    runs: list[list[str | float]] = []  # [text, weight], weights multiplied in place as brackets close
    round_opened: list[int] = []
    square_opened: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] = float(run[1]) * factor

    for match in _PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_opened.append(len(runs))
        elif piece == "[":
            square_opened.append(len(runs))
        elif weight is not None and round_opened:
            try:
                factor = float(weight)
            except ValueError:
                raise EmphasisError(f"'{weight}' in '{piece}' is not a weight: write a number such as 1.3") from None
            scale(round_opened.pop(), factor)
        elif piece == ")" and round_opened:
            scale(round_opened.pop(), ROUND_FACTOR)
        elif piece == "]" and square_opened:
            scale(square_opened.pop(), SQUARE_FACTOR)
        else:
            for index, part in enumerate(_BREAK_SPLIT.split(piece)):
                if index:
                    runs.append(list(_BREAK_MARK))
                runs.append([part, 1.0])
    for start in round_opened:
        scale(start, ROUND_FACTOR)
    for start in square_opened:
        scale(start, SQUARE_FACTOR)
    merged: list[tuple[str, float]] = []
    for text_run, weight_run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == weight_run:
            merged[-1] = (merged[-1][0] + str(text_run), merged[-1][1])
        else:
            merged.append((str(text_run), float(weight_run)))
    for text_run, weight_run in merged:
        if not (math.isfinite(weight_run) and abs(weight_run) <= MAX_WEIGHT):
            raise EmphasisError(
                f"'{text_run.strip()[:40]}' weighs {weight_run:g} once its brackets are multiplied out: at most "
                f"{MAX_WEIGHT:g}"
            )
    return merged


@dataclass(frozen=True)
class Chunk:
    """What CLIP reads at once: 77 positions (BOS, up to 75 tokens, EOS padding), each a token id or a vector of a
    textual-inversion embedding, and each one's weight."""

    ids: tuple[int | torch.Tensor, ...]
    weights: tuple[float, ...]


def is_break(run: str, weight: float) -> bool:
    """Whether a run of `parse` is a BREAK, not text (text may have a negative weight: `(easyneg:-1)`)."""
    return (run, weight) == _BREAK_MARK


def chunks(tokenizer: CLIPTokenizer, text: str, vocabulary: Vocabulary | None = None) -> list[Chunk]:
    """`text` parsed, tokenized run by run (with the embeddings of `vocabulary` it names: ldm/embeddings.py) and cut
    into chunks of 75 positions (at least one). An embedding's vectors stay in one chunk, as in A1111: one that does
    not fit in what is left of a chunk starts the next."""
    comma = tokenizer.encoder[",</w>"]
    done: list[Chunk] = []
    ids: list[int | torch.Tensor] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        pad = READ_TOKENS - len(ids)
        framed = [tokenizer.bos_id, *ids, *[tokenizer.eos_id] * pad, tokenizer.eos_id]
        done.append(Chunk(tuple(framed), (1.0, *weights, *[1.0] * pad, 1.0)))
        ids, weights, last_comma = [], [], -1

    for run, weight in parse(text):
        if is_break(run, weight):
            close()
            continue
        tokens = tokenizer.tokenize(run)
        for slot in tokens if vocabulary is None else vocabulary.expand(tokens):
            if isinstance(slot, int) and slot == comma:
                last_comma = len(ids)
            elif len(ids) == READ_TOKENS and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                moved = ids[last_comma + 1 :], weights[last_comma + 1 :]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close()
                ids, weights = moved
            if len(ids) == READ_TOKENS:
                close()
            if isinstance(slot, int):
                ids.append(slot)
                weights.append(weight)
                continue
            if len(ids) + slot.vectors.shape[0] > READ_TOKENS:
                close()
            ids.extend(slot.vectors)
            weights.extend([weight] * slot.vectors.shape[0])
    if ids or not done:
        close()
    return done
