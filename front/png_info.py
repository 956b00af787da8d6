"""A PNG's text chunks, and A1111's `POST /sdapi/v1/png-info`: an image's infotext read into fields as A1111 reads it.

Why: A1111's clients read an image's settings back through that endpoint (a gallery's "send to txt2img", a bot that
remakes an image), on PNGs made here as on A1111's. The chunks are walked here rather than by PIL: only the text is
wanted, no pixel of an upload is decoded, and the front's image has no PIL. JPEG and WebP images, whose infotext
A1111 reads from EXIF, have none here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from typing import Any

from front.errors import FrontError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# How the other images A1111's clients send begin (JPEG, GIF, BMP, TIFF either way round); WebP: `is_image`.
IMAGE_SIGNATURES = (SIGNATURE, b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\0", b"MM\0*")
# A text chunk decompressed past this is dropped, as PIL drops it (its MAX_TEXT_CHUNK).
MAX_TEXT = 2**20
INFOTEXT = "parameters"
# A1111 1.9's infotext fields: `Key: value` pairs, a value quoted as JSON when it holds a comma.
PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# A run of the characters a key is made of, and of whitespace (`parameters`).
KEY_RUN = re.compile(r"[\w \-/]*")
SPACE_RUN = re.compile(r"\s*")
# All the text chunks of one image together, past which it is refused, as PIL refuses it (its MAX_TEXT_MEMORY).
MAX_TEXTS = 64 * 2**20
SIZE = re.compile(r"^(\d+)x(\d+)$")
# What A1111 1.9 fills in for a field an infotext leaves out (its setting's value when the image was made).
ABSENT: dict[str, Any] = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
    "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
    "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0,
    "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable",
}  # fmt: skip


def _inflated(data: bytes) -> bytes | None:
    """zlib-compressed chunk text, or None when it inflates past `MAX_TEXT` (PIL then refuses the whole image; here
    the chunk is dropped and the rest still read). Raises zlib.error for data that is not zlib's."""
    text = zlib.decompressobj().decompress(data, MAX_TEXT + 1)
    return text if len(text) <= MAX_TEXT else None


class TooMuchText(ValueError):
    """A PNG whose text chunks together pass `MAX_TEXTS` once inflated."""


def _text(kind: bytes, content: bytes) -> tuple[str, str] | None:
    """One chunk's keyword and text as PIL (13) reads them, or None where PIL drops the chunk. tEXt and zTXt hold
    Latin-1 under a keyword that is not empty; without a zero byte, all is keyword and the text is empty."""
    key, separator, rest = content.partition(b"\0")
    if kind == b"iTXt":
        text = _international(rest) if separator else None
    elif not key:
        return None
    else:
        text = _compressed(rest) if kind == b"zTXt" else rest.decode("latin-1")
    return None if text is None else (key.decode("latin-1"), text)


def _compressed(rest: bytes) -> str | None:
    """A zTXt's text from what follows its keyword: its method byte (0, zlib's) and the data. Data that is no zlib
    stream is empty text; another method PIL refuses, and the whole image with it: here the chunk is dropped."""
    if rest[:1] not in (b"", b"\0"):
        return None
    try:
        value = _inflated(rest[1:])
    except zlib.error:
        return ""
    return None if value is None else value.decode("latin-1")


def _international(rest: bytes) -> str | None:
    """An iTXt's text from what follows its keyword: its compression flag and method, its language tag and translated
    keyword (each ended by a zero byte), then UTF-8, compressed under any flag but 0, by method 0 only."""
    parts = rest[2:].split(b"\0", 2)
    if len(rest) < 2 or len(parts) < 3 or (rest[0] and rest[1]) or not all(map(_is_utf8, parts[:2])):
        return None
    try:
        value = _inflated(parts[2]) if rest[0] else parts[2]
        return None if value is None else value.decode("utf-8")
    except (zlib.error, UnicodeDecodeError):
        return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def png_texts(data: bytes) -> dict[str, str]:
    """Every text chunk of PNG bytes by keyword (the later of two alike, as PIL keeps); {} for what is no PNG.
    Raises `TooMuchText` past `MAX_TEXTS` in all, so a small upload cannot inflate to gigabytes."""
    texts: dict[str, str] = {}
    if not data.startswith(SIGNATURE):
        return texts
    position, total = len(SIGNATURE), 0
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind, content = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IEND":
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt") and (text := _text(kind, content)):
            total += len(text[0]) + len(text[1])
            if total > MAX_TEXTS:
                raise TooMuchText(f"its text chunks hold more than {MAX_TEXTS} bytes")
            texts[text[0]] = text[1]
        position += 12 + length
    return texts


