"""LoRA: low-rank weight deltas for the UNet and the text encoder, named in a prompt as AUTOMATIC1111 names them.

`<lora:name:0.8>` anywhere in a prompt adds 0.8·(α/r)·up·down to every weight the file `name.safetensors` (or `.pt`,
`.ckpt`) in the LoRA folder has a pair for; `<lora:name:0.8:0.5>` (or `<lora:name:te=0.8:unet=0.5>`) gives the text
encoder 0.8 and the UNet 0.5; `<lyco:…>` is the same tag (A1111's alias, from the LyCORIS extension). The tag itself
is not text: it is cut out before CLIP reads the prompt, and kept in the prompt a PNG records, as A1111 does. A1111's
other extra networks (`<hypernet:…>`, any `<word:…>`) are not done here: such a tag is refused (A1111 cuts them out
too, and would read a hypernetwork), not read as words.

Files are in kohya-ss sd-scripts' format, what A1111, ComfyUI and most shared SD v1 LoRAs use: keys such as
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight` (diffusers' module path,
dots written as underscores), `.lora_up.weight` and `.alpha`; `lora_te_text_model_encoder_layers_0_self_attn_q_proj`
for CLIP. Convolutions too (LoCon: a 3×3 `lora_down`, a 1×1 `lora_up`). Our UNet keeps the original's module names,
so `diffusers_names` translates them.

Why merged into the weights, not run beside them: a merged weight costs nothing per step, and the GPU fast path's
CUDA graphs read weights in place, so they see it too. `LoraWeights` keeps the original of every weight it changed
and puts it back exactly, bit for bit, before a request with other LoRAs (or none) runs.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ldm.attention import SpatialTransformer
from ldm.checkpoint import FLOAT_DTYPES, CheckpointError, files_in, is_safetensors, read_state_dict
from ldm.model import StableDiffusion
from ldm.safe_pickle import UnsafeCheckpointError
from ldm.unet import Downsample, ResBlock, UNetModel, Upsample

SUFFIXES = (".safetensors", ".pt", ".ckpt")
# `<lora:name>`, `<lora:name:w>`, `<lora:name:text_w:unet_w>` (or `te=`, `unet=`); a name is anything up to the next
# colon; `lyco` is A1111's alias.
TAG = re.compile(r"<(?:lora|lyco):([^:<>]*)((?::[^:<>]*)*)>")
# A1111's extra-network tags (its `re_extra_net`), of which only LoRAs are done here.
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
# A weight of this size is a typo, not a style: it turns every image into noise.
MAX_WEIGHT = 10.0
# Kohya's prefixes for the two networks a LoRA changes, and the first text encoder's under SDXL's naming, which some
# trainers write for SD v1's one (A1111 reads it so).
UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
FIRST_TEXT_PREFIX = "lora_te1_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# Suffixes of LyCORIS' other kinds (LoHa, LoKr, Tucker-decomposed LoCon, full deltas, DoRA, norms).
OTHER_KINDS = (".hada_", ".lokr_", ".lora_mid.", ".diff", ".dora_scale", ".w_norm", ".b_norm")
# How many names an error message lists: enough to spot a typo, not a whole folder.
_SHOWN = 5
_SHOWN_FILES = 20
# Inside a ResBlock, the original's module names → diffusers'.
_RESNET_NAMES = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


class LoraError(ValueError):
    """A LoRA tag or file this model cannot use; the message says which and why."""


@dataclass(frozen=True)
class LoraUse:
    """One LoRA a prompt names, with the multiplier of its text-encoder and of its UNet deltas."""

    name: str
    text_weight: float = 1.0
    unet_weight: float = 1.0


def strip_tags(text: str) -> str:
    """The text CLIP reads: the prompt without its LoRA tags."""
    return TAG.sub("", text)


def prompt_loras(text: str) -> tuple[LoraUse, ...]:
    """The LoRAs a prompt's tags name, in order; a name tagged twice adds its weights, as two tags would. Another
    extra network's tag is refused (`EXTRA_NETWORK`)."""
    other = EXTRA_NETWORK.search(TAG.sub("", text))
    if other:
        raise LoraError(f"'{other.group(0)[:60]}': {other.group(1)} is not available here, only <lora:…> and <lyco:…>")
    found: dict[str, tuple[float, float]] = {}
    for match in TAG.finditer(text):
        name = match.group(1).strip()
        if not name:
            raise LoraError(f"'{match.group(0)}' names no LoRA: write <lora:name:weight>")
        text_weight, unet_weight = _weights(match.group(0), match.group(2).split(":")[1:])
        old = found.get(name, (0.0, 0.0))
        found[name] = (old[0] + text_weight, old[1] + unet_weight)
    for name, weights in found.items():
        if max(abs(w) for w in weights) > MAX_WEIGHT:
            raise LoraError(f"the tags of LoRA '{name}' add up to more than ±{MAX_WEIGHT:g}: {weights[0]:g}")
    return tuple(LoraUse(name, *weights) for name, weights in found.items())


