"""Requests that break a rule, each with the status and the field its error must name.

Shared by the in-process handler tests, the tests against a real TorchServe and those through the web front.
"""

from __future__ import annotations

import base64
import io
import itertools
import struct
import zlib
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

VALID: dict[str, Any] = {"prompt": "a red bicycle", "H": 64, "W": 64, "ddim_steps": 3, "seed": 5}
INIT_IMAGE_BYTES = 10 * 1024 * 1024  # handler.limits.max_init_image_bytes


def image_base64(image: Image.Image, format: str = "PNG", **save: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_base64(width: int = 80, height: int = 64, **save: Any) -> str:
    return image_base64(Image.new("RGB", (width, height), (200, 30, 30)), "PNG", **save)


def black_png(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A valid PNG of zeros, in any depth and colour type, at any size at all: deflate shrinks zeros about
    1000-fold, so 5000×5000 at 1 bit is 3 KB and 30000×30000 (900 megapixels, 112 MB of rows) is 107 KB — the least
    any valid PNG of that size can be."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = bytes((width * channels * bit_depth + 7) // 8)
    return _png(width, height, bit_depth, color_type, itertools.repeat(row, height))


def png_of(samples: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of (H, W, 3) samples, which PIL cannot write."""
    height, width, _ = samples.shape
    return _png(width, height, 16, 2, (row.astype(">u2").tobytes() for row in samples))


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: Iterable[bytes]) -> bytes:
    """A PNG written chunk by chunk from its rows of samples (each given a filter byte of 0, none)."""
    deflate = zlib.compressobj(9)
    pixels = b"".join(deflate.compress(b"\0" + row) for row in rows) + deflate.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def truncated_png() -> str:
    """A PNG of noise (which deflate cannot shrink) cut halfway through its pixel data: the header still reads."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()[: buffer.tell() // 2]).decode("ascii")


def png_with_a_broken_chunk() -> str:
    """A PNG of noise whose pixel data is split over two IDAT chunks, the second's type garbled: its header reads,
    and PIL's decoder fails part way with a SyntaxError ("broken PNG file"), not an OSError."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    png = buffer.getvalue()
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start : start + 4])
    data, rest = png[start + 8 : start + 8 + length], png[start + 12 + length :]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    half = len(data) // 2
    broken = png[:start] + chunk(b"IDAT", data[:half]) + chunk(b"\x00\x01\x02\x03", data[half:]) + rest
    return base64.b64encode(broken).decode("ascii")


def with_(**fields: Any) -> dict[str, Any]:
    return {**VALID, **fields}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != name}


class Case(NamedTuple):
    """A request that breaks one rule: `body` is a dict sent as JSON or raw bytes sent as they are; its 400 names
    `field`, and its message says `says` (the field and the rule or limit broken)."""

    name: str
    body: Any
    field: str
    says: str


# A table: one case a line where it fits.
# fmt: off
CASES: list[Case] = [
    # The body as a whole.
    Case("not json", b"{prompt: cat", "body", "the body is not valid JSON: Expecting property name"),
    Case("truncated json", b'{"prompt": "a cat", "H": 6', "body", "the body is not valid JSON: Expecting ','"),
    Case("empty body", b"", "body", "the body is empty"),
    Case("array", b'[{"prompt": "a cat"}]', "body", "the body must be a JSON object, not list"),
    Case("string", b'"a cat"', "body", "the body must be a JSON object, not str"),
    Case("invalid utf-8", b'{"prompt": "\xff\xfe"}', "body", "the body is not valid UTF-8 (byte 12)"),
    Case("nested too deep", b'{"prompt": "a cat", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body",
         "the body nests arrays or objects too deeply"),
    Case("integer of 5000 digits", b'{"prompt": "a cat", "seed": 1' + b"0" * 5000 + b"}", "body",
         "the body holds an integer of more than 4300 digits"),
    Case("duplicate key", b'{"prompt": "a cat", "prompt": "a dog"}', "prompt", "'prompt' is given more than once"),
    Case("unknown field", with_(ddim_step=10), "ddim_step", "unknown field 'ddim_step'; known fields: prompt,"),
    Case("field of the wrong case", with_(h=64), "h", "unknown field 'h'"),
    # Text.
    Case("missing prompt", without("prompt"), "prompt", "prompt is required"),
    Case("prompt null", with_(prompt=None), "prompt", "prompt must be a string, got null"),
    Case("prompt not a string", with_(prompt=42), "prompt", "prompt must be a string, got 42"),
    Case("prompt too long", with_(prompt="x" * 2001), "prompt", "prompt must be at most 2000 characters, got 2001"),
    Case("prompt of 1 MB", with_(prompt="x" * 2**20), "prompt", "prompt must be at most 2000 characters, got 1048576"),
    Case("control character", with_(prompt="a\x00cat"), "prompt",
         "prompt must not contain control characters other than tab and line breaks; found U+0000 at position 1"),
    Case("escaped control character", b'{"prompt": "a \\u001b[31m cat"}', "prompt", "found U+001B at position 2"),
    Case("DEL in negative prompt", with_(negative_prompt="blurry\x7f"), "negative_prompt",
         "negative_prompt must not contain control characters other than tab and line breaks; found U+007F"),
    Case("unpaired surrogate", b'{"prompt": "a \\ud800 cat"}', "prompt",
         "prompt must not contain unpaired UTF-16 surrogates (not valid Unicode); found U+D800 at position 2"),
    Case("negative prompt not a string", with_(negative_prompt=["blurry"]), "negative_prompt",
         "negative_prompt must be a string, got an array"),
    Case("prompt nested nearly as deep as the parser allows", b'{"prompt": ' + b"[" * 950 + b"]" * 950 + b"}",
         "prompt", "prompt must be a string, got an array"),
    # Weighted sub-prompts (ldm/subprompts.py).
    Case("weighted_subprompts not a boolean", with_(weighted_subprompts="yes"), "weighted_subprompts",
         'weighted_subprompts must be true or false, got "yes"'),
    Case("sub-prompt weight not a number", with_(prompt="style:watercolor x:1", weighted_subprompts=True), "prompt",
         "prompt: 'watercolor' after 'style:' is not a weight: write a number and a space (not a line break)"),
    Case("sub-prompt weights adding up to 0", with_(negative_prompt="fog:1 rain:-1", weighted_subprompts=True),
         "negative_prompt", "negative_prompt: the sub-prompts' weights add up to 0"),
    Case("sub-prompt weight infinite", with_(prompt="a:inf b", weighted_subprompts=True), "prompt",
         "prompt: the weight of 'a' must be a finite number, got 'inf'"),
    Case("too many sub-prompts", with_(prompt=" ".join(f"w{i}:1" for i in range(17)), weighted_subprompts=True),
         "prompt", "prompt: at most 16 weighted sub-prompts, got 17"),
    Case("emphasis not a boolean", with_(emphasis=1), "emphasis", "emphasis must be true or false, got 1"),
    Case("emphasis with weighted sub-prompts", with_(emphasis=True, weighted_subprompts=True), "emphasis",
         "emphasis and weighted_subprompts read a prompt's colons each their own way: send one of them"),
    Case("AND sub-prompt weight past 100", with_(prompt="a castle AND a lake:250", emphasis=True), "prompt",
         "prompt: sub-prompt weight 250 of 'a lake' is not within ±100"),
    Case("emphasis weight not a number", with_(prompt="a (red:1..5) door", emphasis=True), "prompt",
         "prompt: '1..5' in ':1..5)' is not a weight: write a number such as 1.3"),
    Case("mask_blur 65", with_(mask_blur=65), "mask_blur", "mask_blur must be between 0 and 64 pixels, got 65"),
    Case("resize_mode unknown", with_(init_image=png_base64(), resize_mode="Crop"), "resize_mode",
         "resize_mode must be one of just_resize, crop_and_resize, resize_and_fill, got 'Crop'"),
    Case("resize_mode without an init image", with_(resize_mode="crop_and_resize"), "resize_mode",
         "resize_mode needs an init_image: it tells how to bring it to H×W"),
    Case("masked_content unknown", with_(init_image=png_base64(), mask_image=png_base64(), masked_content="blur"),
         "masked_content", "masked_content must be one of fill, original, latent_noise, latent_nothing, got 'blur'"),
    Case("inpaint_area without a mask", with_(inpaint_area="only_masked"), "inpaint_area",
         "inpaint_area needs a mask_image: it tells how to inpaint through one"),
    Case("masked_area_padding 257", with_(masked_area_padding=257), "masked_area_padding",
         "masked_area_padding must be between 0 and 256 pixels, got 257"),
    Case("only_masked answer over the pixels of a response",
         with_(init_image=(big := base64.b64encode(black_png(3000, 3000)).decode()), mask_image=big,
               inpaint_area="only_masked"),
         "init_image", "init_image is 3000x3000, and inpaint_area only_masked answers at its size: n_samples×n_iter "
         "of it must be at most 8388608 pixels, got 9000000"),
    Case("tiling a string", with_(tiling="yes"), "tiling", 'tiling must be true or false, got "yes"'),
    # Variation seeds.
    Case("subseed_strength 1.5", with_(subseed_strength=1.5), "subseed_strength",
         "subseed_strength must be in [0.0, 1.0], got 1.5"),
    Case("subseed a string, over 8 images in all", with_(subseed="7", subseed_strength=0.5, n_samples=2, n_iter=5),
         "subseed", 'subseed must be an integer, got "7"'),
    Case("subseed_strength a string, over 8 images in all", with_(subseed_strength="0.5", n_samples=2, n_iter=5),
         "subseed_strength", 'subseed_strength must be a finite number, got "0.5"'),
    Case("subseed past 32 bits for its images", with_(subseed=2**32 - 1, subseed_strength=0.5, n_samples=2),
         "subseed", "subseed must be between 0 and 4294967294, got 4294967295"),
    # Resize seed from.
    Case("seed_resize_from_h without its width", with_(seed_resize_from_h=64, seed_resize_from_w=-1),
         "seed_resize_from_w", "seed_resize_from_w must be set too, since seed_resize_from_h is 64: a seed resize "
         "needs both sides (both 0: none)"),
    Case("seed_resize_from_w not a multiple of 8", with_(seed_resize_from_h=64, seed_resize_from_w=100),
         "seed_resize_from_w", "seed_resize_from_w must be 0 (no resize) or a positive multiple of 8, got 100"),
    Case("seed_resize_from_h below the smallest side", with_(seed_resize_from_h=32, seed_resize_from_w=64),
         "seed_resize_from_h", "seed_resize_from_h must be 0 (none) or at least 64 pixels, got 32"),
    Case("seed_resize_from_h past the largest side", with_(seed_resize_from_h=4096, seed_resize_from_w=64),
         "seed_resize_from_h", "seed_resize_from_h must be between -1 and 2048 pixels, got 4096"),
    # The hires fix.
    Case("hr_scale below 1", with_(hr_scale=0.5), "hr_scale", "hr_scale must be in [1.0, 4.0], got 0.5"),
    Case("hr_scale a string", with_(hr_scale="2"), "hr_scale", 'hr_scale must be a finite number, got "2"'),
    Case("hr_upscaler unknown", with_(hr_scale=2, hr_upscaler="R-ESRGAN 4x+"), "hr_upscaler",
         "hr_upscaler 'R-ESRGAN 4x+' is not available; choose one of: latent, latent_antialiased, latent_bicubic, "
         "latent_bicubic_antialiased, latent_nearest, latent_nearest_exact, lanczos, nearest"),
    Case("hr_steps negative", with_(hr_scale=2, hr_steps=-1), "hr_steps", "hr_steps must be between 0 and 150, got -1"),
    Case("hires fix past the pixel limit", with_(H=768, W=768, hr_scale=2), "hr_scale",
         "hr_scale 2 makes 1536x1536 images, 2359296 pixels; at most 1048576"),
    Case("hires fix past the side limit", with_(W=1024, hr_scale=2.5), "hr_scale",
         "hr_scale 2.5 makes 2560x160 images; each side at most 2048 pixels"),
    Case("hires fix of an init image", with_(init_image=png_base64(), hr_scale=2), "hr_scale",
         "hr_scale is txt2img's (A1111's hires fix): an img2img request sets its size with H and W"),
    Case("hires resize negative", with_(hr_resize_x=-8), "hr_resize_x",
         "hr_resize_x must be between 0 and 2048 pixels, got -8"),
    Case("hires resize with hr_scale", with_(hr_scale=2, hr_resize_y=128), "hr_resize_y",
         "hr_resize_y sets the hires fix's size: leave hr_scale at 1 (or out)"),
    Case("hires resize past the pixel limit", with_(hr_resize_x=2048), "hr_resize_x",
         "hr_resize_x 2048 makes 2048x2048 images, 4194304 pixels; at most 1048576"),
    Case("hires resize of an image upscaler past the side limit before its cut",
         with_(H=512, hr_resize_x=1024, hr_resize_y=1024, hr_upscaler="lanczos"), "hr_resize_x",
         "hr_resize_x 1024 upscales the images to 1024x8192 to cut them to 1024x1024; each side at most 2048 pixels"),
    Case("hires resize below the smallest side", with_(W=128, hr_resize_y=32), "hr_resize_y",
         "hr_resize_y 32 makes 64x32 images; each side at least 64 pixels"),
    Case("hires resize of an init image", with_(init_image=png_base64(), hr_resize_x=128), "hr_resize_x",
         "hr_resize_x is txt2img's (A1111's hires fix): an img2img request sets its size with H and W"),
    Case("hires fix with plms", with_(sampler="plms", hr_scale=2), "sampler",
         "sampler plms is for txt2img only, and the hires fix's second pass is an img2img: choose another"),
    Case("hires fix run past the model's steps", with_(hr_scale=2, hr_steps=20, strength=0.01), "strength",
         "strength 0.01 makes the hires fix's 20 steps the last of a run of 2000, over this model's 999: raise "
         "strength to at least 0.0201, or lower hr_steps"),
    Case("hires fix reading a bad weight in its second pass alone",
         with_(prompt="[a|(b:1..5)]", emphasis=True, ddim_steps=1, hr_scale=2, hr_steps=2, sampler="euler"),
         "prompt", "prompt: '1..5' in ':1..5)' is not a weight"),
    Case("hires prompt not a string", with_(hr_scale=2, hr_prompt=["a", "sea"]), "hr_prompt",
         "hr_prompt must be a string, got an array"),
    Case("hires prompt without a hires fix", with_(hr_prompt="a stormy sea"), "hr_prompt",
         "hr_prompt is the hires fix's second pass's: set hr_scale or hr_resize_x/_y"),
    Case("hires sampler not available", with_(hr_scale=2, hr_sampler="k_euler"), "hr_sampler",
         "hr_sampler 'k_euler' is not available; choose one of: "),
    Case("hires sampler plms", with_(hr_scale=2, hr_sampler="PLMS"), "hr_sampler",
         "hr_sampler plms is for txt2img only, and the hires fix's second pass is an img2img: choose another"),
    Case("hires prompt without the prompt's LoRA", with_(prompt="a castle <lora:tiny-style:0.8>", hr_scale=2,
         hr_prompt="a castle"), "hr_prompt",
         "hr_prompt: its LoRA tags (<lora:…>) must be the prompt's: both passes run on the same weights"),
    Case("hires negative prompt past 8 chunks",
         with_(hr_scale=2, hr_negative_prompt="x BREAK " * 8 + "x", emphasis=True), "hr_negative_prompt",
         "hr_negative_prompt: at most 8 chunks of 75 tokens with emphasis, got 9"),
    Case("emphasis weight not a number in a prompt edit", with_(prompt="a [red:(blue:1..2):1] door", emphasis=True),
         "prompt", "prompt: '1..2' in ':1..2)' is not a weight: write a number such as 1.3"),
    Case("emphasis weight overflowing", with_(negative_prompt="(" * 1000 + "fog", emphasis=True), "negative_prompt",
         "negative_prompt: 'fog' weighs 2.46993e+41 once its brackets are multiplied out: at most 100"),
    Case("emphasis over 8 chunks", with_(prompt="x BREAK " * 8 + "x", emphasis=True), "prompt",
         "prompt: at most 8 chunks of 75 tokens with emphasis, got 9"),
    # Clip skip.
    Case("clip_skip 0", with_(clip_skip=0), "clip_skip", "clip_skip must be between 1 and 12, got 0"),
    Case("clip_skip not an integer", with_(clip_skip=1.5), "clip_skip", "clip_skip must be an integer, got 1.5"),
    Case("clip_skip past the model's CLIP", with_(clip_skip=4), "clip_skip",
         "clip_skip must be in [1, 3] (this model's CLIP layers), got 4"),
    # LoRA tags (ldm/lora.py).
    Case("LoRA not in the folder", with_(prompt="a castle <lora:no-such-lora:0.8>"), "prompt",
         "prompt: no LoRA named 'no-such-lora'; the LoRA folder holds: "),
    Case("LoRA weight not a number", with_(prompt="a castle <lora:style:much>"), "prompt",
         "prompt: '<lora:style:much>': 'much' is not a number"),
    Case("LoRA tag in the negative prompt", with_(negative_prompt="blurry <lora:style:1>"), "negative_prompt",
         "negative_prompt: LoRA tags (<lora:…>) are read from the prompt only"),
    Case("more than 4 LoRAs", with_(prompt="".join(f"<lora:l{i}:1>" for i in range(5))), "prompt",
         "prompt: at most 4 LoRAs (<lora:…> tags), got 5"),
    # Sizes.
    Case("H boolean", with_(H=True), "H", "H must be an integer, got true"),
    Case("H float", with_(H=64.0), "H", "H must be an integer, got 64.0"),
    Case("H string", with_(H="64"), "H", 'H must be an integer, got "64"'),
    Case("H a 1 MB string", with_(H="6" * 2**20), "H", 'H must be an integer, got "' + "6" * 39 + "…"),
    Case("H zero", with_(H=0), "H", "H must be between 64 and 2048 pixels, got 0"),
    Case("H negative", with_(H=-64), "H", "H must be between 64 and 2048 pixels, got -64"),
    Case("H not multiple of 8", with_(H=100), "H", "H must be a multiple of 8, got 100"),
    Case("W too large", with_(W=4096), "W", "W must be between 64 and 2048 pixels, got 4096"),
    Case("too many pixels", with_(H=2048, W=2048), "H", "H×W must be at most 1048576 pixels, got 4194304"),
    # Steps, guidance, eta.
    Case("steps zero", with_(ddim_steps=0), "ddim_steps", "ddim_steps must be between 1 and 150, got 0"),
    Case("steps huge", with_(ddim_steps=10**6), "ddim_steps", "ddim_steps must be between 1 and 150, got 1000000"),
    Case("steps float", with_(ddim_steps=50.0), "ddim_steps", "ddim_steps must be an integer, got 50.0"),
    Case("NaN literal", b'{"prompt": "a cat", "scale": NaN}', "scale", "scale must be a finite number, got NaN"),
    Case("Infinity literal", b'{"prompt": "a cat", "scale": Infinity}', "scale",
         "scale must be a finite number, got Infinity"),
    Case("-Infinity literal", b'{"prompt": "a cat", "eta": -Infinity}', "eta",
         "eta must be a finite number, got -Infinity"),
    Case("number beyond float", b'{"prompt": "a cat", "scale": 1e400}', "scale",
         "scale must be a finite number, got Infinity"),
    Case("scale NaN-like string", with_(scale="nan"), "scale", 'scale must be a finite number, got "nan"'),
    Case("integer beyond float", b'{"prompt": "a cat", "eta": 1' + b"0" * 400 + b"}", "eta",
         "eta must be in [0.0, 1.0], got 1" + "0" * 39 + "…"),
    Case("strength beyond float", b'{"prompt": "a cat", "strength": -1' + b"0" * 400 + b"}", "strength",
         "strength must be in (0.0, 1.0], got -1"),
    Case("scale boolean", with_(scale=True), "scale", "scale must be a finite number, got true"),
    Case("scale negative", with_(scale=-1), "scale", "scale must be in [0.0, 50.0], got -1"),
    Case("eta above 1", with_(eta=1.5), "eta", "eta must be in [0.0, 1.0], got 1.5"),
    # How many images, and their seeds.
    Case("n_samples zero", with_(n_samples=0), "n_samples", "n_samples must be between 1 and 8, got 0"),
    Case("n_samples huge", with_(n_samples=10**4), "n_samples", "n_samples must be between 1 and 8, got 10000"),
    Case("n_iter zero", with_(n_iter=0), "n_iter", "n_iter must be between 1 and 8, got 0"),
    Case("too many images", with_(n_samples=4, n_iter=3), "n_iter", "n_samples×n_iter must be at most 8 images"),
    # -1 itself is drawn through /imagine, as A1111 reads it; TorchServe's own API refuses it (test_handler).
    Case("seed negative", with_(seed=-2), "seed", "seed must be between 0 and 4294967295, got -2"),
    Case("seed 2^64", with_(seed=2**64), "seed", "seed must be between 0 and 4294967295, got 18446744073709551616"),
    Case("seed string", with_(seed="42"), "seed", 'seed must be an integer, got "42"'),
    Case("seed float", with_(seed=4.2), "seed", "seed must be an integer, got 4.2"),
    Case("seed boolean", with_(seed=False), "seed", "seed must be an integer, got false"),
    Case("last image's seed past 2^32", with_(n_iter=2, seed=2**32 - 1), "seed",
         "seed must be between 0 and 4294967294, got 4294967295"),
    # The web front allows more images than one TorchServe request: the error must name the seed, not the count.
    Case("seed string with more images than a request takes", with_(n_iter=10, seed="42"), "seed",
         'seed must be an integer, got "42"'),
    Case("unknown sampler", with_(sampler="k_euler"), "sampler",
         "sampler 'k_euler' is not available; choose one of: ddim, plms, euler, euler_a, heun, dpm2, dpm2_a, lms, "
         "dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_a, dpmpp_sde, euler_karras, euler_a_karras, heun_karras, lms_karras, "
         "dpm2_karras, dpm2_a_karras, dpmpp_2m_karras, "
         "dpmpp_2m_sde_karras, dpmpp_2s_a_karras, dpmpp_sde_karras"),
    Case("euler_a with eta", with_(sampler="euler_a", eta=0.5), "eta",
         "eta is DDIM's: it must be 0 with sampler euler_a, got 0.5"),
    Case("plms for img2img", with_(sampler="plms", init_image=png_base64()), "sampler",
         "sampler plms is for txt2img only; img2img runs every other sampler"),
    Case("sampler null", with_(sampler=None), "sampler", "sampler must be a string, got null"),
    # img2img.
    Case("strength zero", with_(strength=0), "strength", "strength must be in (0.0, 1.0], got 0"),
    Case("strength 1.5", with_(strength=1.5), "strength", "strength must be in (0.0, 1.0], got 1.5"),
    Case("strength NaN", b'{"prompt": "a cat", "strength": NaN}', "strength", "strength must be a finite number"),
    Case("strength too small for steps", with_(init_image=png_base64(), strength=0.2), "strength",
         "strength 0.2 × ddim_steps 3 leaves no denoising step"),
    Case("init image not a string", with_(init_image=123), "init_image", "init_image must be a base64 string"),
    Case("init image not base64", with_(init_image="***not base64***"), "init_image", "init_image is not valid base64"),
    Case("init image not an image", with_(init_image=base64.b64encode(b"hello world").decode()), "init_image",
         "init_image is not a PNG, JPEG or WebP image we can read"),
    Case("init image cut in its header", with_(init_image=png_base64()[:24]), "init_image",
         "init_image is not a PNG, JPEG or WebP image we can read"),
    Case("init image cut in its pixels", with_(init_image=truncated_png()), "init_image",
         "init_image is truncated or corrupt"),
    Case("init image with a garbled chunk in its pixels", with_(init_image=png_with_a_broken_chunk()), "init_image",
         "init_image is truncated or corrupt"),
    Case("init image over 10 MB", with_(init_image="A" * (INIT_IMAGE_BYTES * 4 // 3 + 8)), "init_image",
         f"init_image must be at most {INIT_IMAGE_BYTES} bytes"),
    Case("init image GIF", with_(init_image=image_base64(Image.new("RGB", (64, 64)), "GIF")), "init_image",
         "init_image must be PNG, JPEG or WebP, got GIF"),
    Case("init image 25 megapixels", with_(init_image=base64.b64encode(black_png(5000, 5000)).decode()),
         "init_image", "init_image must have at most 16777216 pixels, got 5000x5000"),
    Case("init image decompression bomb", with_(init_image=base64.b64encode(black_png(30000, 30000)).decode()),
         "init_image", "init_image must have at most 16777216 pixels; its header claims over"),
    Case("init image animated",
         with_(init_image=image_base64(Image.new("RGB", (64, 64)), "PNG", save_all=True,
                                       append_images=[Image.new("RGB", (64, 64), "red")])),
         "init_image", "init_image must be a single still image, not an animation"),
    Case("init image CMYK", with_(init_image=image_base64(Image.new("CMYK", (64, 64), (0, 255, 0, 0)), "JPEG")),
         "init_image", "init_image must be RGB, RGBA, 8-bit grayscale or palette, got CMYK: convert it to 8-bit RGB "
         "first"),
    Case("init image 16-bit grayscale",
         with_(init_image=image_base64(Image.fromarray(np.full((64, 64), 40000, np.uint16)), "PNG")),
         "init_image", "init_image must be RGB, RGBA, 8-bit grayscale or palette, got I;16: convert it to 8-bit RGB"),
    # Inpainting.
    Case("mask without init image", with_(mask_image=png_base64()), "mask_image",
         "mask_image needs an init_image: it tells which of its pixels to repaint"),
    Case("mask not base64", with_(init_image=png_base64(), mask_image="***"), "mask_image",
         "mask_image is not valid base64"),
    Case("mask over what the init image leaves",
         with_(init_image=png_base64(), mask_image="A" * (INIT_IMAGE_BYTES * 4 // 3 + 8)), "mask_image",
         f"mask_image must be at most {INIT_IMAGE_BYTES - len(png_base64()) * 3 // 4} bytes (init_image and "
         f"mask_image share {INIT_IMAGE_BYTES})"),
    Case("mask with plms", with_(init_image=png_base64(), mask_image=png_base64(), sampler="plms"), "sampler",
         "sampler plms is for txt2img only"),
    # The answer's form.
    Case("stream not a boolean", with_(stream=1), "stream", "stream must be true or false, got 1"),
    Case("stream a string", with_(stream="true"), "stream", 'stream must be true or false, got "true"'),
    # These two are sent with Accept: image/png (PNG_ONLY).
    Case("png for several images", with_(n_samples=2), "n_samples",
         "Accept: image/png returns one image, but this request makes 2 (n_samples×n_iter)"),
    Case("stream as png", with_(stream=True), "stream",
         "a stream is JSON lines (application/x-ndjson), but Accept asks for image/png"),
]
# fmt: on
# (name, body, field): what the tests that only check the status and the field unpack.
BAD: list[tuple[str, Any, str]] = [case[:3] for case in CASES]
PNG_ONLY = {"png for several images", "stream as png"}
