"""img2img with the flags of optimizedSD's optimized_img2img.py; the flags and their meaning: ldm/cli.py, --help.

python scripts/img2img.py --init-img sketch.png --prompt "a castle on a hill" --strength 0.75 --n_samples 1
"""

from __future__ import annotations

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(mode="img2img"))
