"""Names of written images, `seed_{seed}_{n:05}.{ext}` (optimizedSD's), shared by the command lines and the client.

Kept free of torch so the HTTP client starts instantly.
"""

from __future__ import annotations

import re
from pathlib import Path

# Our own written names, and optimizedSD's: seed_{seed}_{n:05}.{format}.
IMAGE_NAME = re.compile(r"seed_\d+_(\d+)\.[A-Za-z0-9]+")


def image_name(seed: int, index: int, extension: str) -> str:
    return f"seed_{seed}_{index:05}.{extension}"


def next_index(outdir: Path) -> int:
    """n of the next image: one past the highest n among files named seed_{seed}_{n}.{ext} (0 when there are none).

    optimizedSD used the number of files in the folder. On a folder only it wrote that is the same number, but a
    count reuses a number already taken once a file was deleted (overwriting it when the seed repeats) and skips
    numbers for every unrelated file (a grid, notes, .DS_Store); the highest index + 1 does neither.
    """
    if not outdir.is_dir():
        return 0
    indices = [int(m.group(1)) for p in outdir.iterdir() if (m := IMAGE_NAME.fullmatch(p.name))]
    return max(indices, default=-1) + 1
