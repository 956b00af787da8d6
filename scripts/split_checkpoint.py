"""Split an original SD v1 checkpoint into per-part safetensors files that load straight to a device.

    python scripts/split_checkpoint.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt \
        --config configs/v1-inference.yaml --out build/sd-v1 --dtype fp16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.checkpoint import CheckpointError, default_config
from ldm.config import ConfigError
from ldm.parts import DTYPES, write_split
from ldm.safe_pickle import UnsafeCheckpointError
from ldm.vae_file import FLAG_HELP, choose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="original checkpoint (.ckpt or .safetensors)")
    parser.add_argument(
        "--config",
        help="original-format config YAML (default: configs/v1-inference.yaml, or v1-inpainting-inference.yaml for an "
        "inpainting checkpoint)",
    )
    parser.add_argument("--out", required=True, help="folder to write the parts into")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the written weights")
    parser.add_argument(
        "--vae",
        help=FLAG_HELP,
    )
    args = parser.parse_args(argv)
    try:
        vae = choose(Path(args.ckpt), args.vae)
        if vae.beside:
            print(f"split_checkpoint: taking {vae.described()}")
        manifest = write_split(args.ckpt, args.config or default_config(args.ckpt), args.out, args.dtype, vae.path)
    except (CheckpointError, ConfigError, UnsafeCheckpointError, OSError) as error:
        print(f"split_checkpoint: {error}", file=sys.stderr)
        return 2
    total = sum(manifest.parameters.values())
    vae = f", VAE {manifest.vae}" if manifest.vae else ""
    print(f"wrote {args.out}: {total:,} parameters ({args.dtype}), model hash {manifest.model_hash}{vae}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
