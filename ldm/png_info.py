"""PNG files that carry their generation parameters, in the `parameters` text chunk other SD tools read.

Format (AUTOMATIC1111's): the prompt, then `Negative prompt: ...`, then one line of `Key: value` pairs. A prompt's
line breaks are written as they are, as A1111 writes them (its reader joins a prompt's lines back), but for one
before a line starting `Negative prompt:`, written as `\\n`, so that a prompt can never forge a negative prompt (nor
the parameters, which are always the last line). Backslashes stay as written: `\\(` is how A1111's users write a
literal parenthesis, and doubling it would make every tool that reads the chunk show, and paste back, another
prompt.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ldm import hires
from ldm.generation_request import A1111_AUTOMATIC_NOT_UNIFORM, MASKED_CONTENTS, SAMPLERS, GenerationRequest
from ldm.model import StableDiffusion
from ldm.pipeline import Generation
from ldm.png_encoder import encode_pngs
from ldm.vae_file import VaeFile

PARAMETERS_KEY = "parameters"
NEGATIVE = "Negative prompt:"


def _escape(text: str) -> str:
    """A prompt's text as the chunk holds it: its line breaks as they are (CR LF and CR as LF), but one before a line
    that A1111's reader would take for the start of the negative prompt."""
    first, *rest = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return first + "".join(("\\n" if line.strip().startswith(NEGATIVE) else "\n") + line for line in rest)


def _quote(value: str) -> str:
    """A field's value as A1111 writes it: in JSON quotes when it holds a comma, colon or line break, which its
    reader would otherwise take for the end of the field."""
    return json.dumps(value, ensure_ascii=False) if any(mark in value for mark in ",:\n\r") else value


