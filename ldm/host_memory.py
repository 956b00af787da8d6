"""Keep freed host memory in the process, so CPU inference stops paying the kernel for the same pages every step.

glibc serves blocks above its mmap threshold (128 KiB at first, raised as it goes up to 32 MiB) with fresh `mmap`s
and hands them back on free; it also trims the heap's top once enough of it is free. A UNet call on the CPU makes
and drops the same gigabytes of activations every step, so by default each call faults them all back in,
zero-filled: 788,000 page faults (3 GB) per guided call at 512×512. Raising both thresholds keeps those pages in
the heap for the next step — 7,700 faults, same arithmetic — and the call took 0.89× the time on two cores (0.80×
at 256×256, `scripts/bench_allocator.py`).

The cost is memory: the process keeps its high-water mark of activations resident between requests (which the next
request needs again anyway), and a 512×512 image peaked 276 MiB (5 %) higher. It is applied once the weights are
loaded, so loading's own temporaries (fp16 parts widened to fp32) still go back to the kernel.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks from this size up still get their own mapping. The UNet's activations at 512×512 stay under it; the VAE
# decoder's feature maps at 512×512 (64–256 MiB, each made once per image) go over, and kept in the heap they
# fragment it: with a 1 GiB threshold a 512×512 decode peaked 620 MiB higher than with glibc's defaults, with this
# one 140 MiB higher.
MMAP_THRESHOLD = 64 << 20
# Freed heap memory kept before glibc trims: as much as an int parameter can say.
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks under 64 MiB in the heap and never trim it; False where that is not glibc
    (musl, macOS): those allocators are left as they are."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        logger.info("not glibc: host memory allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