def _weights(tag: str, items: list[str]) -> tuple[float, float]:
    """The text encoder's and the UNet's weights of a tag's items, as A1111 reads them: by position, or named `te=`
    and `unet=` (which win); the UNet's is the text encoder's unless given, which is 1 unless given."""
    positional = [item for item in items if "=" not in item]
    named = dict(item.split("=", 1) for item in items if "=" in item)
    unknown = sorted(set(named) - {"te", "unet"})
    if len(positional) > 2 or unknown:
        raise LoraError(f"'{tag}': at most two weights, the text encoder's and the UNet's (te=, unet=)")
    text_weight = _weight(tag, named.get("te", positional[0] if positional else "1"))
    unet = named.get("unet", positional[1] if len(positional) == 2 else None)
    return text_weight, text_weight if unet is None else _weight(tag, unet)


def _weight(tag: str, number: str) -> float:
    try:
        value = float(number)
    except ValueError:
        raise LoraError(f"'{tag}': '{number}' is not a number") from None
    if not -MAX_WEIGHT <= value <= MAX_WEIGHT:
        raise LoraError(f"'{tag}': a LoRA weight must be in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {number}")
    return value


def find(folder: Path | None, name: str) -> Path:
    """The file of the LoRA `name`: its stem is the name (the first in path order, if two share it), or else its
    `alias` is, as A1111 finds one (its UI writes the alias into prompts by default). Only files found in the folder
    are compared, so a name is never a path."""
    files = files_in(folder, SUFFIXES)
    for path in files:
        if path.stem == name:
            return path
    for path in files:
        if alias(path) == name:
            return path
    names = sorted({path.stem for path in files})
    held = ", ".join(names[:_SHOWN_FILES]) + (f", … ({len(names)} in all)" if len(names) > _SHOWN_FILES else "")
    raise LoraError(f"no LoRA named '{name}'; the LoRA folder holds: {held or 'none'}")


def alias(path: Path) -> str | None:
    """A safetensors LoRA's `ss_output_name`, the name kohya's scripts trained it under (kept when a download is
    renamed), read from its header alone, once while the file is unchanged (a prompt naming an alias would read every
    file's header on every request); None for other files and unreadable headers."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _alias(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _alias(path: Path, _mtime_ns: int, _size: int) -> str | None:
    try:
        if not is_safetensors(path):
            return None
        with safe_open(str(path), "pt") as file:
            metadata = file.metadata() or {}
    except (CheckpointError, SafetensorError, OSError):
        return None
    name = metadata.get("ss_output_name")
    return name if isinstance(name, str) and name else None


def names_in(folder: Path | None) -> list[str]:
    """The names of the LoRAs in `folder` or below it, as a prompt's tags name them, each once, sorted."""
    return sorted({path.stem for path in files_in(folder, SUFFIXES)})


