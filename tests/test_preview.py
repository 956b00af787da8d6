"""Latent previews (ldm/preview.py): the linear latent→RGB map against numpy, and the JPEG it sends."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ldm.preview import LATENT_TO_RGB, preview_jpeg, preview_rgb


def numpy_preview(latent: np.ndarray) -> np.ndarray:
    """The same map computed another way: float64 einsum over channels, [−1, 1] → [0, 255], rounded, clipped."""
    rgb = np.einsum("chw,cr->hwr", latent.astype(np.float64), LATENT_TO_RGB.numpy().astype(np.float64))
    return np.clip(np.rint((rgb + 1.0) * 127.5), 0, 255).astype(np.uint8)


def test_preview_equals_an_independent_computation() -> None:
    latent = torch.randn(4, 9, 7, generator=torch.Generator().manual_seed(3)) * 2.0
    got = preview_rgb(latent)
    assert got.shape == (9, 7, 3) and got.dtype == np.uint8
    expected = numpy_preview(latent.numpy())
    # float32 against float64: a value exactly on a rounding boundary may land one level apart.
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert (got == expected).mean() > 0.99
    assert (got == 0).any() and (got == 255).any(), "this latent reaches both ends of the clamp"


def test_hand_checked_pixel() -> None:
    """Channel 1 alone at 1.0 maps to its row of the matrix: (1 + 0.298, 1 + 0.207, 1 + 0.208)·127.5 = (165.5, 153.9,
    154.0); all zeros is mid-grey, 127.5, which rounds to even."""
    latent = torch.zeros(4, 1, 1)
    latent[0] = 1.0
    assert preview_rgb(latent)[0, 0].tolist() == [165, 154, 154]
    assert preview_rgb(torch.zeros(4, 2, 3)).tolist() == [[[128, 128, 128]] * 3] * 2


def test_jpeg_is_the_preview_at_latent_resolution() -> None:
    # A smooth latent: what JPEG keeps well (noise would measure the codec, not the preview).
    rows = torch.linspace(-1.5, 1.5, 16)[:, None].expand(16, 24)
    columns = torch.linspace(-1.0, 1.0, 24)[None, :].expand(16, 24)
    latent = torch.stack([rows, columns, -rows, torch.full((16, 24), 0.3)])
    data = preview_jpeg(latent)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (24, 16)
        decoded = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(decoded - numpy_preview(latent.numpy())).mean() < 3
