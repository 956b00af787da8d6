"""Per-step noise of the stochastic samplers, drawn per image from that image's own CPU generator.

Why here: tests/fixtures/GENERATION.md makes every image's noise a function of its seed alone, drawn in step order
after its starting noise, so an image is the same alone or anywhere in a batch, on any device. DDIM with η > 0, the
ancestral samplers, DPM++ 2M SDE and DPM++ SDE (two draws a step) all draw this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def per_image_noise(x: torch.Tensor, generators: Sequence[torch.Generator], draws: Sequence[bool]) -> torch.Tensor:
    """One standard normal draw shaped like a row of `x` from `generators[i]` where `draws[i]`, zeros elsewhere
    (that image's generator is not advanced); on `x`'s device and dtype. For a GPU the draw goes through pinned
    memory, so that its copy does not make the host wait for the GPU at every step."""
    rows = [
        torch.randn(x.shape[1:], generator=generator, dtype=torch.float32) if draw else torch.zeros(x.shape[1:])
        for generator, draw in zip(generators, draws, strict=True)
    ]
    noise = torch.stack(rows)
    if x.device.type == "cuda":
        noise = noise.pin_memory()
    return noise.to(device=x.device, dtype=x.dtype, non_blocking=True)