def diffusers_names(unet: UNetModel) -> Iterator[tuple[str, str]]:
    """(our module path, diffusers' path) of every block of `unet`, by walking it: the original counts blocks in one
    flat list, diffusers by level (`down_blocks.1.resnets.0`), and within a block both use the same inner names but
    for a ResBlock's (`_RESNET_NAMES`) and the resampling convolutions'."""
    yield "time_embed.0", "time_embedding.linear_1"
    yield "time_embed.2", "time_embedding.linear_2"
    yield "input_blocks.0.0", "conv_in"
    level, index = 0, 0
    for number, block in enumerate(unet.input_blocks[1:], start=1):
        for position, layer in enumerate(block):
            ours = f"input_blocks.{number}.{position}"
            if isinstance(layer, Downsample):
                yield f"{ours}.op", f"down_blocks.{level}.downsamplers.0.conv"
                level, index = level + 1, -1
            else:
                yield from _inner(ours, f"down_blocks.{level}", layer, index)
        index += 1
    # The middle block: a ResBlock (resnets.0), a transformer (attentions.0), a ResBlock (resnets.1).
    for position, index in enumerate((0, 0, 1)):
        yield from _inner(f"middle_block.{position}", "mid_block", unet.middle_block[position], index)
    per_level = unet.config.num_res_blocks + 1
    for number, block in enumerate(unet.output_blocks):
        level, index = divmod(number, per_level)
        for position, layer in enumerate(block):
            ours = f"output_blocks.{number}.{position}"
            if isinstance(layer, Upsample):
                yield f"{ours}.conv", f"up_blocks.{level}.upsamplers.0.conv"
            else:
                yield from _inner(ours, f"up_blocks.{level}", layer, index)
    yield "out.2", "conv_out"


def _inner(ours: str, level: str, layer: nn.Module, index: int) -> Iterator[tuple[str, str]]:
    """A ResBlock's or a SpatialTransformer's own layers, which diffusers names alike but for a ResBlock's four."""
    if isinstance(layer, ResBlock):
        for inner, theirs in _RESNET_NAMES.items():
            yield f"{ours}.{inner}", f"{level}.resnets.{index}.{theirs}"
    elif isinstance(layer, SpatialTransformer):
        for inner, module in layer.named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                yield f"{ours}.{inner}", f"{level}.attentions.{index}.{inner}"


def kohya_targets(model: StableDiffusion) -> dict[str, nn.Module]:
    """Kohya's name of every layer a LoRA may change (linear or convolution, in the UNet and CLIP) → the layer; and
    the other names A1111 reads the same layers by: a UNet layer's original (CompVis) path, which is ours, and the
    text encoder's under `lora_te1_`. An SDXL file still fits nothing: its second text encoder, deeper blocks and
    wider cross-attention are not this model's."""
    unet_modules = dict(model.unet.named_modules())
    targets = {
        UNET_PREFIX + theirs.replace(".", "_"): unet_modules[ours]
        for ours, theirs in diffusers_names(model.unet)
        if isinstance(unet_modules.get(ours), nn.Linear | nn.Conv2d)
    }
    layers = set(targets.values())
    targets |= {UNET_PREFIX + ours.replace(".", "_"): layer for ours, layer in unet_modules.items() if layer in layers}
    for name, module in model.text_encoder.core.named_modules():
        if isinstance(module, nn.Linear):
            for prefix in (TEXT_PREFIX, FIRST_TEXT_PREFIX):
                targets[prefix + "text_model_" + name.replace(".", "_")] = module
    return targets


