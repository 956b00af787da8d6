"""A1111's "Resize seed from width/height": a seed's noise at one size, kept as it was inside an image of another.

Why: a seed that paints a good 512×512 image paints something else at 512×768, since a larger latent is another
draw of the generator. Drawing the seed's noise at the size it was found at and pasting it, centred, into the noise
of the new size keeps what the image was made of where it was, and the new margins are new noise; a smaller size
keeps the old noise's centre. A1111 writes the old size as "Seed resize from: WxH", and a shared PNG's image is
only this one if the paste is A1111's to the row. As in A1111 1.6:
- the old-size noise is drawn from a generator of its own seeded with the image's seed (and bent toward the
  variation seed's old-size noise, with variation seeds), and the new-size noise is the image's generator's first
  draw, as without a resize, so the step noise of the stochastic samplers that follows is the same;
- the offset on each axis is half the difference in latent size, rounded down (toward −∞ when the old size is the
  larger): on an axis that shrinks by an odd number of latent rows, A1111 copies one row fewer than fit, and the
  last row of the new noise stays its own.
"""

from __future__ import annotations

import torch


def _span(old: int, new: int) -> tuple[int, int, int]:
    """(start in the new noise, start in the old, length) of what one axis copies."""
    offset = (new - old) // 2
    if offset >= 0:
        return offset, 0, old
    return 0, -offset, old + 2 * offset


def paste_centred(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`new` (…, H, W) with the centre of `old` (…, h, w) written over its own centre."""
    to_y, from_y, rows = _span(old.shape[-2], new.shape[-2])
    to_x, from_x, columns = _span(old.shape[-1], new.shape[-1])
    pasted = new.clone()
    pasted[..., to_y : to_y + rows, to_x : to_x + columns] = old[..., from_y : from_y + rows, from_x : from_x + columns]
    return pasted
