"""Serving rows: what TorchServe adds to a generation, and images per second with batching off and on.

The tiny demo architecture (configs/tiny-demo.yaml, random weights) on the CPU, so that the model's own time is
small and the server's share shows. In-process means `Pipeline.generate` plus the same JSON encoding the handler
does; through TorchServe means the same request over HTTP to a real server on loopback (one client, one at a time),
so the difference is the server's plumbing: HTTP, Java frontend, the socket to the Python worker, batching. On a
machine whose speed drifts, the difference of two medians is noisy; each answer's `Server-Timing` header gives the
worker's own time for that very request, and the client's time minus it is the plumbing, free of the drift. Three
rows split it: the same requests back to back, a request the handler refuses at once (the round trip to the worker),
and `GET /ping` (HTTP and the frontend alone).
Batching: the model is served with `batchSize` 1, with the shipped batching, and with the same batch size and a 50 ms
`maxBatchDelay` (TorchServe's examples' kind of wait); for each, a lone request's overhead (TorchServe holds the first
request of a batch up to maxBatchDelay for company) and throughput under 8 concurrent clients (scripts/load_test.py).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from handler.response import json_body, png_files
from ldm.config import load_config
from ldm.generation_request import GenerationRequest
from ldm.model import StableDiffusion
from ldm.parts import load_split, write_split
from ldm.pipeline import Generation, Pipeline
from ldm.random_weights import random_state_dict, save_checkpoint
from scripts.build_mar import main as build_mar
from scripts.load_test import run as load_run
from scripts.model_store import DEMO_CONFIG, ROOT
from scripts.server import TorchServe, loopback_listeners, write_properties

PROMPT = "a lighthouse at dawn"
STARTUP_TIMEOUT = 180.0
# Requests of the rows that split the overhead (each a few ms).
PLUMBING_RUNS = 30


@dataclass(frozen=True)
class Batching:
    """One way to serve the model: TorchServe's batchSize and maxBatchDelay (ms; None: as model-config.yaml ships)."""

    batch_size: int
    max_delay_ms: int | None = None

    @property
    def name(self) -> str:
        return f"b{self.batch_size}" + ("" if self.max_delay_ms is None else f"-d{self.max_delay_ms}")

    def label(self) -> str:
        delay = f"{shipped_delay_ms()} ms, as shipped" if self.max_delay_ms is None else f"{self.max_delay_ms} ms"
        return f"batchSize {self.batch_size}, maxBatchDelay {delay}"


def shipped_text() -> str:
    return (ROOT / "model-config.yaml").read_text()


def shipped_delay_ms() -> int:
    match = re.search(r"^maxBatchDelay: (\d+)$", shipped_text(), re.M)
    assert match, "model-config.yaml no longer says maxBatchDelay"
    return int(match[1])


# batchSize 1; the shipped batching; the same batch size with a long wait, as TorchServe's examples use.
BATCHINGS = (Batching(1), Batching(4), Batching(4, 50))


def model_config(home: Path, batching: Batching) -> Path:
    """The shipped model-config.yaml with another batchSize and maxBatchDelay (everything else as shipped)."""
    shipped = shipped_text()
    assert "batchSize: 4\n" in shipped, "model-config.yaml no longer says batchSize: 4"
    delay = shipped_delay_ms() if batching.max_delay_ms is None else batching.max_delay_ms
    text = shipped.replace("batchSize: 4\n", f"batchSize: {batching.batch_size}\n")
    path = home / f"model-config-{batching.name}.yaml"
    path.write_text(re.sub(r"^maxBatchDelay: \d+$", f"maxBatchDelay: {delay}", text, flags=re.M))
    return path


def serve(home: Path, ckpt: Path, batchings: tuple[Batching, ...]) -> TorchServe:
    """One TorchServe serving the model once per batching, each under its `name`."""
    store = home / "model-store"
    for batching in batchings:
        args = ["--ckpt", str(ckpt), "--config", str(DEMO_CONFIG), "--model-name", batching.name,
                "--export-path", str(store), "--dtype", "fp32", "--archive-format", "default",
                "--model-config", str(model_config(home, batching))]  # fmt: skip
        if build_mar(args):
            raise SystemExit(f"build_mar failed for {batching.label()}")
    overrides = {**loopback_listeners(store), "vmargs": "-Xmx512m"}
    config = write_properties(ROOT / "config.properties", home / "config.properties", overrides)
    server = TorchServe(config, home, store, ",".join(f"{b.name}={b.name}.mar" for b in batchings))
    server.start(foreground=True)
    for batching in batchings:
        server.wait_ready(batching.name, STARTUP_TIMEOUT)
    return server


def answer(generation: Generation, model: StableDiffusion) -> str:
    """What the handler makes of a generation for a JSON request."""
    return json_body(generation, png_files([generation], model)[0])


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
        server = serve(home, ckpt, BATCHINGS)
        try:
            url = f"{server.inference_url}/predictions/{BATCHINGS[0].name}"
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
                local.append(median_seconds(lambda: answer(pipeline.generate(request), model), 1))
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

            print(
                f"\nper batching: a lone request's overhead (client time minus handler time, median of {runs} back "
                f"to back: TorchServe waits maxBatchDelay for company first);\n{clients} concurrent clients × "
                f"{requests_per_client} requests, one image each"
            )
            print(f"{'':<44}{'lone ms':>9}{'images/s':>10}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}  statuses")
            for batching in BATCHINGS:
                lone_url = f"{server.inference_url}/predictions/{batching.name}"
                lone = statistics.median(plumbing_seconds(session, lone_url, body, 200) for _ in range(runs))
                bodies = [{**body, "seed": seed} for seed in range(clients * requests_per_client)]
                report = load_run(server.inference_url, batching.name, bodies, clients)
                statuses = dict(sorted(report.statuses.items()))
                print(
                    f"{batching.label():<44}{lone * 1000:>9.1f}{report.images_per_second:>10.1f}"
                    f"{report.latency(50):>8.2f}{report.latency(95):>8.2f}{report.latency(99):>8.2f}  {statuses}"
                )
        finally:
            server.stop()