def parameters_text(
    request: GenerationRequest,
    seed: int,
    model_hash: str = "",
    lora_hashes: Sequence[tuple[str, str]] = (),
    embedding_hashes: Sequence[tuple[str, str]] = (),
    subseed: int | None = None,
    vae_file: VaeFile | None = None,
    model_name: str = "",
) -> str:
    """The parameters text of one image of a resolved request, which merged the LoRAs and read the textual-inversion
    embeddings these name, each with its short hash (`Generation.lora_hashes`, `embedding_hashes`); `seed` and
    `subseed` are the image's own (`Generation.seeds`, `subseeds`); `vae_file`, the model's VAE file if it has one
    (`StableDiffusion.vae_file`); `model_name`, its checkpoint's (A1111's "Model", by which civitai links it).

    A sampler whose A1111 1.9+ default schedule ("Automatic") is another than ours says "Schedule type: Uniform"
    (A1111's name for the model's own levels, which ours walk); a Karras variant says so by its name, as in 1.6."""
    lines = [_escape(request.prompt)]
    if request.negative_prompt:
        lines.append(f"{NEGATIVE} {_escape(request.negative_prompt)}")
    fields = [
        f"Steps: {request.steps}",
        f"Sampler: {SAMPLERS[request.sampler]}",
        *(["Schedule type: Uniform"] if request.sampler in A1111_AUTOMATIC_NOT_UNIFORM else []),
        f"CFG scale: {float(request.scale)}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
    ]
    if model_hash:
        fields.append(f"Model hash: {model_hash}")
    if model_name:
        fields.append(f"Model: {_quote(model_name)}")
    if vae_file is not None:
        fields.append(f"VAE hash: {vae_file.short_hash}, VAE: {_quote(vae_file.name)}")
    if request.variation:
        subseed = request.subseed if subseed is None else subseed
        fields.append(f"Variation seed: {subseed}, Variation seed strength: {float(request.subseed_strength)}")
    if request.seed_resize:
        fields.append(f"Seed resize from: {request.seed_resize_from_w}x{request.seed_resize_from_h}")
    if request.eta:
        fields.append(f"Eta DDIM: {float(request.eta)}")  # A1111's name for DDIM's η ("Eta" is the ancestral one)
    if request.init_image is not None or request.hires:
        fields.append(f"Denoising strength: {float(request.strength)}")
    if request.hires:
        # A1111's fields: its size is the first pass's, "Hires upscale" or "Hires resize" makes the image's; it writes
        # "Hires steps" only when they are not the first pass's.
        if request.hr_resize_x or request.hr_resize_y:
            fields.append(f"Hires resize: {request.hr_resize_x}x{request.hr_resize_y}")
        else:
            scale = float(request.hr_scale)
            fields.append(f"Hires upscale: {int(scale) if scale.is_integer() else scale}")
        if request.hires_steps != request.steps:
            fields.append(f"Hires steps: {request.hires_steps}")
        fields.append(f"Hires upscaler: {hires.UPSCALERS[request.hr_upscaler]}")
        # The second pass's own sampler and prompts, as A1111 writes them: only where they are not the first's.
        if request.hr_sampler not in ("", request.sampler):
            fields.append(f"Hires sampler: {SAMPLERS[request.hr_sampler]}")
            if _hires_schedule_differs(request):
                fields.append("Hires schedule type: Uniform")
        own = {"Hires prompt": (request.hr_prompt, request.prompt),
               "Hires negative prompt": (request.hr_negative_prompt, request.negative_prompt)}  # fmt: skip
        fields.extend(f"{key}: {_quote(text)}" for key, (text, first) in own.items() if text not in ("", first))
    if request.mask_image is not None:
        if request.invert_mask:
            fields.append("Mask mode: Inpaint not masked")
        fields.append(f"Mask blur: {request.mask_blur}")
        if request.inpaint_area == "only_masked":
            fields.extend(("Inpaint area: Only masked", f"Masked area padding: {request.masked_area_padding}"))
        if request.masked_content != "original":
            fields.append(f"Masked content: {MASKED_CONTENTS[request.masked_content]}")
    if request.clip_skip != 1:
        fields.append(f"Clip skip: {request.clip_skip}")
    # The noise is drawn on the CPU (A1111's GPU default, which it assumes when told nothing, draws other numbers).
    fields.append("RNG: CPU")
    if request.tiling:
        fields.append("Tiling: True")  # after Clip skip and RNG, as A1111 orders them
    if request.weighted_subprompts:
        fields.append("Weighted subprompts: True")
    # Always said: A1111 (and the page) takes a PNG that names none as "Original", which weighs brackets, reads AND
    # and weights after a colon, and reads a text past CLIP's 75 tokens whole (and encodes each text alone); "None"
    # is the original's reading, as written.
    fields.append(f"Emphasis: {'Original' if request.emphasis else 'None'}")
    for key, hashes in (("Lora hashes", lora_hashes), ("TI hashes", embedding_hashes)):
        if hashes:
            # A1111's fields, quoted as it quotes a value holding commas or colons; names lose theirs, as in A1111.
            listed = ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in hashes)
            fields.append(f"{key}: {_quote(listed)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _hires_schedule_differs(request: GenerationRequest) -> bool:
    """Whether A1111 1.9+ would run the hires fix's own sampler (on the model's levels here, but for a Karras
    variant, named so, and DDIM and PLMS, which keep their timesteps) on another schedule: the first pass's, as it
    reads it (Karras by a name's suffix, Uniform where written, else each sampler's own default)."""
    second = request.hr_sampler
    if second.endswith("_karras") or second in ("ddim", "plms"):
        return False
    first = request.sampler
    return first.endswith("_karras") or (
        first not in A1111_AUTOMATIC_NOT_UNIFORM and second in A1111_AUTOMATIC_NOT_UNIFORM
    )


def generation_texts(generation: Generation, model: StableDiffusion) -> list[str]:
    """The parameters text of each image of a generation: its own seeds, the generation's LoRAs and embeddings, and
    `model`'s hashes."""
    return [
        parameters_text(
            generation.request, seed, model.model_hash, generation.lora_hashes, generation.embedding_hashes, subseed,
            model.vae_file, model.model_name,
        )
        for seed, subseed in zip(generation.seeds, generation.subseeds, strict=True)
    ]  # fmt: skip


def encode_with_parameters(images: Sequence[np.ndarray], parameters: Sequence[str]) -> list[bytes]:
    """uint8 (H, W, 3) images → PNG bytes, each with its parameters chunk (iTXt when the text is not Latin-1),
    compressed together on every CPU."""
    return encode_pngs(images, [{PARAMETERS_KEY: text} for text in parameters])


def read_parameters(png: bytes) -> str | None:
    """The parameters text of PNG bytes, or None when there is none."""
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image.text.get(PARAMETERS_KEY)  # type: ignore[attr-defined]
