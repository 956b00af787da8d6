"""This process's memory as Linux reports it in /proc/self/status: what the benchmarks' children measure."""

from __future__ import annotations

from pathlib import Path


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes.

    VmHWM rather than ru_maxrss for the peak: Linux carries ru_maxrss across execve, so a child the (by then
    multi-GB) benchmark spawns would report the parent's peak as its own; VmHWM belongs to the new address space.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS, so the peak measured next is the load's, not the imports' (clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
