"""Request JSON → a validated `GenerationRequest`, or a `RequestError` naming the field and the rule it breaks.

Strict on purpose: an unknown field is an error (a typo such as `ddim_step` must not silently fall back to a
default), a boolean is not a number, NaN and infinities are not numbers, a float is not an integer.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

from PIL import Image

from handler.errors import RequestError
from handler.images import decode_images
from handler.settings import HandlerSettings, Limits, SettingsError
from ldm import emphasis, hires
from ldm.config import CLIP_VIT_L14_TEXT
from ldm.embeddings import Vocabulary
from ldm.generation_request import (
    INPAINT_AREAS,
    MASKED_CONTENTS,
    MAX_SEED,
    SAMPLERS,
    TEXT_FIELDS,
    GenerationError,
    GenerationRequest,
)
from ldm.init_images import RESIZE_MODES
from ldm.inpainting import MAX_MASK_BLUR
from ldm.model import StableDiffusion
from ldm.only_masked import MAX_PADDING
from ldm.request_checks import (
    check_clip_skip,
    check_emphasis,
    check_hires,
    check_mask,
    check_resize_mode,
    check_sampler,
    check_seed_resize,
)
from ldm.request_texts import named_texts, read_texts, request_loras, text_parts
from ldm.tokenizer import CLIPTokenizer

FIELDS = (
    "prompt",
    "negative_prompt",
    "H",
    "W",
    "ddim_steps",
    "scale",
    "eta",
    "seed",
    "n_samples",
    "n_iter",
    "sampler",
    "init_image",
    "mask_image",
    "mask_blur",
    "invert_mask",
    "masked_content",
    "inpaint_area",
    "masked_area_padding",
    "strength",
    "resize_mode",
    "stream",
    "weighted_subprompts",
    "emphasis",
    "clip_skip",
    "hr_scale",
    "hr_upscaler",
    "hr_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_sampler",
    "subseed",
    "subseed_strength",
    "seed_resize_from_h",
    "seed_resize_from_w",
    "tiling",
)
NDJSON = "application/x-ndjson"
# SD v1's CLIP (ViT-L/14) has 12 layers: clip skip reads one of them (the loaded model's may have fewer).
MAX_CLIP_SKIP: int = CLIP_VIT_L14_TEXT["num_hidden_layers"]
# How much of a wrong value an error message quotes.
SHOWN_CHARS = 40
# What a text field must not hold, and how to say so. C0 control characters other than tab, newline and carriage
# return, and DEL, are never part of a prompt. A lone UTF-16 surrogate (a JSON escape such as \ud800 with no
# partner) is not Unicode at all: it cannot be encoded into the image's PNG metadata.
_FORBIDDEN_TEXT = (
    (re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"), "control characters other than tab and line breaks"),
    (re.compile(r"[\ud800-\udfff]"), "unpaired UTF-16 surrogates (not valid Unicode)"),
)


@dataclass(frozen=True)
class ApiRequest:
    """A validated request and how its answer is wanted: one PNG, JSON, or streamed progress then JSON (ndjson)."""

    generation: GenerationRequest
    want_png: bool
    stream: bool


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise RequestError(duplicates[0], f"field '{duplicates[0]}' is given more than once")
    return dict(pairs)


def request_body(row: Any) -> Any:
    """The body of one TorchServe request row: `body` (or `data`) holds it unless the client sent a form."""
    if isinstance(row, dict) and ("body" in row or "data" in row):
        return row.get("body", row.get("data"))
    raise RequestError("body", "send the request as a JSON object with Content-Type: application/json", 415)


def parse_body(data: Any) -> dict[str, Any]:
    """The JSON object of a request body, whether TorchServe already decoded it or passed text or raw bytes."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError("body", f"the body is not valid UTF-8 (byte {error.start})") from None
        if not text.strip():
            raise RequestError("body", 'the body is empty; send a JSON object such as {"prompt": "a cat"}')
        try:
            # NaN and ±Infinity parse (as Python does) so that the field's own check can name the field.
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise RequestError("body", f"the body is not valid JSON: {error.msg} at position {error.pos}") from None
        except RequestError:
            raise
        except RecursionError:
            raise RequestError("body", "the body nests arrays or objects too deeply to read") from None
        except ValueError:
            # Python reads integers of at most sys.get_int_max_str_digits() digits: more is a denial of service.
            limit = sys.get_int_max_str_digits()
            raise RequestError("body", f"the body holds an integer of more than {limit} digits") from None
    if not isinstance(data, dict):
        raise RequestError("body", f"the body must be a JSON object, not {type(data).__name__}")
    return data


