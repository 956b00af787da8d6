"""What keeping freed host memory (`ldm.host_memory`) is worth: our UNet calls on the CPU with and without it, and
what it costs in peak memory.

Ours against ours, not against diffusers: the setting is process-wide and one-way, so the speed rows of the CPU
section (which a `Pipeline` in their process has already switched) give both sides the same allocator, and these
rows show what that allocator is worth. Each run is a fresh child that loads the split parts, sets the allocator or
leaves glibc's defaults, makes one untimed warm-up UNet call, times a few calls counting their page faults, then
decodes one latent of the same size and reports its peak resident memory. The children alternate ABBA so a machine
that slows down during a row hits both settings alike.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ldm.host_memory import keep_freed_memory
from ldm.parts import load_split
from scripts.process_memory import proc_status

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
# Fresh processes per setting and latent size, and timed calls in each: ~5 min in all on 2 cores for 256² and 512².
ALLOCATOR_CHILDREN, CALLS_PER_CHILD = 3, 2
MODES = {"defaults": "glibc defaults", "kept": "freed memory kept"}


def child(mode: str, split: Path, batch: int, latent: int) -> None:
    """Body of one child: a JSON line with each timed call's seconds and page faults, and the peak RSS."""
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
        model.vae.decode(x[:1])
    report = {"seconds": seconds, "faults": faults, "peak": proc_status("VmHWM"), "applied": applied}
    print(json.dumps(report))


def run_children(split: Path, batch: int, latent: int, children: int) -> dict[str, list[dict[str, Any]]]:
    """`children` children per setting, alternating ABBA."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for i in range(children):
        for mode in list(MODES) if i % 2 == 0 else reversed(MODES):
            command = [sys.executable, "-m", "scripts.bench_allocator", mode, str(split), str(batch), str(latent)]
            done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def compare_allocators(split: Path, batch: int, latents: tuple[int, ...], children: int) -> None:
    """One table row pair per latent size."""
    print(
        f"\nhost allocator, our UNet call b{batch}: {children} fresh processes per setting and size (alternating), "
        f"{CALLS_PER_CHILD} timed calls each after a warm-up, then one VAE decode; medians; peak = VmHWM, weights "
        "included"
    )
    print(f"{'':<40}{'s':>8}{'page faults':>14}{'spread':>8}{'peak MiB':>10}")
    for latent in latents:
        runs = run_children(split, batch, latent, children)
        medians = {}
        for mode, label in MODES.items():
            seconds = [s for run in runs[mode] for s in run["seconds"]]
            faults = statistics.median(f for run in runs[mode] for f in run["faults"])
            peak = statistics.median(run["peak"] for run in runs[mode]) / MIB
            medians[mode] = statistics.median(seconds)
            if mode == "kept" and not all(run["applied"] for run in runs[mode]):
                label += " (NOT APPLIED)"
            row = f"{latent * 8}², {label}"
            spread = max(seconds) / min(seconds)
            print(f"{row:<40}{medians[mode]:>8.3f}{faults:>14,.0f}{spread:>8.2f}{peak:>10,.0f}")
        print(f"{latent * 8}², kept / defaults: {medians['kept'] / medians['defaults']:.2f}")


if __name__ == "__main__":
    child(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
