"""img2img with the flags of optimizedSD's optimized_img2img.py; the flags and their meaning: ldm/cli_flags.py, --help.

python scripts/img2img.py --init-img sketch.png --prompt "a castle on a hill" --strength 0.75 --n_samples 1
"""

from __future__ import annotations

import os
import sys

# On Apple silicon (--device mps), an operation torch has no GPU kernel for runs on the CPU instead of failing; torch
# reads this as it loads, so before anything imports it.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(mode="img2img"))
