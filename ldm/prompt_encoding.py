"""(1) of the pipeline: a request's prompts as the UNet reads them, CLIP's output for every text of its run.

Why apart: texts are read three ways (as written; optimizedSD's weighted sub-prompts; A1111's syntax, with prompt
editing and `AND`), and a batch of requests shares one text-encoder call per way and clip skip, so each distinct
text is encoded once; the pipeline only asks for the conditioning of its requests.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

from ldm import emphasis, subprompts
from ldm.conditioning import ImageConditioning
from ldm.embeddings import EmbeddingLibrary, Vocabulary, flatten
from ldm.generation_request import TEXT_FIELDS, GenerationError, GenerationRequest, hires_run
from ldm.model import StableDiffusion
from ldm.request_texts import pass_field, text_batches, text_parts, text_schedules
from ldm.text_encoder import weigh_batch


class PromptEncoder:
    """The text encoder of `model` with the textual-inversion embeddings of `embeddings`."""

    def __init__(self, model: StableDiffusion, embeddings: EmbeddingLibrary) -> None:
        self.model = model
        self.embeddings = embeddings

    @torch.inference_mode()
    def embed(self, prompts: Sequence[str], clip_skip: int = 1, vocabulary: Vocabulary | None = None) -> torch.Tensor:
        """(1) Text embeddings (B, 77, d) in the UNet's dtype, from CLIP's last layer or `clip_skip`'s, reading the
        textual-inversion embeddings of `vocabulary` the prompts name (ldm/embeddings.py)."""
        with self.model.resident(self.model.text_encoder) as encoder:
            if vocabulary is None or not vocabulary.embeddings:
                return encoder(list(prompts), clip_skip).to(self.model.dtype)
            tokenizer = encoder.tokenizer
            rows = [tokenizer.frame(flatten(vocabulary.read(tokenizer, p)[0])) for p in prompts]
            return encoder.encode(rows, clip_skip).to(self.model.dtype)

    @torch.inference_mode()
    def embed_batches(
        self, batches: Sequence[Sequence[str]], clip_skip: int = 1, vocabulary: Vocabulary | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """(1) Texts in A1111's syntax (ldm/emphasis.py) as A1111 encodes a prompt's prompt-editing texts: in one
        batch (`prompt_editing.batch`: repeats count), chunk by chunk, a text of fewer chunks than another padded
        with empty ones (BOS and EOS: an empty prompt's), each chunk position weighted and rescaled over the batch
        (`weigh_batch`). Each batch's texts, (1, 77·k, d) in the UNet's dtype, k its most chunks; each distinct text
        encoded once."""
        with self.model.resident(self.model.text_encoder) as encoder:
            texts = sorted({text for batch in batches for text in batch})
            chunked = {text: emphasis.chunks(encoder.tokenizer, text, vocabulary) for text in texts}
            states = {text: encoder.encode([c.ids for c in chunks], clip_skip) for text, chunks in chunked.items()}
            ragged = any(len({len(chunked[text]) for text in batch}) > 1 for batch in batches)
            empty = emphasis.chunks(encoder.tokenizer, "")[0]
            blank = encoder.encode([empty.ids], clip_skip)[0] if ragged else None
        out = []
        for batch in batches:
            counts = collections.Counter(batch)
            longest = max(len(chunked[text]) for text in counts)
            positions = []
            for index in range(longest):
                rows = [
                    (states[text][index], torch.tensor(chunked[text][index].weights), count)
                    if index < len(chunked[text])
                    else (blank, torch.tensor(empty.weights), count)
                    for text, count in counts.items()
                ]
                positions.append(weigh_batch(rows))
            out.append(
                {
                    text: torch.cat([weighed[i] for weighed in positions])[None].to(self.model.dtype)
                    for i, text in enumerate(counts)
                }
            )
        return out

    def conditions(
        self, requests: Sequence[GenerationRequest], vocabulary: Vocabulary | None = None, hires_pass: bool = False
    ) -> list[ImageConditioning]:
        """(1) Each request's prompt and negative prompt embeddings over its run, or over its hires fix's second pass
        (one throughout, but for A1111's prompt editing): every distinct text (or sub-prompt) once per `clip_skip`,
        the plain ones of a `clip_skip` in one text-encoder call, those in A1111's syntax with the others of their
        schedule, as A1111 encodes them (`embed_batches`); with the textual-inversion embeddings of `vocabulary` (by
        default, the embeddings folder's)."""
        if vocabulary is None:
            vocabulary = self.embeddings.vocabulary()
        runs = [hires_run(r) if hires_pass else r for r in requests]  # what the pass's texts are read from
        parts = [(text_parts(r, "prompt"), text_parts(r, "negative_prompt")) for r in runs]
        schedules = [{f: text_schedules(r, f, hires_pass) for f in TEXT_FIELDS} for r in requests]
        plain = {
            (r.clip_skip, text)
            for r, pair in zip(requests, parts, strict=True)
            if not r.emphasis
            for side in pair
            for text, _ in side
        }
        batches = [{f: text_batches(r, f, hires_pass) for f in TEXT_FIELDS} if r.emphasis else {} for r in requests]
        syntax = {
            (r.clip_skip, batch)
            for r, fields in zip(requests, batches, strict=True)
            for field in fields.values()
            for batch in field
        }
        encoded: dict[tuple[int, str], torch.Tensor] = {}
        emphasized: dict[tuple[int, tuple[str, ...]], dict[str, torch.Tensor]] = {}
        for skip in sorted({skip for skip, _ in plain | syntax}):
            texts = sorted(text for s, text in plain if s == skip)
            if texts:
                vectors = self.embed(texts, skip, vocabulary).split(1)
                encoded.update(zip(((skip, t) for t in texts), vectors, strict=True))
            skip_batches = sorted(batch for s, batch in syntax if s == skip)
            made = self.embed_batches(skip_batches, skip, vocabulary)
            emphasized.update(zip(((skip, batch) for batch in skip_batches), made, strict=True))
        for request, fields in zip(requests, batches, strict=True):
            for field, field_batches in fields.items():
                made = [emphasized[request.clip_skip, batch] for batch in field_batches]
                if not all(bool(vector.isfinite().all()) for texts in made for vector in texts.values()):
                    # Weights that cancel out: a chunk whose weighted mean is 0 cannot be rescaled to its mean.
                    name = pass_field(request, field, hires_pass)
                    raise GenerationError(name, f"{name}: its weights cancel out, so CLIP's output cannot be rescaled")
        out: list[ImageConditioning] = []
        for r, fields, field_batches, (p, n) in zip(requests, schedules, batches, parts, strict=True):
            if r.emphasis:
                prompts, (negative,) = (
                    tuple(
                        tuple((end, emphasized[r.clip_skip, batch][text]) for end, text in s)
                        for s, batch in zip(fields[f], field_batches[f], strict=True)
                    )
                    for f in TEXT_FIELDS
                )
                out.append(ImageConditioning(prompts, negative, tuple(weight for _, weight in p)))
            else:
                (((end, _),),) = fields["prompt"]
                prompt, negative = (((end, _weighted(side, encoded, r.clip_skip)),) for side in (p, n))
                out.append(ImageConditioning((prompt,), negative))
        return out


def _weighted(parts: subprompts.Parts, encoded: dict[tuple[int, str], torch.Tensor], clip_skip: int) -> torch.Tensor:
    """Σ weight·CLIP output over a text's parts (`encoded` keyed by clip skip and text), added to zeros in order as
    optimizedSD did; a text of one part (whose weight is 1) is its output unchanged."""
    if len(parts) == 1:
        return encoded[clip_skip, parts[0][0]]
    total = torch.zeros_like(encoded[clip_skip, parts[0][0]])
    for text, weight in parts:
        total = torch.add(total, encoded[clip_skip, text], alpha=weight)
    return total
