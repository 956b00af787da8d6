"""AUTOMATIC1111's web API, `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img`, as requests of our inference API.

Why: bots, editor plugins and scripts that make SD v1 images mostly speak A1111's API; pointed at this front they run
unchanged on TorchServe. Each request field translated here means what it means in A1111 (1.6, and 1.9's
`scheduler`), with A1111's API defaults rather than this server's, so a txt2img request paints the image of an
A1111 that draws its noise on the CPU, as this server does (its "Random number generator source" setting), but for
DDIM and PLMS, which run the original's timesteps here (tests/fixtures/GENERATION.md) where A1111 1.6 and later
run their own, and for DPM++ SDE and DPM++ 2M SDE (and their Karras forms), whose step noise A1111 draws from a
Brownian tree (torchsde's) where they draw each image's generator here (ldm/k_samplers.py). An img2img request
runs this server's img2img (the original's schedule of ⌊strength·steps⌋ steps, and its inpainting), which is not
A1111's: the same request paints another image there.

- Prompts are read in A1111's syntax (`emphasis`), as A1111 always reads them: weights, BREAK, prompt editing, `AND`.
- Values are converted as A1111's API (pydantic 1) converts them (`coerced`): "42" and 42.9 are the integer 42.
- Sampler and upscaler names go to the handler as A1111 writes them (it takes them beside ours); `scheduler` Karras
  picks a sampler's Karras variant, and 1.9's Automatic (or an empty name) the variant 1.9 picks for it; DDIM and
  PLMS run their own timesteps whatever it says. The hires fix's own sampler
  (`hr_sampler_name`) takes its own `hr_scheduler` the same way, or the request's ("Use same scheduler"); its own
  prompts go as sent.
- η: DDIM's (A1111's default 0); the ancestral and SDE samplers run at A1111's default η of 1 and take no other; the
  other samplers have none, so any value does nothing, as in A1111.
- Refused with a 400 naming the field, when set to anything but its off value: what would change the image in a way
  not done here (face restoration, styles, scripts, the samplers' churn and noise settings, the hires fix's own
  checkpoint, the resize mode of a latent upscale, several init images, extensions sent turned on,
  override settings but clip skip and those that change nothing here: the served model, an option at its value,
  saving files).
- Inpainting runs A1111's masked contents (`inpainting_fill`: fill by default) and inpaint areas (`inpaint_full_res`:
  "only masked" by default, with its padding), ldm/inpainting.py's and ldm/only_masked.py's.
- Ignored, as A1111 ignores keys it does not know: everything else (saving files on A1111's disk, its UI's switches).
- Answers: A1111's `{"images", "parameters", "info"}`, `info` a JSON string with the seeds and each image's infotext;
  errors are the front's `{"error", "field"}` naming fields as A1111 names them, with A1111's `detail` beside.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from typing import Any, Literal

from front.a1111_options import (
    CLIP_SKIP,
    A1111Error,
    Served,
    check_option,
    refuse,
)
from front.errors import FrontError, shown
from front.png_info import INFOTEXT, parse_infotext, png_texts

Mode = Literal["txt2img", "img2img"]
# Where A1111's API is served.
PREFIX = "/sdapi/v1/"
# A1111's fields that are ours under another name, and A1111's API defaults where they are not this server's.
RENAMED = {"steps": "ddim_steps", "cfg_scale": "scale", "width": "W", "height": "H", "batch_size": "n_samples"}
COPIED = ("prompt", "negative_prompt", "n_iter", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w")
# A1111's typed request fields, which its API (pydantic 1) reads from any JSON value Python converts: an integer
# from "42" or 42.9 (truncated), a number from "7.5", a flag from "false", "no", "off", "0", 0 (and their opposites).
INTEGERS = ("steps", "width", "height", "batch_size", "n_iter", "seed", "subseed", "seed_resize_from_h",
            "seed_resize_from_w", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "mask_blur", "mask_blur_x",
            "mask_blur_y", "inpainting_fill", "inpaint_full_res_padding", "inpainting_mask_invert", "resize_mode",
            "firstphase_width", "firstphase_height")  # fmt: skip
NUMBERS = ("cfg_scale", "denoising_strength", "subseed_strength", "eta", "hr_scale", "s_churn", "s_tmax", "s_tmin",
           "s_noise", "s_min_uncond", "initial_noise_multiplier", "image_cfg_scale")  # fmt: skip
FLAGS = ("restore_faces", "tiling", "enable_hr", "inpaint_full_res", "send_images", "save_images",
         "include_init_images", "do_not_save_samples", "do_not_save_grid", "disable_extra_networks")  # fmt: skip
TRUE, FALSE = ("1", "on", "t", "true", "y", "yes"), ("0", "off", "f", "false", "n", "no")
DEFAULTS = {"prompt": "", "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "batch_size": 1, "n_iter": 1}
# The field A1111 names for each of ours that a refusal may name.
THEIRS = {ours: theirs for theirs, ours in RENAMED.items()} | {
    "sampler": "sampler_name", "strength": "denoising_strength", "hr_steps": "hr_second_pass_steps",
    "init_image": "init_images", "mask_image": "mask", "clip_skip": f"override_settings.{CLIP_SKIP}",
    "hr_sampler": "hr_sampler_name", "masked_content": "inpainting_fill", "inpaint_area": "inpaint_full_res",
    "invert_mask": "inpainting_mask_invert",
    "masked_area_padding": "inpaint_full_res_padding",
}  # fmt: skip
# Inpainting's masked content, ours, by A1111's number for it (`inpainting_fill`); img2img's resize modes
# (`resize_mode`, its fourth, a latent upscale, not done here). Ours are ldm's names, in A1111's order (the front's
# image has no ldm; tests/test_front_a1111.py ties them).
MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
# Options that change the image in ways not done here, with the values that leave it alone (None: left out).
OFF: dict[str, tuple[Any, ...]] = {
    "restore_faces": (None, False), "styles": (None, []), "script_name": (None, ""), "script_args": (None, []),
    "s_churn": (None, 0), "s_tmin": (None, 0), "s_noise": (None, 1),
    "s_min_uncond": (None, 0), "initial_noise_multiplier": (None, 1), "disable_extra_networks": (None, False),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"), "refiner_checkpoint": (None, ""),
    "firstpass_image": (None, ""), "infotext": (None, ""),
    "firstphase_width": (None, 0), "firstphase_height": (None, 0),
}  # fmt: skip
# The hires fix's second pass's own prompts and sampler (ours), each with the first pass's field it repeats when
# A1111's is empty, "Use same sampler" or left out.
HIRES_OWN = {"hr_prompt": "prompt", "hr_negative_prompt": "negative_prompt", "hr_sampler": "sampler"}
SAME_SAMPLER, SAME_SCHEDULER = "Use same sampler", "Use same scheduler"
# A1111's samplers that take η (the ancestral and SDE ones: 1 by default); the others have none.
ETA_SAMPLERS = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE")
# 1.9's schedulers done here, as its `GET /sdapi/v1/schedulers` lists them; a request names one by name or label.
SCHEDULER_ITEMS = (
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1, "need_inner_model": True},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
)
SCHEDULERS = tuple(item["name"] for item in SCHEDULER_ITEMS)
# Samplers that run their own timesteps, whatever the scheduler (A1111's CompVis samplers do not read it).
OWN_TIMESTEPS = ("DDIM", "PLMS")
# 1.9's Automatic scheduler: Karras for these samplers, the exponential one (not available here) for DPM++ 2M SDE.
AUTOMATIC_KARRAS = ("DPM++ 2M", "DPM++ SDE", "DPM++ 2S a", "DPM2", "DPM2 a")
# A1111's "None" hires upscaler resizes the image with Lanczos, as ours does (at once, where ours takes A1111's
# Lanczos upscaler's three resizes to a size that is no multiple of 8).
UPSCALER_ALIASES = {"None": "Lanczos"}


def _sent(body: dict[str, Any], name: str, default: Any) -> Any:
    """A field as A1111's API reads it: its default where left out or null."""
    return default if body.get(name) is None else body[name]