def decoded(image: Any, field: str) -> bytes:
    """An image sent as A1111's clients send one: base64, maybe behind a `data:` URL prefix. A URL is refused:
    the front fetches nothing."""
    if not isinstance(image, str):
        raise FrontError(400, f"{field}: send the image as a base64 string", field)
    text = image.strip()
    if text.startswith(("http://", "https://")):
        raise FrontError(400, f"{field}: send the image itself as base64; URLs are not fetched here", field)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line breaks, as some encoders write them
    except (binascii.Error, ValueError):
        raise FrontError(400, f"{field}: is not base64", field) from None


def _unquoted(value: str) -> str:
    """A value A1111 quoted (as JSON) because it holds a comma or quote, as it was."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return str(json.loads(value))
    except ValueError:
        return value


def parameters(line: str) -> list[tuple[str, str]]:
    """`PARAMETER.findall(line)`, in time linear in the line rather than quadratic. Why: findall tries a key at every
    position of a long run of key characters (words and spaces: a prompt), reading to the run's end each time, so an
    upload's 1 MB line would hold the front for an hour. Where a try fails, every start later in the same run fails
    too (a key must end at a colon, and the run's end is none), but for a start whose whitespace reaches past the
    run, which a try at the run's end makes as well: the tries skipped change nothing."""
    found = []
    position = 0
    while position <= len(line):
        if match := PARAMETER.match(line, position):
            found.append((match.group(1), match.group(2)))
            position = match.end()
            continue
        spaces = SPACE_RUN.match(line, position).end()  # type: ignore[union-attr]  # always matches
        run = KEY_RUN.match(line, position).end()  # type: ignore[union-attr]
        if spaces > position:
            position = spaces  # every start in a run of whitespace reaches the same key
        elif run > position and line[run : run + 1] != ":":
            position = run
        else:
            position += 1
    return found


def parse_infotext(text: str) -> dict[str, Any]:
    """An infotext's fields as A1111 1.9 reads them: `Prompt` and `Negative prompt` from the lines before the last,
    each `Key: value` of the last line (the whole text is prompt when it has fewer than three), a size `WxH` as
    `Key-1` and `Key-2`, the values as text, then `ABSENT`'s defaults. Not done: A1111's styles and hypernetworks,
    and its conversions of infotexts older than its version 1.0 (their first-pass sizes) or naming an older version."""
    *lines, last = text.strip().split("\n")
    if len(parameters(last)) < 3:
        lines, last = [*lines, last], ""
    # Joined as A1111 joins them: a line after an empty text gets no newline before it.
    prompt = negative = ""
    after_negative = False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            after_negative, line = True, line.removeprefix("Negative prompt:").strip()
        if after_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    fields: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in parameters(last):
        if not value:
            continue  # A1111 skips a key with nothing after it
        value = _unquoted(value)
        if size := SIZE.match(value):
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
        else:
            fields[key] = value
    return fields | {key: value for key, value in ABSENT.items() if key not in fields}


def is_image(data: bytes) -> bool:
    """Whether the bytes start as an image of a format A1111's clients send (told by its signature: the front's
    image has no PIL, and needs none to read text chunks)."""
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return webp or data.startswith(IMAGE_SIGNATURES)


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """A1111's answer to `POST /sdapi/v1/png-info` `{"image": base64}`: the infotext as `info` ("" without one),
    every text chunk as `items` (`parameters` first, "" without one, as A1111 1.6 lists them), and the infotext's
    fields as `parameters` (A1111 1.9's). An empty image answers nothing (A1111 1.6's); bytes that are no image, or
    text past `MAX_TEXTS`, are a 400."""
    data = decoded(body.get("image"), "image")
    if data and not is_image(data):
        raise FrontError(400, "image: is not a PNG, JPEG, WebP, GIF, BMP or TIFF image", "image")
    try:
        texts = png_texts(data)
    except TooMuchText as error:
        raise FrontError(400, f"image: {error}", "image") from None
    info = texts.pop(INFOTEXT, "")
    return {"info": info, "items": {INFOTEXT: info, **texts}, "parameters": parse_infotext(info)}
