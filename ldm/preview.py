"""Cheap previews of latents mid-denoising: a fixed linear map of the 4 latent channels to RGB, no VAE call.

A preview sent every few steps must cost next to nothing beside a UNet step, so it skips the VAE decoder, stays at
latent resolution (H/8 × W/8) and is a single 4×3 matrix product per pixel.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# RGB contribution of each SD v1 latent channel (rows: channels 1-4; columns: R, G, B), applied to latents in the
# UNet's space (already multiplied by scale_factor 0.18215); the result lies roughly in [−1, 1], as the VAE's output
# does. Values: the least-squares fit of SD v1.4 decodes published by Kevin Turner ("keturn"), "Decoding latents to
# RGB without upscaling", Hugging Face forums, November 2022.
LATENT_TO_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)
JPEG_QUALITY = 80


def preview_rgb(latent: torch.Tensor) -> np.ndarray:
    """One latent (4, h, w) → uint8 RGB (h, w, 3): the linear map, then [−1, 1] → [0, 255] as the VAE's output is."""
    rgb = torch.einsum("chw,cr->hwr", latent.float(), LATENT_TO_RGB.to(latent.device))
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu().numpy()


def preview_jpeg(latent: torch.Tensor) -> bytes:
    """`preview_rgb` as JPEG bytes: a few KB for a 512×512 image's 64×64 latent, small enough to send often."""
    buffer = io.BytesIO()
    Image.fromarray(preview_rgb(latent)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
