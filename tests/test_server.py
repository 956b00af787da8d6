"""A real TorchServe over HTTP: the .mar built by the real archiver from the tiny reference checkpoint, started on
free ports in its own folder, asked what users ask, and stopped with all its processes."""

from __future__ import annotations

import base64
import dataclasses
import io
import itertools
import json
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.generation_request import GenerationRequest
from ldm.parts import load_split
from ldm.pipeline import Pipeline
from ldm.png_info import read_parameters
from scripts.server import TorchServe
from tests.bad_requests import CASES, PNG_ONLY, VALID, Case, image_base64, png_base64
from tests.reference import (
    REFERENCE,
    TINY_CONFIG,
    TINY_SAFETENSORS,
    assert_matches_png,
    case,
    load_image,
    reference_png,
    request_for,
)
from tests.servers import MODEL, TIMEOUT, TINY_EMBEDDING, TINY_LORA, write_tiny_embedding, write_tiny_lora

pytestmark = pytest.mark.integration
# Rounds of every bad request to warm the worker up, rounds after them, and how much the worker's resident memory
# may grow in the median one of the latter: keeping any one of a round's bodies (the largest is 14 MB), or 20 kB of
# each of its 141 requests, would show. The allocator grows the heap in steps of about 30 MiB now and then as it settles
# around four concurrent requests' big bodies (24 rounds alone, 2026-11-29: +80, +2 and +30 MiB in the first three,
# +29 in the eighth, under 0.4 in each other one); a leak grows it in every round.
WARM_UP_ROUNDS, BAD_ROUNDS = 3, 8
MEDIAN_ROUND_GROWTH_BOUND = 2**20


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The same parts the archive holds, loaded in this process: what the server must answer."""
    from ldm.parts import write_split

    folder = tmp_path_factory.mktemp("parts")
    write_split(TINY_SAFETENSORS, TINY_CONFIG, folder, "fp32")
    loras, embeddings = write_tiny_lora(folder / "loras").parent, write_tiny_embedding(folder / "embeddings").parent
    return Pipeline(load_split(folder), lora_dir=loras, embeddings_dir=embeddings)


def predict(server: TorchServe, body: Any, accept: str = "application/json", **kwargs: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": accept}
    return requests.post(
        f"{server.inference_url}/predictions/{MODEL}", data=data, headers=headers, timeout=TIMEOUT, **kwargs
    )


def decode(png_b64: str) -> np.ndarray:
    return np.asarray(load_image(io.BytesIO(base64.b64decode(png_b64))))


def worker_pids(server: TorchServe) -> list[int]:
    return sorted(w["pid"] for w in server.ready_workers(MODEL))


def test_ping(server: TorchServe) -> None:
    response = requests.get(f"{server.inference_url}/ping", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "Healthy"


def test_png_equals_in_process_image(server: TorchServe, in_process: Pipeline) -> None:
    response = predict(server, VALID, accept="image/png")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["X-Seed"] == "5"
    # The worker's own time for the request, which the client's wall time contains.
    handler_ms = float(re.fullmatch(r'handler;dur=([0-9.]+);desc="batch of 1"', response.headers["Server-Timing"])[1])
    assert 0 < handler_ms <= response.elapsed.total_seconds() * 1000
    expected = in_process.generate(GenerationRequest("a red bicycle", height=64, width=64, steps=3, seed=5))
    assert np.array_equal(np.asarray(load_image(io.BytesIO(response.content))), expected.images[0])
    assert "Seed: 5, Size: 64x64, Model hash: 8e79c1729f" in read_parameters(response.content)


def test_json_equals_in_process_images(server: TorchServe, in_process: Pipeline) -> None:
    response = predict(server, {**VALID, "n_samples": 2, "n_iter": 2, "negative_prompt": "fog", "eta": 0.3})
    assert response.status_code == 200
    body = response.json()
    assert body["seeds"] == [5, 6, 7, 8]
    assert body["parameters"]["n_iter"] == 2 and body["parameters"]["eta"] == 0.3
    expected = in_process.generate(GenerationRequest("a red bicycle", "fog", 64, 64, 3, eta=0.3, seed=5, n_samples=2,
                                                     n_iter=2))  # fmt: skip
    # The server batches all four images at once, in-process runs two batches of two: float rounding may differ.
    for png, pixels in zip(body["images"], expected.images, strict=True):
        assert_matches_png(decode(png), pixels)


@pytest.mark.parametrize("case_id", ["basic", "negative", "steps12_wide", "img2img"])
def test_reference_cases_through_the_server(server: TorchServe, case_id: str) -> None:
    data = case(case_id)
    request = data["request"]
    body = {k: v for k, v in request.items() if v is not None and k not in ("init_image",)}
    if request["init_image"]:
        body["init_image"] = base64.b64encode((REFERENCE / request["init_image"]).read_bytes()).decode()
    response = predict(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["seeds"] == [image["seed"] for image in data["images"]]
    for png, image in zip(response.json()["images"], data["images"], strict=True):
        assert_matches_png(decode(png), reference_png(image))
    assert request_for(data).seed == request["seed"]


def resident_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE).group(1)) * 1024


def send_every_bad_request(server: TorchServe) -> None:
    """Every case of tests/bad_requests.py once, four at a time (a full batch): each answered with its own 400."""

    def send(case: Case) -> None:
        response = predict(server, case.body, accept="image/png" if case.name in PNG_ONLY else "application/json")
        assert response.status_code == 400, (case.name, response.text)
        assert response.headers["Content-Type"].startswith("application/json"), case.name
        error = response.json()
        assert error["field"] == case.field and case.says in error["error"], (case.name, error)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, CASES))


def test_every_rule_is_a_400_and_the_same_worker_serves_on_without_growing(
    server: TorchServe, in_process: Pipeline
) -> None:
    """The first rounds warm the worker up: malloc keeps some of the heap the 14 MB and 1 MB bodies took, decoders
    load lazily. Later rounds must not add beyond allocator noise: the heap settling grows the worker in steps, in
    a few rounds at moments the requests' order decides (in both halves of 6 rounds in one full suite run, by 27 and
    14 MiB); a leak grows it in every round, so the median round must stay flat."""
    [pid] = worker_pids(server)
    for _ in range(WARM_UP_ROUNDS):
        send_every_bad_request(server)
    sizes = [resident_bytes(pid)]
    for _ in range(BAD_ROUNDS):
        send_every_bad_request(server)
        sizes.append(resident_bytes(pid))
    rounds = [after - before for before, after in itertools.pairwise(sizes)]
    grown = ", ".join(f"{g / 2**20:.1f}" for g in rounds)
    assert statistics.median(rounds) < MEDIAN_ROUND_GROWTH_BOUND, f"the worker grew in most rounds: {grown} MiB"
    assert worker_pids(server) == [pid]
    response = predict(server, VALID, accept="image/png")
    expected = in_process.generate(GenerationRequest("a red bicycle", height=64, width=64, steps=3, seed=5))
    assert np.array_equal(np.asarray(load_image(io.BytesIO(response.content))), expected.images[0])


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_a_form_is_a_415_naming_the_body(server: TorchServe, content_type: str) -> None:
    """What `curl -d` and HTML forms send. Other content types with a JSON body are read as JSON: the body says
    what it is, and the handler's strict parser refuses anything else."""
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=json.dumps(VALID),
                             headers={"Content-Type": content_type}, timeout=TIMEOUT)  # fmt: skip
    assert response.status_code == 415
    assert response.json() == {"error": "send the request as a JSON object with Content-Type: application/json",
                               "field": "body"}  # fmt: skip


