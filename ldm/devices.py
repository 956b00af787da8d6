"""Where the networks run: an NVIDIA GPU (CUDA), Apple silicon's GPU (MPS), or the CPU; and what each needs.

Why apart: TorchServe names a GPU for a worker both on CUDA machines and on Apple silicon (it counts the Mac's GPU),
and the server and the command lines must read that alike. MPS has no float64, so the float64 arithmetic of the
schedules stays on the CPU (tests/test_devices.py holds that none of it meets the networks' tensors), and its
memory cache is emptied through its own call.

What is measured where: CUDA by the GPU benchmark and tests (docs/PERFORMANCE.md); MPS by nobody here (no Mac), so
an MPS worker runs in float32 unless told otherwise, the precision whose images match the CPU's but for the
rounding of Apple's kernels, and its speed is not claimed.
"""

from __future__ import annotations

import torch


def mps_available() -> bool:
    """Whether this machine has Apple silicon's GPU and this torch build can use it."""
    return torch.backends.mps.is_available()


def worker_device(gpu_id: int | None) -> torch.device:
    """The device of a TorchServe worker given `gpu_id` (None: TorchServe gave it none, a CPU worker): that CUDA
    GPU, else Apple's GPU, else the CPU (a GPU named by a machine whose torch cannot use it)."""
    if gpu_id is None:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def auto_dtype(device: torch.device) -> torch.dtype:
    """The precision "auto" picks: float16 on CUDA (tensor cores; the images within fp16's rounding of float32's),
    float32 on the CPU (where float16 is slow and inexact) and on MPS (not measured here: the exact choice)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def release_cached_memory(device: torch.device) -> None:
    """Hand the memory torch's allocator keeps for reuse on `device` back to the GPU, after a part moved off it
    (low-memory mode) or an allocation failed; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
