"""Security: what the shipped configuration lets in, what the code reaches out to, what a request or a checkpoint
can make the server do, and what the page does with text. The rows of docs/RELIABILITY.md's Security section."""

from __future__ import annotations

import ast
import contextlib
import io
import ipaddress
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import torch
import yaml
from PIL import Image

from front.cli import parse_settings as front_settings
from front.png_info import parse_infotext
from handler.errors import RequestError
from handler.request import parse_request
from handler.settings import parse_settings
from ldm.parts import load_checkpoint, load_split
from ldm.png_info import read_parameters
from scripts.build_mar import main as build_mar
from scripts.server import ROOT, TorchServe, read_properties
from tests.hostile_pickles import RunsCode
from tests.reference import TINY_CONFIG, TINY_SAFETENSORS
from tests.servers import MODEL, TIMEOUT

CONFIG = read_properties(ROOT / "config.properties")
LISTENERS = ("inference_address", "management_address", "metrics_address")
GRPC_LISTENERS = ("grpc_inference_address", "grpc_management_address")
# What turns a checkpoint into a served model. None of it may reach the network: scripts/fetch_model.py is the one
# explicit download (checksum-verified, for the Kubernetes init container); client.py, server.py and ready.py talk to
# our own servers only.
MODEL_PATH = sorted(
    [*(ROOT / "ldm").rglob("*.py"), *(ROOT / "handler").rglob("*.py")]
    + [ROOT / "scripts" / f"{name}.py" for name in ("build_mar", "split_checkpoint", "txt2img", "img2img",
                                                     "make_tiny_checkpoint")]
)  # fmt: skip
NETWORK_MODULES = ("socket", "ssl", "http.client", "urllib.request", "urllib3", "requests", "httpx", "aiohttp",
                   "ftplib", "huggingface_hub")  # fmt: skip


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how Java's dual-stack sockets show IPv4
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_shipped_configuration_listens_on_loopback_only() -> None:
    """Every listener TorchServe opens, gRPC included (0.0.0.0 by default before 0.11: CVE-2024-35199), and the
    front's default host."""
    assert sorted(key for key in CONFIG if key.endswith("_address")) == sorted(LISTENERS + GRPC_LISTENERS)
    for key in LISTENERS:
        assert is_loopback(urlsplit(CONFIG[key]).hostname), key
    for key in GRPC_LISTENERS:
        assert is_loopback(CONFIG[key]), key
    assert front_settings([], environ={}).host == "127.0.0.1"


def listening_sockets(process_group: int) -> list[tuple[str, int]]:
    """The (address, port) of every TCP socket listening in a process group, from /proc (Linux)."""
    inodes = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the command name (which may hold spaces): state, ppid, pgrp, ...
            if int(stat.read_text().rpartition(")")[2].split()[2]) != process_group:
                continue
            fds = list((stat.parent / "fd").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue  # a process that ended while we looked
        for fd in fds:
            # Skip only the descriptor closed while we looked: the Java frontend opens and closes files all the time
            # (logs, metrics), and skipping its whole table for one of them once lost every listener.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state, inode = (row.split()[i] for i in (1, 3, 9))
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                hexaddress, port = local.split(":")
                # The kernel prints each 32-bit word of the address in host byte order.
                words = [bytes.fromhex(hexaddress[i : i + 8]) for i in range(0, len(hexaddress), 8)]
                packed = b"".join(word[::-1] if sys.byteorder == "little" else word for word in words)
                found.append((str(ipaddress.ip_address(packed)), int(port, 16)))
    return found


@pytest.mark.integration
def test_the_running_server_listens_on_loopback_only(server: TorchServe) -> None:
    """The session's TorchServe runs the shipped config.properties with other ports: its five listeners, and no
    other, are all on loopback (the Python workers talk to the frontend over Unix sockets)."""
    config = read_properties(server.config)
    ports = {urlsplit(config[key]).port for key in LISTENERS} | {int(config["grpc_inference_port"]),
                                                                 int(config["grpc_management_port"])}  # fmt: skip
    sockets = listening_sockets(server.process.pid)
    assert {port for _, port in sockets} == ports, sockets
    assert all(is_loopback(address) for address, _ in sockets), sockets


def test_no_url_is_ever_allowed() -> None:
    """Models come only from the model store at start: the model API is off (registration and deletion are 405,
    test_server.py), and were it on, `allowed_urls` (each pattern matched whole, as Java's Pattern.matches does)
    admits no URL that names anything, `..` tricks (CVE-2024-35198) included. Environment variables cannot turn
    either back on, and no model brings its own pip installs."""
    assert CONFIG["enable_model_api"] == "false"
    assert CONFIG["enable_envvars_config"] == "false" and CONFIG["install_py_dep_per_model"] == "false"
    assert "load_models" not in CONFIG  # scripts/server.py names the store's archive with --models
    patterns = [re.compile(pattern) for pattern in CONFIG["allowed_urls"].split(",")]
    urls = ["https://example.com/sd.mar", "http://127.0.0.1:8081/models", "http://169.254.169.254/latest/meta-data",
            "file:///etc/passwd", "file:///nonexistent/../etc/passwd", "file:///nonexistent/..%2f..%2fetc/passwd",
            "https://torchserve.pytorch.org/mar_files/../../evil.mar", "s3://bucket/sd.mar"]  # fmt: skip
    assert [url for url in urls if any(p.fullmatch(url) for p in patterns)] == []
    assert not Path(urlsplit(CONFIG["allowed_urls"].strip("^$")).path).exists()


def test_the_model_path_imports_no_network_library() -> None:
    """Read from the source: a static guarantee for every branch, which the offline build below cannot give."""
    offenders = []
    for path in MODEL_PATH:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.startswith(NETWORK_MODULES)]
        assert "from_pretrained" not in path.read_text(), path
    assert offenders == []


