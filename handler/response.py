"""Generations → response bodies: one PNG, or JSON with base64 PNGs, seeds and the effective parameters."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from handler.request import ApiRequest
from ldm.generation_request import HIRES_OWN
from ldm.model import StableDiffusion
from ldm.pipeline import Generation
from ldm.png_info import encode_with_parameters, generation_texts


@dataclass(frozen=True)
class Answer:
    """A request and the images made for it."""

    request: ApiRequest
    generation: Generation


def effective_parameters(generation: Generation) -> dict[str, Any]:
    """Every request field as it was run, defaults and the drawn seed filled in (init_image and mask_image left out)."""
    r = generation.request
    parameters: dict[str, Any] = {
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "H": r.height,
        "W": r.width,
        "ddim_steps": r.steps,
        "scale": r.scale,
        "eta": r.eta,
        "seed": r.seed,
        "n_samples": r.n_samples,
        "n_iter": r.n_iter,
        "sampler": r.sampler,
        "weighted_subprompts": r.weighted_subprompts,
        "emphasis": r.emphasis,
        "clip_skip": r.clip_skip,
    }
    if r.init_image is not None or r.hires:
        parameters["strength"] = r.strength
    if r.init_image is not None and r.inpaint_area != "only_masked":  # an only-masked box is cut as it is
        parameters["resize_mode"] = r.resize_mode
    if r.hires:
        if r.hr_resize_x or r.hr_resize_y:
            parameters.update(hr_resize_x=r.hr_resize_x, hr_resize_y=r.hr_resize_y)
        else:
            parameters["hr_scale"] = r.hr_scale
        parameters.update(hr_upscaler=r.hr_upscaler, hr_steps=r.hr_steps)
        parameters.update({name: getattr(r, name) for name in HIRES_OWN if getattr(r, name)})
    if r.variation:
        parameters.update(subseed=r.subseed, subseed_strength=r.subseed_strength)
    if r.seed_resize:
        parameters.update(seed_resize_from_h=r.seed_resize_from_h, seed_resize_from_w=r.seed_resize_from_w)
    if r.tiling:
        parameters["tiling"] = True
    if r.mask_image is not None:
        parameters.update(
            mask_blur=r.mask_blur,
            invert_mask=r.invert_mask,
            masked_content=r.masked_content,
            inpaint_area=r.inpaint_area,
        )
        if r.inpaint_area == "only_masked":
            parameters["masked_area_padding"] = r.masked_area_padding
    return parameters


def png_files(generations: Sequence[Generation], model: StableDiffusion) -> list[list[bytes]]:
    """Each generation's images as PNG bytes, each carrying its own `parameters` chunk (its own seed; `model`'s
    hashes), the whole batch's compressed at once."""
    texts = [text for g in generations for text in generation_texts(g, model)]
    files = iter(encode_with_parameters([image for g in generations for image in g.images], texts))
    return [[next(files) for _ in g.seeds] for g in generations]


def json_body(generation: Generation, pngs: Sequence[bytes]) -> str:
    """`{"images": [base64 PNG, ...], "seeds": [...], "parameters": {...}, "warnings": [...]}`, and each image's
    `"subseeds"` with variation seeds."""
    body: dict[str, Any] = {
        "images": [base64.b64encode(png).decode("ascii") for png in pngs],
        "seeds": generation.seeds,
        "parameters": effective_parameters(generation),
        "warnings": list(generation.warnings),
    }
    if generation.request.variation:
        body["subseeds"] = generation.subseeds
    return json.dumps(body)
