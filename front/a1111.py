"""AUTOMATIC1111's web API, `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img`, as requests of our inference API.

Why: bots, editor plugins and scripts that make SD v1 images mostly speak A1111's API; pointed at this front they run
unchanged on TorchServe, and get the image A1111 would paint for the same request, since everything translated here
is computed as A1111 computes it.

- Prompts are read in A1111's syntax (`emphasis`), as A1111 always reads them: weights, BREAK, prompt editing, `AND`.
- Translated: prompt, negative_prompt, seed and subseed (-1: drawn), subseed_strength, seed_resize_from_w/h,
  sampler_name (or the older sampler_index; default Euler, as A1111's API) with scheduler Automatic or Karras,
  steps, cfg_scale (default 7), width and height, batch_size, n_iter, eta, tiling; the hires fix (enable_hr,
  hr_scale, hr_upscaler, hr_second_pass_steps, denoising_strength); img2img's init_images (one), denoising_strength,
  mask and mask_blur; override_settings' CLIP_stop_at_last_layers (clip skip). Sampler and upscaler names go to the
  handler as written: it takes A1111's names beside ours.
- Refused with a 400 naming the field, when set to anything but its off value: what would change the image in a way
  not done here (restore_faces, styles, scripts, hr_resize_x/y, a second-pass sampler, prompt or checkpoint, other
  schedulers, resize modes but "just resize", inpainting but of the whole picture from its original pixels
  (`inpainting_fill` 1, `inpaint_full_res` false: A1111's API defaults to others), an inverted mask, several init
  images, any other override setting).
- Ignored, as A1111 ignores what it does not know: everything else (saving files on A1111's disk, its UI's switches).
- Answers: A1111's `{"images", "parameters", "info"}`, `info` a JSON string with the seeds and each image's infotext;
  errors are the front's `{"error", "field"}` with the field named as A1111 names it, and A1111's `detail` beside.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any, Literal

from front.errors import FrontError

Mode = Literal["txt2img", "img2img"]
# A1111's fields that are ours under another name, with A1111's API defaults where they are not ours.
RENAMED = {"steps": "ddim_steps", "cfg_scale": "scale", "width": "W", "height": "H", "batch_size": "n_samples"}
DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "batch_size": 1}
COPIED = ("prompt", "negative_prompt", "n_iter", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w",
          "eta", "tiling")  # fmt: skip
# The field A1111 names for each of ours that a refusal may name.
THEIRS = {ours: theirs for theirs, ours in RENAMED.items()} | {
    "sampler": "sampler_name", "strength": "denoising_strength", "hr_steps": "hr_second_pass_steps",
    "init_image": "init_images", "mask_image": "mask", "clip_skip": "override_settings.CLIP_stop_at_last_layers",
}  # fmt: skip
# Options that change the image in ways not done here: a request may send each only with its off value (or, for
# those that repeat another field, that field's value).
REFUSED = ("restore_faces", "styles", "script_name", "script_args", "alwayson_scripts", "hr_resize_x", "hr_resize_y",
           "hr_checkpoint_name", "hr_sampler_name", "hr_prompt", "hr_negative_prompt", "refiner_checkpoint",
           "resize_mode", "inpainting_mask_invert")  # fmt: skip
REPEATS = {"hr_sampler_name": "sampler_name", "hr_prompt": "prompt", "hr_negative_prompt": "negative_prompt"}
SCHEDULERS = {"Automatic": "", "Karras": " Karras"}
CLIP_SKIP = "CLIP_stop_at_last_layers"


class A1111Error(FrontError):
    """A refusal answered as A1111's clients read one: the front's body with A1111's `detail` beside."""

    def body(self) -> dict[str, str]:
        return {**super().body(), "detail": self.error}


def _refuse(field: str, message: str) -> A1111Error:
    return A1111Error(400, f"{field}: {message}", field)


def translate(body: Any, mode: Mode) -> dict[str, Any]:
    """Our inference request for an A1111 request body."""
    if not isinstance(body, dict):
        raise A1111Error(400, "send the request as a JSON object", "body")
    for name in REFUSED:
        value = body.get(name)
        if value and not (name in REPEATS and value == body.get(REPEATS[name])):
            raise _refuse(name, f"is not available here; send {name} off (or leave it out)")
    given = {**DEFAULTS, **body}
    ours: dict[str, Any] = {"emphasis": True, "sampler": _sampler(body)}
    ours.update({our: given[theirs] for theirs, our in RENAMED.items() if given.get(theirs) is not None})
    ours.update({name: body[name] for name in COPIED if body.get(name) is not None})
    for name in ("seed", "subseed"):
        if body.get(name) not in (None, -1):
            ours[name] = body[name]
    ours.update(_overrides(body.get("override_settings")))
    if mode == "txt2img":
        _hires(body, ours)
    else:
        _img2img(body, ours)
    return ours