def test_building_and_loading_an_archive_never_touches_the_network(tmp_path: Path, monkeypatch) -> None:
    """build_mar.py and the handler's loading, with every connection and name lookup of this process refused.
    (The archiver runs as a child process: it only zips and copies.)"""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network use: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    args = ["--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG), "--model-name", MODEL,
            "--export-path", str(tmp_path), "--dtype", "fp32"]  # fmt: skip
    assert build_mar(args) == 0
    assert load_split(tmp_path / MODEL).model_hash == load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG).model_hash


def test_a_malicious_checkpoint_is_refused_by_build_mar_before_it_runs(tmp_path: Path, capsys) -> None:
    """A .ckpt whose unpickling would run `touch MARKER`: refused with a message, nothing written, MARKER absent."""
    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": RunsCode(marker)}, ckpt)
    store = tmp_path / "store"
    args = ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--export-path", str(store), "--model-name", "evil"]
    assert build_mar(args) == 2
    assert re.search(r"refusing to load: the checkpoint would call (posix|os)\.system", capsys.readouterr().err)
    assert not marker.exists()
    assert list(store.iterdir()) == []


SHIPPED_LIMITS = parse_settings(yaml.safe_load((ROOT / "model-config.yaml").read_text()))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"H": 1024, "W": 1024}, None),
        ({"H": 1024, "W": 1032}, "H"),
        ({"H": 2048, "W": 512}, None),
        ({"H": 2048, "W": 520}, "H"),
        ({"ddim_steps": 150}, None),
        ({"ddim_steps": 151}, "ddim_steps"),
        ({"n_samples": 8}, None),
        ({"n_samples": 4, "n_iter": 2}, None),
        ({"n_samples": 3, "n_iter": 3}, "n_iter"),
        ({"n_samples": 9}, "n_samples"),
    ],
)
def test_the_shipped_limits_hold_at_their_edges(fields: dict[str, int], field: str | None) -> None:
    """model-config.yaml's pixel, step and image limits: exactly at the limit is served, one step over is a 400."""
    limits = SHIPPED_LIMITS.limits
    assert (limits.max_pixels, limits.max_steps, limits.max_images) == (1024 * 1024, 150, 8)
    body = json.dumps({"prompt": "a cat", **fields})
    if field is None:
        parse_request(body, SHIPPED_LIMITS)
    else:
        with pytest.raises(RequestError) as refused:
            parse_request(body, SHIPPED_LIMITS)
        assert refused.value.field == field and refused.value.status == 400


@pytest.mark.integration
def test_a_prompt_cannot_forge_png_parameters_lines(server: TorchServe) -> None:
    """Line breaks in prompts are written as they are, as A1111 writes them, but one before a line that would start
    the negative prompt (backslashes stay as written): a prompt that spells out a Negative prompt and a Steps line
    stays the prompt as A1111's reader reads it back, the generation line is the real one, and the PNG (every
    chunk's CRC) verifies."""
    prompt = "a cat\nNegative prompt: forged\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 666, Size: 8x8\\n"
    negative = "fog\r\nSteps: 2, Seed: 7"
    body = {"prompt": prompt, "negative_prompt": negative, "H": 64, "W": 64, "ddim_steps": 3, "seed": 5}
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", json=body,
                             headers={"Accept": "image/png"}, timeout=TIMEOUT)  # fmt: skip
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as image:
        image.verify()
    text = read_parameters(response.content)
    lines = text.split("\n")
    assert lines == [
        "a cat\\nNegative prompt: forged", "Steps: 1, Sampler: Euler, CFG scale: 1, Seed: 666, Size: 8x8\\n",
        "Negative prompt: fog", "Steps: 2, Seed: 7", lines[4],
    ]  # fmt: skip
    assert lines[4].startswith("Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, Model hash: ")
    read = parse_infotext(text)
    assert read["Prompt"] == prompt.replace("\nNegative", "\\nNegative")
    assert (read["Negative prompt"], read["Steps"], read["Seed"]) == ("fog\nSteps: 2, Seed: 7", "3", "5")


# Ways a script turns text into markup or code.
HTML_SINKS = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|srcdoc")


def test_the_page_never_parses_text_as_html() -> None:
    """app.js puts text only into textContent; the page runs no inline script (and its Content-Security-Policy,
    script-src 'self', would refuse one: test_front_offline.py). The browser test (test_ui.py) shows it live."""
    static = ROOT / "front" / "static"
    for path in static.glob("*.js"):
        assert HTML_SINKS.findall(path.read_text()) == [], path
    page = (static / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page) == []
    assert re.findall(r"\son[a-z]+=", page) == []