def shown(value: Any) -> str:
    """A request's value as an error message quotes it: JSON, cut after SHOWN_CHARS characters, and an array or
    object by its kind alone. Why: the answer must not echo megabytes (a 10 MB string where a number belongs), and a
    value nested almost as deep as the parser allows cannot be written back out (json.dumps runs out of stack)."""
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = json.dumps(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


def _integer(data: dict[str, Any], name: str, default: int, low: int, high: int, unit: str = "") -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"{name} must be an integer, got {shown(value)}")
    if not low <= value <= high:
        raise RequestError(name, f"{name} must be between {low} and {high}{unit}, got {shown(value)}")
    return value


def _number(data: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = data.get(name, default)
    # An integer is finite however long it is (math.isfinite would overflow converting one of 400 digits).
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not finite:
        raise RequestError(name, f"{name} must be a finite number, got {shown(value)}")
    if value > high or value < low or (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(name, f"{name} must be in {interval}, got {shown(value)}")
    return float(value)


def _boolean(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(name, f"{name} must be true or false, got {shown(value)}")
    return value


def _text(data: dict[str, Any], name: str, default: str | None, max_chars: int) -> str:
    if name not in data and default is None:
        raise RequestError(name, f"{name} is required")
    value = data.get(name, default)
    if not isinstance(value, str):
        raise RequestError(name, f"{name} must be a string, got {shown(value)}")
    if len(value) > max_chars:
        raise RequestError(name, f"{name} must be at most {max_chars} characters, got {len(value)}")
    for pattern, what in _FORBIDDEN_TEXT:
        found = pattern.search(value)
        if found:
            code = f"U+{ord(found.group()):04X}"
            raise RequestError(name, f"{name} must not contain {what}; found {code} at position {found.start()}")
    return value


def _syntax(body: dict[str, Any], settings: HandlerSettings) -> dict[str, bool]:
    """`weighted_subprompts` and `emphasis`, which exclude each other: one a request turns on sets the server's
    default for the other aside; both turned on by the request is an error (`check_emphasis`)."""
    d = settings.defaults
    chosen = {name: _boolean(body, name, getattr(d, name)) for name in ("weighted_subprompts", "emphasis")}
    for name, other in (("weighted_subprompts", "emphasis"), ("emphasis", "weighted_subprompts")):
        if body.get(name) is True and other not in body:
            chosen[other] = False
    return chosen


def check_chunks(
    generation: GenerationRequest, tokenizer: CLIPTokenizer, settings: HandlerSettings, vocabulary: Vocabulary
) -> None:
    """With emphasis, each 75 positions of a text are one more text-encoder row and 77 more tokens that every UNet
    step attends to: `max_prompt_chunks` bounds them in every text its prompt editing reads, in every pass (counted
    with the model's tokenizer and the embeddings the text names, each a position per vector, so this is the
    handler's)."""
    if not generation.emphasis:
        return
    limit = settings.limits.max_prompt_chunks
    for field in TEXT_FIELDS:
        for name, text in named_texts(generation, field):
            count = len(emphasis.chunks(tokenizer, text, vocabulary))
            if count > limit:
                raise RequestError(name, f"{name}: at most {limit} chunks of 75 tokens with emphasis, got {count}")


def _our_name(name: str, names: dict[str, str]) -> str:
    """A sampler or upscaler by our name or by A1111's (`Euler a`, `Latent (bicubic)`), which its clients send."""
    return next((ours for ours, theirs in names.items() if theirs == name), name)


def _seed_resize(body: dict[str, Any], settings: HandlerSettings) -> dict[str, int]:
    """A1111's "Resize seed from" sides, within the sides of an image (`min_side` to `max_side`: noise a latent row
    or two tall has no direction for a variation seed's interpolation to turn); its API's -1 means none, as 0 does."""
    limits, sides = settings.limits, {}
    for name in ("seed_resize_from_h", "seed_resize_from_w"):
        side = _integer(body, name, 0, -1, limits.max_side, " pixels")
        if 0 < side < limits.min_side:
            raise RequestError(name, f"{name} must be 0 (none) or at least {limits.min_side} pixels, got {side}")
        sides[name] = max(0, side)
    return sides


def _check_hires_size(generation: GenerationRequest, settings: HandlerSettings, factor: int) -> None:
    """The hires fix's images must fit the limits that H and W do: they are what the UNet and the VAE run at, and
    so is the upscaled image that an image upscaler's VAE encodes before a "Hires resize" cuts it (a latent
    upscaler's upscaled latent, before the cut, is small)."""
    limits, plan, field = settings.limits, generation.hires_plan(factor), generation.hires_field
    asked = f"{field} {getattr(generation, field):g}"
    height, width = plan.size
    encoded_whole = plan.upscaled != plan.size and not hires.is_latent(generation.hr_upscaler)
    big_h, big_w = plan.upscaled if encoded_whole else plan.size
    made = f"makes {width}x{height} images"
    if encoded_whole:
        made = f"upscales the images to {big_w}x{big_h} to cut them to {width}x{height}"
    if max(big_h, big_w) > limits.max_side:
        raise RequestError(field, f"{asked} {made}; each side at most {limits.max_side} pixels")
    if big_h * big_w > limits.max_pixels:
        raise RequestError(field, f"{asked} {made}, {big_h * big_w} pixels; at most {limits.max_pixels}")
    if min(height, width) < limits.min_side:
        raise RequestError(field, f"{asked} makes {width}x{height} images; each side at least {limits.min_side} pixels")


def fitted_size(width: int, height: int, limits: Limits, factor: int) -> dict[str, int]:
    """H and W for an init image of `width`×`height` where the request leaves them out: its own size rounded down to
    the VAE's `factor` (the original's), or, for an image beyond the limits, scaled down to fit them (or up to the
    least side) keeping its shape, as the page sizes one; each side clamped on its own would stretch a panorama, and
    a phone's photo would be refused for a size its client never sent."""
    scale = min(1.0, math.sqrt(limits.max_pixels / (width * height)), limits.max_side / max(width, height))
    lift = max(1.0, limits.min_side / (min(width, height) * scale))

    def side(length: int) -> int:
        return min(limits.max_side, max(limits.min_side, math.floor(length * scale * lift / factor) * factor))

    return {"H": side(height), "W": side(width)}


def _check_only_masked_size(generation: GenerationRequest, settings: HandlerSettings) -> None:
    """An only-masked inpainting answers at its init image's size (its box is painted at H×W): its images may hold
    as many pixels as the most images at the largest size do, what the response limits are sized for."""
    assert generation.init_image is not None, "only_masked needs a mask, and a mask an init image"
    limits, (width, height) = settings.limits, generation.init_image.size
    budget = limits.max_images * limits.max_pixels
    if generation.n_images * width * height > budget:
        raise RequestError(
            "init_image",
            f"init_image is {width}x{height}, and inpaint_area only_masked answers at its size: n_samples×n_iter of "
            f"it must be at most {budget} pixels, got {generation.n_images * width * height}; send a smaller image "
            "or fewer images",
        )


def parse_request(
    data: Any, settings: HandlerSettings, accept: str | None = None, factor: int = 8, num_timesteps: int = 1000
) -> ApiRequest:
    """Validate one request body against the settings' defaults and limits, for a model whose VAE downsamples by
    `factor` and that was trained on `num_timesteps` (SD v1's by default)."""
    body = parse_body(data)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field '{unknown[0]}'; known fields: {', '.join(FIELDS)}")
    d, limits = settings.defaults, settings.limits
    init_image, mask_image = decode_images(body, settings)
    defaults = {"H": d.H, "W": d.W} if init_image is None else fitted_size(*init_image.size, limits, factor)
    sizes = {}
    for name, default in defaults.items():
        sizes[name] = _integer(body, name, default, limits.min_side, limits.max_side, " pixels")
        if sizes[name] % factor:
            raise RequestError(name, f"{name} must be a multiple of {factor}, got {sizes[name]}")
    if sizes["H"] * sizes["W"] > limits.max_pixels:
        field = "H" if "H" in body else "W"
        raise RequestError(field, f"H×W must be at most {limits.max_pixels} pixels, got {sizes['H'] * sizes['W']}")
    steps = _integer(body, "ddim_steps", d.ddim_steps, 1, limits.max_steps)
    # The seeds before the counts: the web front forwards whole a request whose seeds it cannot split on (one that is
    # not an integer, a variation strength that is not a number), and then the error must name that field, not an
    # n_iter the front allows and this does not.
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(body, "seed", 0, 0, MAX_SEED)
    subseed = body.get("subseed")
    if subseed is not None:
        subseed = _integer(body, "subseed", 0, 0, MAX_SEED)
    subseed_strength = _number(body, "subseed_strength", 0.0, 0.0, 1.0)
    n_samples = _integer(body, "n_samples", d.n_samples, 1, limits.max_images)
    n_iter = _integer(body, "n_iter", d.n_iter, 1, limits.max_images)
    total = n_samples * n_iter
    if total > limits.max_images:
        field = "n_iter" if "n_iter" in body else "n_samples"
        raise RequestError(field, f"n_samples×n_iter must be at most {limits.max_images} images, got {total}")
    # Image i has seed + i, or with variation seeds subseed + i: the last one must be 32-bit too.
    counted, first = ("subseed", subseed) if subseed_strength != 0 else ("seed", seed)
    if first is not None and first > MAX_SEED - total + 1:
        raise RequestError(counted, f"{counted} must be between 0 and {MAX_SEED - total + 1}, got {first}")
    hr_scale = _number(body, "hr_scale", 1.0, 1.0, hires.MAX_SCALE)
    resize_x, resize_y = (_integer(body, f"hr_resize_{axis}", 0, 0, limits.max_side, " pixels") for axis in "xy")
    second_pass = hr_scale != 1 or bool(resize_x or resize_y)
    # PLMS runs txt2img alone (and the hires fix's second pass is an img2img, unless it has a sampler of its own): a
    # configured default of plms is plain txt2img's.
    img2img = init_image is not None or (second_pass and not body.get("hr_sampler"))
    sampler = _our_name(_text(body, "sampler", "ddim" if img2img and d.sampler == "plms" else d.sampler, 32), SAMPLERS)
    strength = _number(body, "strength", d.strength, 0.0, 1.0, low_open=True)
    hr_sampler = _our_name(_text(body, "hr_sampler", "", 32), SAMPLERS)
    generation = GenerationRequest(
        prompt=_text(body, "prompt", None, limits.max_prompt_chars),
        negative_prompt=_text(body, "negative_prompt", "", limits.max_prompt_chars),
        height=sizes["H"],
        width=sizes["W"],
        steps=steps,
        scale=_number(body, "scale", d.scale, 0.0, limits.max_scale),
        # η is DDIM's alone: a configured default η is not the other samplers', in either pass.
        eta=_number(body, "eta", d.eta if {sampler, hr_sampler or sampler} == {"ddim"} else 0.0, 0.0, limits.max_eta),
        seed=seed,
        n_samples=n_samples,
        n_iter=n_iter,
        sampler=sampler,
        init_image=init_image,
        strength=strength,
        resize_mode=_our_name(_text(body, "resize_mode", GenerationRequest.resize_mode, 32), RESIZE_MODES),
        mask_image=mask_image,
        mask_blur=_integer(body, "mask_blur", d.mask_blur, 0, MAX_MASK_BLUR, " pixels"),
        invert_mask=_boolean(body, "invert_mask", False),
        # GenerationRequest's defaults: the original pixels, the whole picture, A1111's UI's padding.
        masked_content=_our_name(_text(body, "masked_content", GenerationRequest.masked_content, 32), MASKED_CONTENTS),
        inpaint_area=_our_name(_text(body, "inpaint_area", GenerationRequest.inpaint_area, 32), INPAINT_AREAS),
        masked_area_padding=_integer(
            body, "masked_area_padding", GenerationRequest.masked_area_padding, 0, MAX_PADDING, " pixels"
        ),
        clip_skip=_integer(body, "clip_skip", d.clip_skip, 1, MAX_CLIP_SKIP),
        hr_scale=hr_scale,
        hr_upscaler=_our_name(_text(body, "hr_upscaler", d.hr_upscaler, 32), hires.UPSCALERS),
        hr_steps=_integer(body, "hr_steps", d.hr_steps, 0, limits.max_steps),
        hr_resize_x=resize_x,
        hr_resize_y=resize_y,
        hr_prompt=_text(body, "hr_prompt", "", limits.max_prompt_chars),
        hr_negative_prompt=_text(body, "hr_negative_prompt", "", limits.max_prompt_chars),
        hr_sampler=hr_sampler,
        subseed=subseed,
        subseed_strength=subseed_strength,
        **_seed_resize(body, settings),
        tiling=_boolean(body, "tiling", False),
        **_syntax(body, settings),
    )
    try:
        loras = len(request_loras(generation))
    except GenerationError as error:
        raise RequestError(error.field, str(error)) from None
    if loras > limits.max_loras:
        raise RequestError("prompt", f"prompt: at most {limits.max_loras} LoRAs (<lora:…> tags), got {loras}")
    # The sub-prompts are counted before their texts are parsed: a prompt of too many is refused for that, not for
    # the number of texts they read together. Both syntaxes at once are check_emphasis's error.
    both_syntaxes = generation.emphasis and generation.weighted_subprompts
    for name, run, field in read_texts(generation) if not both_syntaxes else ():
        try:
            count = len(text_parts(run, field, name))
        except GenerationError as error:
            raise RequestError(error.field, str(error)) from None
        kind, limit = "weighted sub-prompts", limits.max_subprompts
        if generation.emphasis:
            kind, limit = "sub-prompts joined by AND", limits.max_and_subprompts
        if count > limit:
            raise RequestError(name, f"{name}: at most {limit} {kind}, got {count}")
    try:
        check_emphasis(generation)
        check_seed_resize(generation, factor)
        check_mask(generation)
        check_resize_mode(generation)
        check_hires(generation, num_timesteps, factor)
    except GenerationError as error:
        raise RequestError(error.field, str(error)) from None
    if generation.hires:
        _check_hires_size(generation, settings, factor)
    if generation.inpaint_area == "only_masked":
        _check_only_masked_size(generation, settings)
    try:
        check_sampler(generation)
    except GenerationError as error:
        # A rule broken by the server's default sampler, which this client never named: say so.
        default = "" if "sampler" in body else f' ({sampler} is this server\'s default sampler; send "sampler": "ddim")'
        raise RequestError(error.field, f"{error}{default}") from None
    if generation.denoising_steps < 1:
        raise RequestError(
            "strength", f"strength {strength} × ddim_steps {steps} leaves no denoising step; raise strength or steps"
        )
    accepted = (accept or "").lower()
    stream = _boolean(body, "stream", False) or NDJSON in accepted
    want_png = "image/png" in accepted and "application/json" not in accepted and NDJSON not in accepted
    if stream and want_png:
        raise RequestError(
            "stream", f"a stream is JSON lines ({NDJSON}), but Accept asks for image/png; drop one of the two"
        )
    if want_png and generation.n_images > 1:
        field = "n_iter" if n_iter > 1 else "n_samples"
        raise RequestError(
            field,
            f"Accept: image/png returns one image, but this request makes {generation.n_images} (n_samples×n_iter); "
            "ask for JSON (Accept: application/json) to get them all",
        )
    return ApiRequest(generation, want_png, stream)


def check_defaults(settings: HandlerSettings, model: StableDiffusion) -> None:
    """The defaults as requests that send none of the fields get them, through every check such a request meets: a
    txt2img request, one that names DDIM (the only sampler the default η is used with) and an img2img request of the
    default size (the only kind the default strength is used by). Why: a default that breaks a limit (H above
    max_side, ddim_steps above max_steps, n_samples×n_iter above max_images, η above max_eta, a strength that leaves
    no step) or that the loaded model cannot honour (clip_skip past its CLIP's layers) would have every request that
    leaves the field out refused, for a field its client never sent: the worker refuses to start instead, before any
    warm-up."""
    factor, timesteps = model.config.vae.downsampling_factor, model.config.timesteps

    def probe(fields: dict[str, Any]) -> None:
        parsed = parse_request({"prompt": "", **fields}, settings, None, factor, timesteps)
        check_clip_skip(parsed.generation, model.text_encoder.layers)

    try:
        probe({})
        probe({"sampler": "ddim"})
        # Made once the default size has passed the limits above: an image of any size it names could be huge.
        blank = io.BytesIO()
        Image.new("RGB", (settings.defaults.W, settings.defaults.H)).save(blank, format="PNG")
        probe({"init_image": base64.b64encode(blank.getvalue()).decode("ascii")})
    except (RequestError, GenerationError) as error:
        raise SettingsError(
            f"model-config.yaml handler.defaults.{error.field}: a request that leaves {error.field} out would be "
            f"refused: {error}"
        ) from None
