"""A1111's "Tiling": images that wrap around their edges, for seamless textures and wallpapers.

Why this works: with every convolution padding circularly instead of with zeros, the networks see the image as a
torus, so its left edge continues its right one and its top its bottom; tile the image and no seam shows. A1111 does
exactly this (every `Conv2d` of the model, the UNet and the VAE, set to circular padding while a tiled request runs),
so a tiled prompt shared from it paints its texture here too. The VAE encoder's own zero padding before each
downsampling (CompVis' `F.pad`) stays, as in A1111.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def circular_padding(*networks: nn.Module) -> Iterator[None]:
    """Every `Conv2d` of `networks` pads circularly for the block, then as it did before."""
    before = [(m, m.padding_mode) for network in networks for m in network.modules() if isinstance(m, nn.Conv2d)]
    for convolution, _ in before:
        convolution.padding_mode = "circular"
    try:
        yield
    finally:
        for convolution, mode in before:
            convolution.padding_mode = mode
