"""What keeping freed host memory (`ldm.host_memory`) is worth: our UNet call on the CPU with and without it.

Ours against ours, not against diffusers: the setting is process-wide and one-way, so the speed rows of the CPU
section (which a `Pipeline` in their process has already switched) give both sides the same allocator, and this row
shows what that allocator is worth. Each run is a fresh child that loads the split parts, sets the allocator or
leaves glibc's defaults, makes one untimed warm-up call and then times a few calls, counting their page faults;
the children alternate ABBA so a machine that slows down during the row hits both settings alike.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm.host_memory import keep_freed_memory
from ldm.parts import load_split

REPO = Path(__file__).resolve().parent.parent
# Fresh processes per setting, and timed calls in each: ~100 s in all on 2 cores.
ALLOCATOR_CHILDREN, CALLS_PER_CHILD = 4, 2
MODES = ("defaults", "kept")


def child(mode: str, split: Path, batch: int, latent: int) -> None:
    """Body of one child: a JSON line with the seconds and page faults of each timed call."""
    model = load_split(split)
    applied = keep_freed_memory() if mode == "kept" else False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=generator)
    t = torch.full((batch,), 500)
    context = torch.randn(batch, 77, model.config.unet.context_dim, generator=generator)
    seconds, faults = [], []
    with torch.inference_mode():
        model.unet(x, t, context)
        for _ in range(CALLS_PER_CHILD):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            model.unet(x, t, context)
            seconds.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"seconds": seconds, "faults": faults, "applied": applied}))


def compare_allocators(split: Path, batch: int, latent: int, children: int) -> None:
    """Run `children` children per setting, alternating, and print the row."""
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for i in range(children):
        for mode in MODES if i % 2 == 0 else reversed(MODES):
            command = [sys.executable, "-m", "scripts.bench_allocator", mode, str(split), str(batch), str(latent)]
            done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"\nhost allocator, our UNet call b{batch} {latent}×{latent} latent: {children} fresh processes per setting "
        f"(alternating), {CALLS_PER_CHILD} timed calls each after a warm-up; medians"
    )
    print(f"{'':<34}{'s':>8}{'page faults':>14}{'spread':>8}")
    medians = {}
    for mode, label in zip(MODES, ("glibc defaults", "freed memory kept"), strict=True):
        seconds = [s for run in runs[mode] for s in run["seconds"]]
        faults = [f for run in runs[mode] for f in run["faults"]]
        medians[mode] = statistics.median(seconds)
        if mode == "kept" and not all(run["applied"] for run in runs[mode]):
            label += " (NOT APPLIED: not glibc)"
        print(f"{label:<34}{medians[mode]:>8.3f}{statistics.median(faults):>14,.0f}{max(seconds) / min(seconds):>8.2f}")
    print(f"kept / defaults: {medians['kept'] / medians['defaults']:.2f}")


if __name__ == "__main__":
    child(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
