"""Generations → response bodies: one PNG, or JSON with base64 PNGs, seeds and the effective parameters."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from handler.request import ApiRequest
from ldm.pipeline import Generation
from ldm.png_info import encode_png, parameters_text


@dataclass(frozen=True)
class Answer:
    """A request and the images made for it."""

    request: ApiRequest
    generation: Generation


def effective_parameters(generation: Generation) -> dict[str, Any]:
    """Every request field as it was run, defaults and the drawn seed filled in (init_image left out)."""
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
    }
    if r.init_image is not None:
        parameters["strength"] = r.strength
    return parameters


def png_files(generation: Generation, model_hash: str) -> list[bytes]:
    """Each image as PNG bytes carrying its own `parameters` chunk (its own seed)."""
    return [
        encode_png(image, parameters_text(generation.request, seed, model_hash))
        for image, seed in zip(generation.images, generation.seeds, strict=True)
    ]


def json_body(generation: Generation, model_hash: str) -> str:
    """`{"images": [base64 PNG, ...], "seeds": [...], "parameters": {...}}`."""
    return json.dumps(
        {
            "images": [base64.b64encode(png).decode("ascii") for png in png_files(generation, model_hash)],
            "seeds": generation.seeds,
            "parameters": effective_parameters(generation),
        }
    )