@dataclass(frozen=True)
class Delta:
    """One layer's low-rank pair: the layer changes by weight·`scale`·up·down, `scale` being α/r."""

    layer: nn.Module
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    in_unet: bool

    def value(self, weight: float) -> torch.Tensor:
        """The change to the layer's weight, in float32 on its device, in its shape (a 3×3 `down` with a 1×1 `up`
        composes into a 3×3 change)."""
        target = self.layer.weight
        # Cast where they are, then moved: Apple's GPU (MPS) cannot hold a float64 file's tensors even for a moment.
        down = self.down.to(torch.float32).to(target.device).flatten(1)
        up = self.up.to(torch.float32).to(target.device).flatten(1)
        return (up @ down).mul_(weight * self.scale).view(target.shape)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and matched against the model's layers; two reads of a file unchanged on disk (the same
    `stamp`: modification time and size) are equal, so requests naming it share one merge."""

    path: Path
    stamp: tuple[int, int]
    deltas: tuple[Delta, ...] = field(compare=False, repr=False)
    short_hash: str = field(default="", compare=False)


def short_hash(path: Path) -> str:
    """The 12 hex digits A1111 writes in a PNG's `Lora hashes` (and civitai looks LoRAs up by): the SHA-256 of a
    safetensors file's tensor bytes after its header (kohya's hash, the same whatever metadata the header holds), or
    of a whole `.pt`/`.ckpt`."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        if is_safetensors(path):
            file.seek(8 + int.from_bytes(file.read(8), "little"))
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def parse(
    path: Path, stamp: tuple[int, int], state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, nn.Module]
) -> LoraFile:
    """Match a kohya-format state dict to `targets` (`kohya_targets`), checking every key and shape, so that a file
    for another model (SD 2, SDXL) or of another kind (LyCORIS' LoHa, LoKr) is an error naming why, never a partly
    applied LoRA."""
    other = sorted(k for k in state_dict if any(kind in k for kind in OTHER_KINDS))
    if other:
        raise LoraError(
            f"LoRA '{path.stem}' is of a kind this server does not read (keys such as {other[0]}: LyCORIS' LoHa, "
            "LoKr or another); it reads LoRA and LoCon files in kohya's format"
        )
    names = {k[: -len(DOWN)] for k in state_dict if k.endswith(DOWN)}
    known = {f"{name}{suffix}" for name in names for suffix in (DOWN, UP, ALPHA)}
    stray = sorted(set(state_dict) - known)
    if not names or stray:
        example = stray[0] if stray else "none"
        raise LoraError(
            f"LoRA '{path.stem}' is not in kohya's format (`lora_unet_….lora_down.weight` and `.lora_up.weight` "
            f"pairs; found {example})"
        )
    missing = sorted(name for name in names if name not in targets)
    if missing:
        raise LoraError(
            f"LoRA '{path.stem}' changes layers this model does not have ({', '.join(missing[:_SHOWN])}): it is not "
            "a LoRA for Stable Diffusion v1"
        )
    deltas = []
    for name in sorted(names):
        down, up = state_dict[f"{name}{DOWN}"], state_dict.get(f"{name}{UP}")
        alpha = state_dict.get(f"{name}{ALPHA}")
        layer = targets[name]
        shape = layer.weight.shape
        unreadable = sorted({str(t.dtype) for t in (down, up) if t is not None and t.dtype not in FLOAT_DTYPES})
        if unreadable:
            raise LoraError(
                f"LoRA '{path.stem}': {name} holds numbers of type {', '.join(unreadable)}, which it cannot read"
            )
        if up is None or not _fits(down, up, shape):
            raise LoraError(
                f"LoRA '{path.stem}': {name} does not fit this model's layer of shape {tuple(shape)}: it is not a "
                "LoRA for Stable Diffusion v1"
            )
        if alpha is not None and not _one_number(alpha):
            raise LoraError(f"LoRA '{path.stem}': {name}.alpha must be one finite number")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        deltas.append(Delta(layer, down, up, scale, name.startswith(UNET_PREFIX)))
    return LoraFile(path, stamp, tuple(deltas))


def _one_number(alpha: torch.Tensor) -> bool:
    """Whether a `.alpha` is one finite real number of a type we can read (kohya writes a float; an integer reads
    too; complex and 4-bit floats do not)."""
    real = alpha.dtype in FLOAT_DTYPES or not (alpha.is_floating_point() or alpha.is_complex())
    # In float32: torch has no isfinite for float8.
    return real and alpha.numel() == 1 and bool(alpha.float().isfinite().all())


