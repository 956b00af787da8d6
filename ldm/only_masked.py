"""AUTOMATIC1111's "Inpaint area: Only masked": inpaint a box around the mask at the request's size, then put it back.

Why: a face in a 2048-pixel photo, repainted as part of the whole picture at 512×512, gets a few dozen latent pixels;
cropped to a box around the mask and scaled up to the request's size, it gets them all. That detail fix is what A1111's
users run it for (it is its API's default inpaint area). The geometry is A1111's (its processing.py, masking.py and
images.resize_image):

1. The box (`crop_box`): every pixel the blurred mask touches, widened by the padding on each side within the image,
   then grown about its centre to the request's W:H shape and shifted back inside the image where it crosses an edge.
2. The init image and the mask cut to it and fitted to W×H keeping their shape, the bands left over filled by
   stretching the edge rows (ldm/init_images.py's `fit_and_fill`, A1111's "resize and fill"); that is inpainted as
   a whole picture.
3. The painted W×H image scaled to cover the box and centre-cropped (`cover`, A1111's "crop and resize"), put in
   place and laid under the init image through the blurred mask (`Crop.__call__`): the answer has the init image's
   size, and outside the box it is the init image itself.

A1111 blurs the mask at the init image's size and scales the blurred box; this blurs the box's mask again at the
request's size (ldm/inpainting.py's `blurred`), which differs only where the box is scaled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from ldm.generation_request import GenerationRequest
from ldm.init_images import cover, fit_and_fill, rgb
from ldm.inpainting import blurred, repaint_pixels

# A1111's "Only masked padding, pixels" slider's range.
MAX_PADDING = 256
Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom excluded), in the init image's pixels


def crop_box(touched: np.ndarray, padding: int, width: int, height: int) -> Box:
    """The box around the True pixels of `touched` (H, W), widened by `padding` px within it and grown to the shape
    `width`:`height`, with A1111's integer rounding (so the same mask cuts the same box)."""
    rows, cols = np.flatnonzero(touched.any(axis=1)), np.flatnonzero(touched.any(axis=0))
    image_h, image_w = touched.shape
    x1, y1 = max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0)
    x2, y2 = min(int(cols[-1]) + 1 + padding, image_w), min(int(rows[-1]) + 1 + padding, image_h)
    shape = width / height
    if (x2 - x1) / (y2 - y1) > shape:
        y1, y2 = _grown(y1, y2, (x2 - x1) / shape, image_h)
    else:
        x1, x2 = _grown(x1, x2, (y2 - y1) * shape, image_w)
    return x1, y1, x2, y2


def _grown(low: int, high: int, wanted: float, limit: int) -> tuple[int, int]:
    """One side of the box grown to `wanted` px about its centre (the odd pixel after it), shifted back within
    [0, `limit`] and cut to it where it is still too long."""
    grow = int(wanted - (high - low))
    low, high = low - grow // 2, high + grow - grow // 2
    if high > limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


@dataclass(frozen=True)
class Crop:
    """An only-masked request's box; the request as it is run (`run`: the box's init image and mask fitted to its
    size, inpainted as a whole picture); and what puts its painted images back: the init image, and how much of the
    painted pixel shows at each of its pixels (the blurred mask, as A1111 lays it: not doubled as a whole picture's
    is, so the seam fades both ways)."""

    box: Box
    run: GenerationRequest
    init: torch.Tensor  # (H, W, 3) float32 in [0, 255]: the init image at its own size
    alpha: torch.Tensor  # (H, W, 1) float32 in [0, 1]

    @classmethod
    def of(cls, request: GenerationRequest) -> Crop:
        """For a resolved only-masked request whose mask repaints something (`repaints`)."""
        assert request.init_image is not None and request.mask_image is not None, "an only-masked request inpaints"
        assert request.width is not None and request.height is not None, "a resolved request has a size"
        image = rgb(request.init_image)
        binary = repaint_pixels(request, *image.size)
        soft = blurred(binary, request.mask_blur)[0, 0]
        # The pixels A1111's 8-bit blurred mask touches; where a lone pixel under a wide blur rounds away there, the
        # box is the mask's own.
        touched = (soft * 255.0).round().numpy() > 0
        if not touched.any():
            touched = binary[0, 0].numpy() > 0
        box = crop_box(touched, request.masked_area_padding, request.width, request.height)
        cut = (image, Image.fromarray((binary[0, 0] * 255).byte().numpy()))
        init, mask = (fit_and_fill(picture.crop(box), request.width, request.height) for picture in cut)
        run = replace(request, init_image=init, mask_image=mask, inpaint_area="whole_picture", invert_mask=False)
        return cls(box, run, torch.from_numpy(np.array(image)).float(), soft[:, :, None])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """A painted image (h, w, 3) in [0, 255] put back: the init image's size, the init image outside the box."""
        x1, y1, x2, y2 = self.box
        painted = Image.fromarray(np.rint(pixels.numpy()).astype(np.uint8))
        canvas = self.init.clone()
        canvas[y1:y2, x1:x2] = torch.from_numpy(np.array(cover(painted, x2 - x1, y2 - y1))).float()
        return self.alpha * canvas + (1.0 - self.alpha) * self.init


def repaints(request: GenerationRequest) -> bool:
    """Whether the request's mask repaints any pixel of its init image: an only-masked request whose mask repaints
    none is an img2img of the whole picture, as A1111 runs it."""
    assert request.init_image is not None and request.mask_image is not None, "a request with a mask"
    return bool(repaint_pixels(request, *request.init_image.size).any())
