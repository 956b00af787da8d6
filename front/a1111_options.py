"""AUTOMATIC1111's options and listings (`/sdapi/v1/options`, `/sdapi/v1/samplers`, `sd-models`, ...) answered from
what the worker describes, and the error its API answers with.

Why apart from the request translation (front/a1111.py): A1111's clients read these to find out what a server
offers and send options back to pick a checkpoint; one model is served here, so naming it, or sending an option at
the value it has here, changes nothing, and anything else is refused by name, both here and in a request's
`override_settings`.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from front.errors import FrontError, shown

CLIP_SKIP = "CLIP_stop_at_last_layers"
# Options GET /sdapi/v1/options reads beside the model, VAE and clip skip, each at the value it has here.
FIXED_OPTIONS = {"eta_ddim": 0.0, "eta_ancestral": 1.0, "randn_source": "CPU", "eta_noise_seed_delta": 0}
# A1111's default VAE setting: the checkpoint's own or the file beside it, which is what is served here.
AUTOMATIC_VAE = "Automatic"
# Override settings about where A1111 saves files: nothing of the image.
SAVING = re.compile(r"^(samples_|save_|grid_|outdir|export_|jpeg_|webp_|png_|use_original_name|directories_)")


class Served(NamedTuple):
    """What this front serves, as A1111's options and answers name it: the worker's description
    (handler/description.py) and TorchServe's name for the model."""

    described: dict[str, Any]
    model: str


class A1111Error(FrontError):
    """An error answered as A1111's clients read one: the front's body with A1111's `detail` beside."""

    def body(self) -> dict[str, str]:
        return {**super().body(), "detail": self.error}


def refuse(field: str, message: str) -> A1111Error:
    """A 400 for an A1111 field, its message starting with the field's name."""
    return A1111Error(400, f"{field}: {message}", field)


def needs_options(body: dict[str, Any]) -> bool:
    """Whether `translate` must be given the served options to judge the request's `override_settings` (any but
    clip skip and saving files: the model named, a setting at its value)."""
    settings = body.get("override_settings")
    return isinstance(settings, dict) and any(name != CLIP_SKIP and not SAVING.match(name) for name in settings)


# A1111's listings the front answers from the handler's description (handler/description.py).
LISTINGS = ("samplers", "upscalers", "latent-upscale-modes", "sd-models", "sd-vae", "loras", "embeddings", "options")
# A1111's listings of what is not done here (requests naming any are refused): empty, as an A1111 without any.
NONE_HERE = ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles", "script-info", "extensions")
# A1111's rescans of its model folders: here, a fresh description (new LoRA or embedding files are listed at once).
REFRESHES = ("refresh-checkpoints", "refresh-vae", "refresh-embeddings", "refresh-loras")
DESCRIBE = b'{"describe": true}'


def listing(name: str, described: Any, model: str) -> Any:
    """A1111's answer to `GET /sdapi/v1/<name>` from what the worker describes: the samplers and upscalers by
    A1111's names, the one model (named as TorchServe serves it), its VAE file if it has one, the LoRAs and
    embeddings a prompt may name, and the options its clients read (the model, the VAE, clip skip, η, where the
    noise is drawn)."""
    try:
        samplers, upscalers = described["sampler_names"].items(), described["upscalers"].items()
        model_hash, loras, shapes = described["model_hash"], described["loras"], described["embedding_shapes"].items()
        clip_skip, vae = described["defaults"]["clip_skip"], described.get("vae", {"name": "None"})["name"]
    except (KeyError, TypeError, AttributeError):
        raise A1111Error(502, "TorchServe's worker answered no description of what it serves") from None
    if name == "options":
        return {"sd_model_checkpoint": model_title(model, model_hash), "sd_vae": vae, CLIP_SKIP: clip_skip,
                **FIXED_OPTIONS}  # fmt: skip
    if name == "samplers":
        return [{"name": title, "aliases": [ours], "options": {}} for ours, title in samplers]
    if name == "upscalers":
        titles = ["None", *(title for ours, title in upscalers if not ours.startswith("latent"))]
        return [
            {"name": title, "model_name": None, "model_path": None, "model_url": None, "scale": 1} for title in titles
        ]
    if name == "sd-vae":
        return [{"model_name": vae, "filename": vae}] if "vae" in described else []
    if name == "latent-upscale-modes":
        return [{"name": title} for ours, title in upscalers if ours.startswith("latent")]
    if name == "sd-models":
        title = model_title(model, model_hash)
        return [
            {"title": title, "model_name": model, "hash": model_hash, "sha256": None, "filename": model, "config": None}
        ]
    if name == "loras":
        return [{"name": lora, "alias": lora, "path": None, "metadata": {}} for lora in loras]
    loaded = {
        word: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width, "vectors": count}
        for word, (count, width) in shapes
    }
    return {"loaded": loaded, "skipped": {}}


def model_title(model: str, model_hash: str) -> str:
    """The served model as A1111 titles a checkpoint: its name, then its short hash in brackets."""
    return f"{model} [{model_hash}]"


def check_options(body: Any, served: Served) -> None:
    """A1111's `POST /sdapi/v1/options`, which its clients send to pick a checkpoint (often all the options they
    read, one changed), each option as `check_option` takes it; clip skip is each request's here."""
    if not isinstance(body, dict):
        raise refuse("body", "send the options as a JSON object")
    clip_skip = served.described.get("defaults", {}).get("clip_skip")
    for name, value in body.items():
        if name == CLIP_SKIP and value != clip_skip:
            raise refuse(name, "is each request's here: send it in the request's override_settings")
        check_option(name, value, served, name)


def check_option(name: str, value: Any, served: Served | None, field: str) -> None:
    """An A1111 option set (by `POST /sdapi/v1/options` or a request's `override_settings`, `field` naming it):
    one model is served, so naming it (by title, name or hash) changes nothing, nor does an option at the value
    GET gives (the VAE also as A1111's default, Automatic), and settings about saving files mean nothing here; any
    other is refused, naming it."""
    if SAVING.match(name):
        return
    if served is None:  # the caller fetches the options where `needs_options` says so
        raise refuse(field, "is not available here")
    title = model_title(served.model, served.described.get("model_hash", ""))
    if name == "sd_model_checkpoint":
        if value in (title, served.model, served.described.get("model_hash")):
            return
        raise refuse(field, f"only {title} is served here, got {shown(value)}")
    if name == "sd_vae" and value == AUTOMATIC_VAE:
        return
    current = listing("options", served.described, served.model)
    if name not in current:
        raise refuse(field, "is not available here")
    if value != current[name]:
        raise refuse(field, f"is {json.dumps(current[name])} here, got {shown(value)}")
