"""PNG rows: the answer's encoding, ours next to PIL's one image at a time (what optimizedSD's Flask app did).

The worker holds its GPU idle while it encodes, so this is part of every request's time. Both sides write the same
`parameters` text chunk; the pixels read back identical (checked before timing). Two kinds of 512×512 image: gradients
plus a little noise, which compress like a photograph, and uniform noise, which does not compress at all (what a
random-weight model paints).
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.png_encoder import usable_cpus
from ldm.png_info import PARAMETERS_KEY, encode_with_parameters

PARAMETERS = "a lighthouse at dawn\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512"


def photograph_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients plus a little noise: compresses like a photograph, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [128 + 100 * np.sin(x / 37 + k + seed) * np.cos(y / 23 - k) for k in range(3)]
    return np.clip(np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pil_pngs(images: list[np.ndarray], parameters: list[str]) -> list[bytes]:
    files = []
    for image, text in zip(images, parameters, strict=True):
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, text)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
        files.append(buffer.getvalue())
    return files


def check_same_pixels(images: list[np.ndarray], *encodings: list[bytes]) -> None:
    for files in encodings:
        for image, png in zip(images, files, strict=True):
            with Image.open(io.BytesIO(png)) as decoded:
                if not np.array_equal(np.asarray(decoded), image):
                    raise SystemExit("a PNG does not read back to its pixels: the timings would compare nothing")


def alternate(
    ours: Callable[[], object], theirs: Callable[[], object], repeats: int
) -> tuple[list[float], list[float]]:
    """ABBA-alternating wall times of each side, after one warm-up call each."""
    ours(), theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            started = time.perf_counter()
            (ours, theirs)[side]()
            times[side].append(time.perf_counter() - started)
    return times


def run_png(size: int, batches: list[int], repeats: int) -> None:
    print(
        f"PNG encoding of {size}×{size} RGB images with a parameters chunk; {usable_cpus()} CPUs; "
        f"median of {repeats} alternating runs; paired = ours/PIL of neighbouring runs, median (min-max)"
    )
    print(
        f"{'image, batch':<24}{'ours ms':>9}{'PIL ms':>9}{'ours/PIL':>10}{'paired':>19}{'ours KiB':>10}{'PIL KiB':>9}"
    )
    for kind, make in (("photograph-like", photograph_like), ("noise", noise)):
        for batch in batches:
            images = [make(size, size, seed) for seed in range(batch)]
            texts = [PARAMETERS] * batch
            ours_files, pil_files = encode_with_parameters(images, texts), pil_pngs(images, texts)
            check_same_pixels(images, ours_files, pil_files)
            mine, theirs = alternate(
                partial(encode_with_parameters, images, texts), partial(pil_pngs, images, texts), repeats
            )
            ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
            ms = statistics.median(mine) * 1000, statistics.median(theirs) * 1000
            kib = sum(map(len, ours_files)) / batch / 1024, sum(map(len, pil_files)) / batch / 1024
            print(
                f"{f'{kind}, {batch}':<24}{ms[0]:>9.1f}{ms[1]:>9.1f}{ms[0] / ms[1]:>10.2f}"
                f"{f'{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})':>19}"
                f"{kib[0]:>10.0f}{kib[1]:>9.0f}"
            )
