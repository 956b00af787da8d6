"""What to generate (`GenerationRequest`) and the views of it the pipeline runs: a hires fix's second pass as a
request of its own, and the request without it.

Why apart from the pipeline: the handler and the command lines make and read requests before a model is loaded
(their rules: ldm/request_checks.py; their texts: ldm/request_texts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from PIL import Image

from ldm import hires, k_samplers

# optimizedSD's --sampler names (and the DPM++ samplers and the Karras variants, which it lacks), each with the
# name other SD tools write in a PNG's parameters. DDIM alone takes η; all but PLMS run img2img (optimizedSD's ran DDIM
# alone). The others are ldm/plms.py's and ldm/k_samplers.py's (k-diffusion 0.1.1's, whose DPM2 differs from
# optimizedSD's older copy).
SAMPLERS = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2s_a": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "euler_karras": "Euler Karras",
    "euler_a_karras": "Euler a Karras",
    "heun_karras": "Heun Karras",
    "lms_karras": "LMS Karras",
    "dpm2_karras": "DPM2 Karras",
    "dpm2_a_karras": "DPM2 a Karras",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "dpmpp_2s_a_karras": "DPM++ 2S a Karras",
    "dpmpp_sde_karras": "DPM++ SDE Karras",
}
# Samplers whose schedule A1111 1.9's default ("Automatic") makes Karras' (DPM++ 2M SDE: an exponential one), where
# ours walk the model's own levels unless named `_karras`: their PNGs say so (ldm/png_info.py).
A1111_AUTOMATIC_NOT_UNIFORM = ("dpmpp_2m", "dpmpp_sde", "dpmpp_2s_a", "dpm2", "dpm2_a", "dpmpp_2m_sde")
# The samplers that run img2img, and so a hires fix's second pass.
IMG2IMG_SAMPLERS = tuple(name for name in SAMPLERS if name != "plms")
# Inpainting's "Masked content" (what the repainted part starts from) and "Inpaint area", each with the name A1111
# writes in a PNG's parameters and its API's number for it (`inpainting_fill`; `inpaint_full_res` false, true).
MASKED_CONTENTS = {
    "fill": "fill",
    "original": "original",
    "latent_noise": "latent noise",
    "latent_nothing": "latent nothing",
}
INPAINT_AREAS = {"whole_picture": "Whole picture", "only_masked": "Only masked"}
# The fields that say how to inpaint through a mask: at their defaults without one.
MASK_WAYS = ("invert_mask", "masked_content", "inpaint_area")
MAX_SEED = 2**32 - 1
# The request's texts that CLIP encodes.
TextField = Literal["prompt", "negative_prompt"]
TEXT_FIELDS: tuple[TextField, ...] = ("prompt", "negative_prompt")
# A hires fix's second pass's own prompts and sampler ("": the first pass's).
HIRES_OWN = ("hr_prompt", "hr_negative_prompt", "hr_sampler")
MASK_WITHOUT_INIT = "mask_image needs an init_image: it tells which of its pixels to repaint"
IMG2IMG_RUN = "the hires fix's second pass is an img2img: choose another"


class GenerationError(ValueError):
    """A request the pipeline cannot run; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. `init_image` set → img2img; with a `mask_image` too → inpainting (ldm/inpainting.py: white
    is repainted, black kept, the init image pasted back through the mask blurred by `mask_blur` px). `seed` None →
    one is drawn and reported back.

    `height`/`width` None → the model's native size (txt2img) or the init image's size rounded down to multiples
    of 8 (img2img). `weighted_subprompts` → `prompt` and `negative_prompt` are read as optimizedSD's weighted
    sub-prompts (`ldm/subprompts.py`), not as written; `emphasis` → in AUTOMATIC1111's syntax, whole
    (`ldm/emphasis.py`, and its prompt editing: `ldm/prompt_editing.py`). The prompt's `<lora:name:weight>` tags
    name LoRAs (`ldm/lora.py`) and are not text. `clip_skip` k: the texts are read from CLIP's k-th layer from the
    end (A1111's "Clip skip"; 1, the last, is SD v1's own).

    `subseed_strength` above 0 → A1111's variation seeds (ldm/variation.py): every image keeps `seed`, and its noise
    is bent toward that of its variation seed `subseed` + i (None: drawn and reported back) by the strength.
    `seed_resize_from_w`/`_h` both above 0 → A1111's "Resize seed from" (ldm/seed_resize.py): the seeds' noise is
    drawn at that size and pasted, centred, into the image's own.

    `resize_mode` (A1111's "Resize mode", ldm/init_images.py): how an init image of another shape than the request
    is brought to its size: stretched ("just_resize"), covering it, the overflow cut ("crop_and_resize"), or inside
    it, its edges stretched over the rest ("resize_and_fill"); an only-masked inpainting cuts its own box instead.

    `invert_mask` (A1111's "Mask mode: Inpaint not masked"): the mask's black part is repainted, its white kept.
    `masked_content` (A1111's "Masked content", ldm/inpainting.py): what the repainted part starts from: the init
    image ("original"), its kept part blurred over it ("fill"), the image's noise ("latent_noise") or nothing
    ("latent_nothing"). `inpaint_area` "only_masked" (A1111's "Only masked", ldm/only_masked.py): a box around the
    mask, `masked_area_padding` px wider, is inpainted at the request's size and put back; the images have the init
    image's size.

    `tiling` → A1111's "Tiling" (ldm/tiling.py): the image wraps around its edges, a seamless texture.

    `hr_scale` above 1 → A1111's hires fix (txt2img only, ldm/hires.py): the image is upscaled by `hr_upscaler` to
    `hr_scale` times its size and sampled again for `hr_steps` steps (0: `steps`), `strength` telling how much of it
    the second pass may change. `hr_resize_x`/`_y` (either above 0, `hr_scale` left at 1) → the same, to that width,
    height or both (A1111's "Hires resize"). `hr_prompt`, `hr_negative_prompt`, `hr_sampler` → the second pass's own
    (A1111's "Hires prompt", "Hires negative prompt", "Hires sampler"; empty: the first pass's); its LoRAs are the
    prompt's, since both passes run on the same merged weights.
    """

    prompt: str
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    seed: int | None = None
    n_samples: int = 1
    n_iter: int = 1
    sampler: str = "ddim"
    init_image: Image.Image | None = None
    strength: float = 0.75
    resize_mode: str = "just_resize"
    weighted_subprompts: bool = False
    mask_image: Image.Image | None = None
    emphasis: bool = False
    clip_skip: int = 1
    mask_blur: int = 4  # A1111's default
    invert_mask: bool = False
    masked_content: str = "original"
    inpaint_area: str = "whole_picture"
    masked_area_padding: int = 32  # A1111's UI's default
    hr_scale: float = 1.0  # 1: no hires fix
    hr_upscaler: str = "latent"
    hr_steps: int = 0
    hr_resize_x: int = 0  # 0 with hr_resize_y 0: hr_scale sets the hires fix's size
    hr_resize_y: int = 0
    hr_prompt: str = ""  # "": the prompt
    hr_negative_prompt: str = ""  # "": the negative prompt
    hr_sampler: str = ""  # "": the sampler
    subseed: int | None = None
    subseed_strength: float = 0.0  # 0: no variation
    seed_resize_from_h: int = 0  # 0: the noise is drawn at the image's own size
    seed_resize_from_w: int = 0
    tiling: bool = False

    @property
    def n_images(self) -> int:
        return self.n_samples * self.n_iter

    @property
    def variation(self) -> bool:
        return self.subseed_strength != 0

    @property
    def seed_resize(self) -> bool:
        return self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0

    @property
    def seeds(self) -> list[int]:
        """seed_i = seed + i for image i = iter·n_samples + j; the seed itself for every image with variation seeds,
        as A1111 keeps it."""
        assert self.seed is not None, "seeds are known once the request has a seed"
        return [self.seed + (0 if self.variation else i) for i in range(self.n_images)]

    @property
    def subseeds(self) -> list[int]:
        """Each image's variation seed, subseed + i (none without variation seeds)."""
        if not self.variation:
            return []
        assert self.subseed is not None, "variation seeds are known once the request is resolved"
        return [self.subseed + i for i in range(self.n_images)]

    def img2img_steps(self) -> int:
        """m = ⌊strength·S⌋ (computed as the original does, int() of the float product)."""
        return int(self.strength * self.steps)

    @property
    def denoising_steps(self) -> int:
        """UNet steps each image runs: S for txt2img, m for img2img."""
        return self.steps if self.init_image is None else self.img2img_steps()

    @property
    def hires(self) -> bool:
        return self.hr_scale != 1 or bool(self.hr_resize_x or self.hr_resize_y)

    @property
    def hires_field(self) -> str:
        """The field that asks for its hires fix, for errors to name."""
        return "hr_resize_x" if self.hr_resize_x else "hr_resize_y" if self.hr_resize_y else "hr_scale"

    def hires_plan(self, factor: int) -> hires.Plan:
        """The sizes of its hires fix, once its size is known."""
        assert self.height is not None and self.width is not None, "a resolved request has a size"
        return hires.plan(self.height, self.width, factor, self.hr_scale, (self.hr_resize_x, self.hr_resize_y))

    @property
    def hires_steps(self) -> int:
        """Steps of the hires fix's second pass: `hr_steps`, or as many as the first pass's."""
        return self.hr_steps or self.steps

    @property
    def passes(self) -> tuple[bool, ...]:
        """Its runs, each told by whether it is a hires fix's second pass."""
        return (False, True) if self.hires else (False,)

    @property
    def total_steps(self) -> int:
        """UNet steps each image runs in all: its denoising steps, and the hires fix's second pass."""
        return self.denoising_steps + (self.hires_steps if self.hires else 0)

    @property
    def starts_from_noise(self) -> bool:
        """Whether its images start from noise alone: txt2img, and inpainting at strength 1 (as diffusers' and
        RunwayML's inpainting do; img2img at strength 1 keeps the original's start, z₀ noised to its first step)."""
        return self.init_image is None or (self.mask_image is not None and self.strength == 1.0)


def hires_run(request: GenerationRequest) -> GenerationRequest:
    """The hires fix's second pass's prompts, sampler and steps, still at the first pass's size: what its texts and
    their prompt editing are read from (`text_schedules`)."""
    return replace(
        request,
        prompt=request.hr_prompt or request.prompt,
        negative_prompt=request.hr_negative_prompt or request.negative_prompt,
        sampler=request.hr_sampler or request.sampler,
        steps=request.hires_steps,
    )


def hires_pass(request: GenerationRequest, factor: int) -> GenerationRequest:
    """The hires fix's second pass of a resolved request, as a request of its own: its prompts and sampler
    (`hires_run`) at the larger size (its texts: `text_schedules` of the request's second pass)."""
    height, width = request.hires_plan(factor).size
    return without_hires(replace(hires_run(request), height=height, width=width))


def first_pass_share(request: GenerationRequest, factor: int) -> float:
    """The first pass's share of a hires fix's sampling work, for a progress bar to give each pass its room: each
    pass's UNet calls (`k_samplers.unet_calls`: a second pass of Heun calls twice a step) times its size, which is
    about what a call costs."""
    passes = (request, hires_pass(request, factor))
    work = [k_samplers.unet_calls(r.sampler, r.denoising_steps) * r.height * r.width for r in passes]
    return work[0] / sum(work)


def without_hires(request: GenerationRequest) -> GenerationRequest:
    """The request without its hires fix: what a second pass runs as a request of its own (`hires_pass`)."""
    return replace(request, hr_scale=1.0, hr_resize_x=0, hr_resize_y=0, **dict.fromkeys(HIRES_OWN, ""))
