"""What the UNet attends to at each call of a run, for texts that change as sampling goes (ldm/prompt_editing.py),
and how an image's guidance combines what it made of them (A1111's `AND`, ldm/composable.py).

Why apart from the pipeline: a UNet batch mixes images whose prompts change at different steps and have different
sub-prompts; this is where each row's texts are looked up per call and the batch's tensors are remade, only when some
row's text changed (once per run for prompts that never change, as before prompt editing existed), and where the rows
of an image's sub-prompts are laid out and summed back into its ε.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ldm.prompt_editing import text_at

# A text's conditioning over a run: ldm/prompt_editing.py's (end, text) schedule, each text encoded (1, L, d).
TextConditioning = tuple[tuple[int, torch.Tensor], ...]


@dataclass(frozen=True, eq=False)
class ImageConditioning:
    """An image's conditioning over a run: its prompt's sub-prompts (A1111's `AND`, ldm/composable.py; one without
    it), each with its weight, and its negative prompt."""

    prompts: tuple[TextConditioning, ...]
    negative: TextConditioning
    weights: tuple[float, ...] = (1.0,)

    @property
    def composed(self) -> bool:
        """Whether its guidance sums sub-prompts' pulls, rather than being ε_u + s·(ε_c − ε_u) of one prompt."""
        return self.weights != (1.0,)

    def chosen(self, call: int) -> tuple[tuple[int, ...], int]:
        """Which text of each sub-prompt's schedule, and of the negative prompt's, UNet call `call` reads."""
        return tuple(text_at(prompt, call) for prompt in self.prompts), text_at(self.negative, call)

    def contexts(self, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sub-prompts (k, L, d), negative prompt (1, L', d)) at UNet call `call`. Sub-prompts of several lengths
        (A1111's chunks of 75 tokens) are made as long as the longest by repeating each one's last vector, as A1111
        pads them."""
        prompts, negative = self.chosen(call)
        texts = [prompt[index][1] for prompt, index in zip(self.prompts, prompts, strict=True)]
        longest = max(text.shape[1] for text in texts)
        padded = [torch.cat([t, t[:, -1:].expand(-1, longest - t.shape[1], -1)], dim=1) for t in texts]
        return torch.cat(padded) if len(padded) > 1 else texts[0], self.negative[negative][1]


def lengths(image: ImageConditioning, calls: int) -> tuple[tuple[tuple[int, int], int], ...]:
    """The (prompt, negative prompt) context lengths at UNet calls 0 … calls − 1, as runs (lengths, how many calls).
    Images share UNet calls only with images whose lengths agree at every call (A1111's chunks)."""

    def at(call: int) -> tuple[int, int]:
        prompts, negative = image.chosen(call)
        longest = max(prompt[index][1].shape[1] for prompt, index in zip(image.prompts, prompts, strict=True))
        return longest, image.negative[negative][1].shape[1]

    return tuple((pair, len(list(run))) for pair, run in itertools.groupby(at(call) for call in range(calls)))


class BatchConditions:
    """A UNet batch's (prompt, negative prompt) contexts at UNet call c, counted from 0 over the run: each row's
    texts in force at c, concatenated in row order (a composed row's sub-prompts one after another)."""

    def __init__(self, rows: Sequence[ImageConditioning]) -> None:
        self.rows = rows
        self._chosen: tuple[tuple[tuple[int, ...], int], ...] | None = None
        self._contexts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows: torch.Tensor | None = None  # each prompt row's image, on the latents' device
        # The guidance scales as last given, and the same on the ε's device with each image's first prompt row there:
        # copied once, not at every UNet call (a copy from pageable host memory makes the host wait for the GPU).
        self._guidance: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def composed(self) -> bool:
        return any(row.composed for row in self.rows)

    def __call__(self, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = tuple(row.chosen(call) for row in self.rows)
        if chosen != self._chosen:
            prompt, negative = zip(*(row.contexts(call) for row in self.rows), strict=True)
            self._chosen, self._contexts = chosen, (torch.cat(prompt), torch.cat(negative))
        assert self._contexts is not None  # made on the first call: no chosen texts equal None
        return self._contexts

    def prompt_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (B, …), one row per image, as the prompt contexts' rows: each image's repeated for its sub-prompts."""
        if not self.composed:
            return x
        if self._rows is None or self._rows.device != x.device:
            images = [image for image, row in enumerate(self.rows) for _ in row.prompts]
            self._rows = torch.tensor(images, device=x.device)
        return x.index_select(0, self._rows)

    def guide(self, e_u: torch.Tensor, e_c: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Each image's ε from its unconditional ε_u (B, …) and its sub-prompts' ε (`prompt_rows`), at guidance
        scales (B,): ε_u + s·(ε_c − ε_u) for one prompt (ε_c itself at s = 1), A1111's ε_u + Σ_j w_j·s·(ε_j − ε_u)
        for a composed one, added up in its order."""
        first = [0, *itertools.accumulate(len(row.prompts) for row in self.rows)][:-1]
        if self._guidance is None or self._guidance[0] is not scales or self._guidance[1].device != e_u.device:
            on_device = scales.view(-1, *[1] * (e_u.dim() - 1)).to(e_u.device)
            self._guidance = (scales, on_device, torch.tensor(first, device=e_u.device))
        _, s, first_rows = self._guidance
        e_first = e_c.index_select(0, first_rows) if self.composed else e_c
        guided = torch.where(s == 1, e_first, e_u + s * (e_first - e_u))
        for i, row in enumerate(self.rows):
            if row.composed:
                guided[i] = e_u[i]
                for j, weight in enumerate(row.weights):
                    guided[i] += (e_c[first[i] + j] - e_u[i]) * (weight * float(scales[i]))
        return guided
