"""Random LoRA files in kohya's format, for the layers a test names by kohya's own key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.lora import kohya_targets
from ldm.model import StableDiffusion


def kohya_lora(layers: Mapping[str, nn.Module], rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """A kohya state dict changing each of `layers` (kohya key → linear or convolution): `lora_down` reads the
    layer's input (a convolution's own kernel size, LoCon's way), a 1×1 `lora_up` writes its output."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, layer in layers.items():
        shape = layer.weight.shape
        down = (rank, *shape[1:])
        up = (shape[0], rank) if layer.weight.dim() == 2 else (shape[0], rank, 1, 1)
        state[f"{key}.lora_down.weight"] = torch.randn(down, generator=generator) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn(up, generator=generator) * 0.1
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def write_lora(path: Path, state: Mapping[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(state), str(path))
    return path


def unet_kohya_layers(unet: nn.Module, where: str = "attentions") -> dict[str, nn.Module]:
    """Kohya key → layer, for the linear and convolution layers of a diffusers UNet whose path holds `where`; the key
    is diffusers' path with dots as underscores, which is how kohya names them."""
    return {
        "lora_unet_" + name.replace(".", "_"): module
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d) and where in name
    }


def text_kohya_layers(clip: nn.Module) -> dict[str, nn.Module]:
    """Kohya key → layer for the linear layers of a transformers `CLIPTextModel`'s encoder (kohya wrote its keys when
    the model had a `text_model.` level, which transformers 5.6 dropped)."""
    layers = {}
    for name, module in clip.named_modules():
        if isinstance(module, nn.Linear) and "encoder.layers" in name:
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            layers["lora_te_" + path.replace(".", "_")] = module
    return layers


def model_lora(model: StableDiffusion, seed: int = 0) -> dict:
    """A LoRA for `model`'s attention layers and CLIP, keyed by our own kohya names (which tests/test_lora.py checks
    against diffusers'): for tests of what carries a LoRA to the pipeline, not of the merge itself."""
    layers = {k: v for k, v in kohya_targets(model).items() if "attentions" in k or k.startswith("lora_te_")}
    return kohya_lora(layers, seed=seed)
