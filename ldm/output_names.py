"""Names of written images, `seed_{seed}_{n:05}.{ext}` (optimizedSD's), shared by the command lines and the client.

Kept free of torch so the HTTP client starts instantly.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

# Our own written names, and optimizedSD's: seed_{seed}_{n:05}.{format}.
IMAGE_NAME = re.compile(r"seed_\d+_(\d+)\.[A-Za-z0-9]+")
# optimizedSD cut a prompt's folder's whole path at this many characters; a file system takes 255 bytes a name.
PROMPT_PATH_CHARS, NAME_BYTES = 150, 255


def image_name(seed: int, index: int, extension: str) -> str:
    return f"seed_{seed}_{index:05}.{extension}"


def write_new(outdir: Path, seed: int, index: int, extension: str, data: bytes) -> tuple[Path, int]:
    """Write `data` as the first free `seed_{seed}_{n:05}.{extension}` from n = `index` on, never over an existing
    file (another run may be writing into the same folder); returns its path and the next n."""
    while True:
        path = outdir / image_name(seed, index, extension)
        index += 1
        try:
            with path.open("xb") as file:
                file.write(data)
        except FileExistsError:
            continue
        return path, index


def prompt_folder(outdir: Path, prompt: str) -> Path:
    """The folder under `outdir` a prompt's images go to, as optimizedSD's command lines name it: the prompt split at
    spaces and colons, joined by "_", the path cut at 150 characters ("a castle: night" → `a_castle__night`), so
    that scripts written for them find the images where they did. Where optimizedSD let a prompt name another
    folder, here it cannot: a slash is "_", ".." is "_" (an empty prompt, or ".", is `outdir` itself, as there), a
    name is cut to 255 bytes, and an `outdir` of nearly 150 characters still leaves the name 16 of its own."""
    name = "_".join(re.split(":| ", prompt)).replace("/", "_")
    room = PROMPT_PATH_CHARS - len(os.path.join(str(outdir), ""))
    name = name[: max(room, 16)]
    while len(name.encode()) > NAME_BYTES:
        name = name[:-1]
    return outdir / ("_" if name == ".." else name)


def outdir_problem(path: Path) -> str | None:
    """Why images cannot be written to folder `path` (None: they can), once it is created and a file written there:
    asked before the work, so that a bad path fails then, not after minutes of it."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"{path}: cannot create it: {error.strerror or error}"
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        return f"{path}: cannot write there: {error.strerror or error}"
    return None


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
