"""Loading split parts holds one copy of the weights: peak memory while loading ≤ 1.3 × the parts' size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.config import parse_config
from ldm.parts import write_split
from ldm.random_weights import random_state_dict, save_checkpoint
from tests.reference import TINY_CONFIG

# Runs in a fresh interpreter: its own peak (VmHWM) is reset after the imports, then the parts are loaded and every
# weight read once, so pages the loader left on the file mapping are counted too.
PROBE = """
import json, sys
import torch
from ldm.parts import load_split
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
model = load_split(sys.argv[1], dtype=torch.float32)
total = sum(float(p.sum()) for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters())
print(json.dumps({"before": before, "peak": status("VmHWM"), "checksum": total}))
"""


@pytest.mark.slow
def test_split_parts_load_with_one_copy_of_the_weights(tmp_path: Path) -> None:
    # A model of about 450 MB: big enough that the interpreter's own memory is noise.
    raw = OmegaConf.load(TINY_CONFIG)
    raw.model.params.unet_config.params.model_channels = 256
    raw.model.params.unet_config.params.context_dim = 256
    raw.model.params.cond_stage_config.params.text_config.hidden_size = 256
    raw.model.params.cond_stage_config.params.text_config.intermediate_size = 1024
    raw.model.params.first_stage_config.params.ddconfig.ch = 64
    config_path = tmp_path / "medium.yaml"
    OmegaConf.save(raw, config_path)
    ckpt = tmp_path / "medium.safetensors"
    save_checkpoint(random_state_dict(parse_config(raw)), ckpt)
    parts = tmp_path / "parts"
    write_split(ckpt, config_path, parts, "fp32")
    ckpt.unlink()
    size = sum(p.stat().st_size for p in parts.glob("*.safetensors"))
    assert size > 400 * 2**20

    probe = subprocess.run([sys.executable, "-c", PROBE, str(parts)], capture_output=True, text=True, check=True)
    measured = json.loads(probe.stdout)
    assert measured["checksum"] != 0
    assert (measured["peak"] - measured["before"]) / size <= 1.3
