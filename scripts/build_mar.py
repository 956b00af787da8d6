"""Package an SD v1 checkpoint for TorchServe: split it into parts and run torch-model-archiver.

    python scripts/build_mar.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt --config configs/v1-inference.yaml \
        --model-name sd --export-path model-store --archive-format no-archive

The archive holds the handler (`sd_handler.py` and the `handler` package), the `ldm` package, model-config.yaml and
the split parts (`unet`/`vae`/`text_encoder.safetensors`, config, tokenizer, manifest); with `--loras DIR`, the LoRA
files of DIR in `loras/`, where the handler looks for the LoRAs a prompt names (model-config.yaml's
`handler.lora_dir`), and with `--embeddings DIR` the textual-inversion embeddings of DIR in `embeddings/`
(`handler.embeddings_dir`).

Which format for a 2–4 GB model: `no-archive`. TorchServe unpacks a `.mar` into a temporary folder at every start
(and keeps that copy on disk); `default` also deflates gigabytes of incompressible weights, which takes minutes to
build and to unpack. `no-archive` writes the folder TorchServe would unpack to, so start-up reads the weights once,
straight from the model store. `zip-store` (a `.mar` without compression) suits copying one file around; `default`
suits small models such as the demo.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ldm import embeddings, lora
from ldm.checkpoint import CheckpointError, default_config, files_in
from ldm.config import ConfigError
from ldm.parts import DTYPES, write_split
from ldm.safe_pickle import UnsafeCheckpointError
from ldm.vae_file import FLAG_HELP, choose

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE_FORMATS = ("default", "no-archive", "zip-store")
# A build's folder in the store, and within it the staged model and the archiver's temp folder.
BUILDING = ".building-"
STAGED = "staged"
SCRATCH = "archiver-tmp"


def stage(
    ckpt: Path,
    config: Path,
    dtype: str,
    folder: Path,
    loras: Path | None = None,
    embeddings_dir: Path | None = None,
    vae: Path | None = None,
) -> None:
    """Lay out what the archive's root holds besides the handler file: packages, split parts (the VAE's from `vae`
    if given), LoRAs and embeddings (where model-config.yaml's `handler.lora_dir` and `handler.embeddings_dir` look
    by default)."""
    write_split(ckpt, config, folder, dtype, vae)
    for package in ("ldm", "handler"):
        shutil.copytree(ROOT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    for source, name, suffixes in (
        (loras, "loras", lora.SUFFIXES),
        (embeddings_dir, "embeddings", embeddings.SUFFIXES),
    ):
        if source is None:
            continue
        if not source.is_dir():
            raise NotADirectoryError(f"--{name} {source}: not a folder")
        for path in files_in(source, suffixes):
            target = folder / name / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def archive(args: argparse.Namespace, building: Path) -> None:
    """Run torch-model-archiver (the one next to this Python) over `building`/STAGED. It copies everything into
    `$TMPDIR/<model name>` first: its TMPDIR is `building`/SCRATCH, beside the store, rather than the system's temp
    folder, which may be a RAM-backed tmpfs too small for a second copy of the weights, or hold another user's folder
    of that name, which it cannot replace. It runs in `building` and is given the staged folder by a relative path:
    it splits `--extra-files` at commas and reads it as a glob pattern, which a checkout's path may upset."""
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    command = [
        str(archiver if archiver.exists() else "torch-model-archiver"),
        "--model-name", args.model_name,
        "--version", args.version,
        "--handler", str(ROOT / "handler" / "sd_handler.py"),
        "--extra-files", STAGED,
        "--config-file", str(args.model_config.resolve()),
        "--export-path", str(args.export_path.resolve()),
        "--archive-format", args.archive_format,
        "--force",
    ]  # fmt: skip
    environment = {**os.environ, "TMPDIR": str((building / SCRATCH).resolve())}
    subprocess.run(command, check=True, cwd=building, env=environment)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="original checkpoint (.ckpt or .safetensors)")
    parser.add_argument(
        "--config",
        type=Path,
        help="config YAML (default: configs/v1-inference.yaml, or v1-inpainting-inference.yaml for an inpainting "
        "checkpoint)",
    )
    parser.add_argument("--model-name", default="sd", help="name the model is served under (default: %(default)s)")
    parser.add_argument("--export-path", type=Path, default=ROOT / "model-store", help="the model store")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weights' dtype (default: fp16)")
    parser.add_argument("--archive-format", choices=ARCHIVE_FORMATS, default="no-archive", help="see above")
    parser.add_argument("--model-config", type=Path, default=ROOT / "model-config.yaml", help="model-config.yaml")
    parser.add_argument("--version", default="1.0", help="model version recorded in the archive")
    parser.add_argument("--loras", type=Path, help="a folder of LoRA files to package, for <lora:name:weight> tags")
    parser.add_argument(
        "--embeddings", type=Path, help="a folder of textual-inversion embeddings to package, found in prompts by name"
    )
    parser.add_argument(
        "--vae",
        help=FLAG_HELP,
    )
    args = parser.parse_args(argv)
    args.export_path.mkdir(parents=True, exist_ok=True)
    # Staged beside the store (on its disk) for the reasons `archive` gives; a build killed outright leaves its folder
    # behind, weights and all, for the next one to remove.
    for left in args.export_path.glob(f"{BUILDING}*"):
        shutil.rmtree(left, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=BUILDING, dir=args.export_path) as tmp:
        building = Path(tmp)
        staged = building / STAGED
        try:
            config = args.config or default_config(args.ckpt)
            vae = choose(args.ckpt, args.vae)
            if vae.beside:
                print(f"build_mar: taking {vae.described()}")
            stage(args.ckpt, config, args.dtype, staged, args.loras, args.embeddings, vae.path)
        except (CheckpointError, ConfigError, UnsafeCheckpointError, OSError) as error:
            print(f"build_mar: {error}", file=sys.stderr)
            return 2
        if args.archive_format == "no-archive":
            # The archiver refuses to write into an existing folder even with --force. Only now, once the new model
            # is staged: a checkpoint or VAE file that cannot be read leaves the store it would replace as it was.
            shutil.rmtree(args.export_path / args.model_name, ignore_errors=True)
        (building / SCRATCH).mkdir()
        archive(args, building)
    suffix = "" if args.archive_format == "no-archive" else ".mar"
    print(f"wrote {args.export_path / (args.model_name + suffix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