def test_oversized_body_is_413(server: TorchServe) -> None:
    response = predict(server, b"{" + b" " * (17 * 1024 * 1024) + b"}")
    assert response.status_code == 413


def test_concurrent_clients_each_get_their_own_images(server: TorchServe, in_process: Pipeline) -> None:
    bodies = [
        {"prompt": f"client {i}", "seed": 100 + i, "H": 64 if i % 3 else 72, "W": 64, "ddim_steps": 3,
         "scale": 1.0 if i == 5 else 7.5, "n_samples": 1 + i % 2}
        for i in range(8)
    ]  # fmt: skip
    barrier = threading.Barrier(len(bodies))

    def send(body: dict) -> requests.Response:
        barrier.wait()
        return predict(server, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        request = GenerationRequest(body["prompt"], height=body["H"], width=64, steps=3, scale=body["scale"],
                                    seed=body["seed"], n_samples=body["n_samples"])  # fmt: skip
        expected = in_process.generate(request).images
        got = np.stack([decode(png) for png in response.json()["images"]])
        assert np.abs(got.astype(int) - expected).max() <= 1, body
    log = (server.home / "logs" / "model_log.log").read_text()
    sizes = [int(size) for size in re.findall(r"batch of (\d+) requests", log)]
    assert max(sizes) > 1, "concurrent requests should have shared a batch"


def test_scaling_workers_up_under_load_and_down_when_idle_loses_none(server: TorchServe) -> None:
    """The management API's scaling as docs/RELIABILITY.md advises it: up while requests flow (TorchServe only adds
    a worker), down once they have stopped. A scale-down while requests flow can fail one in TorchServe 0.12
    (tests/test_faults.py), or leave one unanswered (docs/RELIABILITY.md)."""
    management = f"{server.management_url}/models/{MODEL}"
    described = requests.get(management, timeout=10).json()[0]
    assert described["batchSize"] == 4 and described["maxBatchDelay"] == 400
    results: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            results.append(predict(server, {**VALID, "seed": len(results)}).status_code)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        scaled = requests.put(f"{management}?min_worker=2&max_worker=2&synchronous=true", timeout=TIMEOUT)
        assert scaled.status_code == 200, scaled.text
        server.wait_ready(MODEL, TIMEOUT, workers=2)
        served_by_two = len(results)
        # Requests go on being answered with two workers READY before the flow stops.
        while len(results) < served_by_two + 8:
            assert all(thread.is_alive() for thread in threads)
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        # Back to one worker whatever happened: the server is the session's.
        scaled = requests.put(f"{management}?min_worker=1&max_worker=1&synchronous=true", timeout=TIMEOUT)
    assert results and set(results) == {200}
    assert scaled.status_code == 200, scaled.text
    assert len(server.ready_workers(MODEL)) == 1
    assert predict(server, VALID).status_code == 200


def test_the_management_api_describes_what_the_worker_serves(server: TorchServe) -> None:
    response = requests.get(f"{server.management_url}/models/{MODEL}?customized=true", timeout=TIMEOUT)
    assert response.status_code == 200
    (model,) = response.json()
    described = model["customizedMetadata"]
    assert described["model_hash"] == "8e79c1729f" and described["device"] == "cpu"
    assert (described["loras"], described["embeddings"]) == ([TINY_LORA], [TINY_EMBEDDING])
    assert "ddim" in described["samplers"] and described["limits"]["max_images"] == 8


def test_custom_metrics_on_the_prometheus_endpoint(server: TorchServe) -> None:
    assert predict(server, VALID).status_code == 200
    assert predict(server, {"prompt": 3}).status_code == 400
    metrics = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    for name in ("ImagesGenerated", "UNetStepsPerSecond", "SecondsPerImage", "FailedRequests"):
        assert f'{name}{{ModelName="{MODEL}"' in metrics, name


@pytest.mark.parametrize(
    "url",
    ["https://example.com/x.mar", "http://127.0.0.1:1/x.mar", "file:///nonexistent", "tiny.mar",
     "https://example.com/mar_files/../../x.mar"],
)  # fmt: skip
def test_registration_and_deletion_are_refused(server: TorchServe, url: str) -> None:
    """The model API is off (config.properties): no URL, not even the store's own archive, is registered, and the
    served model cannot be deleted."""
    register = requests.post(f"{server.management_url}/models", params={"url": url}, timeout=10)
    delete = requests.delete(f"{server.management_url}/models/{MODEL}", timeout=10)
    assert register.status_code == 405 and delete.status_code == 405
    models = requests.get(f"{server.management_url}/models", timeout=10).json()["models"]
    assert [m["modelName"] for m in models] == [MODEL] and server.ready_workers(MODEL)


def test_init_image_as_data_url(server: TorchServe) -> None:
    body = {"prompt": "tiles", "init_image": "data:image/png;base64," + png_base64(80, 64), "strength": 0.5,
            "ddim_steps": 4, "seed": 9}  # fmt: skip
    response = predict(server, body)
    assert response.status_code == 200
    assert decode(response.json()["images"][0]).shape == (64, 80, 3)


def test_inpainting_equals_in_process_image(server: TorchServe, in_process: Pipeline) -> None:
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (20, 16, 60, 48))
    body = {"prompt": "a window", "init_image": image_base64(init), "mask_image": image_base64(mask),
            "ddim_steps": 4, "seed": 8, "sampler": "euler_a"}  # fmt: skip
    response = predict(server, body)
    assert response.status_code == 200, response.text
    request = GenerationRequest("a window", steps=4, seed=8, sampler="euler_a", init_image=init, mask_image=mask)
    assert np.array_equal(decode(response.json()["images"][0]), in_process.generate(request).images[0])


