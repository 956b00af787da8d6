"""What the UNet attends to at each call of a run, for texts that change as sampling goes (ldm/prompt_editing.py).

Why apart from the pipeline: a UNet batch mixes images whose prompts change at different steps; this is where each
row's text is looked up per call and the batch's tensors are remade, only when some row's text changed (once per
run for prompts that never change, as before prompt editing existed).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from ldm.prompt_editing import text_at

# A text's conditioning over a run: ldm/prompt_editing.py's (end, text) schedule, each text encoded (1, L, d).
TextConditioning = tuple[tuple[int, torch.Tensor], ...]
# An image's (prompt, negative prompt) conditioning.
ImageConditioning = tuple[TextConditioning, TextConditioning]


def lengths(image: ImageConditioning, calls: int) -> tuple[tuple[tuple[int, int], int], ...]:
    """The (prompt, negative prompt) context lengths at UNet calls 0 … calls − 1, as runs (lengths, how many calls).
    Images share UNet calls only with images whose lengths agree at every call (A1111's chunks)."""
    per_call = (tuple(text[text_at(text, call)][1].shape[1] for text in image) for call in range(calls))
    return tuple((pair, len(list(run))) for pair, run in itertools.groupby(per_call))


class BatchConditions:
    """A UNet batch's (prompt, negative prompt) contexts at UNet call c, counted from 0 over the run: each row's
    text in force at c, concatenated in row order."""

    def __init__(self, rows: Sequence[ImageConditioning]) -> None:
        self.rows = rows
        self._chosen: tuple[tuple[int, ...], ...] | None = None
        self._contexts: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = tuple(tuple(text_at(text, call) for text in row) for row in self.rows)
        if chosen != self._chosen:
            prompt, negative = (
                torch.cat([row[side][index[side]][1] for row, index in zip(self.rows, chosen, strict=True)])
                for side in (0, 1)
            )
            self._chosen, self._contexts = chosen, (prompt, negative)
        assert self._contexts is not None  # made on the first call: no chosen texts equal None
        return self._contexts
