"""Shared fixtures: the tiny reference model, loaded once, and its original-format `.ckpt` twin; a real TorchServe
serving it, and the web front in front of that, each started once for every integration test that asks."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.model import StableDiffusion
from ldm.parts import load_checkpoint, write_split
from ldm.pipeline import Pipeline
from scripts.server import TorchServe
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS
from tests.servers import running_front, tiny_torchserve

# TorchServe's ts/version.py reads version.txt without closing it; let that file go now, quietly, rather than as a
# ResourceWarning that `filterwarnings = error` would pin on whichever test happens to collect it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ResourceWarning)
    import ts.version  # noqa: F401

    gc.collect()


@pytest.fixture(scope="session", autouse=True)
def model_hash_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Model hashes remembered by the code under test (and by its subprocesses) go to a temp folder, never into the
    user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


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


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference checkpoint split into fp32 parts, as a model directory of the handler."""
    out = tmp_path_factory.mktemp("tiny-split")
    write_split(TINY_SAFETENSORS, TINY_CONFIG, out, "fp32")
    return out


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """TorchServe serving the tiny model (`tests.servers.MODEL`), with a 400 ms batch delay."""
    with tiny_torchserve(tmp_path_factory.mktemp("torchserve")) as ts:
        yield ts


@pytest.fixture(scope="session")
def front(server: TorchServe) -> Iterator[str]:
    """The base URL of the web front forwarding to `server`."""
    with running_front(server.inference_url) as url:
        yield url
