"""A request's init image and mask: base64 text → the RGB image (or the mask's gray) the pipeline reads.

Why apart: decoding an image someone sent is where a small request can cost the most (a PNG of a few KB can claim
30000×30000 pixels), so every limit is checked from the header, before the pixels are decoded, and PIL's many ways
of failing on damaged data are answered as one 400 naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from handler.errors import RequestError
from handler.settings import HandlerSettings
from ldm.generation_request import MASK_WITHOUT_INIT
from ldm.init_images import ImageError, rgb, upright
from ldm.inpainting import mask_band

# MPO is a JPEG followed by more pictures (a second view, a depth map: phones and cameras write them as .jpg); its
# first picture is the JPEG every viewer shows, and the one used. WebP: what browsers save most images of the web as.
INIT_IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP")
# What PIL raises for damaged image data, as it reads the header or decodes the pixels (a broken PNG chunk is a
# SyntaxError).
_DAMAGED = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_image(
    value: Any, settings: HandlerSettings, field: str = "init_image", max_bytes: int | None = None
) -> Image.Image:
    """Base64 PNG/JPEG/WebP (a `data:` URL prefix and line breaks allowed) of request field `field` → RGB image
    (`mask_image`: the grayscale mask it draws, `mask_band`), refusing anything over the limits before decoding its
    pixels (a PNG of a few KB can claim 30000×30000), and anything whose conversion to RGB would not be exact (an
    animation, CMYK, 16-bit grayscale; PIL reads 16-bit colour as its high bytes, exactly). `max_bytes`: what is left of
    `max_init_image_bytes` (all of it by default)."""
    limits = settings.limits
    max_bytes = limits.max_init_image_bytes if max_bytes is None else max_bytes
    if not isinstance(value, str):
        raise RequestError(field, f"{field} must be a base64 string (PNG, JPEG or WebP)")
    encoded = _payload(value)
    if _payload_bytes(encoded) > max_bytes:
        shared = "" if field == "init_image" else f" (init_image and {field} share {limits.max_init_image_bytes})"
        raise RequestError(field, f"{field} must be at most {max_bytes} bytes{shared}")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, f"{field} is not valid base64") from None
    too_many_pixels = f"{field} must have at most {limits.max_init_image_pixels} pixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own guard, which reads only the header, answered before ours could.
        raise RequestError(field, f"{too_many_pixels}; its header claims over {Image.MAX_IMAGE_PIXELS}") from None
    except (UnidentifiedImageError, *_DAMAGED):
        raise RequestError(field, f"{field} is not a PNG, JPEG or WebP image we can read") from None
    with image:
        if image.format not in INIT_IMAGE_FORMATS:
            raise RequestError(field, f"{field} must be PNG, JPEG or WebP, got {image.format}")
        width, height = image.size
        if width * height > limits.max_init_image_pixels:
            raise RequestError(field, f"{too_many_pixels}, got {width}x{height}")
        try:
            shown = upright(image)
            return mask_band(shown) if field == "mask_image" else rgb(shown)
        except ImageError as error:
            raise RequestError(field, f"{field} {error}") from None
        except _DAMAGED:
            raise RequestError(field, f"{field} is truncated or corrupt") from None


def decode_images(body: dict[str, Any], settings: HandlerSettings) -> tuple[Image.Image | None, Image.Image | None]:
    """The init image and the mask over it (None where not sent). The mask shares the init image's byte limit, so
    `max_request_size` (config.properties) holds for both."""
    if body.get("init_image") is None:
        if body.get("mask_image") is not None:
            raise RequestError("mask_image", MASK_WITHOUT_INIT)  # before decoding a mask that cannot be used
        return None, None
    init = decode_image(body["init_image"], settings)
    if body.get("mask_image") is None:
        return init, None
    budget = settings.limits.max_init_image_bytes - _payload_bytes(_payload(body["init_image"]))
    return init, decode_image(body["mask_image"], settings, "mask_image", budget)


def _payload(value: str) -> str:
    """The base64 text of an image field, without its `data:` URL prefix and whitespace (`base64` wraps its lines
    at 76 characters; A1111 reads them so)."""
    return "".join(_DATA_URL.sub("", value.strip(), count=1).split())


def _payload_bytes(payload: str) -> int:
    """The bytes base64 text decodes to, counted without decoding it."""
    return len(payload) * 3 // 4
