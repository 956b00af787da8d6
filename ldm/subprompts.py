"""optimizedSD's weighted sub-prompts: `a castle:0.7 a forest:0.3` conditions on 0.7·E("a castle") + 0.3·E("a forest").

Why: every prompt optimizedSD's command lines and the app built on them ran went through this split, so prompts
written for them blend concepts with it. We split only when asked (`weighted_subprompts`): read as written, CLIP sees
the colons and numbers as text, and a prompt such as `style: watercolor` is not meant as two sub-prompts.

The syntax, as optimizedSD read it, left to right: the text before a colon is a sub-prompt; what follows the colon up
to the next space is its weight (nothing there: 1); text after the last weight is a sub-prompt of weight 1. Weights
are divided by their sum. One sub-prompt or none: the prompt is encoded as written, colon and all, whatever follows
the colon (`http://example.com` too). Torch-free, so the handler can check a prompt before it queues a generation.

Where we differ, on purpose, in prompts of two sub-prompts or more: a weight that is not a number
(`style:watercolor`, a missing space) is an error, where optimizedSD printed a warning, used 1 and dropped the word;
so are weights that are not finite, that sum to 0, or that their sum turns into more than MAX_WEIGHT (which make NaN
or noise images, or crashed optimizedSD).
"""

from __future__ import annotations

import math

# A weight divided by the sum of all: beyond this the conditioning is far outside anything CLIP produces (a sum of
# weights near 0 gets here), and far enough out it overflows fp16 to infinities.
MAX_WEIGHT = 100.0

Parts = tuple[tuple[str, float], ...]


class SubpromptError(ValueError):
    """A prompt whose weighted sub-prompts cannot be used; the message says which weight and why."""


def split(text: str) -> Parts:
    """(sub-prompt, weight ÷ sum of weights) pairs, or ((text, 1.0),) when there are fewer than two sub-prompts."""
    written: list[tuple[str, str]] = []  # (sub-prompt, its weight as written)
    rest = text
    while rest:
        prompt, colon, rest = rest.partition(":")
        if not colon:
            written.append((prompt, ""))
            break
        word, _, rest = rest.partition(" ")
        written.append((prompt, word))
    if len(written) < 2:
        return ((text, 1.0),)
    parts = [(prompt, _weight(word, prompt)) for prompt, word in written]
    total = sum(weight for _, weight in parts)  # as optimizedSD summed them, to the last bit
    if total == 0:
        raise SubpromptError("the sub-prompts' weights add up to 0, and each weight is divided by their sum")
    if not math.isfinite(total):
        raise SubpromptError("the sub-prompts' weights add up to more than a number can hold")
    normalized = tuple((prompt, weight / total) for prompt, weight in parts)
    for prompt, weight in normalized:
        if abs(weight) > MAX_WEIGHT:
            raise SubpromptError(
                f"the weight of {prompt!r} divided by the sum of all weights is {weight:.4g}; it must stay within "
                f"±{MAX_WEIGHT:g} (do the weights nearly cancel out?)"
            )
    return normalized


def _weight(word: str, prompt: str) -> float:
    """The weight written after a sub-prompt's colon; none written is 1."""
    if not word:
        return 1.0
    try:
        weight = float(word)
    except ValueError:
        raise SubpromptError(
            f"{word!r} after {prompt + ':'!r} is not a weight: write a number and a space (not a line break) after "
            "the colon, as in 'a castle:0.7 a forest:0.3', or send the prompt with weighted_subprompts off to give "
            "CLIP its colons as written"
        ) from None
    if not math.isfinite(weight):
        raise SubpromptError(f"the weight of {prompt!r} must be a finite number, got {word!r}")
    return weight