def read(raw: bytes) -> dict[str, Any]:
    """The request body, a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise refuse("body", "is not JSON this front can read") from None
    if not isinstance(body, dict):
        raise refuse("body", "send the request as a JSON object")
    return body


def encoded(ours: dict[str, Any]) -> bytes:
    """The translated request as TorchServe's body (a prompt nested past what JSON can write is the client's)."""
    try:
        return json.dumps(ours).encode()
    except (ValueError, RecursionError):
        raise refuse("body", "is nested too deep") from None


def translate(raw: dict[str, Any], mode: Mode, served: Served | None = None) -> dict[str, Any]:
    """Our inference request for an A1111 request body; `served`: what `override_settings` may name (needed when
    `needs_options` says so)."""
    body = coerced(raw)
    for name, off in OFF.items():
        if not any(body.get(name) == value for value in off):
            raise refuse(name, "is not available here; leave it out")
    _scripts_off(body.get("alwayson_scripts"))
    given = {**DEFAULTS, **{name: value for name, value in body.items() if value is not None}}
    sampler = _sampler(body)
    ours: dict[str, Any] = {"emphasis": True, "sampler": sampler, "clip_skip": 1}
    ours.update({our: given[theirs] for theirs, our in RENAMED.items()})
    for side in ("W", "H"):  # A1111 paints (side // 8) · 8 pixels: its latent's (below 8, the handler names the side)
        if isinstance(ours[side], int) and ours[side] >= 8:
            ours[side] -= ours[side] % 8
    ours.update({name: given[name] for name in COPIED if name in given})
    for name in ("seed", "subseed"):  # -1 too: the plan (front/imagine.py) draws it
        if body.get(name) is not None:
            ours[name] = body[name]
    if body.get("tiling"):
        ours["tiling"] = True
    ours.update(_overrides(body.get("override_settings"), served))
    if mode == "txt2img":
        _hires(body, ours)
    else:
        _img2img(body, ours)
    ours.update(_eta(body.get("eta"), [sampler, *([ours["hr_sampler"]] if "hr_sampler" in ours else [])]))
    return ours


def coerced(body: dict[str, Any]) -> dict[str, Any]:
    """The body with A1111's typed fields converted as its API converts them (`INTEGERS`, `NUMBERS`, `FLAGS`); a
    value that does not convert is refused, naming its field."""
    converted = dict(body)
    for names, convert, what in ((INTEGERS, int, "an integer"), (NUMBERS, float, "a number"),
                                 (FLAGS, _flag, "true or false")):  # fmt: skip
        for name in names:
            value = body.get(name)
            if value is None or (convert is int and type(value) is int):
                continue
            try:
                if isinstance(value, (dict, list)):
                    raise TypeError(name)
                converted[name] = convert(value)
            except (TypeError, ValueError, OverflowError):
                raise refuse(name, f"must be {what}, got {shown(value)}") from None
    return converted


def _flag(value: Any) -> bool:
    """A boolean as pydantic 1 reads one."""
    if isinstance(value, bool):
        return value
    word = value.lower() if isinstance(value, str) else value
    if word in TRUE or word == 1:
        return True
    if word in FALSE or word == 0:
        return False
    raise ValueError(value)


def _scripts_off(scripts: Any) -> None:
    """A1111's `alwayson_scripts` may name extensions left off (as clients send every one they know): each with no
    arguments, its first argument false (ADetailer's "enable"), or units all disabled (ControlNet's)."""
    if scripts in (None, {}):
        return
    if not isinstance(scripts, dict):
        raise refuse("alwayson_scripts", "must be an object of scripts")
    for name, script in scripts.items():
        args = script.get("args") if isinstance(script, dict) else None
        off = isinstance(args, list) and (
            not args or args[0] is False or all(isinstance(arg, dict) and arg.get("enabled") is False for arg in args)
        )
        if not off:
            raise refuse(f"alwayson_scripts.{name}", "is not available here; leave it out or turn it off")


def _sampler(body: dict[str, Any], name: Any = None, field: str = "scheduler") -> Any:
    """The sampler's A1111 name (Euler by default, as A1111's API), or `name` (the hires fix's), with the scheduler
    `field` names (the request's, or 1.9's `hr_scheduler`): Karras is the name's Karras variant; 1.9's Automatic is
    Karras where 1.9 makes it so; Uniform, or no scheduler (1.6), the name itself."""
    name = name or body.get("sampler_name") or body.get("sampler_index") or "Euler"
    scheduler = body.get(field)
    if scheduler is None or not isinstance(name, str):
        return name
    if scheduler == "":  # A1111's default
        scheduler = "automatic"
    if not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULERS:
        raise refuse(field, f"{shown(scheduler)} is not available; send Automatic, Uniform or Karras")
    base = name.removesuffix(" Karras")
    if base in OWN_TIMESTEPS:
        return base
    if scheduler.lower() == "automatic" and base == "DPM++ 2M SDE":
        raise refuse(field, "Automatic is the exponential schedule for DPM++ 2M SDE, not available here")
    karras = scheduler.lower() == "karras" or (scheduler.lower() == "automatic" and base in AUTOMATIC_KARRAS)
    return base + " Karras" if karras else base


def _eta(eta: Any, samplers: list[Any]) -> dict[str, Any]:
    """η as A1111 runs it in each pass (`ETA_SAMPLERS`, the first pass's and a hires fix's own): DDIM's own (0 by
    default), 1 for the ancestral and SDE samplers. Here η is DDIM's alone, so beside a pass of another sampler,
    DDIM's can only run at 0."""
    for sampler in samplers:
        base = sampler.removesuffix(" Karras") if isinstance(sampler, str) else sampler
        if base in ETA_SAMPLERS and eta not in (None, 1):
            raise refuse("eta", f"{sampler} runs at eta 1 here (A1111's default for it); leave eta out")
    if "DDIM" not in samplers:
        return {}
    if eta not in (None, 0) and set(samplers) != {"DDIM"}:
        other = next(sampler for sampler in samplers if sampler != "DDIM")
        raise refuse("eta", f"is DDIM's alone here, and the hires fix runs {other} beside it: send 0 or leave it out")
    return {"eta": 0.0 if eta is None else eta}


