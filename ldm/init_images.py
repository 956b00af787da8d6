"""What an img2img init image becomes before it is encoded: its colours (`rgb`) and its size (`sized`).

Why apart: the handler, the command lines and the pipeline read init images alike, and A1111's clients expect its
ways: a picture with transparency shows what a page on white shows, and an image of another shape than the request
is fitted by one of A1111's resize modes ("Just resize" stretches it; "Crop and resize" covers the size and cuts the
overflow, `cover`; "Resize and fill" fits inside it and stretches its edges over the rest, `fit_and_fill`).
"""

from __future__ import annotations

from PIL import Image, ImageOps

# The resize modes, each with A1111's name (its API's number is the order; its fourth, a latent upscale, is not one).
RESIZE_MODES = {
    "just_resize": "Just resize",
    "crop_and_resize": "Crop and resize",
    "resize_and_fill": "Resize and fill",
}
# What shows through a transparent init image: A1111's default img2img background.
BACKGROUND = (255, 255, 255)
# Image modes whose conversion to RGB is exact, for an init image or a mask. CMYK is not (PIL's conversion ignores
# the colour profile, so colours come out wrong), nor is 16-bit grayscale (PIL clips it to 8 bits: most pixels turn
# white).
EXACT_RGB_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1")


class ImageError(ValueError):
    """A file that cannot be an init image or a mask; the message reads after the image's name (field or flag)."""


def upright(image: Image.Image) -> Image.Image:
    """The image as every viewer (and the page, which sizes a mask from it) shows it: a phone's portrait photo is
    stored sideways with an EXIF orientation, which PIL would ignore. Refuses an image whose pixels would not come
    out as they look: an animation, and modes outside EXACT_RGB_MODES. Reads the pixels (PIL's errors for a damaged
    file are the caller's)."""
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":  # MPO: a camera's photo with its preview
        raise ImageError("must be a single still image, not an animation")
    if image.mode not in EXACT_RGB_MODES:
        raise ImageError(
            f"must be RGB, RGBA, 8-bit grayscale or palette, got {image.mode}: convert it to 8-bit RGB first"
        )
    return ImageOps.exif_transpose(image)


def rgb(image: Image.Image) -> Image.Image:
    """The image as RGB, whatever shows through its transparency white, as A1111 flattens it (PIL's own conversion
    drops the alpha and shows the colours the transparent pixels hide: mostly black)."""
    if "A" not in image.getbands() and "transparency" not in image.info:  # a palette's or a colour's transparency
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, BACKGROUND)
    background.alpha_composite(image.convert("RGBA"))
    return background.convert("RGB")


def sized(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """The image at `width`×`height` by resize mode `mode` (a name of RESIZE_MODES), LANCZOS-scaled."""
    if mode == "crop_and_resize":
        return cover(image, width, height)
    if mode == "resize_and_fill":
        return fit_and_fill(image, width, height)
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def fit_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image LANCZOS-scaled to fit inside `width`×`height` keeping its shape, centred, the bands beside it
    filled by stretching its edge rows (or columns) across them: A1111's "resize and fill"."""
    shape, own = width / height, image.width / image.height
    # At least a pixel: a box one pixel wide fitted into a wide request would round to none.
    fit_w = max(1, width if shape < own else image.width * height // image.height)
    fit_h = max(1, height if shape >= own else image.height * width // image.width)
    fitted = image.resize((fit_w, fit_h), resample=Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(fitted, (width // 2 - fit_w // 2, height // 2 - fit_h // 2))
    if shape < own and (band := height // 2 - fit_h // 2) > 0:
        canvas.paste(fitted.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        canvas.paste(fitted.resize((width, band), box=(0, fit_h, width, fit_h)), (0, band + fit_h))
    elif shape > own and (band := width // 2 - fit_w // 2) > 0:
        canvas.paste(fitted.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        canvas.paste(fitted.resize((band, height), box=(fit_w, 0, fit_w, height)), (band + fit_w, 0))
    return canvas


def cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image LANCZOS-scaled to cover `width`×`height` keeping its shape, and centre-cropped to it: A1111's
    "crop and resize". A1111 scales the whole image and crops it, which could take gigabytes (a box the image's
    edge kept from the request's shape: 64×2048 painted for a 3964×2048 box covers 3964×126848); this scales the
    part that shows alone, the same picture, which PIL samples a little differently here and there (on a
    reference image: 0.07 levels on average, 10 at most)."""
    shape, own = width / height, image.width / image.height
    cover_w = width if shape > own else image.width * height // image.height
    cover_h = height if shape <= own else image.height * width // image.width
    scale_x, scale_y = image.width / cover_w, image.height / cover_h
    left, top = cover_w // 2 - width // 2, cover_h // 2 - height // 2
    shown = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
    return image.resize((width, height), resample=Image.Resampling.LANCZOS, box=shown)