def _sampler(body: dict[str, Any]) -> Any:
    """The sampler's A1111 name (Euler by default, as A1111's API), with " Karras" for its Karras scheduler."""
    name = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    scheduler = body.get("scheduler") or "Automatic"
    if scheduler not in SCHEDULERS:
        raise _refuse("scheduler", f"'{scheduler}' is not available; send one of: {', '.join(SCHEDULERS)}")
    suffix = SCHEDULERS[scheduler]
    return name if not isinstance(name, str) or name.endswith(suffix) else name + suffix


def _overrides(settings: Any) -> dict[str, Any]:
    if not settings:
        return {}
    if not isinstance(settings, dict):
        raise _refuse("override_settings", "must be an object of settings")
    for name in settings:
        if name != CLIP_SKIP:
            raise _refuse(f"override_settings.{name}", f"is not available here; only {CLIP_SKIP} is")
    return {"clip_skip": settings[CLIP_SKIP]} if CLIP_SKIP in settings else {}


def _hires(body: dict[str, Any], ours: dict[str, Any]) -> None:
    """The hires fix when enabled (its fields are A1111's second pass's alone, so left out without it)."""
    if not body.get("enable_hr"):
        return
    ours["hr_scale"] = body.get("hr_scale", 2.0)
    ours["hr_upscaler"] = body.get("hr_upscaler") or "Latent"
    if body.get("hr_second_pass_steps"):
        ours["hr_steps"] = body["hr_second_pass_steps"]
    if body.get("denoising_strength") is not None:
        ours["strength"] = body["denoising_strength"]


def _img2img(body: dict[str, Any], ours: dict[str, Any]) -> None:
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise _refuse("init_images", "send a list of one base64 image (several are not available here)")
    ours["init_image"] = images[0]
    ours["strength"] = body.get("denoising_strength", 0.75)
    if body.get("mask") is None:
        return
    ours["mask_image"] = body["mask"]
    if body.get("mask_blur") is not None:
        ours["mask_blur"] = body["mask_blur"]
    # A1111's API defaults to filling the masked area and to painting a crop around it; this paints the whole
    # picture from its original pixels, which a request must ask for.
    if body.get("inpainting_fill", 0) != 1:
        raise _refuse("inpainting_fill", "only 1 (original) is available here; send 1")
    if body.get("inpaint_full_res", True):
        raise _refuse("inpaint_full_res", "only the whole picture is available here; send false")


def renamed(error: FrontError) -> A1111Error:
    """TorchServe's refusal of a translated request, naming the field as the A1111 request did."""
    field = THEIRS.get(error.field, error.field)
    message = error.error
    if field != error.field and message.startswith(error.field):
        message = field + message[len(error.field) :]
    return A1111Error(error.status, message, field)


def answer(body: dict[str, Any], ours: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A1111's answer: the images (unless `send_images` is false), the request as sent (without its images, as
    A1111 leaves them out) and `info`, a JSON string of what A1111's clients read from it."""
    images = result["images"]
    seeds = result["seeds"]
    subseeds = result.get("subseeds", [-1] * len(seeds))
    infotexts = [png_parameters(image) for image in images]
    parameters = result.get("parameters", {})
    info = {
        "prompt": ours.get("prompt", ""),
        "all_prompts": [ours.get("prompt", "")] * len(seeds),
        "negative_prompt": ours.get("negative_prompt", ""),
        "all_negative_prompts": [ours.get("negative_prompt", "")] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": ours.get("subseed_strength", 0),
        "width": parameters.get("W"),
        "height": parameters.get("H"),
        "sampler_name": ours["sampler"],
        "cfg_scale": parameters.get("scale"),
        "steps": parameters.get("ddim_steps"),
        "batch_size": parameters.get("n_samples"),
        "clip_skip": parameters.get("clip_skip"),
        "seed_resize_from_w": ours.get("seed_resize_from_w", -1),
        "seed_resize_from_h": ours.get("seed_resize_from_h", -1),
        "denoising_strength": parameters.get("strength"),
        "restore_faces": False,
        "styles": [],
        "index_of_first_image": 0,
        "infotexts": infotexts,
    }
    echoed = {**body, "init_images": None, "mask": None} if "init_images" in body else body
    sent = images if body.get("send_images", True) else []
    return {"images": sent, "parameters": echoed, "info": json.dumps(info)}


def png_parameters(image: str) -> str:
    """The `parameters` text of a base64 PNG (A1111's infotext: its tEXt or UTF-8 iTXt chunk), or "" without one."""
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        return ""
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind, content = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        key, _, value = content.partition(b"\0")
        if key == b"parameters" and kind == b"tEXt":
            return value.decode("latin-1")
        if key == b"parameters" and kind == b"iTXt":
            compressed, _, rest = value[0:1], value[1:2], value[2:]
            text = rest.split(b"\0", 2)[-1]
            return (zlib.decompress(text) if compressed == b"\1" else text).decode("utf-8")
        position += 12 + length
    return ""
