"""The model store `scripts/serve.sh` serves: built from the user's checkpoint, or a demo one, only when needed.

Why a stamp, and what it covers: splitting a 4 GB checkpoint takes a minute, so a start reuses `model-store/sd`. But
the store holds copies of everything TorchServe runs besides the weights (the handler, `ldm`, model-config.yaml, the
model config), so it is stale as soon as any of those changes (a `git pull`, an edit of model-config.yaml), not only
when the checkpoint does. The stamp records all of it, in `.torchserve/` (outside the store, which a build replaces);
it says "building" until a build completes, so a build cut short is redone, never served. Each build also leaves a
mark in the store itself, so that a store serve.sh built is still known for its own once `.torchserve/` is deleted
(to clear its logs, say, once stopped: it holds the running server's pid file, without which stop.sh cannot find it),
and is rebuilt rather than served unchecked.

A store that serve.sh did not build (`scripts/build_mar.py` run by hand, as README shows) is served as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
USER_CKPT = ROOT / "models" / "ldm" / "stable-diffusion-v1" / "model.ckpt"
# The user's LoRAs (A1111's folder name) and textual-inversion embeddings: the store links to them, so files added
# while serving are found.
USER_LORAS = ROOT / "models" / "Lora"
USER_EMBEDDINGS = ROOT / "models" / "embeddings"
DEMO_CKPT = ROOT / "models" / "demo" / "tiny-demo.safetensors"
DEMO_CONFIG = ROOT / "configs" / "tiny-demo.yaml"
MODEL_STORE = ROOT / "model-store"
MODEL_NAME = "sd"
# The user's server's folder (scripts/server.py): TorchServe's pid file, its logs, and this module's stamp.
RUN_DIR = ROOT / ".torchserve"
STAMP = RUN_DIR / "model-store.json"
# What scripts/build_mar.py copies into the store besides the split parts and the model config.
PACKAGED = (ROOT / "ldm", ROOT / "handler", ROOT / "model-config.yaml")
# The mark a build leaves in the store, and where serve.sh kept its stamp before it covered the code: a store with
# either is serve.sh's, to rebuild when its stamp does not say it is current.
BUILT_HERE = "built-by-serve.sh"
OLD_STAMP = "source.json"


@dataclass(frozen=True)
class Store:
    """What the store serves: `source` is its checkpoint, None for a store built by hand; `vae`, the VAE file built in
    in place of the checkpoint's, if any."""

    path: Path
    source: Path | None
    demo: bool
    vae: Path | None = None


def _files(config: Path) -> list[Path]:
    found = [config]
    for item in PACKAGED:
        inside = item.rglob("*") if item.is_dir() else [item]
        found += [f for f in inside if f.is_file() and "__pycache__" not in f.parts]
    return sorted(found)


def fingerprint(source: Path, config: Path, dtype: str, vae: Path | None = None) -> dict[str, Any]:
    """The checkpoint and the VAE file that replaces its VAE, if any (path, size, mtime: hashing 4 GB at every start
    would cost seconds), the dtype of its parts, and a digest of every other file the store copies."""
    digest = hashlib.sha256()
    for file in _files(config):
        digest.update(f"{file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}\0".encode())
        digest.update(file.read_bytes())
    stat = source.stat()
    found = {"checkpoint": str(source), "size": stat.st_size, "mtime": stat.st_mtime, "dtype": dtype,
             "files": digest.hexdigest()}  # fmt: skip
    if vae is not None:
        vae_stat = vae.stat()
        found["vae"] = {"path": str(vae), "size": vae_stat.st_size, "mtime": vae_stat.st_mtime}
    return found


def _dtype_for_this_machine() -> str:
    import torch

    return "fp16" if torch.cuda.is_available() else "fp32"


def _stamped() -> dict[str, Any] | None:
    try:
        return json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return None


def other_checkpoints() -> list[str]:
    """Names of checkpoint files beside where the user's belongs, under another name (a download's own, such as
    v1-5-pruned-emaonly.safetensors), which serve.sh does not take: the demo warning names them. VAE files (A1111's
    `model.vae.ckpt`, Stability's `vae-ft-mse-840000-ema-pruned.safetensors`) are not."""
    folder = USER_CKPT.parent
    found = folder.glob("*") if folder.is_dir() else []
    return sorted(
        f.name
        for f in found
        if f.suffix in (".ckpt", ".safetensors") and "vae" not in f.name.lower() and f.name != USER_CKPT.name
    )


def _user_config() -> Path:
    """configs/v1-inference.yaml, or its inpainting twin for an inpainting checkpoint."""
    from ldm.checkpoint import default_config

    return default_config(USER_CKPT)


def prepare(dtype: str | None = None) -> Store:
    """The store to serve, (re)built first when serve.sh built it from something that has changed since, or never."""
    demo = not USER_CKPT.exists()
    source, config = (DEMO_CKPT, DEMO_CONFIG) if demo else (USER_CKPT, _user_config())
    store = MODEL_STORE / MODEL_NAME
    stamped = _stamped()
    if store.exists() and stamped is None and not any((store / mark).exists() for mark in (BUILT_HERE, OLD_STAMP)):
        return Store(store, None, False)
    if demo and not DEMO_CKPT.exists():
        from ldm.config import load_config
        from ldm.random_weights import random_state_dict, save_checkpoint

        DEMO_CKPT.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(random_state_dict(load_config(DEMO_CONFIG)), DEMO_CKPT)
    from ldm.vae_file import NONE, near_checkpoint

    # A1111's automatic VAE: `model.vae.ckpt` (or .pt, .safetensors) beside the user's `model.ckpt`.
    vae = None if demo else near_checkpoint(source)
    wanted = fingerprint(source, config, dtype or _dtype_for_this_machine(), vae)
    if store.exists() and stamped == wanted:
        return Store(store, source, demo, vae)
    from scripts.build_mar import main as build_mar

    STAMP.parent.mkdir(parents=True, exist_ok=True)
    STAMP.write_text(json.dumps({"building": wanted}))
    code = build_mar([
        "--ckpt", str(source), "--config", str(config), "--model-name", MODEL_NAME,
        "--export-path", str(MODEL_STORE), "--dtype", wanted["dtype"], "--archive-format", "no-archive",
        "--vae", str(vae) if vae else NONE,
    ])  # fmt: skip
    if code:
        raise SystemExit(code)
    # handler.lora_dir's and handler.embeddings_dir's defaults, in the model's folder.
    for folder, name in ((USER_LORAS, "loras"), (USER_EMBEDDINGS, "embeddings")):
        folder.mkdir(parents=True, exist_ok=True)
        link = store / name
        if not link.is_symlink():
            # Relative: the link still holds when the checkout moves.
            link.symlink_to(os.path.relpath(folder, store), target_is_directory=True)
    (store / BUILT_HERE).touch()
    STAMP.write_text(json.dumps(wanted))
    return Store(store, source, demo, vae)
