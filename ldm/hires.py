"""A1111's "Hires. fix": a txt2img image made at the request's size, upscaled, then sampled again at the larger size.

Why: SD v1 learned 512×512 images. Asked for 1024×1024 at once, it paints its subject twice or more across the
canvas; made at 512 and then refined at 1024, it keeps one composition and gains the detail. The second pass is an
img2img of the upscaled first image, so its `strength` decides how much it may change.

The arithmetic is A1111 1.6's: the target is int(side·scale), or A1111's "Hires resize" to a width, a height or both
(the first image then upscaled to cover it, and its latent cut down to it), rounded down to the latent's factor
(A1111 interpolates its latent to that size; to the size the image has too, a second pass at that size); the second
pass runs `steps` N steps, the last N of a run of ⌊N / min(strength, 0.999)⌋, and draws its noise anew from each
image's seed.
Its upscalers are A1111's interpolations of the latent, and its resizes of the first pass's image with PIL's filters
(`upscale_image`, whose latent the VAE then encodes again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Our names → the names A1111 writes in a PNG's "Hires upscaler" (and offers in its menu).
UPSCALERS = {
    "latent": "Latent",
    "latent_antialiased": "Latent (antialiased)",
    "latent_bicubic": "Latent (bicubic)",
    "latent_bicubic_antialiased": "Latent (bicubic antialiased)",
    "latent_nearest": "Latent (nearest)",
    "latent_nearest_exact": "Latent (nearest-exact)",
    "lanczos": "Lanczos",
    "nearest": "Nearest",
}
# The latent upscalers: torch's interpolation mode, and whether it filters (antialias) as it resamples.
_LATENT_MODES = {
    "latent": ("bilinear", False),
    "latent_antialiased": ("bilinear", True),
    "latent_bicubic": ("bicubic", False),
    "latent_bicubic_antialiased": ("bicubic", True),
    "latent_nearest": ("nearest", False),
    "latent_nearest_exact": ("nearest-exact", False),
}
_IMAGE_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
MAX_SCALE = 4.0
# A1111 divides by the strength capped just below 1 (a cap its other img2img arithmetic needs, kept here so that the
# run is A1111's to the step); at strength 1 the run is still `steps` long for fewer than 999 steps.
_MAX_RUN_STRENGTH = 0.999


@dataclass(frozen=True)
class Plan:
    """The hires fix's sizes in pixels, multiples of the latent's factor: the first image is upscaled to `upscaled`,
    and its latent then cut down to `size`, the second pass's (they differ for a "Hires resize" to other
    proportions than the first image's). An upscale to the first image's own size still runs a second pass at that
    size, as A1111 1.6 runs one (A1111 1.5 and before took it for no hires fix at all). `target`: the upscale's size
    before its rounding, which an image upscaler resizes the first image to (its VAE then drops what is past a
    multiple of the factor, as A1111's does)."""

    upscaled: tuple[int, int]
    size: tuple[int, int]
    target: tuple[int, int]

    def crop(self, latents: torch.Tensor, factor: int) -> torch.Tensor:
        """Latents (B, C, h, w) of the upscaled size cut to the second pass's, centred as A1111 cuts them: of an odd
        number of rows or columns cut, the extra one from the bottom or right."""
        rows, columns = ((big - small) // factor for big, small in zip(self.upscaled, self.size, strict=True))
        height, width = latents.shape[2:]
        return latents[:, :, rows // 2 : height - (rows + 1) // 2, columns // 2 : width - (columns + 1) // 2]


def plan(height: int, width: int, factor: int, scale: float = 1.0, resize: tuple[int, int] = (0, 0)) -> Plan:
    """The sizes of the hires fix of a (height, width) first image, as A1111 1.6 computes them, each rounded down to
    a multiple of `factor` (A1111's latent is that size, and so are its images).

    `resize` (width, height), A1111's "Hires resize", both 0 (off) → `scale`: int(side·scale). One side 0 → the
    other side set, the first image's proportions kept (the lost side's fraction floored). Both set → upscaled to
    cover that size in the first image's proportions, then cut to it: ⌊excess / factor⌋ latent rows or columns."""
    resize_w, resize_h = resize
    if not resize_w and not resize_h:
        big_h, big_w = int(height * scale), int(width * scale)
    elif not resize_h or (resize_w and width * resize_h < resize_w * height):  # A1111's ratios, compared exactly
        big_h, big_w = resize_w * height // width, resize_w
    else:
        big_h, big_w = resize_h, resize_h * width // height
    rows, columns = big_h // factor, big_w // factor
    if resize_w and resize_h:
        cut_rows, cut_columns = (big_h - resize_h) // factor, (big_w - resize_w) // factor
    else:
        cut_rows = cut_columns = 0
    size = ((rows - cut_rows) * factor, (columns - cut_columns) * factor)
    return Plan((rows * factor, columns * factor), size, (big_h, big_w))


def run_length(steps: int, strength: float) -> int:
    """S of the run whose last `steps` steps the second pass takes: ⌊steps / min(strength, 0.999)⌋ (A1111's)."""
    return int(steps / min(strength, _MAX_RUN_STRENGTH))


def most_steps(max_run: int) -> int:
    """The most second-pass steps a run of at most `max_run` steps can hold, even at strength 1."""
    steps = max_run
    while run_length(steps, 1.0) > max_run:
        steps -= 1
    return steps


def is_latent(upscaler: str) -> bool:
    return upscaler in _LATENT_MODES


def upscale_latents(latents: torch.Tensor, height: int, width: int, upscaler: str) -> torch.Tensor:
    """Latents (B, C, h, w) interpolated to (height, width) latent pixels by a latent upscaler."""
    mode, antialias = _LATENT_MODES[upscaler]
    return F.interpolate(latents, size=(height, width), mode=mode, antialias=antialias)


def upscale_image(image: np.ndarray, height: int, width: int, upscaler: str) -> Image.Image:
    """A uint8 (H, W, 3) image resized to (height, width) by an image upscaler as A1111 1.6's `resize_image` runs its
    Lanczos or Nearest upscaler: scaled by the larger side's ratio s with the upscaler's filter to int(side·s), then
    with Lanczos to that rounded down to a multiple of 8, then to (height, width). To a multiple of 8 that is one
    resize; to another size, three, which soften the image a little more than one."""
    picture = Image.fromarray(image)
    scale = max(width / picture.width, height / picture.height)
    if scale > 1.0:
        rounded = (int(picture.width * scale // 8 * 8), int(picture.height * scale // 8 * 8))
        for _ in range(3):  # A1111 upscales again (up to 3 times) while short of the rounded size
            before = picture.size
            picture = picture.resize(
                (int(picture.width * scale), int(picture.height * scale)), _IMAGE_FILTERS[upscaler]
            )
            if picture.size == before or (picture.width >= rounded[0] and picture.height >= rounded[1]):
                break
        if picture.size != rounded:
            picture = picture.resize(rounded, Image.Resampling.LANCZOS)
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    return picture
