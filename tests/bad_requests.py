"""Requests that break a rule, each with the status and the field its error must name.

Shared by the in-process handler tests and the tests against a real TorchServe.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

VALID: dict[str, Any] = {"prompt": "a red bicycle", "H": 64, "W": 64, "ddim_steps": 3, "seed": 5}


def png_base64(width: int = 80, height: int = 64, **save: Any) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG", **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def with_(**fields: Any) -> dict[str, Any]:
    return {**VALID, **fields}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != name}


# (id, body: a dict sent as JSON or raw bytes sent as they are, field named by the error)
BAD: list[tuple[str, Any, str]] = [
    ("not json", b"{prompt: cat", "body"),
    ("truncated json", b'{"prompt": "a cat", "H": 6', "body"),
    ("empty body", b"", "body"),
    ("array", b'[{"prompt": "a cat"}]', "body"),
    ("string", b'"a cat"', "body"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', "body"),
    ("NaN literal", b'{"prompt": "a cat", "scale": NaN}', "scale"),
    ("Infinity literal", b'{"prompt": "a cat", "eta": -Infinity}', "eta"),
    ("duplicate key", b'{"prompt": "a cat", "prompt": "a dog"}', "prompt"),
    ("missing prompt", without("prompt"), "prompt"),
    ("prompt not a string", with_(prompt=42), "prompt"),
    ("prompt too long", with_(prompt="x" * 2001), "prompt"),
    ("control character", with_(prompt="a\x00cat"), "prompt"),
    ("negative prompt not a string", with_(negative_prompt=["blurry"]), "negative_prompt"),
    ("unknown field", with_(ddim_step=10), "ddim_step"),
    ("H boolean", with_(H=True), "H"),
    ("H float", with_(H=64.0), "H"),
    ("H string", with_(H="64"), "H"),
    ("H zero", with_(H=0), "H"),
    ("H negative", with_(H=-64), "H"),
    ("H not multiple of 8", with_(H=100), "H"),
    ("W too large", with_(W=4096), "W"),
    ("too many pixels", with_(H=2048, W=2048), "H"),
    ("steps zero", with_(ddim_steps=0), "ddim_steps"),
    ("steps huge", with_(ddim_steps=10**6), "ddim_steps"),
    ("scale NaN-like string", with_(scale="nan"), "scale"),
    ("scale negative", with_(scale=-1), "scale"),
    ("eta above 1", with_(eta=1.5), "eta"),
    ("n_samples zero", with_(n_samples=0), "n_samples"),
    ("n_samples huge", with_(n_samples=10**4), "n_samples"),
    ("too many images", with_(n_samples=4, n_iter=3), "n_iter"),
    ("seed negative", with_(seed=-1), "seed"),
    ("seed 2^64", with_(seed=2**64), "seed"),
    ("seed string", with_(seed="42"), "seed"),
    ("seed float", with_(seed=4.2), "seed"),
    ("unknown sampler", with_(sampler="plms"), "sampler"),
    ("strength zero", with_(strength=0), "strength"),
    ("strength 1.5", with_(strength=1.5), "strength"),
    ("strength too small for steps", with_(init_image=png_base64(), strength=0.2), "strength"),
    ("init image not base64", with_(init_image="***not base64***"), "init_image"),
    ("init image not an image", with_(init_image=base64.b64encode(b"hello world").decode()), "init_image"),
    ("init image truncated", with_(init_image=png_base64()[:60]), "init_image"),
    ("init image not a string", with_(init_image=123), "init_image"),
    ("stream not a boolean", with_(stream=1), "stream"),
    ("stream a string", with_(stream="true"), "stream"),
    ("png for several images", with_(n_samples=2), "n_samples"),  # sent with Accept: image/png
    ("stream as png", with_(stream=True), "stream"),  # sent with Accept: image/png
]
PNG_ONLY = {"png for several images", "stream as png"}
