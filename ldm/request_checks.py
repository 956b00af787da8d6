"""The rules a request must keep for the pipeline to run it, each a `GenerationError` naming its field, and
`resolve`, which fills what a request leaves open (seed, size) and checks them all.

Why apart from the pipeline: the handler checks a request before it queues it (a 400 in place of a failed batch),
and the command lines before they load a model.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
from dataclasses import replace
from pathlib import Path

from PIL import Image

from ldm import emphasis, hires, init_images, inpainting, lora, only_masked, prompt_editing
from ldm.ddim import max_ddim_steps
from ldm.generation_request import (
    HIRES_OWN,
    IMG2IMG_RUN,
    IMG2IMG_SAMPLERS,
    INPAINT_AREAS,
    MASK_WAYS,
    MASK_WITHOUT_INIT,
    MASKED_CONTENTS,
    MAX_SEED,
    SAMPLERS,
    TEXT_FIELDS,
    GenerationError,
    GenerationRequest,
    hires_run,
)
from ldm.init_images import RESIZE_MODES
from ldm.lora import LoraError
from ldm.request_texts import check_no_lora_tags, named_texts, pass_field, request_loras, text_parts


def check_sampler(request: GenerationRequest) -> None:
    """The sampler exists, and the request is one it can run: η is DDIM's (the ancestral samplers' noise is their
    own), and PLMS runs txt2img only, as in the original and other SD tools (its first step has no history to start
    from mid-schedule). The hires fix's own sampler is `check_hires`'s."""
    if request.sampler not in SAMPLERS:
        raise GenerationError(
            "sampler", f"sampler '{request.sampler}' is not available; choose one of: {', '.join(SAMPLERS)}"
        )
    if request.sampler == "plms" and request.init_image is not None:
        raise GenerationError("sampler", "sampler plms is for txt2img only; img2img runs every other sampler")
    check_eta(request, "sampler", request.sampler)


def check_eta(request: GenerationRequest, field: str, sampler: str) -> None:
    """η is DDIM's: a request with another sampler (`field`'s) in any pass runs at 0."""
    if sampler != "ddim" and request.eta != 0:
        raise GenerationError("eta", f"eta is DDIM's: it must be 0 with {field} {sampler}, got {request.eta}")


def check_seed_resize(request: GenerationRequest, factor: int = 8) -> None:
    """A seed resize names a whole latent size: both sides, each a positive multiple of `factor` (0 and 0: none)."""
    sides = {"seed_resize_from_h": request.seed_resize_from_h, "seed_resize_from_w": request.seed_resize_from_w}
    for name, side in sides.items():
        if side < 0 or side % factor:
            raise GenerationError(name, f"{name} must be 0 (no resize) or a positive multiple of {factor}, got {side}")
    for (name, side), (other, other_side) in itertools.permutations(sides.items()):
        if side == 0 and other_side > 0:
            raise GenerationError(
                name,
                f"{name} must be set too, since {other} is {other_side}: a seed resize needs both sides (both 0: none)",
            )


def check_resize_mode(request: GenerationRequest) -> None:
    """A resize mode is one of A1111's, for an init image."""
    if request.resize_mode not in RESIZE_MODES:
        names = ", ".join(RESIZE_MODES)
        raise GenerationError("resize_mode", f"resize_mode must be one of {names}, got {request.resize_mode!r}")
    if request.init_image is None and request.resize_mode != "just_resize":
        raise GenerationError("resize_mode", "resize_mode needs an init_image: it tells how to bring it to H×W")