def _fits(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> bool:
    """Whether up (out, r[, 1, 1]) · down (r, in[, k, k]) makes a change of the layer's `shape`, r ≥ 1."""
    if down.dim() < 2 or up.dim() < 2:
        return False
    rank = down.shape[0]
    return (
        rank >= 1
        and tuple(up.shape[:2]) == (shape[0], rank)
        and up.numel() == shape[0] * rank
        and down.numel() == rank * math.prod(shape[1:])
    )


class LoraLibrary:
    """The LoRA folder: a LoRA is named by its file's stem, in the folder or below it (as A1111 finds them), so files
    added while the server runs are found; the last `keep` files read are kept while they are unchanged on disk (a
    batch naming more reads some twice, and still merges each set once)."""

    def __init__(self, folder: Path | None, targets: Mapping[str, nn.Module], keep: int = 8) -> None:
        self.folder = folder
        self.targets = targets
        self.keep = keep
        self.cache: dict[Path, LoraFile] = {}

    def find(self, name: str) -> Path:
        """The file of the LoRA `name` in this library's folder (`find`)."""
        return find(self.folder, name)

    def load(self, name: str) -> LoraFile:
        """The LoRA `name`, read and checked (`parse`), from the cache while its file is unchanged."""
        path = self.find(name)
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self.cache.pop(path, None)
            if cached is None or cached.stamp != stamp:
                # Copied out of the file's memory mapping: a file overwritten in place must not change what is held.
                state_dict = {key: tensor.clone() for key, tensor in read_state_dict(path).items()}
                cached = replace(parse(path, stamp, state_dict, self.targets), short_hash=short_hash(path))
        except (CheckpointError, UnsafeCheckpointError, OSError) as error:
            raise LoraError(f"LoRA '{name}' cannot be read: {error}") from None
        self.cache[path] = cached  # last used last: the first is the one to drop
        while len(self.cache) > self.keep:
            del self.cache[next(iter(self.cache))]
        return cached


class LoraWeights:
    """A model's weights with some LoRAs merged in, and the originals of every weight that changed, to put back.

    One per model (`merged_into`), whatever pipelines share it. Applying the set already applied costs nothing, so a
    run of requests with the same LoRAs pays for merging once. The originals wait on the CPU: a GPU keeps no second
    copy of the layers a LoRA changes, and putting them back costs one copy to the device when the set changes.
    """

    def __init__(self) -> None:
        self.applied: tuple[tuple[LoraFile, LoraUse], ...] = ()
        self.originals: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def apply(self, loras: Sequence[tuple[LoraFile, LoraUse]]) -> None:
        """Merge exactly `loras` (none: the checkpoint's own weights). A layer several LoRAs change gets the sum of
        their changes, in float32, rounded to the weight's dtype once."""
        loras = tuple(loras)
        if loras == self.applied:
            return
        self.restore()
        by_layer: dict[nn.Module, list[tuple[Delta, float]]] = {}
        for file, use in loras:
            for delta in file.deltas:
                by_layer.setdefault(delta.layer, []).append(
                    (delta, use.unet_weight if delta.in_unet else use.text_weight)
                )
        try:
            for layer, deltas in by_layer.items():
                change = _sum(delta.value(weight) for delta, weight in deltas)
                self.originals[layer] = layer.weight.detach().to("cpu", copy=True)
                layer.weight.add_(change)
        except BaseException:
            self.restore()
            raise
        self.applied = loras

    @torch.no_grad()
    def restore(self) -> None:
        """Put every changed weight back as it was, bit for bit."""
        for layer, original in self.originals.items():
            layer.weight.copy_(original)
        self.originals.clear()
        self.applied = ()


_MERGED: weakref.WeakKeyDictionary[nn.Module, LoraWeights] = weakref.WeakKeyDictionary()


def merged_into(model: StableDiffusion) -> LoraWeights:
    """The LoRA state of `model`'s weights, shared by every pipeline on it: one that merged a LoRA must be the one
    that takes it out, whichever pipeline asks next."""
    return _MERGED.setdefault(model.unet, LoraWeights())


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ of the tensors, added into the first (each is a fresh change of one layer: no copy needed)."""
    iterator = iter(tensors)
    total = next(iterator)
    for tensor in iterator:
        total += tensor
    return total
