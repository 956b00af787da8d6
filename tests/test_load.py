"""Load through a real TorchServe with batching on (the tiny model, the shipped model-config.yaml): 16 clients send
requests drawn from scripts/load_test.py's mix; every answer is the request's own images or an explicit 503, never a
hang or another error, and every image is the one its request gives alone. A full job queue; a soak of 1,000
requests with the worker's memory flat. The figures go to test-artifacts/reliability.json (tests/figures.py)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from ldm.pipeline import Pipeline
from scripts.load_test import Mix, Report, run
from scripts.server import TorchServe
from tests.figures import record
from tests.reference import assert_matches_png, load_image, request_from_body
from tests.servers import MODEL, TIMEOUT, tiny_torchserve

pytestmark = pytest.mark.integration

CLIENTS = 16
Alone = Callable[[dict[str, Any]], np.ndarray]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """A TorchServe of its own with the shipped batching and job queue (the settings users get), so that the load
    neither slows nor fills the log of the session server other tests read."""
    with tiny_torchserve(tmp_path_factory.mktemp("loaded"), settings={}) as ts:
        yield ts


@pytest.fixture(scope="module")
def alone(pipeline: Pipeline) -> Alone:
    """The images a request body gives on its own, made in this process from the same weights, once per body."""
    made: dict[str, np.ndarray] = {}

    def images(body: dict[str, Any]) -> np.ndarray:
        key = json.dumps(body, sort_keys=True)
        if key not in made:
            made[key] = pipeline.generate(request_from_body(body)).images
        return made[key]

    return images


def assert_answers(report: Report, alone: Alone) -> None:
    """Every request was answered with its own images or TorchServe's explicit 503 JSON.

    Own images: the request's seeds, and pixels equal to the request's alone within rounding. A batched UNet call
    rounds differently from a single one on the CPU (≤ 1 level on ≤ 0.1 % of the values); another request's image
    would differ nearly everywhere.
    """
    assert not report.unexpected(), [(r.status, r.error or r.content[:200]) for r in report.unexpected()][:5]
    for result in report.results:
        body = result.body
        if result.status == 503:
            assert result.answer()["code"] == 503 and result.answer()["message"], result.content
            continue
        assert result.answer()["seeds"] == [body["seed"] + i for i in range(body["n_samples"])], body
        for png, expected in zip(result.images(), alone(body), strict=True):
            assert_matches_png(np.asarray(load_image(io.BytesIO(png))), expected)


def batch_sizes(server: TorchServe, since: int) -> list[int]:
    """Requests per batch the handler logged after the first `since` characters of its log."""
    log = (server.home / "logs" / "model_log.log").read_text()[since:]
    return [int(size) for size in re.findall(r"batch of (\d+) requests", log)]


def only_worker(server: TorchServe) -> psutil.Process:
    (worker,) = server.ready_workers(MODEL)
    return psutil.Process(worker["pid"])


def figures(report: Report) -> dict[str, float | int]:
    return {
        "requests": len(report.results), "clients": report.clients, "seconds": report.seconds,
        **{f"status_{status}": count for status, count in report.statuses.items()},
        "requests_per_s": report.requests_per_second, "images_per_s": report.images_per_second,
        "p50_s": report.latency(50), "p95_s": report.latency(95), "p99_s": report.latency(99),
    }  # fmt: skip


def test_sixteen_clients_each_get_their_own_images_or_an_explicit_503(loaded: TorchServe, alone: Alone) -> None:
    worker = only_worker(loaded)
    logged = len((loaded.home / "logs" / "model_log.log").read_text())
    report = run(loaded.inference_url, MODEL, Mix().draw(300), CLIENTS, timeout=TIMEOUT)
    assert_answers(report, alone)
    assert only_worker(loaded).pid == worker.pid, "the worker died under load"
    sizes = batch_sizes(loaded, logged)
    assert max(sizes) > 1, "16 clients should have shared batches"
    record("load", **figures(report), mean_batch=sum(sizes) / len(sizes))


def test_a_full_queue_is_an_explicit_503_and_the_server_serves_on(tmp_path: Path, alone: Alone) -> None:
    with tiny_torchserve(tmp_path, settings={"jobQueueSize": 2}) as ts:
        report = run(ts.inference_url, MODEL, Mix().draw(96, seed=1), CLIENTS, timeout=TIMEOUT)
        assert_answers(report, alone)
        assert report.statuses[503] > 0 and report.statuses[200] > 0, report.statuses
        after = run(ts.inference_url, MODEL, Mix().draw(1, seed=2), 1, timeout=TIMEOUT)
        assert after.statuses == {200: 1}
        assert_answers(after, alone)
    record("queue_full", **figures(report))


@pytest.mark.slow
def test_a_soak_of_1000_requests_keeps_the_worker_memory_flat(loaded: TorchServe) -> None:
    small = Mix(sizes=((64, 64),), n_samples=(1,))
    worker = only_worker(loaded)
    # Warm-up, so that the worker's allocator already holds what steady service needs.
    run(loaded.inference_url, MODEL, small.draw(100, seed=2), CLIENTS, timeout=TIMEOUT)
    before = worker.memory_info().rss
    report = run(loaded.inference_url, MODEL, small.draw(1000, seed=3), CLIENTS, timeout=TIMEOUT)
    after = worker.memory_info().rss
    assert report.statuses == {200: 1000}
    # The same process throughout: a restarted worker would start small again and hide a leak.
    assert only_worker(loaded).pid == worker.pid
    growth = after / before - 1
    record("soak", **figures(report), rss_before_mb=before / 2**20, rss_after_mb=after / 2**20,
           rss_growth_percent=100 * growth)  # fmt: skip
    assert growth < 0.05
