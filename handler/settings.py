"""The `handler:` section of model-config.yaml: request defaults, limits, precision, memory mode.

Read once in `initialize`; every key is optional and falls back to the values below, which are the documented
defaults of the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import torch

from ldm.ddim import max_ddim_steps
from ldm.devices import auto_dtype
from ldm.fast_path import FastPath

PRECISIONS = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


Section = TypeVar("Section")


class SettingsError(ValueError):
    """model-config.yaml's handler section has an unknown key or a wrong value."""


@dataclass(frozen=True)
class Defaults:
    """What a request gets for a field it leaves out."""

    H: int = 512
    W: int = 512
    ddim_steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    n_samples: int = 1
    n_iter: int = 1
    strength: float = 0.75
    sampler: str = "ddim"
    weighted_subprompts: bool = False
    emphasis: bool = False
    # A1111's "Clip skip": 2 reads CLIP's penultimate layer, which many fine-tuned (anime) SD v1 models expect.
    clip_skip: int = 1
    # A1111's "Mask blur": σ in pixels of the seam where an inpainted image's kept pixels are pasted back.
    mask_blur: int = 4
    # The hires fix's (a request's hr_scale above 1, or resize): A1111's "Latent" upscaler, and 0: as many steps as
    # ddim_steps.
    hr_upscaler: str = "latent"
    hr_steps: int = 0


@dataclass(frozen=True)
class Limits:
    """The largest request the server accepts; each breach is a 400 naming the field and the limit."""

    max_pixels: int = 1024 * 1024
    min_side: int = 64
    max_side: int = 2048
    max_steps: int = 150
    max_images: int = 8
    max_prompt_chars: int = 2000
    # Per prompt with weighted_subprompts: each sub-prompt is one more text-encoder row.
    max_subprompts: int = 16
    # Per prompt with emphasis, A1111's AND: each sub-prompt is one more UNet row per image at every step.
    max_and_subprompts: int = 8
    # Per prompt with emphasis: each 75 tokens are one more text-encoder row, and 77 more tokens every UNet step
    # attends to.
    max_prompt_chunks: int = 8
    # Per prompt: each LoRA is read, checked and merged into the weights (and out again) before its request runs.
    max_loras: int = 4
    max_scale: float = 50.0
    max_eta: float = 1.0
    max_init_image_bytes: int = 10 * 1024 * 1024
    max_init_image_pixels: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        """Integer limits count something (at least 1); number limits bound a value (at least 0)."""
        for item in fields(self):
            value = getattr(self, item.name)
            least = 1 if isinstance(value, int) else 0
            if value < least:
                raise ValueError(f"{item.name} must be at least {least}, got {value}")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is above max_side {self.max_side}")
        # DDIM's σ past η = 1 outgrows the noise a step has left: ldm refuses it whatever a server allows.
        if self.max_eta > 1:
            raise ValueError(f"max_eta must be at most 1, got {self.max_eta}")


@dataclass(frozen=True)
class HandlerSettings:
    """Everything the handler reads from model-config.yaml."""

    defaults: Defaults = field(default_factory=Defaults)
    limits: Limits = field(default_factory=Limits)
    # auto: fp16 on CUDA, fp32 on the CPU (fp16 convolutions there are slow and inexact) and on MPS (ldm/devices.py).
    precision: str = "auto"
    low_memory: bool = False
    # Images denoised in one UNet batch, across requests; bounds activation memory.
    max_batch_images: int = 8
    # A streamed request gets a preview every this many steps, and at its last step; 0: never.
    preview_every: int = 5
    # GPU speed switches (compile, CUDA graphs, channels-last) and the shapes warmed up at load.
    fast_path: FastPath = field(default_factory=FastPath)
    # Where the LoRAs a prompt names (<lora:name:weight>) are: relative to the model's folder (where
    # scripts/build_mar.py --loras puts them), or absolute (a volume on Kubernetes).
    lora_dir: str = "loras"
    # Where the textual-inversion embeddings a prompt names by word are, likewise (build_mar.py --embeddings).
    embeddings_dir: str = "embeddings"

    def dtype(self, device: torch.device) -> torch.dtype:
        chosen = PRECISIONS[self.precision]
        return auto_dtype(device) if chosen is None else chosen


def _section(cls: type[Section], values: dict[str, Any] | None, where: str) -> Section:
    """One section of the settings as `cls` (a dataclass whose every field has a default): its keys known, each value
    of its default's type (an integer where a number is, a list of names where a tuple is), then `cls`'s own
    checks; any breach a SettingsError naming the key."""
    values = dict(values or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingsError(f"model-config.yaml {where}: unknown keys {unknown}; known: {sorted(known)}")
    for name, value in values.items():
        expected = type(getattr(cls(), name))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif expected is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
            values[name] = tuple(value)
        elif not isinstance(value, expected) or isinstance(value, bool) is not (expected is bool):
            raise SettingsError(f"model-config.yaml {where}.{name}: expected {expected.__name__}, got {value!r}")
    try:
        return cls(**values)
    except ValueError as error:
        raise SettingsError(f"model-config.yaml {where}: {error}") from error


def check_against_model(settings: HandlerSettings, timesteps: int) -> None:
    """A limit the loaded model cannot honour: DDIM takes at most T − 1 steps of a T-step model. (The defaults are
    checked against the model as a request meets them: `handler.request.check_defaults`.)"""
    most, asked = max_ddim_steps(timesteps), settings.limits.max_steps
    if asked > most:
        raise SettingsError(f"model-config.yaml handler.limits.max_steps: at most {most} for this model, got {asked}")


def parse_settings(model_yaml_config: dict[str, Any] | None) -> HandlerSettings:
    """HandlerSettings from TorchServe's parsed model-config.yaml (its `handler:` section)."""
    section = dict((model_yaml_config or {}).get("handler") or {})
    defaults = _section(Defaults, section.pop("defaults", None), "handler.defaults")
    limits = _section(Limits, section.pop("limits", None), "handler.limits")
    fast_path = _section(FastPath, section.pop("fast_path", None), "handler.fast_path")
    settings = _section(HandlerSettings, section, "handler")
    if settings.precision not in PRECISIONS:
        raise SettingsError(
            f"model-config.yaml handler.precision: one of {sorted(PRECISIONS)}, got {settings.precision!r}"
        )
    if settings.preview_every < 0:
        raise SettingsError(f"model-config.yaml handler.preview_every: 0 (never) or more, got {settings.preview_every}")
    if settings.max_batch_images < 1:
        raise SettingsError(f"model-config.yaml handler.max_batch_images: 1 or more, got {settings.max_batch_images}")
    return replace(settings, defaults=defaults, limits=limits, fast_path=fast_path)
