"""Serving rows: what TorchServe adds to a generation, and images per second with batching off and on.

The tiny demo architecture (configs/tiny-demo.yaml, random weights) on the CPU, so that the model's own time is
small and the server's share shows. In-process means `Pipeline.generate` plus the same JSON encoding the handler
does; through TorchServe means the same request over HTTP to a real server on loopback (one client, one at a time),
so the difference is the server's plumbing: HTTP, Java frontend, the socket to the Python worker, batching. On a
machine whose speed drifts, the difference of two medians is noisy; each answer's `Server-Timing` header gives the
worker's own time for that very request, and the client's time minus it is the plumbing, free of the drift. Three
rows split it: the same requests back to back, a request the handler refuses at once (the round trip to the worker),
and `GET /ping` (HTTP and the frontend alone).
Throughput: 8 concurrent clients (scripts/load_test.py) against the model served with `batchSize` 1 and with 4.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

from handler.response import json_body, png_files
from ldm.config import load_config
from ldm.parts import load_split, write_split
from ldm.pipeline import Generation, GenerationRequest, Pipeline
from ldm.random_weights import random_state_dict, save_checkpoint
from scripts.build_mar import main as build_mar
from scripts.load_test import run as load_run
from scripts.server import DEMO_CONFIG, ROOT, TorchServe, loopback_listeners, write_properties

PROMPT = "a lighthouse at dawn"
STARTUP_TIMEOUT = 180.0
# Requests of the rows that split the overhead (each a few ms).
PLUMBING_RUNS = 30


def model_config(home: Path, batch_size: int) -> Path:
    """The shipped model-config.yaml with another batchSize (everything else, maxBatchDelay too, as shipped)."""
    text = (ROOT / "model-config.yaml").read_text()
    assert "batchSize: 4\n" in text, "model-config.yaml no longer says batchSize: 4"
    path = home / f"model-config-b{batch_size}.yaml"
    path.write_text(text.replace("batchSize: 4\n", f"batchSize: {batch_size}\n"))
    return path


def serve(home: Path, ckpt: Path, batch_sizes: list[int]) -> TorchServe:
    """One TorchServe serving the model once per batch size, as `b1`, `b4`, ..."""
    store = home / "model-store"
    for size in batch_sizes:
        args = ["--ckpt", str(ckpt), "--config", str(DEMO_CONFIG), "--model-name", f"b{size}",
                "--export-path", str(store), "--dtype", "fp32", "--archive-format", "default",
                "--model-config", str(model_config(home, size))]  # fmt: skip
        if build_mar(args):
            raise SystemExit(f"build_mar failed for batchSize {size}")
    overrides = {**loopback_listeners(store), "vmargs": f"-Xmx512m -Djava.io.tmpdir={home}"}
    config = write_properties(ROOT / "config.properties", home / "config.properties", overrides)
    server = TorchServe(config, home, store, ",".join(f"b{size}=b{size}.mar" for size in batch_sizes))
    server.start(foreground=True)
    for size in batch_sizes:
        server.wait_ready(f"b{size}", STARTUP_TIMEOUT)
    return server


def answer(generation: Generation, model_hash: str) -> str:
    """What the handler makes of a generation for a JSON request."""
    return json_body(generation, png_files([generation], model_hash)[0])


def handler_seconds(response: requests.Response) -> float:
    """The worker's time for the request, from the handler's `Server-Timing: handler;dur=MS` header."""
    match = re.match(r"handler;dur=([0-9.]+)", response.headers.get("Server-Timing", ""))
    if match is None:
        raise SystemExit(f"no handler Server-Timing header in {dict(response.headers)}")
    return float(match[1]) / 1000


def plumbing_seconds(session: requests.Session, url: str, body: dict, status: int) -> float:
    """One request's wall time at the client minus the handler's own time for it."""
    started = time.perf_counter()
    response = session.post(url, json=body, headers={"Accept": "application/json"}, timeout=120)
    if response.status_code != status:
        raise SystemExit(f"expected {status}, got {response.status_code}: {response.text[:200]}")
    return time.perf_counter() - started - handler_seconds(response)


def median_seconds(call: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_serving(requests_per_client: int, clients: int, size: int, steps: int, runs: int) -> None:
    """Print the overhead row and the throughput rows."""
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as scratch:
        home = Path(scratch)
        ckpt = home / "tiny-demo.safetensors"
        save_checkpoint(random_state_dict(load_config(DEMO_CONFIG)), ckpt)
        write_split(ckpt, DEMO_CONFIG, home / "split", "fp32")
        model = load_split(home / "split")
        pipeline = Pipeline(model)
        body = {"prompt": PROMPT, "H": size, "W": size, "ddim_steps": steps, "seed": 7}
        request = GenerationRequest(PROMPT, height=size, width=size, steps=steps, seed=7)
        server = serve(home, ckpt, [1, 4])
        try:
            url = f"{server.inference_url}/predictions/b1"
            session = requests.Session()

            plumbing: list[float] = []

            def over_http() -> None:
                plumbing.append(plumbing_seconds(session, url, body, 200))

            # Warm both up; then alternate, so machine noise hits both alike.
            over_http()
            pipeline.generate(request)
            plumbing.clear()
            local, served = [], []
            for _ in range(runs):
                local.append(median_seconds(lambda: answer(pipeline.generate(request), model.model_hash), 1))
                served.append(median_seconds(over_http, 1))
            inproc, http = statistics.median(local), statistics.median(served)
            print(f"\none {size}×{size} image, {steps} steps, tiny demo model, CPU; median of {runs} alternating runs")
            print(f"{'in-process (generate + JSON)':<36}{inproc * 1000:>9.1f} ms")
            print(f"{'through TorchServe (HTTP, JSON)':<36}{http * 1000:>9.1f} ms")
            print(f"{'difference':<36}{(http - inproc) * 1000:>9.1f} ms  ({http / inproc - 1:+.1%})")
            print(
                f"{'TorchServe overhead, per request':<36}{statistics.median(plumbing) * 1000:>9.1f} ms  "
                f"(min {min(plumbing) * 1000:.1f}, max {max(plumbing) * 1000:.1f}; the client's time minus the "
                "worker's handler time for the same request, from its Server-Timing header)"
            )
            # Where it goes: the same requests with nothing between them, a round trip to the worker that does no
            # work, and the frontend alone.
            back_to_back = [plumbing_seconds(session, url, body, 200) for _ in range(runs)]
            refused = [plumbing_seconds(session, url, {**body, "H": 3}, 400) for _ in range(PLUMBING_RUNS)]
            ping = median_seconds(lambda: session.get(f"{server.inference_url}/ping", timeout=10), PLUMBING_RUNS)
            for label, seconds in (
                ("  the same, back to back", statistics.median(back_to_back)),
                ("  a request refused (400), no work", statistics.median(refused)),
                ("  GET /ping: HTTP, frontend, no worker", ping),
            ):
                print(f"{label:<36}{seconds * 1000:>9.1f} ms")

            print(f"\n{clients} concurrent clients × {requests_per_client} requests, one image each")
            print(f"{'batchSize':<12}{'images/s':>10}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}  statuses")
            for batch_size in (1, 4):
                bodies = [{**body, "seed": seed} for seed in range(clients * requests_per_client)]
                report = load_run(server.inference_url, f"b{batch_size}", bodies, clients)
                statuses = dict(sorted(report.statuses.items()))
                print(
                    f"{batch_size:<12}{report.images_per_second:>10.1f}{report.latency(50):>8.2f}"
                    f"{report.latency(95):>8.2f}{report.latency(99):>8.2f}  {statuses}"
                )
        finally:
            server.stop()
