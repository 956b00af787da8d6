"""Inpainting: repaint the white part of a mask over an init image, keep the black part.

Two kinds of model do it, as in diffusers' `StableDiffusionInpaintPipeline` and RunwayML's original scripts:
- An inpainting model (RunwayML's sd-v1-5-inpainting, `conditioning_key: hybrid`) reads, beside the latent, the
  mask at latent size and the latent of the init image with its masked part blanked (0 in [−1, 1]: mid-gray): its
  UNet's input is their concatenation (`image_condition`). A request without a mask shows it a mask that covers
  everything, so an all-gray masked image (txt2img on such a model inpaints the whole of a blank image).
- A text-to-image model never sees the mask: after every step the kept region of the latents is put back to the
  init image's latent z₀ noised to the level the step reached, with the image's own starting noise (after the last
  step: z₀ itself), so only the masked region is painted (`KeptRegion`).

Masks are read as diffusers reads them: grayscale (one with transparency: its alpha, `mask_band`), LANCZOS-resized
to the image's size, then 1 (repaint) where at least half white, 0 (keep) elsewhere; shrunk to latent size by
nearest-neighbour sampling.

What the repainted part starts from is A1111's "Masked content": the init image's own pixels ("original"), the
colours around it blurred over it ("fill", `filled`), or, over that fill, the image's starting noise or nothing at all
in the latent ("latent_noise", "latent_nothing": Pipeline._first_pass). Only img2img below strength 1 starts from it.

Then the init image is laid back over the decoded one where the mask keeps it (`Overlay`), as A1111 lays it: kept
pixels come back exactly, not as the VAE redraws them, and the seam is soft on their side. CompVis' latent-diffusion
inpainting script pastes back too, with the mask unblurred (A1111's "Mask blur" 0); RunwayML's scripts and diffusers
do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from ldm.generation_request import GenerationRequest
from ldm.init_images import rgb

# A1111's "Mask blur" range (its slider's), in pixels: σ of the Gaussian that softens the pasted edge.
MAX_MASK_BLUR = 64
# A1111's "fill": (radius of PIL's Gaussian blur, times laid) from the widest to none, each over the ones before.
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def resized_pixels(image: Image.Image, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8: the image as RGB (`init_images.rgb`), LANCZOS-resized to (W, H): what img2img encodes and
    inpainting pastes back."""
    return np.array(rgb(image).resize((width, height), resample=Image.Resampling.LANCZOS))


def mask_band(image: Image.Image) -> Image.Image:
    """The mask an image draws, as grayscale: an image with transparency (an editor's or a canvas's export: a
    stroke over nothing) by its alpha, opaque beyond half repainted (A1111's `create_binary_mask` for RGBA; gray
    with alpha and palettes with a transparent colour alike here), any other by its gray. Read by its gray, a white
    stroke on transparent white would repaint everything, a black one nothing."""
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if "A" in image.getbands():
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda value: 255 if value > 128 else 0)
    return image.convert("L")


