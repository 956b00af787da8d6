"""A VAE read from its own file in place of the checkpoint's: AUTOMATIC1111's "SD VAE".

SD v1 checkpoints carry the VAE they were trained with, whose decoder paints small faces, eyes and text poorly.
Stability's fine-tuned `vae-ft-mse-840000-ema-pruned` (and others shared since) decode the same latents more sharply,
and A1111's users load one beside most SD v1 models. Such a file holds the checkpoint's `first_stage_model` weights
without that prefix, in the same layout, plus its training loss's `loss.*` tensors and the EMA's two counters, which
A1111 drops and so do we. Only the VAE changes: a seed gives the same latents, which other weights decode (and an
init image is encoded by them too, as in A1111, which swaps the whole first stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import PREFIXES, CheckpointError, mismatch_report, mismatches, read_state_dict
from ldm.config import ModelConfig
from ldm.model import expected_shapes
from ldm.model_hash import checkpoint_sha256
from ldm.safe_pickle import UnsafeCheckpointError

# What A1111 finds beside a checkpoint `model.ckpt` ("Automatic"), first found first: `model.vae.ckpt`, `.vae.pt`,
# `.vae.safetensors` (the order of its searches).
SUFFIXES = (".ckpt", ".pt", ".safetensors")
# `--vae none`: the checkpoint's own VAE, even with a file beside it (A1111's SD VAE setting "None").
NONE = "none"
# The `--vae` flag of every script that reads a checkpoint (`choose` reads it).
FLAG_HELP = (
    "a VAE file (.safetensors, .pt or .ckpt in the original layout, such as vae-ft-mse-840000-ema-pruned.safetensors) "
    "to use instead of the checkpoint's VAE (A1111's --vae-path), or 'none' for the checkpoint's own; default: "
    "NAME.vae.ckpt (or .vae.pt, .vae.safetensors) beside a checkpoint file NAME.ckpt or NAME.safetensors if there is "
    "one, as A1111 picks it"
)
# A1111's `vae_ignore_keys`, and the prefix of the keys it drops as the training loss's.
IGNORED_KEYS = frozenset({"model_ema.decay", "model_ema.num_updates"})
LOSS_PREFIX = "loss"
# Keys only diffusers' layout of a VAE has (`decoder.up_blocks.0.resnets.0.conv1.weight`; ours says `decoder.up.0`).
DIFFUSERS_MARKERS = ("decoder.up_blocks.", "encoder.down_blocks.")


class VaeError(CheckpointError):
    """A VAE file that cannot stand in for the checkpoint's VAE."""


@dataclass(frozen=True)
class VaeFile:
    """Which file the VAE came from, as A1111 names it in an image's parameters (`VAE hash: …, VAE: name`)."""

    name: str
    sha256: str

    @property
    def short_hash(self) -> str:
        """A1111's "VAE hash": the first 10 hex digits of the file's SHA-256, as for the model hash."""
        return self.sha256[:10]


@dataclass(frozen=True)
class VaeChoice:
    """The VAE file a tool was given or found for a checkpoint (None: the checkpoint's own VAE); `beside`: found
    beside the checkpoint rather than named, which the tool says, with how to refuse it."""

    path: Path | None
    beside: bool = False

    def described(self) -> str:
        """How a tool names the file: `--vae FILE`, or the file beside the checkpoint."""
        if self.beside:
            return f"the VAE file beside the checkpoint, {self.path} (--vae none keeps the checkpoint's own)"
        return f"--vae {self.path}"


def near_checkpoint(ckpt: Path) -> Path | None:
    """The VAE file A1111 picks for `ckpt` by itself: `<name>.vae.ckpt` (or `.vae.pt`, `.vae.safetensors`) beside
    `<name>.ckpt`; None when there is none."""
    for suffix in SUFFIXES:
        candidate = ckpt.with_name(f"{ckpt.stem}.vae{suffix}")
        if candidate.is_file():
            return candidate
    return None


def choose(ckpt: Path, flag: str | None) -> VaeChoice:
    """What a `--vae` flag picks for the checkpoint `ckpt`: the file it names; with "none", no file; unset, the file
    beside a checkpoint file, as A1111 picks one (a split folder keeps the VAE it was split with)."""
    if flag == NONE:
        return VaeChoice(None)
    if flag is not None:
        return VaeChoice(Path(flag))
    found = near_checkpoint(ckpt) if ckpt.is_file() else None
    return VaeChoice(found, beside=found is not None)


def read_vae(path: str | Path, config: ModelConfig) -> tuple[dict[str, torch.Tensor], VaeFile]:
    """The VAE weights of `path`, named as our VAE module names them and checked strictly against `config`'s
    architecture, and the file's identity. Raises VaeError naming the file and what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise VaeError(f"VAE {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        state = read_state_dict(path)
    except CheckpointError as error:
        raise VaeError(f"VAE {error}") from None
    except UnsafeCheckpointError as error:  # nothing ran: refused before
        raise VaeError(f"VAE {error}") from None
    state = {k: v for k, v in state.items() if not k.startswith(LOSS_PREFIX) and k not in IGNORED_KEYS}
    if any(k.startswith(PREFIXES["unet"]) for k in state):
        raise VaeError(f"VAE {path}: a whole checkpoint, not a VAE file (it holds a UNet)")
    if any(k.startswith(DIFFUSERS_MARKERS) for k in state):
        raise VaeError(
            f"VAE {path}: in diffusers' layout (decoder.up_blocks…); a VAE file in the original layout "
            "(decoder.up.…, as vae-ft-mse-840000-ema-pruned.safetensors is) is needed"
        )
    report = mismatch_report(
        f"VAE {path}: does not fit config {config.source}:",
        mismatches(state, expected_shapes(config)["vae"], "", "file"),
    )
    if report:
        raise VaeError(report)
    return state, VaeFile(path.name, checkpoint_sha256(path))
