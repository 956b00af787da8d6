"""txt2img / img2img command lines that take the flags of optimizedSD's `optimized_txt2img.py` / `optimized_img2img.py`.

Why: users of that fork (basujindal/stable-diffusion) have scripts full of its flags; they should run unchanged on
our pipeline. One parser and one run loop serve both commands (`scripts/txt2img.py`, `scripts/img2img.py`).

Where we differ from optimizedSD, on purpose (each is also in `--help`):
- Images go where optimizedSD put them, a folder per prompt under `--outdir` (`prompt_folder`: its words joined by
  "_", the path cut at 150 characters), but a slash or ".." in a prompt never names another folder; as
  `seed_{seed}_{n:05}.{format}`, n continuing after the highest n already in that folder (optimizedSD counted its
  files, reusing a number once one was deleted); every PNG carries the `parameters` chunk (JPEG: EXIF UserComment).
- `--sampler` defaults to `ddim`, as our server does, so a seed makes the same image from either; optimizedSD's
  default `plms` (txt2img only, as there) and its k-diffusion samplers (img2img too, where its img2img ran DDIM
  alone) are there by name, with
  `--ddim_eta` 0, in k-diffusion 0.1.1's versions (optimizedSD's older copy takes DPM2's midpoint otherwise).
- A prompt goes to CLIP as written unless `--weighted_subprompts` is given: optimizedSD always split
  `a castle:0.7 a forest:0.3` into sub-prompts blended by weight, which also cut `style: watercolor` in two. With the
  flag, its split exactly, but weights it could not use are errors (`ldm/subprompts.py`: not a number, not finite,
  summing to 0), where it warned or crashed.
- `--fixed_code` (one starting noise reused by every batch) fails with a clear message: image i starts from its own
  noise, seeded seed + i, so that any image can be remade from its seed alone.
- `--C`/`--f` default to the model's own values and must equal them; `--H`/`--W` default to the model's native size
  (512 for SD v1, optimizedSD's default), and img2img rounds the init image down to multiples of 8, not 64.
- `--turbo`, `--unet_bs`, `--skip_grid` and `--n_rows` are accepted and change nothing in the images (see their help);
  `--skip_save` writes no image file (the closing line still gives the seeds).
- `--from-file` prompts run in file order (optimizedSD sorted them), blank lines skipped; given with `--prompt`, the
  file wins, as in optimizedSD, and a warning says `--prompt` is ignored.
- An input we cannot use ends the run before the model loads, with one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from tqdm import tqdm

from ldm.checkpoint import CheckpointError, default_config
from ldm.cli_flags import DEFAULT_PROMPT, FLAGS, RANDOM_SEED_MAX, Mode, build_parser
from ldm.config import ConfigError, ModelConfig, load_config
from ldm.cpu_features import has_amx_bf16
from ldm.devices import auto_dtype, mps_available
from ldm.embeddings import EmbeddingLibrary
from ldm.generation_request import (
    MAX_SEED,
    SAMPLERS,
    GenerationError,
    GenerationRequest,
)
from ldm.init_images import ImageError, rgb, upright
from ldm.inpainting import mask_band
from ldm.model import StableDiffusion
from ldm.output_names import next_index, outdir_problem, prompt_folder, write_new
from ldm.parts import CONFIG_FILE, MANIFEST, TOKENIZER_DIR, load_checkpoint, load_split
from ldm.pipeline import Generation, Pipeline
from ldm.png_info import encode_with_parameters, generation_texts
from ldm.request_checks import check_clip_skip, check_emphasis, check_hires_texts, check_lora_names, resolve
from ldm.request_texts import text_parts, unread_warnings
from ldm.safe_pickle import UnsafeCheckpointError
from ldm.tokenizer import CLIPTokenizer
from ldm.vae_file import VaeChoice, VaeError, choose

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")
DEMO_HINT = (
    "for a random-weight demo model run `python scripts/make_tiny_checkpoint.py --config "
    "tests/fixtures/reference/tiny-dev.yaml --out models/tiny.ckpt` and pass --ckpt models/tiny.ckpt --config "
    "tests/fixtures/reference/tiny-dev.yaml"
)


class CliError(Exception):
    """An input the command cannot run with; `main` prints it as one `error:` line and exits with code 2."""


def check_flags(args: argparse.Namespace) -> None:
    """Flag values wrong whatever the model: fail before anything is loaded."""
    if args.sampler not in SAMPLERS:
        raise CliError(f"--sampler {args.sampler} is not available; choose one of: {', '.join(SAMPLERS)}")
    if args.fixed_code:
        raise CliError(
            "--fixed_code is not supported: image i starts from its own noise, seeded seed + i, so that any image "
            "can be remade from its seed alone; to start prompts from the same noise, run each with the same --seed"
        )
    # txt2img's hires flags (img2img has none; its --strength is its own).
    if hasattr(args, "hr_scale") and args.hr_scale == 1.0 and not (args.hr_resize_x or args.hr_resize_y):
        for flag in ("hr_upscaler", "hr_steps", "strength", "hr_prompt", "hr_negative_prompt", "hr_sampler"):
            if getattr(args, flag) is not None:
                raise CliError(f"--{flag} needs --hr_scale or --hr_resize_x/--hr_resize_y: it is the hires fix's")
    # The rest of the request's rules are the pipeline's (`resolve`), checked before the model loads.
    for flag in ("n_iter", "unet_bs"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be at least 1, got {getattr(args, flag)}")


def select_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N or mps (Apple silicon's GPU), checked against this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {name}: only cpu, cuda, cuda:N and mps are supported")
    if device.type == "mps" and not mps_available():
        raise CliError(f"--device {name}: this machine has no Apple silicon GPU that torch can use; pass --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            other = "mps" if mps_available() else "cpu"
            raise CliError(f"--device {name}: CUDA is not available on this machine; pass --device {other}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def select_dtype(precision: str, device: torch.device) -> torch.dtype:
    """optimizedSD's autocast halved the networks on the GPU only; on the CPU float16 is slow, so stay float32.
    bfloat16 (ours) is asked for by name: on a CPU it is fast only where the hardware has bf16 instructions."""
    if precision == "bf16":
        return torch.bfloat16
    return auto_dtype(device) if precision == "autocast" else torch.float32


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of the run: the non-blank lines of `--from-file`, else `--prompt` (optimizedSD's default prompt
    if neither is given)."""
    if args.from_file is None:
        return [DEFAULT_PROMPT if args.prompt is None else args.prompt]
    path = Path(args.from_file)
    try:
        raw = path.read_bytes()
        lines = raw.decode("utf-8-sig").splitlines()  # a byte-order mark (Windows' Notepad) is no text
    except OSError as error:
        raise CliError(f"--from-file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        where = error.start + len(raw) - len(error.object)  # counted in the file: the mark was taken off first
        raise CliError(f"--from-file {path} must be UTF-8 text; byte {where} ({raw[where]:#04x}) is not") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CliError(f"--from-file {path} holds no prompt")
    return prompts


def read_image(path: str, flag: str = "init-img") -> Image.Image:
    """The image of `--{flag}` as RGB (`--mask`: the grayscale mask it draws, `mask_band`), read whole so no file
    handle stays open; one whose pixels would not come out as they look (16-bit grayscale, CMYK, an animation) is
    refused, as the server refuses it."""
    try:
        with Image.open(path) as image:
            shown = upright(image)
            return mask_band(shown) if flag == "mask" else rgb(shown)
    except ImageError as error:
        raise CliError(f"--{flag} {path} {error}") from None
    except FileNotFoundError:
        raise CliError(f"--{flag} {path}: no such file") from None
    except Image.DecompressionBombError:
        # Raised from the header alone, for more than twice PIL's MAX_IMAGE_PIXELS (so that limit is set).
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise CliError(f"--{flag} {path}: more than the {limit:,} pixels PIL will decode") from None
    except (UnidentifiedImageError, OSError) as error:
        raise CliError(f"--{flag} {path}: not an image we can read ({error})") from None


@dataclass(frozen=True)
class ModelSource:
    """Where the weights and their config are; `split` → a folder of `load_split`; `vae` → the VAE file to use
    instead of the checkpoint's (or the split folder's), if any."""

    ckpt: Path
    config_path: Path
    split: bool
    vae: VaeChoice


def locate_model(ckpt: str, config: str | None, vae: str | None = None) -> ModelSource:
    """Resolve `--ckpt`/`--config`/`--vae` to existing files, or say in one line what is missing and how to get it."""
    path = Path(ckpt)
    choice = choose(path, vae)
    if choice.path is not None and not choice.path.is_file():
        what = "a folder, not a file" if choice.path.is_dir() else "not found"
        raise CliError(f"--vae {choice.path}: {what} ({choice.path.absolute()})")
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise CliError(f"--ckpt {path} is a folder without {MANIFEST}: not a split checkpoint")
        if config is not None:
            raise CliError(f"--config cannot be used with the split folder {path}: it has its own {CONFIG_FILE}")
        return ModelSource(path, path / CONFIG_FILE, split=True, vae=choice)
    if not path.is_file():
        raise CliError(
            f"checkpoint not found: {path.absolute()} (--ckpt {ckpt}). Download sd-v1-4.ckpt and put it there or pass "
            f"--ckpt PATH (.ckpt, .safetensors or a split folder); {DEMO_HINT}"
        )
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise CliError(f"--ckpt {path}: expected a .ckpt or .safetensors file or a split folder")
    config_path = default_config(path) if config is None else Path(config)
    if not config_path.is_file():
        raise CliError(f"config not found: {config_path.absolute()} (--config); pass --config PATH")
    return ModelSource(path, config_path, split=False, vae=choice)


def check_against_model(args: argparse.Namespace, config: ModelConfig) -> None:
    """`--C`/`--f` are properties of the model: a different value cannot be honoured."""
    channels, factor = config.latent_channels, config.vae.downsampling_factor
    if args.C not in (None, channels):
        raise CliError(f"--C {args.C}: this model has {channels} latent channels")
    if args.f not in (None, factor):
        raise CliError(f"--f {args.f}: this model's VAE downsamples by {factor}")


def check_init_size(args: argparse.Namespace, image: Image.Image, factor: int) -> None:
    """A side left to the init image is rounded down to a multiple of `factor`: a shorter side would become 0, and
    the pipeline would blame --H/--W, flags the user never passed."""
    width, height = image.size
    if (args.W is None and width < factor) or (args.H is None and height < factor):
        raise CliError(
            f"--init-img {args.init_img} is {width}×{height} px: too small, its sides must be at least {factor} px "
            "(or pass --H and --W to resize it)"
        )


def make_outdir(name: str | Path) -> Path:
    """`--outdir`, created and written to once, so that a bad path fails before the model loads, not after minutes
    of loading."""
    path = Path(name)
    problem = outdir_problem(path)
    if problem:
        raise CliError(f"--outdir {problem}")
    return path


def load_model(
    source: ModelSource, config: ModelConfig, device: torch.device, args: argparse.Namespace
) -> StableDiffusion:
    """The model on `device` in the `--precision` dtype, low-memory mode if asked."""
    dtype = select_dtype(args.precision, device)
    if source.split:
        return load_split(source.ckpt, device, dtype, args.low_memory, source.vae.path)
    return load_checkpoint(source.ckpt, config, device, dtype, args.low_memory, source.vae.path)


def encode_jpeg(image: np.ndarray, parameters: str) -> bytes:
    """uint8 (H, W, 3) → JPEG bytes (PIL's default quality, as optimizedSD wrote) with the parameters in EXIF
    UserComment, the place other SD tools read them from in a JPEG (8-byte charset prefix, then UTF-16BE)."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + parameters.encode("utf-16-be")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def write_images(
    generation: Generation, outdir: Path, index: int, image_format: str, model: StableDiffusion
) -> tuple[list[Path], int]:
    """Write a batch's images as the first free numbers from `index` on (another run may write into the folder too),
    each carrying its parameters (with `model`'s hashes); returns the paths and the next number."""
    texts = generation_texts(generation, model)
    files = (
        encode_with_parameters(generation.images, texts)  # the batch's PNGs on every CPU at once
        if image_format == "png"
        else [encode_jpeg(image, text) for image, text in zip(generation.images, texts, strict=True)]
    )
    paths = []
    for seed, data in zip(generation.seeds, files, strict=True):
        path, index = write_new(outdir, seed, index, image_format, data)
        paths.append(path)
    return paths, index


def run(args: argparse.Namespace, mode: Mode) -> list[Path]:
    """Check every input, load the model, generate and write the images; returns the written paths.

    Order (optimizedSD's): for each of n_iter iterations, for each prompt, one batch of n_samples images; seeds
    count up by one per image across the whole run, so every image has a distinct seed (with variation seeds, every
    image keeps the seed and the variation seeds count up instead).
    """
    check_flags(args)
    device = select_device(args.device)
    prompts = read_prompts(args)
    init_image = read_image(args.init_img) if mode == "img2img" else None
    mask_image = read_image(args.mask, "mask") if mode == "img2img" and args.mask is not None else None
    source = locate_model(args.ckpt, args.config, args.vae)
    try:
        config = load_config(source.config_path)
    except (ConfigError, OSError) as error:
        raise CliError(f"config {source.config_path}: {error}") from None
    check_against_model(args, config)
    if init_image is not None:
        check_init_size(args, init_image, config.vae.downsampling_factor)

    seed = args.seed if args.seed is not None else random.randint(0, RANDOM_SEED_MAX)
    subseed = args.subseed
    if args.subseed_strength != 0 and subseed is None:
        subseed = random.randint(0, RANDOM_SEED_MAX)
    # What counts up from image to image across the run: the seed, or with variation seeds the variation seed.
    counted_name, counted = ("subseed", subseed) if args.subseed_strength != 0 else ("seed", seed)
    assert counted is not None
    n_images = args.n_samples * args.n_iter * len(prompts)
    if counted + n_images - 1 > MAX_SEED:
        last = counted + n_images - 1
        raise CliError(f"--{counted_name} {counted}: the run's last {counted_name} {last} would exceed {MAX_SEED}")
    counts = range(counted, counted + n_images)
    template = GenerationRequest(
        prompt=prompts[0],
        negative_prompt=args.negative_prompt,
        height=args.H,
        width=args.W,
        steps=args.ddim_steps,
        scale=args.scale,
        eta=args.ddim_eta,
        seed=seed,
        n_samples=args.n_samples,
        sampler=args.sampler,
        weighted_subprompts=args.weighted_subprompts,
        emphasis=args.emphasis,
        clip_skip=args.clip_skip,
        strength=0.75 if args.strength is None else args.strength,
        subseed=subseed,
        subseed_strength=args.subseed_strength,
        seed_resize_from_h=args.seed_resize_from_h,
        seed_resize_from_w=args.seed_resize_from_w,
        tiling=args.tiling,
    )
    if init_image is not None:
        template = replace(
            template, init_image=init_image, mask_image=mask_image, mask_blur=args.mask_blur,
            resize_mode=args.resize_mode, invert_mask=args.invert_mask,
            masked_content=args.masked_content, inpaint_area=args.inpaint_area,
            masked_area_padding=args.masked_area_padding,
        )  # fmt: skip
    else:
        upscaler, steps = args.hr_upscaler or "latent", args.hr_steps or 0
        template = replace(
            template, hr_scale=args.hr_scale, hr_upscaler=upscaler, hr_steps=steps, hr_resize_x=args.hr_resize_x,
            hr_resize_y=args.hr_resize_y, hr_prompt=args.hr_prompt or "",
            hr_negative_prompt=args.hr_negative_prompt or "", hr_sampler=args.hr_sampler or "",
        )  # fmt: skip
    lora_dir = Path(args.lora_dir)
    try:
        template = resolve(template, config.default_image_size, config.vae.downsampling_factor, config.timesteps)
        check_clip_skip(template, config.text["num_hidden_layers"])
        for prompt in prompts:
            request = replace(template, prompt=prompt)
            check_emphasis(request)
            text_parts(request, "prompt")
            if request.hires:
                check_hires_texts(request)  # a hires prompt names each prompt's LoRAs
            check_lora_names(request, lora_dir)
    except GenerationError as error:
        raise CliError(_flag_error(error, args)) from None
    outdir = None if args.skip_save else make_outdir(args.outdir)
    # Each prompt's own folder (optimizedSD's layout), made now: one that cannot be is said before the work.
    folders = {} if outdir is None else {prompt: make_outdir(prompt_folder(outdir, prompt)) for prompt in prompts}

    # Every input checked: a refused command says only why. What CLIP will not read is said before minutes of
    # loading, once (a long negative prompt is every prompt's).
    tokenizer = CLIPTokenizer(source.ckpt / TOKENIZER_DIR) if source.split else CLIPTokenizer()  # the model's own
    embeddings_dir = Path(args.embeddings_dir)
    vocabulary = EmbeddingLibrary(embeddings_dir, tokenizer, config.text["hidden_size"]).vocabulary()
    lines = (line for p in prompts for line in unread_warnings(tokenizer, replace(template, prompt=p), vocabulary))
    for line in dict.fromkeys(lines):
        print(f"warning: {line}", file=sys.stderr)
    if device.type == "cpu" and select_dtype(args.precision, device) == torch.float32 and has_amx_bf16():
        print("note: this CPU has AMX: --precision bf16 makes images about twice as fast, within bf16's rounding of "
              "these float32 ones", file=sys.stderr)  # fmt: skip
    try:
        model = load_model(source, config, device, args)
    except VaeError as error:
        # The error names the file; a file found beside the checkpoint, unasked, is said to be one.
        beside = "\n(found beside the checkpoint: --vae none keeps the checkpoint's own)" if source.vae.beside else ""
        raise CliError(f"cannot load the {error}{beside}") from None
    except (CheckpointError, ConfigError, UnsafeCheckpointError, FileNotFoundError) as error:
        raise CliError(f"cannot load --ckpt {source.ckpt}: {error}") from None
    if model.vae_file is not None:
        found = " (found beside the checkpoint; --vae none keeps the checkpoint's own)" if source.vae.beside else ""
        print(f"note: the VAE is {model.vae_file.name}'s, not the checkpoint's{found}", file=sys.stderr)
    pipeline = Pipeline(model, lora_dir=lora_dir, embeddings_dir=embeddings_dir)
    try:
        for prompt in prompts:
            pipeline.lora_files(replace(template, prompt=prompt))  # each file read and checked against the model
    except GenerationError as error:
        raise CliError(_flag_error(error, args)) from None

    indices = {folder: next_index(folder) for folder in folders.values()}
    steps_per_batch = template.total_steps
    written: list[Path] = []
    started = time.monotonic()
    with tqdm(total=steps_per_batch * args.n_iter * len(prompts), desc="Sampling", unit="step") as bar:
        for _ in range(args.n_iter):
            for prompt in prompts:
                request = replace(template, prompt=prompt, **{counted_name: counted})
                generation = pipeline.generate(request, lambda progress: bar.update(1))
                if prompt in folders:
                    folder = folders[prompt]
                    paths, indices[folder] = write_images(generation, folder, indices[folder], args.format, model)
                    for path in paths:
                        bar.write(str(path), file=sys.stdout)
                    written += paths
                counted += args.n_samples
    minutes = (time.monotonic() - started) / 60
    # optimizedSD's closing line listed the seeds used; ours are consecutive, so first and last say it all.
    span = f"{counted_name} {counts[0]}" if n_images == 1 else f"{counted_name}s {counts[0]}..{counts[-1]}"
    if counted_name == "subseed":
        span = f"seed {seed}, {span}"
    where = "not saved (--skip_save)" if outdir is None else f"in {outdir}"
    print(f"{n_images} image(s) in {minutes:.2f} minutes, {span}, {where}", file=sys.stderr)
    return written


def _flag_error(error: GenerationError, args: argparse.Namespace) -> str:
    """A request field's error as the flag that set it says it (the prompt's is the file's with --from-file)."""
    flag = "from-file" if error.field == "prompt" and args.from_file else FLAGS.get(error.field, error.field)
    return f"--{flag}: {error}"


def main(argv: Sequence[str] | None = None, mode: Mode = "txt2img") -> int:
    """Entry point of `scripts/{mode}.py`: 0 on success, 2 (one `error:` line, no traceback) on a bad input."""
    parser = build_parser(mode)
    args = parser.parse_args(argv)
    if args.prompt is not None and args.from_file is not None:
        print(f"{parser.prog}: warning: --prompt is ignored because --from-file is given", file=sys.stderr)
    try:
        run(args, mode)
    except CliError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
