"""Where scripts/setup.sh installs torch from: printed as pip arguments, one per line.

PyPI's Linux build of torch is the CUDA one, with several GB of NVIDIA libraries that a machine without an NVIDIA
GPU never uses. PyTorch's own CPU index holds the same version without them, so a Linux laptop or CPU server gets
that one, when the index answers. Runs before anything is installed: the standard library only.
"""

from __future__ import annotations

import http.client
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Set to an index URL (a mirror of the CPU index, or one of PyTorch's CUDA ones), or to nothing for pip's own.
OVERRIDE = "SD_TORCH_INDEX_URL"
# An index of pip's own in `pip config list`'s lines (global.index-url=…, :env:.index-url=…; not extra-index-url).
INDEX_SETTING = re.compile(r"^[^=]*(?<![-\w])index-url=", re.MULTILINE)


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is installed: its kernel module's folder, or its command (WSL2 has only the command)."""
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def answers(url: str, timeout: float = 10.0) -> bool:
    """Whether `url` can be read from here (a machine without internet, or behind a proxy that blocks it, cannot)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except (OSError, ValueError, http.client.HTTPException):
        return False


def pip_index_configured() -> bool:
    """Whether pip is set to an index of its own (`index-url` in a pip.conf or PIP_INDEX_URL: a company mirror),
    which torch should come from like every other package."""
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return INDEX_SETTING.search(listed) is not None


def choose(
    system: str,
    environ: Mapping[str, str],
    nvidia: Callable[[], bool] = has_nvidia_gpu,
    reachable: Callable[[str], bool] = answers,
    configured: Callable[[], bool] = pip_index_configured,
) -> tuple[list[str], str | None]:
    """The pip arguments for torch, and what to tell the user about them (None when nothing is worth saying)."""
    if OVERRIDE in environ:
        chosen = environ[OVERRIDE]
        where = chosen or "pip's own indexes"
        return (["--index-url", chosen] if chosen else []), f"setup: torch from {where} ({OVERRIDE})"
    if system != "Linux" or nvidia() or configured():
        return [], None
    if reachable(f"{CPU_INDEX}/torch/"):
        return ["--index-url", CPU_INDEX], (
            f"setup: no NVIDIA GPU here: torch's CPU build, from {CPU_INDEX} ({OVERRIDE}= for pip's own indexes)"
        )
    return [], (
        f"setup: no NVIDIA GPU here, but {CPU_INDEX} does not answer: torch comes from pip's own indexes, where "
        f"Linux's build is the CUDA one (several GB more) unless a CPU wheel is at hand; {OVERRIDE}=URL names a "
        "mirror of the CPU index"
    )


def main() -> int:
    arguments, message = choose(platform.system(), os.environ)
    if message:
        print(message, file=sys.stderr)
    print("\n".join(arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
