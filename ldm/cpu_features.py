"""What the host CPU can do that changes which precision is fastest on it.

Why: bf16 runs about twice as fast as float32 on CPUs with AMX (docs/PERFORMANCE.md) and may well run slower on CPUs
without bf16 instructions, so a CPU server is told when switching would pay, rather than left to guess.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def has_amx_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU multiplies bf16 matrices in hardware (AMX), from Linux's CPU flags; False where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags
