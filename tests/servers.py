"""Real servers for integration tests, on free ports in their own folders, always stopped: a TorchServe serving
the tiny reference model, and the web front in front of it (uvicorn in a thread of the test process)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import uvicorn
from safetensors.torch import save_file

from front.app import create_app
from front.settings import FrontSettings
from ldm.parts import load_checkpoint
from scripts.build_mar import main as build_mar
from scripts.server import ROOT, TorchServe, free_port, java_problem, loopback_listeners, write_properties
from tests.loras import model_lora, write_lora
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS

MODEL = "tiny"
TIMEOUT = 120
# TorchServe's settings of the session server: a batch delay long enough that concurrent clients share batches.
BATCHING: Mapping[str, int] = {"maxBatchDelay": 400}
# The LoRA every test server holds (scripts/build_mar.py --loras): `<lora:tiny-style:0.8>` in a prompt.
TINY_LORA = "tiny-style"


# And the textual-inversion embedding (build_mar.py --embeddings): the word `tinyglow` in a prompt.
TINY_EMBEDDING = "tinyglow"
# Set by .ci/run, which installs every program the tests run: one missing there is a failure, not a skip.
STRICT = "SD_TESTS_STRICT"


def need(problem: str | None) -> None:
    """Skip a test whose outside program (Java, Chromium, the deploy tools) is missing, saying why and how to get
    it, as on a fresh machine; under .ci/run fail instead."""
    if problem is not None:
        (pytest.fail if os.environ.get(STRICT) else pytest.skip)(problem)


def write_tiny_lora(folder: Path) -> Path:
    """`TINY_LORA`'s file in `folder`, the same bytes each time."""
    return write_lora(folder / f"{TINY_LORA}.safetensors", model_lora(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)))


def write_tiny_embedding(folder: Path) -> Path:
    """`TINY_EMBEDDING`'s file in `folder` (two vectors for the tiny CLIP), the same bytes each time."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_EMBEDDING}.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(12))}, str(path))
    return path


def send_json(handler: BaseHTTPRequestHandler, status: int, answer: object) -> None:
    """Answer the request `handler` is serving with `answer` as JSON, as TorchServe answers."""
    data = json.dumps(answer).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@contextmanager
def http_server(handler: Callable[..., BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on a free loopback port from a thread, stopped and closed on exit; yields the base URL."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        # A short poll interval: shutdown() waits for the next poll, 0.5 s by default.
        thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            thread.join()


def model_config_with(settings: Mapping[str, int]) -> str:
    """The shipped model-config.yaml with some of TorchServe's top-level keys set: replaced where the file has
    them, else added at the top (where a key is top-level whatever the file's last section is)."""
    text = (ROOT / "model-config.yaml").read_text()
    for key, value in settings.items():
        text, found = re.subn(rf"^{key}:.*$", f"{key}: {value}", text, flags=re.MULTILINE)
        if not found:
            text = f"{key}: {value}\n{text}"
    return text


@contextmanager
def tiny_torchserve(home: Path, settings: Mapping[str, int] = BATCHING, detached: bool = False) -> Iterator[TorchServe]:
    """TorchServe serving the tiny model from a .mar built by the real archiver, until the block ends; `settings`
    override the shipped model-config.yaml's (workers, batching, timeouts, queue size). `detached`: started as
    scripts/serve.sh starts it, not as our child."""
    need(java_problem())
    store = home / "model-store"
    model_config = home / "model-config.yaml"
    model_config.write_text(model_config_with(settings))
    args = ["--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG), "--model-name", MODEL,
            "--export-path", str(store), "--dtype", "fp32", "--archive-format", "default",
            "--model-config", str(model_config), "--loras", str(write_tiny_lora(home / "loras").parent),
            "--embeddings", str(write_tiny_embedding(home / "embeddings").parent)]  # fmt: skip
    assert build_mar(args) == 0
    assert (store / f"{MODEL}.mar").is_file()
    config = write_properties(ROOT / "config.properties", home / "config.properties", {
        **loopback_listeners(store),
        "vmargs": "-Xmx512m",
    })  # fmt: skip
    ts = TorchServe(config, home, store, f"{MODEL}={MODEL}.mar")
    ts.start(foreground=not detached)
    try:
        ts.wait_ready(MODEL, timeout=TIMEOUT)
        yield ts
    finally:
        ts.stop()


@contextmanager
def running_front(inference_url: str, model: str = MODEL) -> Iterator[str]:
    """The front on a free port, served by uvicorn in a thread; yields its base URL."""
    settings = FrontSettings(inference_url=inference_url, model=model, port=free_port(), timeout=TIMEOUT)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sd-front")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the front did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
