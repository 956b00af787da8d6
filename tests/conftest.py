"""Shared fixtures: the tiny reference model, loaded once, and its original-format `.ckpt` twin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.model import StableDiffusion
from ldm.parts import load_checkpoint
from ldm.pipeline import Pipeline
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference checkpoint in the original `.ckpt` format, written from its safetensors twin."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-dev.ckpt"
    torch.save({"state_dict": read_state_dict(TINY_SAFETENSORS)}, path)
    return path


@pytest.fixture(scope="session")
def tiny_model() -> StableDiffusion:
    return load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)


@pytest.fixture(scope="session")
def pipeline(tiny_model: StableDiffusion) -> Pipeline:
    return Pipeline(tiny_model)