def _overrides(settings: Any, served: Served | None) -> dict[str, Any]:
    """Clip skip from A1111's `override_settings` (a whole float, 2.0, read as the integer); any other setting as
    `POST /sdapi/v1/options` takes it: the served model, a setting at the value it has here, or one about saving
    files changes nothing, any other is refused."""
    if not settings:
        return {}
    if not isinstance(settings, dict):
        raise refuse("override_settings", "must be an object of settings")
    for name, value in settings.items():
        if name != CLIP_SKIP:
            check_option(name, value, served, f"override_settings.{name}")
    if CLIP_SKIP not in settings:
        return {}
    clip_skip = settings[CLIP_SKIP]
    return {"clip_skip": int(clip_skip) if isinstance(clip_skip, float) and clip_skip.is_integer() else clip_skip}


def _hires(body: dict[str, Any], ours: dict[str, Any]) -> None:
    """The hires fix when enabled (its fields are A1111's second pass's alone, so left out without it)."""
    if not body.get("enable_hr"):
        return
    upscaler = body.get("hr_upscaler") or "Latent"
    resize = {name: body[name] for name in ("hr_resize_x", "hr_resize_y") if body.get(name)}
    scale = _sent(body, "hr_scale", 2.0)
    if resize:  # A1111's "Hires resize", which then sizes the second pass alone (its hr_scale unread)
        ours.update(resize)
    elif scale == 1:  # A1111 1.6 runs a second pass at the same size; our hr_scale 1 is none: a resize to it is one
        ours.update({"hr_resize_x": ours["W"], "hr_resize_y": ours["H"]})
    else:
        ours["hr_scale"] = scale
    ours["hr_upscaler"] = UPSCALER_ALIASES.get(upscaler, upscaler)
    ours["hr_steps"] = body.get("hr_second_pass_steps") or 0
    # A1111 runs the second pass with its own prompts, sampler and scheduler (1.9's; "Use same…": the first pass's);
    # sent only where they differ from the first pass's.
    own = {"hr_prompt": body.get("hr_prompt"), "hr_negative_prompt": body.get("hr_negative_prompt")}
    name = body.get("hr_sampler_name") if body.get("hr_sampler_name") not in (None, "", SAME_SAMPLER) else None
    scheduler = "hr_scheduler" if body.get("hr_scheduler") not in (None, "", SAME_SCHEDULER) else "scheduler"
    if name is not None or scheduler == "hr_scheduler":
        own["hr_sampler"] = _sampler(body, name, scheduler)
    for field, first in HIRES_OWN.items():
        if own.get(field) not in (None, "", ours.get(first)):
            ours[field] = own[field]
    ours["strength"] = _sent(body, "denoising_strength", 0.75)


