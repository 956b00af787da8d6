"""Keep freed host memory in the process, so CPU inference stops paying the kernel for the same pages every step.

glibc serves blocks above its mmap threshold (128 KiB at first, raised as it goes up to 32 MiB) with fresh `mmap`s
and hands them back on free; it also trims the heap's top once enough of it is free. A UNet call on the CPU makes
and drops the same gigabytes of activations every step, so by default each call faults them all back in,
zero-filled: at batch 2 and a 32×32 latent that is 464,000 page faults (1.8 GB) per call, 15–29 % of the call's
time on two cores (`scripts/bench_allocator.py`). Raising both thresholds keeps those pages in the heap for the next
step: 0 faults, same arithmetic.

The cost is that the process keeps its high-water mark of activations resident instead of returning it between
requests, which a server that makes the same images again needs anyway. It is applied once the weights are loaded
(loading's own temporaries, such as fp16 parts widened to fp32, should still go back to the kernel).
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks above this still get their own mapping: a one-off huge buffer should not stay in the heap for good.
MMAP_THRESHOLD = 1 << 30
# Freed heap memory kept before glibc trims: as much as an int parameter can say.
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 1 GiB in the heap and never trim it; False where that is not glibc
    (musl, macOS): those allocators are left as they are."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        logger.info("not glibc: host memory allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
