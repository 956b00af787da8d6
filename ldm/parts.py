"""Split checkpoints: one safetensors file per part, plus config, tokenizer and a manifest, and loading them back.

Why split: a `.ckpt` is a pickle (unsafe, and read whole); per-part safetensors load lazily, straight to the target
device and dtype, and a server (or the low-memory mode) can place each part where it runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.checkpoint import read_state_dict, split_state_dict
from ldm.config import ModelConfig, load_config
from ldm.model import PARTS, StableDiffusion, build_parts, weight_root
from ldm.model_hash import checkpoint_sha256
from ldm.tokenizer import VOCAB_DIR, CLIPTokenizer
from ldm.vae_file import VaeFile, read_vae

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class Manifest:
    """What a split folder holds and where it came from: the checkpoint, and the VAE file that replaced its VAE
    (none: `vae` empty, as in folders split before VAE files were read)."""

    source: str
    source_sha256: str
    dtype: str
    parameters: dict[str, int]
    vae: str = ""
    vae_sha256: str = ""

    @property
    def model_hash(self) -> str:
        """The short hash other SD tools print as 'Model hash': the first 10 hex digits of the source's sha256."""
        return self.source_sha256[:10]

    @property
    def vae_file(self) -> VaeFile | None:
        return VaeFile(self.vae, self.vae_sha256) if self.vae else None


def _cast(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    target = dtype if tensor.is_floating_point() else tensor.dtype
    if tensor.dtype == torch.float64:  # cast where it is: Apple's GPU (MPS) cannot hold float64 even for a moment
        tensor = tensor.to(dtype=target)
    return tensor.to(device=device, dtype=target)


def assemble(
    config: ModelConfig,
    weights: dict[str, dict[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    model_hash: str = "",
    low_memory: bool = False,
    tokenizer: CLIPTokenizer | None = None,
    vae_file: VaeFile | None = None,
    model_name: str = "",
) -> StableDiffusion:
    """Build the networks on meta and hand them the weights (strict; no random init, no second copy); `vae_file`
    says where the VAE's came from when not from the checkpoint."""
    home = torch.device("cpu") if low_memory else device
    modules = build_parts(config)
    for name, module in modules.items():
        state = {k: _cast(v, home, dtype) for k, v in weights[name].items()}
        weight_root(module).load_state_dict(state, strict=True, assign=True)
    modules["text_encoder"].restore_position_ids()
    if tokenizer is not None:
        modules["text_encoder"].tokenizer = tokenizer
    return StableDiffusion(
        config, **modules, device=device, dtype=dtype, model_hash=model_hash, model_name=model_name, vae_file=vae_file,
        low_memory=low_memory,
    )  # fmt: skip


def checkpoint_parts(
    ckpt: str | Path, config: ModelConfig, vae: str | Path | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], VaeFile | None]:
    """The checkpoint's weights by part, checked against `config`, with the VAE's read from the file `vae` if
    given (first: a file that does not fit fails before gigabytes of checkpoint are read)."""
    if vae is None:
        return split_state_dict(read_state_dict(ckpt), config), None
    vae_weights, vae_file = read_vae(vae, config)
    parts = split_state_dict(read_state_dict(ckpt), config, replaced=("vae",))
    parts["vae"] = vae_weights
    return parts, vae_file


def load_checkpoint(
    ckpt: str | Path,
    config: str | Path | ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    low_memory: bool = False,
    vae: str | Path | None = None,
) -> StableDiffusion:
    """Load an original single-file checkpoint (`.ckpt` or `.safetensors`) with its config YAML; its VAE from the
    file `vae` instead, if given."""
    config = config if isinstance(config, ModelConfig) else load_config(config)
    parts, vae_file = checkpoint_parts(ckpt, config, vae)
    hash_ = checkpoint_sha256(ckpt)[:10]
    return assemble(
        config, parts, torch.device(device), dtype, hash_, low_memory, vae_file=vae_file, model_name=Path(ckpt).stem
    )


def write_split(
    ckpt: str | Path, config_path: str | Path, out: str | Path, dtype: str = "fp16", vae: str | Path | None = None
) -> Manifest:
    """Split `ckpt` into `out/{unet,vae,text_encoder}.safetensors` + config, tokenizer files and manifest; the VAE's
    weights from the file `vae` instead of the checkpoint's, if given (the manifest names it)."""
    out = Path(out)
    config = load_config(config_path)
    parts, vae_file = checkpoint_parts(ckpt, config, vae)
    # Only now: inputs that cannot be split leave no empty folder behind.
    out.mkdir(parents=True, exist_ok=True)
    target = DTYPES[dtype]
    parameters = {}
    for name in PARTS:
        tensors = {k: _cast(v, torch.device("cpu"), target).contiguous() for k, v in parts[name].items()}
        save_file(tensors, str(out / f"{name}.safetensors"))
        parameters[name] = sum(t.numel() for t in tensors.values())
        del tensors
    shutil.copyfile(config_path, out / CONFIG_FILE)
    shutil.copytree(VOCAB_DIR, out / TOKENIZER_DIR, dirs_exist_ok=True)
    manifest = Manifest(
        source=Path(ckpt).name,
        source_sha256=checkpoint_sha256(ckpt),
        dtype=dtype,
        parameters=parameters,
        vae=vae_file.name if vae_file else "",
        vae_sha256=vae_file.sha256 if vae_file else "",
    )
    (out / MANIFEST).write_text(json.dumps(manifest.__dict__, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of a split folder."""
    return Manifest(**json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8")))


def _read_part(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of one part, read one at a time straight to `device`, converted to `dtype` as they arrive."""
    tensors = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensors[key] = _cast(f.get_tensor(key), device, dtype)
    return tensors


def load_split(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    low_memory: bool = False,
    vae: str | Path | None = None,
) -> StableDiffusion:
    """Load a folder written by `write_split` onto `device` in `dtype` (on the CPU in low-memory mode); its VAE from
    the file `vae` instead, if given."""
    folder = Path(folder)
    device = torch.device(device)
    config = load_config(folder / CONFIG_FILE)
    home = torch.device("cpu") if low_memory else device
    manifest = read_manifest(folder)
    weights, vae_file = {}, manifest.vae_file
    if vae is not None:  # first: a file that does not fit fails before the other parts are read
        weights["vae"], vae_file = read_vae(vae, config)
    for name in PARTS:
        if name not in weights:
            weights[name] = _read_part(folder / f"{name}.safetensors", home, dtype)
    tokenizer = CLIPTokenizer(folder / TOKENIZER_DIR)
    name = Path(manifest.source).stem
    return assemble(config, weights, device, dtype, manifest.model_hash, low_memory, tokenizer, vae_file, name)
