"""README's "Python API" example runs as written, on the tiny checkpoint on the CPU.

Why: it is the one piece of the README a reader pastes whole, and its imports name modules that move (the request
left ldm/pipeline.py for ldm/generation_request.py); a snippet that no longer runs is found here, not by a user.
"""

from __future__ import annotations

import re

import numpy as np

from scripts.server import ROOT
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS

# What the example names that this machine has not: the user's checkpoint and config, a GPU, fp16 (CPU: fp32).
STAND_INS = {
    '"models/ldm/stable-diffusion-v1/model.ckpt"': f'"{TINY_SAFETENSORS}"',
    '"configs/v1-inference.yaml"': f'"{TINY_CONFIG}"',
    'device="cuda"': 'device="cpu"',
    "dtype=torch.float16": "dtype=torch.float32",
}


def test_the_readme_python_example_makes_its_image() -> None:
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has a python block"
    code = match[1]
    for name, stand_in in STAND_INS.items():
        assert code.count(name) == 1, name
        code = code.replace(name, stand_in)
    names: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), names)
    generation = names["generation"]
    # The tiny config's native size, one image of the seed the example asks for, and a picture, not a flat fill.
    assert generation.images.shape == (1, 64, 64, 3) and generation.images.dtype == np.uint8
    assert generation.seeds == [42]
    assert generation.images.std() > 10
