"""The three networks of SD v1 as one object, and how they are built and filled with weights.

Parts are built on the meta device (no memory, no random init) and then take the loaded tensors by assignment, so
loading holds one copy of the weights, already on the target device and in the target dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ldm.config import ModelConfig
from ldm.ddim import alphas_cumprod
from ldm.devices import release_cached_memory
from ldm.text_encoder import TextEncoder
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL

if TYPE_CHECKING:  # ldm.vae_file reads checkpoints, which build these parts
    from ldm.vae_file import VaeFile

PARTS = ("unet", "vae", "text_encoder")


def build_parts(config: ModelConfig, device: str | torch.device = "meta") -> dict[str, nn.Module]:
    """UNet, VAE and text encoder for `config`, on `device` (meta: shapes only)."""
    with torch.device(device):
        return {
            "unet": UNetModel(config.unet),
            "vae": AutoencoderKL(config.vae),
            "text_encoder": TextEncoder(config.text),
        }


def weight_root(module: nn.Module) -> nn.Module:
    """The module whose state dict has a part's checkpoint keys (for the text encoder: the CLIP core)."""
    return module.core if isinstance(module, TextEncoder) else module


def expected_shapes(config: ModelConfig) -> dict[str, dict[str, torch.Size]]:
    """Every key and shape each part's weights must have, from the architecture itself."""
    parts = build_parts(config)
    return {name: {k: v.shape for k, v in weight_root(m).state_dict().items()} for name, m in parts.items()}


@dataclass
class StableDiffusion:
    """Loaded SD v1: config, networks, where they run, and the checkpoint's identity (and, when its VAE was swapped
    for one of its own file, that file's) for PNG metadata.

    In `low_memory` mode (optimizedSD's idea) the networks live on the CPU and each moves to `device` only while it
    runs, trading transfer time for VRAM.
    """

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    device: torch.device
    dtype: torch.dtype
    model_hash: str = ""
    # The checkpoint's file name without its suffix (A1111's "Model" in a PNG's parameters).
    model_name: str = ""
    vae_file: VaeFile | None = None
    low_memory: bool = False
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.alphas_cumprod = alphas_cumprod(self.config)
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)

    @contextlib.contextmanager
    def resident(self, module: nn.Module) -> Iterator[nn.Module]:
        """Yield `module` on the compute device; in low-memory mode, move it there for the block and back after."""
        if not self.low_memory or self.device.type == "cpu":
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            release_cached_memory(self.device)
