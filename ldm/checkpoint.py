"""Reading original SD v1 checkpoints (`.ckpt` or `.safetensors`) into per-part state dicts, strictly.

The single place that knows the checkpoint's key prefixes and which keys we deliberately ignore.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ldm.config import INPAINTING_CONFIG, TEXT_TO_IMAGE_CONFIG, ModelConfig
from ldm.ddim import alphas_cumprod
from ldm.model import PARTS, expected_shapes
from ldm.safe_pickle import UnsafeCheckpointError, torch_load

# Checkpoint key prefix of each part; stripping it gives the part module's own key.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
# A buffer old transformers versions saved (0..76); today's CLIPTextModel rebuilds it.
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
# Checkpoints saved with transformers before 4.17 lack the `text_model.` level in the text encoder's keys; A1111 reads
# them by putting it back, as this does.
OLD_TEXT_ENCODER = "cond_stage_model.transformer."
OLD_TEXT_ENCODER_LEVELS = ("embeddings.", "encoder.", "final_layer_norm.")
# The DDPM schedule the training code stored; we recompute it from the config and only check that they agree.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# The EMA copy of the UNet in some released files; inference uses the main weights.
EMA_PREFIX = "model_ema."
_SHOWN = 5
# The UNet's first convolution: its input channels tell an inpainting checkpoint (SD v1's 4 latent channels, the mask
# and the masked image's 4) from a text-to-image one.
INPUT_CONV = "input_blocks.0.0.weight"
INPAINTING_UNET_CHANNELS = 9


# The number types a weight file's tensors may come in for us to compute with them (float8: checkpoints stored small,
# converted on loading); torch also loads integers, its 4-bit and complex types, which mean nothing as weights here.
FLOAT_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    | {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
)


class CheckpointError(ValueError):
    """The checkpoint does not match the config, or is not a checkpoint we can read safely."""


def is_safetensors(path: Path) -> bool:
    """Whether the file is in the safetensors format, read from its first bytes, not its name: a download saved as
    `model.ckpt` (the path the original app used) is still safetensors. Such a file starts with the length of its JSON
    header (8 bytes, little-endian) and then the header's `{`; a torch checkpoint with a zip or a pickle opcode."""
    try:
        with path.open("rb") as file:
            head = file.read(9)
    except (IsADirectoryError, PermissionError) as error:
        raise CheckpointError(f"{path}: cannot read it: {error.strerror}") from None
    # The length itself is not checked: a truncated safetensors file should be called that, not a torch one.
    return len(head) == 9 and head[8:] == b"{"


def files_in(folder: Path | None, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of `folder` or below it with one of `suffixes`, whatever their case (`Style.SAFETENSORS`, as A1111
    finds them), in path order (none for a folder that is not there): where LoRAs and embeddings are looked for, by
    name."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat tensor dict of a safetensors or torch (`.ckpt`) file, with or without a top-level `state_dict`."""
    path = Path(path)
    if is_safetensors(path):
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        loaded = torch_load(str(path))
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"{path}: {error}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        # SafetensorError too: torch.load hands a file named *.safetensors to safetensors itself.
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error})") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
    if "state_dict" in loaded and not isinstance(loaded["state_dict"], torch.Tensor):
        # Some merges leave an (empty) `state_dict` entry among the weights; A1111 drops it too.
        loaded = {key: value for key, value in loaded.items() if key != "state_dict"}
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {not_tensors[:_SHOWN]}")
    # Each a fresh tensor on the same storage, without the attributes a pickle may have given it (one named like a
    # method would stand in for it).
    return {key: torch.Tensor.detach(value) for key, value in loaded.items()}


