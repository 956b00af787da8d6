"""Write a random-weight checkpoint in the original SD v1 format for any config (tests, the demo mode).

python scripts/make_tiny_checkpoint.py --config tests/fixtures/reference/tiny-dev.yaml --out models/tiny.ckpt
"""

from __future__ import annotations

import argparse
import sys

from ldm.config import load_config
from ldm.random_weights import random_state_dict, save_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="original-format config YAML (sizes of the model)")
    parser.add_argument("--out", required=True, help="output file: .ckpt (torch pickle) or .safetensors")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    state = random_state_dict(load_config(args.config), args.seed)
    save_checkpoint(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, random weights (seed {args.seed}); its images are noise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