def check_mask(request: GenerationRequest) -> None:
    """A mask says which pixels of the init image to repaint: it needs one (a mask of another size is stretched
    over it); its blur and how it is read are A1111's."""
    if isinstance(request.mask_blur, bool) or not isinstance(request.mask_blur, int):
        raise GenerationError("mask_blur", f"mask_blur must be a whole number of pixels, got {request.mask_blur!r}")
    if not 0 <= request.mask_blur <= inpainting.MAX_MASK_BLUR:
        raise GenerationError(
            "mask_blur", f"mask_blur must be in [0, {inpainting.MAX_MASK_BLUR}] pixels, got {request.mask_blur}"
        )
    for name, names in (("masked_content", MASKED_CONTENTS), ("inpaint_area", INPAINT_AREAS)):
        if getattr(request, name) not in names:
            raise GenerationError(name, f"{name} must be one of {', '.join(names)}, got {getattr(request, name)!r}")
    padding, most = request.masked_area_padding, only_masked.MAX_PADDING
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= most:
        raise GenerationError(
            "masked_area_padding", f"masked_area_padding must be in [0, {most}] pixels, got {padding!r}"
        )
    if request.mask_image is None:
        for name in MASK_WAYS:
            if getattr(request, name) != getattr(GenerationRequest, name):
                raise GenerationError(name, f"{name} needs a mask_image: it tells how to inpaint through one")
        return
    if request.init_image is None:
        raise GenerationError("mask_image", MASK_WITHOUT_INIT)


def check_hires(request: GenerationRequest, num_timesteps: int = 1000, factor: int = 8) -> None:
    """The hires fix's settings are A1111's, and the request one it runs: txt2img (an img2img sets its size itself)
    with a sampler that runs img2img (its second pass is one), whose run of ⌊hr_steps / strength⌋ steps fits the
    model's `num_timesteps`, sized by either `hr_scale` or `hr_resize_x`/`_y`, to an image of at least a latent
    pixel (once the request has a size)."""
    if request.hr_upscaler not in hires.UPSCALERS:
        raise GenerationError(
            "hr_upscaler", f"hr_upscaler '{request.hr_upscaler}' is not available; choose one of: "
            f"{', '.join(hires.UPSCALERS)}"
        )  # fmt: skip
    if not 1.0 <= request.hr_scale <= hires.MAX_SCALE:
        raise GenerationError("hr_scale", f"hr_scale must be in [1, {hires.MAX_SCALE:g}], got {request.hr_scale}")
    for name in ("hr_resize_x", "hr_resize_y"):
        if getattr(request, name) < 0:
            raise GenerationError(name, f"{name} must be at least 0 (0: not set), got {getattr(request, name)}")
    if request.hr_scale != 1 and (request.hr_resize_x or request.hr_resize_y):
        field = request.hires_field
        raise GenerationError(field, f"{field} sets the hires fix's size: leave hr_scale at 1 (or out)")
    max_steps = max_ddim_steps(num_timesteps)
    most = hires.most_steps(max_steps)
    if not 0 <= request.hr_steps <= most:
        raise GenerationError("hr_steps", f"hr_steps must be in [0, {most}] (0: ddim_steps), got {request.hr_steps}")
    own = [name for name in HIRES_OWN if getattr(request, name)]
    if not request.hires:
        if own:
            raise GenerationError(own[0], f"{own[0]} is the hires fix's second pass's: set hr_scale or hr_resize_x/_y")
        return
    if request.hr_sampler == "plms":
        raise GenerationError("hr_sampler", f"hr_sampler plms is for txt2img only, and {IMG2IMG_RUN}")
    if request.hr_sampler and request.hr_sampler not in IMG2IMG_SAMPLERS:
        raise GenerationError(
            "hr_sampler",
            f"hr_sampler '{request.hr_sampler}' is not available; choose one of: {', '.join(IMG2IMG_SAMPLERS)}",
        )
    check_hires_texts(request)
    field = request.hires_field
    if request.init_image is not None:
        raise GenerationError(
            field, f"{field} is txt2img's (A1111's hires fix): an img2img request sets its size with H and W"
        )
    if request.height is not None and request.width is not None:
        height, width = request.hires_plan(factor).size
        if height < factor or width < factor:
            raise GenerationError(field, f"{field} makes {width}x{height} images: too small for a latent pixel")
    if request.sampler == "plms" and not request.hr_sampler:
        raise GenerationError("sampler", f"sampler plms is for txt2img only, and {IMG2IMG_RUN}")
    if request.hr_sampler:
        check_eta(request, "hr_sampler", request.hr_sampler)
    check_strength(request)
    steps = request.hires_steps
    if steps > most:  # hr_steps 0 takes ddim_steps' count, which no strength fits
        raise GenerationError(
            "hr_steps",
            f"hr_steps 0 gives the hires fix ddim_steps' {steps} steps, more than a run of this model's {max_steps} "
            f"holds at any strength: set hr_steps to at most {most}",
        )
    run = hires.run_length(steps, request.strength)
    if run > max_steps:
        raise GenerationError(
            "strength",
            f"strength {request.strength} makes the hires fix's {steps} steps the last of a run of {run}, over this "
            f"model's {max_steps}: raise strength to at least {_rounded_up(steps / max_steps):g}, or lower "
            "hr_steps",
        )


