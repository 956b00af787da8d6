"""A1111's composable diffusion: `a castle AND a forest:0.6` guides each step toward both sub-prompts at once.

Why: one prompt of several subjects tends to blend them or drop one; guiding toward each text apart and summing the
pulls keeps both (Liu et al., "Compositional Visual Generation with Composable Diffusion Models", 2022). A1111 reads
every prompt this way, in its syntax (`emphasis` here), so prompts shared for A1111 that use `AND` paint their
image only if it is read as A1111 reads it:
- the prompt splits at each `AND` (the word alone, in capitals, anywhere: inside brackets too);
- a sub-prompt ending in `:` and a number (`a forest:0.6`, `a forest : -1`, a number without exponent) has that
  weight, else 1; the number and its colon are not text. A prompt without `AND` has one sub-prompt, and a weight
  there counts too: `a castle:2` is guided twice as hard as `a castle`;
- each sub-prompt is its own text, with its own prompt editing, encoded alone; the negative prompt is never split;
- each step, ε = ε_u + Σ_j w_j·s·(ε_j − ε_u), added up in the sub-prompts' order (ldm/conditioning.py).
One sub-prompt of weight 1 is exactly the plain guidance ε_u + s·(ε_c − ε_u). Torch-free, so the handler can check a
prompt before it queues it.
"""

from __future__ import annotations

import math
import re

# Beyond this a sub-prompt's pull is far outside any guidance that paints an image, and overflows fp16.
MAX_WEIGHT = 100.0
# How much of a sub-prompt, or of its weight, an error message quotes.
SHOWN = 40
_AND = re.compile(r"\bAND\b")
# A1111's: the shortest text, then optionally `:` and a number, then trailing whitespace (`.` and `\s` together match
# line breaks too).
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

Parts = tuple[tuple[str, float], ...]


class ComposableError(ValueError):
    """A sub-prompt weight that cannot be used; the message says which."""


def split(prompt: str) -> Parts:
    """(sub-prompt, weight) pairs of a prompt in A1111's syntax, in order; one pair without `AND`."""
    parts = []
    for written in _AND.split(prompt):
        match = _WEIGHT.match(written)
        assert match is not None, "every part of the pattern is optional"
        text, number = match.groups()
        weight = 1.0 if number is None else float(number)
        if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
            raise ComposableError(
                f"sub-prompt weight {number[:SHOWN]} of '{text.strip()[:SHOWN]}' is not within ±{MAX_WEIGHT:g}"
            )
        parts.append((text, weight))
    return tuple(parts)
