"""The `/imagine` request and answers as the OpenAPI document shows them.

For the docs only: the front forwards bodies without checking them against this model, since TorchServe's handler
is the one validator of the fields (its limits are configured in model-config.yaml, and its errors name the field).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ImagineRequest(BaseModel):
    """The original app's fields, and those of our inference API. The original's other options are accepted too
    (`unet_bs`, `turbo`, `precision`, `device`, `n_rows`, `outdir`, `skip_grid`, `skip_save`, `fixed_code`,
    `from_file` empty, `C` 4, `f` 8, `format` "png"), and dropped: they shaped how it ran, not the image."""

    prompt: str = Field(
        description="what the images should show; `<lora:name:0.8>` merges the server's LoRA `name` at weight 0.8 "
        "(`<lora:name:0.8:0.5>`: text encoder 0.8, UNet 0.5), as AUTOMATIC1111 reads it; at most the server's "
        "max_prompt_chars (2000 as shipped)",
    )
    negative_prompt: str = Field("", description="what the images should not show")
    H: int = Field(512, description="height in pixels, a multiple of 8 (img2img: the init image's)")
    W: int = Field(512, description="width in pixels, a multiple of 8 (img2img: the init image's)")
    ddim_steps: int = Field(50, description="denoising steps (the original app's name, whatever the sampler)")
    scale: float = Field(7.5, description="classifier-free guidance scale")
    eta: float = Field(
        0.0, description="DDIM η; 0 is deterministic (and the only value other samplers take, in either pass)"
    )
    ddim_eta: float | None = Field(None, description="the original app's name for eta (give one of the two)")
    seed: int | None = Field(None, description="seed of the first image; image i uses seed + i (default or -1: random)")
    subseed: int | None = Field(
        None,
        description="AUTOMATIC1111's variation seed: with subseed_strength above 0 every image keeps the seed, and "
        "image i's noise is bent toward that of subseed + i (default: random, reported back)",
    )
    subseed_strength: float = Field(
        0.0, description="how far toward the variation seed's noise, in [0, 1] (0: no variation)"
    )
    seed_resize_from_h: int = Field(
        0,
        description="AUTOMATIC1111's 'Resize seed from height': with seed_resize_from_w, the seeds' noise is drawn at "
        "that size and pasted, centred, into the image's own, so a seed keeps what it painted there (0 or -1: none)",
    )
    seed_resize_from_w: int = Field(0, description="AUTOMATIC1111's 'Resize seed from width' (0 or -1: none)")
    n_samples: int = Field(
        1, description="images per iteration (n_samples×n_iter at most the server's max_images, 8 as shipped)"
    )
    n_iter: int = Field(1, description="iterations: each is one TorchServe request of n_samples images")
    sampler: str = Field(
        "ddim",
        description="ddim, plms (the original app's default), euler, euler_a, heun, dpm2, dpm2_a, lms, dpmpp_2m, "
        "dpmpp_2m_sde, dpmpp_2s_a, dpmpp_sde, or the Karras-schedule euler_karras, euler_a_karras, heun_karras, "
        "lms_karras, dpm2_karras, dpm2_a_karras, "
        "dpmpp_2m_karras, dpmpp_2m_sde_karras, dpmpp_2s_a_karras, dpmpp_sde_karras; all but ddim take eta 0, "
        "and plms runs txt2img only",
    )
    weighted_subprompts: bool = Field(
        False,
        description="read 'a castle:0.7 a forest:0.3' as optimizedSD did: the embeddings of 'a castle' and 'a forest' "
        "blended by weight (default: model-config.yaml's, off as shipped, where CLIP reads the colons as written)",
    )
    emphasis: bool = Field(
        False,
        description="read AUTOMATIC1111's syntax: '(word)', '(word:1.3)', '[word]' weigh words, BREAK starts a new "
        "chunk, a prompt past CLIP's 75 tokens is read whole in chunks of 75, and '[cat:dog:0.5]' (prompt editing), "
        "'[cat|dog]' (alternation) change the text as sampling goes, and 'a castle AND a forest:0.6' guides toward "
        "each sub-prompt apart (composable diffusion) (default: model-config.yaml's, off as shipped); not with "
        "weighted_subprompts",
    )
    clip_skip: int = Field(
        1,
        description="AUTOMATIC1111's 'Clip skip': read the prompts from CLIP's k-th layer from the end; 2 (the "
        "penultimate) is what many fine-tuned SD v1 models expect (default: model-config.yaml's, 1 as shipped)",
    )
    tiling: bool = Field(
        False,
        description="AUTOMATIC1111's 'Tiling': every convolution pads circularly, so the image wraps around its edges "
        "(a seamless texture)",
    )
    init_image: str | None = Field(None, description="img2img: base64 PNG, JPEG or WebP, a data: URL prefix allowed")
    mask_image: str | None = Field(
        None,
        description="inpainting: base64 PNG, JPEG or WebP over init_image (stretched to its size if it is not); "
        "white (at least 50 %) is repainted, black kept",
    )
    mask_blur: int = Field(
        4,
        description="inpainting: the init image is pasted back where the mask keeps it, through the mask blurred by "
        "a Gaussian of this σ in pixels, as AUTOMATIC1111's 'Mask blur' (0: a hard seam; at most 64; default: "
        "model-config.yaml's, 4 as shipped)",
    )
    resize_mode: str = Field(
        "just_resize",
        description="img2img: how an init image of another shape than W×H is brought to it, as AUTOMATIC1111's "
        "'Resize mode': just_resize (stretched), crop_and_resize (covering it, the overflow cut) or resize_and_fill "
        "(inside it, its edges stretched over the rest)",
    )
    invert_mask: bool = Field(
        False,
        description="inpainting: repaint the mask's black part, keep its white (AUTOMATIC1111's 'Inpaint not masked')",
    )
    masked_content: str = Field(
        "original",
        description="inpainting: what the repainted part starts from, as AUTOMATIC1111's 'Masked content': original, "
        "fill (the colours around it), latent_noise or latent_nothing",
    )
    inpaint_area: str = Field(
        "whole_picture",
        description="inpainting: only_masked paints a box around the mask at W×H and puts it back into the init "
        "image, whose size the images keep (AUTOMATIC1111's 'Only masked'); whole_picture",
    )
    masked_area_padding: int = Field(
        32, description="inpainting, only_masked: pixels added around the mask's box (0 to 256)"
    )
    strength: float = Field(
        0.75,
        description="img2img and inpainting: how much of the init image is replaced, in (0, 1]; with hr_scale: how "
        "much of the upscaled image the hires fix's second pass may change (AUTOMATIC1111's 'Denoising strength')",
    )
    hr_scale: float = Field(
        1.0,
        description="AUTOMATIC1111's hires fix (txt2img): the image is made at W×H, upscaled this many times (up to "
        "4; the result within the pixel limit) and sampled again at that size, so a large image keeps one composition "
        "(1: off)",
    )
    hr_upscaler: str = Field(
        "latent",
        description="the hires fix's upscaler: latent, latent_antialiased, latent_bicubic, latent_bicubic_antialiased, "
        "latent_nearest, latent_nearest_exact (AUTOMATIC1111's interpolations of the latent), lanczos or nearest "
        "(PIL's, on the image) (default: model-config.yaml's, latent as shipped)",
    )
    hr_steps: int = Field(
        0,
        description="the hires fix's second pass: its steps, the last of ⌊hr_steps / strength⌋ (0: as many as "
        "ddim_steps; default: model-config.yaml's, 0 as shipped)",
    )
    hr_resize_x: int = Field(
        0,
        description="the hires fix to this width instead of hr_scale (AUTOMATIC1111's 'Hires resize'; 0: not set): "
        "alone, the height follows W×H's proportions; with hr_resize_y, the image is upscaled to cover both and cut "
        "to them",
    )
    hr_resize_y: int = Field(
        0, description="the hires fix to this height instead of hr_scale (0: not set), as hr_resize_x does the width"
    )
    hr_prompt: str = Field(
        "", description="the hires fix's second pass's own prompt (AUTOMATIC1111's 'Hires prompt'; empty: the prompt)"
    )
    hr_negative_prompt: str = Field(
        "", description="the hires fix's second pass's own negative prompt (empty: the negative prompt)"
    )
    hr_sampler: str = Field("", description="the hires fix's second pass's own sampler, not plms (empty: sampler)")
    stream: bool = Field(False, description="answer with the progress stream, as POST /imagine/stream does")


EXAMPLES = {
    "png": {"summary": "One PNG (Accept: image/png)", "value": {"prompt": "a lighthouse at dawn", "seed": 42}},
    "json": {
        "summary": "Ten images as a JSON array (Accept: application/json)",
        "value": {"prompt": "a lighthouse at dawn", "n_samples": 2, "n_iter": 5},
    },
}
ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "field": {"type": "string"}}}
NDJSON_DESCRIPTION = (
    'One JSON object per line: `{"step", "total", "image_index", "image_count", "iteration", "n_iter"}` per denoising '
    "step of the UNet batch holding `image_count` images from `image_index` on (some with a base64 JPEG `preview`; "
    '`"hires": true` on the steps of the hires fix\'s second pass, which count from 1 again; `"passes"`, 1 or 2, on '
    'every step, with `"first_pass_share"` of the UNet work when 2), then `{"images", "seeds", "parameters", '
    '"warnings"}` (`warnings`: the words of a prompt past the 75 tokens CLIP reads, which did nothing; `subseeds` '
    'too with variation seeds), or `{"error", "field", "status"}` on failure.'
)


def request_body() -> dict[str, Any]:
    """The `requestBody` of both /imagine operations."""
    content = {"application/json": {"schema": ImagineRequest.model_json_schema(), "examples": EXAMPLES}}
    return {"requestBody": {"required": True, "content": content}}


def errors() -> dict[int | str, dict[str, Any]]:
    """The error answers both operations share."""
    content = {"application/json": {"schema": ERROR}}
    answers = {
        400: "a field breaks a rule; `field` names it",
        413: "the body is larger than TorchServe takes",
        415: "the body is a form, not JSON",
        500: "the generation failed (the server log says why), or its worker died",
        502: "TorchServe's answer was broken or cut short",
        503: "TorchServe is not reachable, does not serve the model, is busy (its queue full: retry in a few seconds), "
        "or the worker's GPU failed (it restarts: retry in a minute)",
        504: "TorchServe sent nothing within the timeout",
        507: "out of memory (the GPU's, or a CPU worker's): retry, or ask for fewer or smaller images",
    }
    return {status: {"description": description, "content": content} for status, description in answers.items()}


IMAGINE_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`Accept: image/png`: the PNG (one image only). Otherwise a JSON array of base64 PNGs, "
        "n_samples × n_iter of them. `X-Seed` holds the first seed, `X-Seeds` all of them.",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "array", "items": {"type": "string", "format": "byte"}}},
            "application/x-ndjson": {"schema": {"type": "string", "description": NDJSON_DESCRIPTION}},
        },
    },
}
STREAM_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The progress stream; `X-Seed` holds the first seed.",
        "content": {"application/x-ndjson": {"schema": {"type": "string", "description": NDJSON_DESCRIPTION}}},
    },
}