def check_hires_texts(request: GenerationRequest) -> None:
    """The second pass's own prompts read as the first pass's do, and name the prompt's LoRAs: both passes run on the
    same merged weights here (A1111 merges a hires prompt's own LoRAs for its pass)."""
    check_no_lora_tags(request, "hr_negative_prompt")
    if request.hr_prompt:
        try:
            same = set(lora.prompt_loras(request.hr_prompt)) == set(lora.prompt_loras(request.prompt))
        except LoraError as error:
            raise GenerationError("hr_prompt", f"hr_prompt: {error}") from None
        if not same:
            raise GenerationError(
                "hr_prompt",
                "hr_prompt: its LoRA tags (<lora:…>) must be the prompt's: both passes run on the same weights",
            )
    second = hires_run(request)
    for field in TEXT_FIELDS:
        text_parts(second, field, pass_field(request, field, True))


def check_strength(request: GenerationRequest) -> None:
    """A strength is a share of the run: more than none of it, at most all."""
    if not 0.0 < request.strength <= 1.0:
        raise GenerationError("strength", f"strength must be in (0, 1], got {request.strength}")


def check_lora_names(request: GenerationRequest, lora_dir: Path | None) -> None:
    """Every LoRA the prompt names has a file in `lora_dir`: what can be told before a model is loaded (whether the
    files fit it, `Pipeline.lora_files` tells)."""
    for use in request_loras(request):
        try:
            lora.find(lora_dir, use.name)
        except LoraError as error:
            raise GenerationError("prompt", f"prompt: {error}") from None


def check_clip_skip(request: GenerationRequest, layers: int) -> None:
    """Clip skip k reads the k-th of CLIP's `layers` from the end: there must be one."""
    if not 1 <= request.clip_skip <= layers:
        raise GenerationError(
            "clip_skip", f"clip_skip must be in [1, {layers}] (this model's CLIP layers), got {request.clip_skip}"
        )


def check_emphasis(request: GenerationRequest) -> None:
    """A1111's syntax reads `(word:1.3)` where optimizedSD's reads a sub-prompt and a weight: one of the two; and
    every weight it reads must be a number."""
    if not request.emphasis:
        return
    if request.weighted_subprompts:
        raise GenerationError(
            "emphasis", "emphasis and weighted_subprompts read a prompt's colons each their own way: send one of them"
        )
    for field in TEXT_FIELDS:
        named = named_texts(request, field)
        for name, count in collections.Counter(name for name, _ in named).items():
            if count > prompt_editing.MAX_TEXTS:
                raise GenerationError(
                    name,
                    f"{name}: its prompt editing reads {count} different texts over the run; at most "
                    f"{prompt_editing.MAX_TEXTS} (fewer alternations, or fewer steps)",
                )
        for name, text in named:
            try:
                emphasis.parse(text)
            except emphasis.EmphasisError as error:
                raise GenerationError(name, f"{name}: {error}") from None


