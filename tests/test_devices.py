"""Where the networks run (ldm/devices.py): the device a TorchServe worker takes, and the float64 arithmetic that
must stay off it (Apple's GPU, MPS, has no float64; there is no Mac here, so what can be checked on the CPU is that
no float64 tensor ever meets the networks' tensors, which are the only ones an MPS run puts on the GPU)."""

from __future__ import annotations

import collections
from dataclasses import replace
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from handler.settings import parse_settings
from ldm.devices import auto_dtype, worker_device
from ldm.generation_request import GenerationRequest
from ldm.pipeline import Pipeline


@pytest.mark.parametrize(
    ("cuda", "mps", "gpu_id", "expected"),
    [
        (True, False, 1, "cuda:1"),
        (True, True, 0, "cuda:0"),
        (False, True, 0, "mps"),  # TorchServe on Apple silicon names the Mac's GPU
        (False, False, 0, "cpu"),  # a GPU this torch cannot use
        (True, True, None, "cpu"),  # a CPU worker
    ],
)
def test_a_worker_runs_where_torchserve_puts_it(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool, gpu_id: int | None, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert worker_device(gpu_id) == torch.device(expected)


def test_auto_precision_halves_on_cuda_alone() -> None:
    assert auto_dtype(torch.device("cuda:0")) == torch.float16
    assert auto_dtype(torch.device("mps")) == torch.float32
    assert auto_dtype(torch.device("cpu")) == torch.float32
    settings = parse_settings({"handler": {"precision": "fp16"}})
    assert settings.dtype(torch.device("mps")) == torch.float16  # asked for by name


class _Float64Meetings(TorchDispatchMode):
    """Counts the operations that read or make a float64 tensor together with a feature map or latent (3 or more
    dimensions, another dtype): on MPS those would be float64 on the GPU, or a CPU tensor met by a GPU one."""

    def __init__(self) -> None:
        super().__init__()
        self.found: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float64 for t in tensors) and any(
            t.dtype != torch.float64 and t.ndim >= 3 for t in tensors
        ):
            self.found[str(func)] += 1
        return out


def test_no_float64_tensor_meets_the_networks(pipeline: Pipeline) -> None:
    """DDIM at η > 0, PLMS, LMS and a Karras SDE sampler; an only-masked inpainting (an img2img with a blurred
    mask); a hires fix with a variation seed: the schedules' float64 arithmetic stays in numbers and CPU tables."""
    init = Image.new("RGB", (64, 64), (120, 30, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    small = GenerationRequest("a cat", height=64, width=64, steps=2, seed=1)
    requests = [
        replace(small, eta=0.5),
        *(replace(small, sampler=sampler) for sampler in ("plms", "lms", "dpmpp_sde_karras")),
        replace(small, steps=4, init_image=init, mask_image=mask, inpaint_area="only_masked"),
        replace(small, hr_scale=1.5, sampler="euler_a", subseed=7, subseed_strength=0.3),
    ]
    meetings = _Float64Meetings()
    with meetings:
        for request in requests:
            pipeline.generate(request)
    assert not meetings.found
