"""The flags of the txt2img / img2img command lines: optimizedSD's (`optimized_txt2img.py`, `optimized_img2img.py`),
with their names, types and defaults unless a flag's help says otherwise, and ours beside them.

Why apart: the parser is most of what a user of those scripts reads (`--help`), and the longest part of the command
lines; `ldm/cli.py` checks the values and runs them.
"""

from __future__ import annotations

import argparse
from typing import Literal

from ldm import hires, vae_file
from ldm.generation_request import IMG2IMG_SAMPLERS, INPAINT_AREAS, MASKED_CONTENTS, SAMPLERS, GenerationRequest
from ldm.init_images import RESIZE_MODES

Mode = Literal["txt2img", "img2img"]

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_LORA_DIR = "models/Lora"
DEFAULT_EMBEDDINGS_DIR = "models/embeddings"
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
# optimizedSD drew a missing seed from randint(0, 1_000_000); we keep its range, so names stay as short as before.
RANDOM_SEED_MAX = 1_000_000
# Request fields whose optimizedSD flag has another name.
FLAGS = {"eta": "ddim_eta", "mask_image": "mask"}


def build_parser(mode: Mode) -> argparse.ArgumentParser:
    """optimizedSD's flags (same names, types and defaults unless the help says otherwise) plus ours."""
    img2img = mode == "img2img"
    parser = argparse.ArgumentParser(
        prog=f"{mode}.py",
        description=f"{mode} with the flags of optimizedSD's optimized_{mode}.py, on our Stable Diffusion v1 pipeline.",
    )
    # No default here, so that a --prompt given beside --from-file can be told apart and reported as ignored.
    parser.add_argument(
        "--prompt", type=str, help=f"the prompt to render; ignored with --from-file (default: {DEFAULT_PROMPT!r})"
    )
    parser.add_argument(
        "--from-file",
        type=str,
        help="read prompts from this UTF-8 file, one per line (blank lines skipped); each runs with the same "
        "settings, in file order, and seeds continue from one image to the next",
    )
    parser.add_argument("--negative_prompt", type=str, default="", help="what the images should not show")
    parser.add_argument(
        "--outdir",
        type=str,
        default=f"outputs/{mode}-samples",
        help="folder under which each prompt's images go to a folder of its own (its words joined by _, as "
        "optimizedSD names it), as seed_{seed}_{n:05}.{format} with n counting on after the highest n already "
        "there (default: %(default)s)",
    )
    if img2img:
        parser.add_argument("--init-img", type=str, required=True, help="path to the input image")
        parser.add_argument(
            "--mask",
            type=str,
            help="inpainting: an image over --init-img (stretched to its size), white (at least 50 %%) where it is "
            "repainted, black where it is kept",
        )
        parser.add_argument(
            "--mask_blur",
            type=int,
            default=4,
            help="inpainting: the init image is pasted back where the mask keeps it, through the mask blurred by a "
            "Gaussian of this σ in pixels, as AUTOMATIC1111's 'Mask blur' (0: a hard seam; default: %(default)s)",
        )
        parser.add_argument(
            "--invert_mask",
            action="store_true",
            help="inpainting: repaint the mask's black part and keep its white, as AUTOMATIC1111's 'Inpaint not "
            "masked'",
        )
        # The request's fields of named choices, each by its own name, GenerationRequest's default the flag's.
        choices = (
            ("resize_mode", RESIZE_MODES,
             "how an init image of another shape than --W x --H is brought to it, as AUTOMATIC1111's 'Resize mode': "
             "stretched, covering it (the overflow cut) or inside it (its edges stretched over the rest)"),
            ("masked_content", MASKED_CONTENTS,
             "inpainting: what the repainted part starts from, as AUTOMATIC1111's 'Masked content'"),
            ("inpaint_area", INPAINT_AREAS,
             "inpainting: only_masked paints a box around the mask at --H x --W (without them: the init image's "
             "size; AUTOMATIC1111's is 512x512) and puts it back into the init image, whose size the images keep, "
             "as AUTOMATIC1111's 'Only masked'"),
        )  # fmt: skip
        for name, names, what in choices:
            default = getattr(GenerationRequest, name)
            parser.add_argument(f"--{name}", choices=tuple(names), default=default, help=f"{what} (default: {default})")
        parser.add_argument(
            "--masked_area_padding",
            type=int,
            default=GenerationRequest.masked_area_padding,
            help="inpainting, only_masked: pixels added around the mask's box (default: %(default)s)",
        )
    else:
        parser.add_argument(
            "--hr_scale",
            type=float,
            default=1.0,
            help="AUTOMATIC1111's hires fix: make each image at --H x --W, upscale it this many times (at most 4) "
            "and sample it again at that size, for large images that keep one composition (default: %(default)s, off)",
        )
        for flag, side, other in (("--hr_resize_x", "width", "height"), ("--hr_resize_y", "height", "width")):
            parser.add_argument(
                flag,
                type=int,
                default=0,
                help=f"the hires fix to this {side} instead of --hr_scale (AUTOMATIC1111's 'Resize {side} to'): alone, "
                f"the {other} follows the image's proportions; with the {other} too, the image is upscaled to cover "
                "both and cut to them (default: %(default)s, not set)",
            )
        # No defaults here, so that one given without --hr_scale can be told apart and refused.
        parser.add_argument(
            "--hr_upscaler",
            choices=tuple(hires.UPSCALERS),
            help="the hires fix's upscaler: A1111's latent interpolations, or PIL's lanczos or nearest on the image "
            "(default: latent)",
        )
        parser.add_argument(
            "--hr_steps", type=int, help="the hires fix's second pass: its steps (default: as many as --ddim_steps)"
        )
        for flag, what in (("--hr_prompt", "prompt"), ("--hr_negative_prompt", "negative prompt")):
            parser.add_argument(
                flag, help=f"the hires fix's second pass's own {what}, AUTOMATIC1111's 'Hires {what}' (default: the "
                "first pass's)",
            )  # fmt: skip
        parser.add_argument(
            "--hr_sampler",
            choices=IMG2IMG_SAMPLERS,
            help="the hires fix's second pass's own sampler (default: --sampler's)",
        )
    parser.add_argument(
        "--strength",
        type=float,
        default=0.75 if img2img else None,
        help=(
            "how much of the init image is replaced by noise, in (0, 1]; ⌊strength·ddim_steps⌋ steps run"
            if img2img
            else "the hires fix's denoising strength: how much of the upscaled image its second pass may change, in "
            "(0, 1]"
        )
        + " (default: 0.75)",
    )
    parser.add_argument(
        "--ddim_steps",
        type=int,
        default=50,
        help="denoising steps, whatever the sampler (optimizedSD's name; default: %(default)s)",
    )
    parser.add_argument(
        "--ddim_eta", type=float, default=0.0, help="DDIM η, 0 to 1; 0 is deterministic (default: %(default)s)"
    )
    parser.add_argument("--n_iter", type=int, default=1, help="batches per prompt (default: %(default)s)")
    size_default = "the init image's, rounded down to a multiple of 8" if img2img else "the model's, 512 for SD v1"
    parser.add_argument("--H", type=int, help=f"image height in pixels, a multiple of 8 (default: {size_default})")
    parser.add_argument("--W", type=int, help=f"image width in pixels, a multiple of 8 (default: {size_default})")
    parser.add_argument("--C", type=int, help="latent channels; must be the model's (default: the model's, 4)")
    parser.add_argument("--f", type=int, help="VAE downsampling factor; must be the model's (default: the model's, 8)")
    parser.add_argument(
        "--n_samples", type=int, default=5, help="images per batch, each with its own seed (default: %(default)s)"
    )
    parser.add_argument(
        "--scale", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        help=f"seed of the first image; image i gets seed + i (default: random in [0, {RANDOM_SEED_MAX:,}])",
    )
    parser.add_argument(
        "--subseed",
        type=int,
        help="AUTOMATIC1111's variation seed: with --subseed_strength above 0 every image keeps --seed, and image "
        f"i's noise is bent toward that of subseed + i (default: random in [0, {RANDOM_SEED_MAX:,}])",
    )
    parser.add_argument(
        "--subseed_strength",
        type=float,
        default=0.0,
        help="how far toward the variation seed's noise, in [0, 1] (default: %(default)s, no variation)",
    )
    for side, name in (("h", "height"), ("w", "width")):
        parser.add_argument(
            f"--seed_resize_from_{side}",
            type=int,
            default=0,
            help=f"AUTOMATIC1111's 'Resize seed from {name}': draw the seeds' noise at this {name} (with the other "
            "side) and paste it, centred, into the image's own, so a seed keeps what it painted at that size "
            "(default: 0, none)",
        )
    parser.add_argument(
        "--device", type=str, default="cuda", help="cpu, cuda, cuda:N or mps (Apple silicon) (default: %(default)s)"
    )
    parser.add_argument(
        "--precision",
        choices=("full", "autocast", "bf16"),
        default="autocast",
        help="autocast: float16 weights on CUDA, float32 on the CPU (where float16 is slow and inexact) and on mps; "
        "full: float32 everywhere; bf16: bfloat16 everywhere, about twice float32's speed on a CPU with AMX "
        "(docs/PERFORMANCE.md), within bfloat16's rounding of the float32 image (default: %(default)s)",
    )
    parser.add_argument(
        "--format",
        choices=("png", "jpg"),
        default="png",
        help="png carries the generation parameters in its `parameters` text chunk, jpg in EXIF UserComment "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--sampler",
        type=str,
        default="ddim",
        help=f"{', '.join(SAMPLERS)} (default: %(default)s, as our server; optimizedSD defaults to plms). All but ddim "
        "take --ddim_eta 0; plms runs txt2img only",
    )
    parser.add_argument(
        "--weighted_subprompts",
        action="store_true",
        help="read 'a castle:0.7 a forest:0.3' as sub-prompts blended by weight, as optimizedSD always did (without "
        "it, CLIP reads the colons and numbers as written, as our server does by default); a weight that is not a "
        "number, not finite, or weights summing to 0 are errors, where optimizedSD warned or crashed",
    )
    parser.add_argument(
        "--emphasis",
        action="store_true",
        help="read AUTOMATIC1111's syntax: '(word:1.3)', '(word)', '[word]' weigh words, BREAK starts a new chunk, "
        "a prompt past the 75 tokens CLIP reads is read whole, in chunks of 75, and '[cat:dog:0.5]', '[cat|dog]' "
        "change the text as sampling goes, and 'a castle AND a forest:0.6' guides toward each sub-prompt (each one "
        "more UNet row per image) (not with --weighted_subprompts)",
    )
    parser.add_argument(
        "--tiling",
        action="store_true",
        help="AUTOMATIC1111's 'Tiling': every convolution pads circularly, so each image wraps around its edges and "
        "its copies tile without a seam (a texture)",
    )
    parser.add_argument(
        "--clip_skip",
        type=int,
        default=1,
        help="AUTOMATIC1111's 'Clip skip': read the prompt from CLIP's k-th layer from the end; 2 (the penultimate) "
        "is what many fine-tuned SD v1 models were trained with (default: %(default)s, SD v1's own)",
    )
    parser.add_argument(
        "--lora_dir",
        type=str,
        default=DEFAULT_LORA_DIR,
        help="where the LoRAs a prompt names are: '<lora:name:0.8>' in a prompt merges name.safetensors (or .pt, "
        ".ckpt) from this folder or below it, at weight 0.8; '<lora:name:0.8:0.5>' gives the text encoder 0.8 and "
        "the UNet 0.5 (default: %(default)s)",
    )
    parser.add_argument(
        "--embeddings_dir",
        type=str,
        default=DEFAULT_EMBEDDINGS_DIR,
        help="where textual-inversion embeddings are: name.pt (.bin, .safetensors, A1111's or diffusers') in this "
        "folder or below it makes the word 'name' in a prompt or negative prompt stand for its vectors (default: "
        "%(default)s)",
    )
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument(
        "--turbo",
        action="store_true",
        help="optimizedSD: keep the UNet on the GPU for speed. Ours always does unless --low_memory, so this is the "
        "default; it never changes the images",
    )
    speed.add_argument(
        "--low_memory",
        action="store_true",
        help="keep the networks on the CPU and move each to the GPU only while it runs: less VRAM, slower, "
        "same images (optimizedSD's default mode)",
    )
    parser.add_argument(
        "--unet_bs",
        type=int,
        default=1,
        help="optimizedSD: UNet batch size. Accepted (≥ 1) and ignored: we run each batch's conditional and "
        "unconditional passes in one UNet call, and the images are the same either way",
    )
    parser.add_argument("--skip_grid", action="store_true", help="accepted and ignored: we never write grids")
    parser.add_argument(
        "--n_rows", type=int, default=0, help="rows of the grid: accepted and ignored, we never write grids"
    )
    parser.add_argument(
        "--skip_save",
        action="store_true",
        help="generate but write no image file, e.g. to time a run; the closing line still gives the seeds",
    )
    parser.add_argument(
        "--fixed_code",
        action="store_true",
        help="optimizedSD: reuse one starting noise for every batch. Refused: image i starts from its own noise, "
        "seeded seed + i",
    )
    parser.add_argument(
        "--ckpt",
        type=str,
        default=DEFAULT_CKPT,
        help="a .ckpt or .safetensors SD v1 checkpoint, or a split folder (with manifest.json, from "
        "scripts/split_checkpoint.py) (default: %(default)s)",
    )
    parser.add_argument(
        "--vae",
        type=str,
        help=vae_file.FLAG_HELP,
    )
    parser.add_argument(
        "--config",
        type=str,
        help="config YAML of a single-file checkpoint (default: configs/v1-inference.yaml, or "
        "configs/v1-inpainting-inference.yaml for an inpainting checkpoint, told by its UNet's 9 input channels); a "
        "split folder has its own",
    )
    return parser