def resolve(
    request: GenerationRequest, default_size: int = 512, factor: int = 8, num_timesteps: int = 1000
) -> GenerationRequest:
    """Fill what a request leaves open (seed, size) and check what the pipeline itself requires.

    Limits a server adds on top (pixels, steps, images per request) are the server's; these are the ones without
    which the math itself breaks.
    """
    check_sampler(request)
    max_steps = max_ddim_steps(num_timesteps)
    if not 1 <= request.steps <= max_steps:
        raise GenerationError("ddim_steps", f"ddim_steps must be in [1, {max_steps}], got {request.steps}")
    request_loras(request)
    check_emphasis(request)  # after the steps: prompt editing makes a schedule as long as they are
    for field in TEXT_FIELDS:
        text_parts(request, field)
    for name, value in (("n_samples", request.n_samples), ("n_iter", request.n_iter)):
        if value < 1:
            raise GenerationError(name, f"{name} must be at least 1, got {value}")
    # Past 1, DDIM's σ outgrows the noise a step has left, and its square root of a negative number paints black.
    if not 0 <= request.eta <= 1:
        raise GenerationError("eta", f"eta must be in [0, 1], got {request.eta}")
    if not math.isfinite(request.scale):
        raise GenerationError("scale", f"scale must be a finite number, got {request.scale}")
    if not 0.0 <= request.subseed_strength <= 1.0:
        raise GenerationError(
            "subseed_strength", f"subseed_strength must be in [0, 1] (0: no variation), got {request.subseed_strength}"
        )
    # The seeds that count up per image: the seed's, or with variation seeds the variation seed's.
    counted = "subseed" if request.variation else "seed"
    for name in ("seed", "subseed"):
        value, last = getattr(request, name), MAX_SEED - (request.n_images - 1 if name == counted else 0)
        if value is not None and not 0 <= value <= last:
            every = f" for every image ({name} + i)" if name == counted else ""
            raise GenerationError(name, f"{name} must be in [0, {last}]{every}, got {value}")
    if request.seed is None:
        request = replace(request, seed=random.randint(0, MAX_SEED - request.n_images + 1))
    if request.variation and request.subseed is None:
        request = replace(request, subseed=random.randint(0, MAX_SEED - request.n_images + 1))
    if request.init_image is None:
        size = (default_size, default_size)
    else:
        w, h = request.init_image.size
        size = (h - h % factor, w - w % factor)
    height = size[0] if request.height is None else request.height
    width = size[1] if request.width is None else request.width
    request = replace(request, height=height, width=width)
    check_seed_resize(request, factor)
    check_mask(request)
    check_resize_mode(request)
    if request.inpaint_area == "only_masked" and not only_masked.repaints(request):
        # A1111's fallback: with no box to inpaint, the whole picture's img2img.
        request = replace(request, mask_image=None, **{name: getattr(GenerationRequest, name) for name in MASK_WAYS})
    check_hires(request, num_timesteps, factor)
    if request.hires:
        request = replace(request, hr_steps=request.hires_steps)
    if request.init_image is not None:
        check_strength(request)
        if request.img2img_steps() < 1:
            raise GenerationError(
                "strength",
                f"strength {request.strength} × ddim_steps {request.steps} leaves no denoising step; "
                f"raise strength to at least {_rounded_up(1 / request.steps):g}",
            )
    for name, value in (("H", request.height), ("W", request.width)):
        if value <= 0 or value % factor:
            raise GenerationError(name, f"{name} must be a positive multiple of {factor}, got {value}")
    return brought_to_size(request)


def brought_to_size(request: GenerationRequest) -> GenerationRequest:
    """A resolved request with its init image (RGB) and mask (the gray it draws) brought to its size by its resize
    mode, so that the rest of the run finds them there (an only-masked inpainting's box is cut from the image as it
    is)."""
    if request.init_image is None or request.inpaint_area != "whole_picture":
        return request
    assert request.width is not None and request.height is not None, "a resolved request has a size"
    # A mask of another size is stretched over the init image first (as diffusers stretches one; A1111 fits it by
    # the resize mode at its own shape, which only agrees with the image's when the shapes do), so that a resize
    # mode cuts both alike.
    mask = None
    if request.mask_image is not None:
        mask = inpainting.mask_band(request.mask_image)
        mask = mask.resize(request.init_image.size, resample=Image.Resampling.LANCZOS)
    pictures = {"init_image": init_images.rgb(request.init_image), "mask_image": mask}
    return replace(
        request,
        **{name: init_images.sized(picture, request.resize_mode, request.width, request.height)
           for name, picture in pictures.items() if picture is not None},
    )  # fmt: skip


def _rounded_up(strength: float) -> float:
    """A least strength to three significant digits, rounded up, so that the strength an error suggests runs
    (1/3 as 0.333 would still leave ⌊0.333·3⌋ = 0 steps)."""
    unit = 10.0 ** (math.floor(math.log10(strength)) - 2)
    return math.ceil(strength / unit) * unit
