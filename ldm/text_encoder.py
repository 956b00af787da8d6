"""CLIP text conditioning: prompt → (77, context_dim) embedding, the last hidden state after the final layer norm.

The transformer is transformers' `CLIPTextModel`, built from config alone (never from the hub). Its state-dict
layout moved between transformers versions (a `text_model.` level before 5.6, none after), so weights are always
loaded into `core`, the module whose keys are the checkpoint's `cond_stage_model.transformer.text_model.*`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.tokenizer import CLIPTokenizer

# The id an embedding's vector stands in place of (any but EOS, whose position CLIP's pooled output looks for).
EMBEDDING_PLACEHOLDER = 0


def weigh_batch(rows: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> list[torch.Tensor]:
    """Chunks A1111 encodes in one batch, each (CLIP output (77, d), weights (77,), how often it is in the batch),
    weighted as its "Original" emphasis weighs them: each token's row multiplied by its weight, then all rescaled by
    one factor to the mean they had (the weights shift attention between words, not the overall scale; A1111 takes
    both means over the whole batch, so each chunk's weights move the others' scale); in float32."""
    hidden = [h.float() for h, _, _ in rows]
    weighted = [h * w.to(h.device, torch.float32)[:, None] for h, (_, w, _) in zip(hidden, rows, strict=True)]
    mean = sum(count * h.mean() for h, (_, _, count) in zip(hidden, rows, strict=True))
    weighted_mean = sum(count * w.mean() for w, (_, _, count) in zip(weighted, rows, strict=True))
    return [w * (mean / weighted_mean) for w in weighted]


class TextEncoder(nn.Module):
    """Tokenizer and CLIP text transformer as one unit: strings in, embeddings out."""

    def __init__(self, text_config: dict[str, Any], tokenizer: CLIPTokenizer | None = None) -> None:
        super().__init__()
        config = CLIPTextConfig(**text_config)
        config._attn_implementation = "sdpa"
        self.transformer = CLIPTextModel(config)
        self.tokenizer = tokenizer or CLIPTokenizer()

    @property
    def core(self) -> nn.Module:
        """The module holding `embeddings`, `encoder` and `final_layer_norm` (the checkpoint's key root)."""
        return getattr(self.transformer, "text_model", self.transformer)

    def restore_position_ids(self) -> None:
        """Recreate the non-persistent `position_ids` buffer (0..76), which weights loaded by assignment lack."""
        embeddings = self.core.embeddings
        n = embeddings.position_embedding.weight.shape[0]
        device = embeddings.position_embedding.weight.device
        embeddings.register_buffer("position_ids", torch.arange(n, device=device)[None], persistent=False)

    def token_ids(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, 77) int64 ids on this module's device."""
        device = self.core.embeddings.position_embedding.weight.device
        return torch.tensor(rows, dtype=torch.long, device=device)

    @property
    def layers(self) -> int:
        """How many transformer layers CLIP has: the most `clip_skip` can be."""
        return len(self.core.encoder.layers)

    def hidden(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """(B, 77, hidden) for token ids (B, 77), no attention mask (as SD v1 was trained): the last layer's output
        after the final layer norm, or with `clip_skip` k > 1 the output of the k-th layer from the end, through the
        same norm (A1111's "Clip skip", which models fine-tuned on a shallower CLIP read)."""
        if clip_skip == 1:
            return self.transformer(input_ids=ids).last_hidden_state
        states = self.transformer(input_ids=ids, output_hidden_states=True).hidden_states
        return self.core.final_layer_norm(states[-clip_skip])

    def encode(self, rows: Sequence[Sequence[int | torch.Tensor]], clip_skip: int = 1) -> torch.Tensor:
        """(B, 77, hidden) for rows of 77 positions, each a token id or one vector of a textual-inversion embedding
        (ldm/embeddings.py), which CLIP reads in place of a token's own embedding: the token embedding's output is
        overwritten there for this call. Rows of ids alone run exactly as `hidden`."""
        ids = self.token_ids(
            [[slot if isinstance(slot, int) else EMBEDDING_PLACEHOLDER for slot in row] for row in rows]
        )
        places = [(r, p, slot) for r, row in enumerate(rows) for p, slot in enumerate(row) if not isinstance(slot, int)]
        if not places:
            return self.hidden(ids, clip_skip)
        where = torch.tensor([(r, p) for r, p, _ in places], device=ids.device).T
        vectors = torch.stack([vector for _, _, vector in places])

        def put(_: nn.Module, __: tuple, output: torch.Tensor) -> torch.Tensor:
            output[where[0], where[1]] = vectors.to(output)
            return output

        hook = self.core.embeddings.token_embedding.register_forward_hook(put)
        try:
            return self.hidden(ids, clip_skip)
        finally:
            hook.remove()

    def forward(self, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """(B, 77, hidden) embeddings of plain prompts (`hidden`)."""
        return self.hidden(self.token_ids([self.tokenizer(p) for p in prompts]), clip_skip)