def mask_pixels(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """(1, 1, H, W) float32: 1 where the mask (`mask_band`) is at least half white (repaint), 0 where it is darker
    (keep)."""
    gray = mask_band(mask).resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(gray, dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def repaint_pixels(request: GenerationRequest, width: int, height: int) -> torch.Tensor:
    """The request's mask as `mask_pixels` reads it at `width`×`height`, turned over for `invert_mask` (A1111's
    "Inpaint not masked": the black part repainted)."""
    assert request.mask_image is not None, "a request with a mask"
    pixels = mask_pixels(request.mask_image, width, height)
    return 1.0 - pixels if request.invert_mask else pixels


def latent_mask(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) at latent size (B, 1, H/f, W/f), nearest-neighbour (F.interpolate's default, as
    the original scripts and diffusers shrink it)."""
    return F.interpolate(pixels, size=(pixels.shape[-2] // factor, pixels.shape[-1] // factor))


def blank_masked(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The init image (B, 3, H, W) in [−1, 1] with its masked pixels set to 0: what an inpainting model is told of
    the image."""
    return pixels * (mask < 0.5)


def filled(image: Image.Image, repaint: torch.Tensor) -> Image.Image:
    """The image (RGB) with the part `repaint` (1, 1, H, W) in [0, 1] repaints painted over by its kept part blurred,
    as A1111's "fill" paints it: the kept pixels, weighed by how much each is kept, blurred ever less and laid one
    over another, so the hole takes the colours around it, wide blurs deep inside, narrow ones at its edge."""
    levels = Image.fromarray((repaint[0, 0] * 255.0).round().byte().numpy())
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(levels))
    painted = Image.new("RGBA", image.size)
    for radius, times in FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            painted.alpha_composite(layer)
    return painted.convert("RGB")


@dataclass(frozen=True)
class KeptRegion:
    """The `after_step` hook (ldm/ddim.py's StepHook) that keeps a text-to-image model's latents on the init image
    outside the mask.

    `levels[i]` = (a, b): after step i the kept region is a·z₀ + b·noise (DDIM: √ᾱ, √(1−ᾱ) of the next step's
    timestep; the σ-space samplers: 1, σ_{i+1}; (1, 0) after the last step). Rows whose mask is all 1 (images
    without a mask in a shared batch) come out unchanged.
    """

    repaint: torch.Tensor  # (B, 1, h, w) bool: True where the image is painted
    z0: torch.Tensor  # (B, C, h, w) float32
    noise: torch.Tensor  # (B, C, h, w) float32, each image's starting noise
    levels: Sequence[tuple[float, float]]

    def __call__(self, index: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.levels[index]
        return torch.where(self.repaint, x, a * self.z0 + b * self.noise)


def blurred(mask: torch.Tensor, sigma: int) -> torch.Tensor:
    """A pixel mask (1, 1, H, W) blurred by a Gaussian of σ = `sigma` px as A1111 blurs its "Mask blur": a kernel
    2·⌊2.5σ + 0.5⌋ + 1 wide, along rows then columns, the borders mirrored without repeating the edge pixel
    (OpenCV's default, again and again where the kernel is wider than the image); in float32, where A1111 rounds to
    8 bits. σ 0 is the mask itself. A1111 blurs at the init image's size and then resizes; this blurs at the
    request's, the same when they agree (the default)."""
    if sigma == 0:
        return mask
    radius = int(2.5 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = (kernel / kernel.sum()).float()
    padded = torch.from_numpy(np.pad(mask[0, 0].float().numpy(), radius, mode="reflect"))[None, None]
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


@dataclass(frozen=True)
class Overlay:
    """The init image laid back over an inpainted one as A1111 lays it: each pixel a·painted + (1 − a)·init, with
    a = min(1, 2·blurred mask), so along a straight edge every repainted pixel (blurred mask ≥ ½ there) is the
    painted one and the seam fades into the kept side only (a repainted corner, or a stroke thinner than the blur,
    lets some of the init image through). Made once per request: every image of it shares mask and init image."""

    init: torch.Tensor  # (H, W, 3) float32 in [0, 255]: the init image at the request's size
    alpha: torch.Tensor  # (H, W, 1) float32 in [0, 1]: how much of the painted pixel shows

    @classmethod
    def of(cls, init_image: Image.Image, mask: torch.Tensor, mask_blur: int) -> Overlay:
        """For the pixel mask (1, 1, H, W) a request repaints (`mask_pixels`), blurred by `mask_blur` px."""
        height, width = mask.shape[-2:]
        init = torch.from_numpy(resized_pixels(init_image, width, height)).float()
        alpha = (2.0 * blurred(mask, mask_blur)).clamp(max=1.0)[0, 0, :, :, None]
        return cls(init, alpha)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Decoded pixels (H, W, 3) in [0, 255] with the init image over them."""
        return self.alpha * pixels + (1.0 - self.alpha) * self.init