def test_a_long_prompt_in_a1111_syntax_equals_in_process_image(server: TorchServe, in_process: Pipeline) -> None:
    """Two chunks of prompt beside a one-chunk negative prompt: the worker's separate UNet calls, over HTTP."""
    prompt = "a (lighthouse:1.3) on a [grey] cliff, " * 12  # 84 tokens
    body = {"prompt": prompt, "emphasis": True, "H": 64, "W": 64, "ddim_steps": 4, "seed": 21}
    response = predict(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["warnings"] == []
    request = GenerationRequest(prompt, height=64, width=64, steps=4, seed=21, emphasis=True)
    assert np.array_equal(decode(response.json()["images"][0]), in_process.generate(request).images[0])


def test_a_lora_tag_and_an_embedding_over_http_equal_in_process_image(server: TorchServe, in_process: Pipeline) -> None:
    """The archive's `loras/` and `embeddings/` (build_mar.py --loras, --embeddings) are where the worker finds the
    LoRA a prompt names and the embedding a word of it stands for."""
    prompt = f"a lighthouse on a cliff, {TINY_EMBEDDING} <lora:{TINY_LORA}:0.8>"
    response = predict(server, {"prompt": prompt, "H": 64, "W": 64, "ddim_steps": 4, "seed": 21})
    assert response.status_code == 200, response.text
    request = GenerationRequest(prompt, height=64, width=64, steps=4, seed=21)
    image = decode(response.json()["images"][0])
    assert np.array_equal(image, in_process.generate(request).images[0])
    for without in (f"a lighthouse on a cliff, {TINY_EMBEDDING}", f"a lighthouse on a cliff <lora:{TINY_LORA}:0.8>"):
        other = in_process.generate(dataclasses.replace(request, prompt=without)).images[0]
        assert np.abs(image.astype(int) - other).mean() > 1  # each of the two counted


def read_stream(response: requests.Response) -> list[dict[str, Any]]:
    """The HTTP chunks of a streamed answer as they arrive, each checked to be exactly one JSON object and '\\n'."""
    lines = []
    for chunk in response.raw.read_chunked(decode_content=True):
        text = chunk.decode("utf-8")
        assert text.endswith("\n") and text.count("\n") == 1, text[:200]
        lines.append(json.loads(text))
    return lines


def test_stream_sends_step_lines_then_the_json_response(server: TorchServe) -> None:
    body = {**VALID, "ddim_steps": 4, "n_samples": 2}
    with predict(server, {**body, "stream": True}, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"
        assert response.headers["Transfer-Encoding"] == "chunked"
        *steps, final = read_stream(response)
    assert [(s["step"], s["total"], s["image_index"]) for s in steps] == [(k, 4, 0) for k in (1, 2, 3, 4)]
    # preview_every is 5 in the shipped model-config.yaml: of 4 steps, only the last has a preview.
    assert [s["step"] for s in steps if "preview" in s] == [4]
    with Image.open(io.BytesIO(base64.b64decode(steps[-1]["preview"]))) as preview:
        assert (preview.format, preview.size) == ("JPEG", (8, 8))
    plain = predict(server, body)
    assert final == plain.json()


def test_accept_ndjson_streams_and_plain_neighbours_in_the_batch_are_unaffected(server: TorchServe) -> None:
    log = server.home / "logs" / "model_log.log"
    logged = len(log.read_text())
    bodies = [{**VALID, "seed": 20 + i, "ddim_steps": 2} for i in range(3)]
    barrier = threading.Barrier(len(bodies))

    def send(index: int) -> tuple[str, list[dict[str, Any]] | dict[str, Any]]:
        barrier.wait()
        if index == 1:
            response = predict(server, bodies[index])
            return response.headers["Content-Type"], response.json()
        with predict(server, bodies[index], accept="application/x-ndjson", stream=True) as response:
            return response.headers["Content-Type"], read_stream(response)

    with ThreadPoolExecutor(len(bodies)) as pool:
        (type0, lines0), (type1, plain), (type2, lines2) = pool.map(send, range(len(bodies)))
    assert (type0, type1, type2) == ("application/x-ndjson", "application/json", "application/x-ndjson")
    for lines in (lines0, lines2):
        assert [(line["step"], line["total"]) for line in lines[:-1]] == [(1, 2), (2, 2)]
    for index, answer in ((0, lines0[-1]), (1, plain), (2, lines2[-1])):
        assert answer["seeds"] == [20 + index]
        alone = predict(server, bodies[index]).json()
        assert np.abs(decode(answer["images"][0]).astype(int) - decode(alone["images"][0])).max() <= 1
    sizes = [int(size) for size in re.findall(r"batch of (\d+) requests", log.read_text()[logged:])]
    assert max(sizes) > 1, "the three requests should have shared a batch"