def is_inpainting_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint's UNet reads 9 channels (the latent, the mask and the masked image: RunwayML's
    sd-v1-5-inpainting), read without loading the weights (safetensors: its header; `.ckpt`: memory-mapped), so a
    command can pick the config that fits. False for anything unreadable: loading it will say what is wrong."""
    key = PREFIXES["unet"] + INPUT_CONV
    path = Path(path)
    try:
        if is_safetensors(path):
            with safe_open(str(path), "pt") as file:
                names = file.keys()
                shape = file.get_slice(key).get_shape() if key in names else []
        else:
            tensor = read_state_dict(path).get(key)
            shape = [] if tensor is None else list(tensor.shape)
    except (CheckpointError, UnsafeCheckpointError, SafetensorError, OSError):
        return False
    return len(shape) == 4 and shape[1] == INPAINTING_UNET_CHANNELS


def default_config(path: str | Path) -> Path:
    """The shipped config a single-file checkpoint wants: the inpainting one for an inpainting checkpoint."""
    return INPAINTING_CONFIG if is_inpainting_checkpoint(path) else TEXT_TO_IMAGE_CONFIG


def _check_schedule(buffers: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """The stored schedule must be the one the config describes, else the images would silently differ."""
    if "alphas_cumprod" not in buffers:
        return
    stored = buffers["alphas_cumprod"]
    expected = alphas_cumprod(config)
    # Half-precision checkpoints store the schedule rounded too: allow a few units of the stored dtype's precision.
    rtol = 4 * torch.finfo(stored.dtype).eps
    if stored.shape != expected.shape or not torch.allclose(stored.double(), expected, rtol=rtol, atol=1e-6):
        raise CheckpointError(
            f"the checkpoint's alphas_cumprod does not match {config.source} (linear_start {config.linear_start}, "
            f"linear_end {config.linear_end}, timesteps {config.timesteps}): wrong config for this checkpoint?"
        )


def split_state_dict(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, replaced: tuple[str, ...] = ()
) -> dict[str, dict[str, torch.Tensor]]:
    """Group checkpoint keys by part (prefix stripped), check them strictly against the architecture. The `replaced`
    parts' weights come from elsewhere (a VAE file): their keys are dropped, and need not be there at all, as for a
    checkpoint shipped without its VAE.

    Raises one CheckpointError listing the first missing, unexpected and mis-shaped keys.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PARTS if name not in replaced}
    schedule: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(OLD_TEXT_ENCODER) and key[len(OLD_TEXT_ENCODER) :].startswith(OLD_TEXT_ENCODER_LEVELS):
            key = PREFIXES["text_encoder"] + key[len(OLD_TEXT_ENCODER) :]
        if key == POSITION_IDS or key.startswith(EMA_PREFIX):
            continue
        if key in SCHEDULE_BUFFERS:
            schedule[key] = value
            continue
        part = next((name for name, prefix in PREFIXES.items() if key.startswith(prefix)), None)
        if part is None:
            unexpected.append(key)
        elif part not in replaced:
            parts[part][key[len(PREFIXES[part]) :]] = value
    _check_schedule(schedule, config)

    found: dict[str, list[str]] = {"missing": [], "unexpected": unexpected, "wrong shape": [], "not floating-point": []}
    for name, shapes in expected_shapes(config).items():
        if name in replaced:
            continue
        for label, keys in mismatches(parts[name], shapes, PREFIXES[name], "checkpoint").items():
            found[label] += keys
    report = mismatch_report(f"checkpoint does not match config {config.source}:", found)
    if report:
        hint = _input_channels_hint(parts["unet"], config)
        raise CheckpointError("\n".join([report] + ([hint] if hint else [])))
    return parts


def mismatches(
    got: dict[str, torch.Tensor], shapes: dict[str, torch.Size], prefix: str, source: str
) -> dict[str, list[str]]:
    """The keys of one part's weights (`got`, as its module names them) that its architecture (`shapes`) lacks,
    wants, wants in another shape, or holds as numbers that are no weights (integers); each named with `prefix`, as
    the file being read names it (`source`; a text encoder's keys of transformers before 4.17 are named with the
    `text_model.` level they are read with)."""
    return {
        "missing": [prefix + k for k in shapes if k not in got],
        "unexpected": [prefix + k for k in got if k not in shapes],
        "wrong shape": [
            f"{prefix}{k}: {source} {list(got[k].shape)}, config {list(s)}"
            for k, s in shapes.items()
            if k in got and got[k].shape != s
        ],
        # Caught here, where the file is named, rather than when a server loads the parts.
        "not floating-point": [
            f"{prefix}{k}: {got[k].dtype}" for k in shapes if k in got and got[k].dtype not in FLOAT_DTYPES
        ],
    }


def mismatch_report(heading: str, found: dict[str, list[str]]) -> str:
    """`heading` and the first few keys of each kind of mismatch, or "" when there is none."""
    lines = [heading]
    for label, keys in found.items():
        if keys:
            more = f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
            lines.append(f"  {len(keys)} {label}: {', '.join(keys[:_SHOWN])}{more}")
    return "\n".join(lines) if len(lines) > 1 else ""


def _input_channels_hint(unet: dict[str, torch.Tensor], config: ModelConfig) -> str:
    """Which config a checkpoint wants when its UNet reads another number of channels than the config's: the usual
    cause is an inpainting checkpoint (9 channels) served with the text-to-image config, or the other way round."""
    weight = unet.get(INPUT_CONV)
    if weight is None or weight.ndim != 4 or weight.shape[1] == config.unet.in_channels:
        return ""
    channels = config.latent_channels
    for count, name, wanted in (
        (2 * channels + 1, "an inpainting", INPAINTING_CONFIG),
        (channels, "a text-to-image", TEXT_TO_IMAGE_CONFIG),
    ):
        if weight.shape[1] == count:
            return f"  its UNet reads {count} channels: this is {name} checkpoint; use configs/{wanted.name}"
    return ""