def _img2img(body: dict[str, Any], ours: dict[str, Any]) -> None:
    """The init image, its strength, and a mask to inpaint through, as this server inpaints: what the masked part
    starts from and the area painted as A1111's defaults say (fill, only masked, no padding) where not sent."""
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise refuse("init_images", "send a list of one base64 image (several are not available here)")
    ours["init_image"] = images[0]
    ours["strength"] = _sent(body, "denoising_strength", 0.75)
    mode = _sent(body, "resize_mode", 0)
    if mode not in range(len(RESIZE_MODES)):
        raise refuse("resize_mode", "must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill) here")
    ours["resize_mode"] = RESIZE_MODES[mode]
    if body.get("mask") is None:
        return
    ours["mask_image"] = body["mask"]
    # 1.6's mask_blur sets both of its axes' blurs; without it each is its own (4 by default), here the same.
    blur_x, blur_y = (_sent(body, name, 4) for name in ("mask_blur_x", "mask_blur_y"))
    if body.get("mask_blur") is None and blur_x != blur_y:
        raise refuse("mask_blur_y", f"must be mask_blur_x's {blur_x} here (one blur for both axes): send mask_blur")
    ours["mask_blur"] = _sent(body, "mask_blur", blur_x)
    if body.get("inpainting_mask_invert"):
        ours["invert_mask"] = True
    fill = _sent(body, "inpainting_fill", 0)
    if fill not in range(len(MASKED_CONTENT)):
        raise refuse("inpainting_fill", "must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
    ours["masked_content"] = MASKED_CONTENT[fill]
    if body.get("inpaint_full_res") is None or body["inpaint_full_res"]:
        ours["inpaint_area"] = "only_masked"
        ours["masked_area_padding"] = _sent(body, "inpaint_full_res_padding", 0)


def renamed(error: FrontError) -> A1111Error:
    """An error as A1111's clients read it: the field, and our field names in the message, as the A1111 request
    named them. A message naming no field (TorchServe's own: "Please use scale workers API") is left as it is."""
    if isinstance(error, A1111Error):
        return error
    if not error.field:
        return A1111Error(error.status, error.error, "")
    message = error.error
    for ours, theirs in THEIRS.items():
        message = re.sub(rf"\b{re.escape(ours)}\b", theirs, message)
    return A1111Error(error.status, message, THEIRS.get(error.field, error.field))


def answer(
    body: dict[str, Any], ours: dict[str, Any], result: dict[str, Any], served: Served, version: str
) -> dict[str, Any]:
    """A1111's answer to `body` from our answer to `ours` (front/imagine.py's `Results.answer`): the images (unless
    `send_images` is false), the request as sent (its images left out unless `include_init_images`, as A1111 does)
    and `info`, a JSON string of what A1111's clients read from it (each key its `Processed.js` writes; `served`
    may be a description of `{}` where none was fetched yet: no VAE file, no inpainting model then)."""
    images, seeds, parameters = result["images"], result["seeds"], result["parameters"]
    subseeds = result.get("subseeds", [-1] * len(seeds))
    first_seed, first_subseed = seeds[0], subseeds[0]
    infotexts = [png_parameters(image) for image in images]
    # The model as the images name it: the checkpoint's file name and hash (TorchServe's name without an infotext).
    first = parse_infotext(infotexts[0]) if infotexts and infotexts[0] else {}
    info = {
        "prompt": ours["prompt"],
        "all_prompts": [ours["prompt"]] * len(seeds),
        "negative_prompt": ours.get("negative_prompt", ""),
        "all_negative_prompts": [ours.get("negative_prompt", "")] * len(seeds),
        "seed": first_seed,
        "all_seeds": seeds,
        "subseed": first_subseed,
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
        "sd_model_name": first.get("Model", served.model),
        "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": (served.described.get("vae") or {}).get("name"),
        "sd_vae_hash": (served.described.get("vae") or {}).get("hash"),
        "restore_faces": False,
        "face_restoration_model": None,
        "styles": [],
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "is_using_inpainting_conditioning": bool(served.described.get("inpainting")) and "init_image" in ours,
        "version": version,
    }
    echoed = body
    if "init_images" in body and not body.get("include_init_images"):
        echoed = {**body, "init_images": None, "mask": None}
    sent = images if body.get("send_images", True) is not False else []
    return {"images": sent, "parameters": echoed, "info": json.dumps(info)}


def png_parameters(image: Any) -> str:
    """The infotext of a base64 PNG (the handler's `parameters` chunk), or "" without one."""
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return ""
    return png_texts(data).get(INFOTEXT, "")
