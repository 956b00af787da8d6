"""Random-weight checkpoints in the original SD v1 format, for tests and the demo mode (no real weights offline).

Unlike the original initialisation, no tensor is zero (the original zero-initialises output convolutions), so a
test model exercises every weight: a loader that dropped one would change the images.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.checkpoint import POSITION_IDS, PREFIXES
from ldm.config import ModelConfig
from ldm.ddim import alphas_cumprod, betas
from ldm.model import expected_shapes


def _random_tensor(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Scaled so activations keep a sane range through deep stacks: weights ~ N(0, 1/fan_in)."""
    noise = torch.randn(shape, generator=generator)
    if len(shape) > 1:
        return noise / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):  # norm gains
        return 1.0 + 0.1 * noise
    return 0.02 * noise


def schedule_buffers(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The 12 DDPM buffers the original training code stores beside the weights (float64 math, float32 stored)."""
    b = betas(config)
    a = alphas_cumprod(config)
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    posterior_variance = b * (1.0 - a_prev) / (1.0 - a)
    buffers = {
        "betas": b,
        "alphas_cumprod": a,
        "alphas_cumprod_prev": a_prev,
        "sqrt_alphas_cumprod": a.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - a).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - a).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / a).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / a - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(torch.clamp(posterior_variance, min=1e-20)),
        "posterior_mean_coef1": b * a_prev.sqrt() / (1.0 - a),
        "posterior_mean_coef2": (1.0 - a_prev) * (1.0 - b).sqrt() / (1.0 - a),
    }
    return {k: v.float() for k, v in buffers.items()}


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full original-format state dict (prefixed keys, position_ids, schedule buffers) with random weights."""
    generator = torch.Generator("cpu").manual_seed(seed)
    state: dict[str, torch.Tensor] = dict(schedule_buffers(config))
    for part, shapes in expected_shapes(config).items():
        for key, shape in shapes.items():
            state[PREFIXES[part] + key] = _random_tensor(key, shape, generator)
    state[POSITION_IDS] = torch.arange(config.text["max_position_embeddings"], dtype=torch.int64)[None]
    return state


def save_checkpoint(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """`.safetensors` by extension, else a `.ckpt` as the original wrote it: `torch.save({"state_dict": ...})`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, str(path))
