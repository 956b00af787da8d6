"""Faults against a real TorchServe of its own (the tiny model, one worker, a response timeout of seconds), each
followed by normal service: a worker killed mid-request, a generation past responseTimeout, workers scaled down
with requests in flight, TorchServe stopped and started again with the web front in front of it. Each test starts
and ends with the server serving; the seconds to recovery go to test-artifacts/reliability.json (tests/figures.py)."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import numpy as np
import psutil
import pytest
import requests

from ldm.pipeline import Pipeline
from scripts.server import TorchServe
from tests.figures import record
from tests.reference import assert_matches_png, load_image, request_from_body
from tests.servers import MODEL, TIMEOUT, running_front, tiny_torchserve

pytestmark = pytest.mark.integration

T = TypeVar("T")
# Seconds a batch may take (model-config.yaml responseTimeout): far below BIG's minutes, and 25 times what a batch of
# IN_FLIGHT takes on an idle machine, so that a busy CI machine does not time out the requests that must succeed.
RESPONSE_TIMEOUT = 20
SMALL = {"prompt": "a red bicycle", "H": 64, "W": 64, "ddim_steps": 2, "seed": 5}
# Minutes of work on the tiny model on a CPU: the generation a fault interrupts.
BIG = {"prompt": "a long generation", "H": 512, "W": 512, "ddim_steps": 150, "seed": 3}
# A generation that outlasts RESPONSE_TIMEOUT by half: its size and steps are chosen from this machine's speed.
LONG = {"prompt": "a long generation", "seed": 3}
# A batch of four of these takes most of a second, so that it is still running when the scale-down comes.
IN_FLIGHT = {**SMALL, "ddim_steps": 20}
# TorchServe's answer when the worker of a request goes away (killed, timed out, scaled down).
WORKER_DIED = "Worker died."


@pytest.fixture(scope="module")
def small_image(pipeline: Pipeline) -> np.ndarray:
    """SMALL's image, made in this process before any fault, so that no recovery time includes making it."""
    return alone(pipeline, SMALL)[0]


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """The faults' own TorchServe: the shipped settings but a response timeout of seconds."""
    with tiny_torchserve(tmp_path_factory.mktemp("fragile"), settings={"responseTimeout": RESPONSE_TIMEOUT}) as ts:
        yield ts


def predict(server: TorchServe, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.inference_url}/predictions/{MODEL}", json=body, timeout=TIMEOUT)


def decode(response: requests.Response) -> list[np.ndarray]:
    """The images of a JSON answer."""
    return [np.asarray(load_image(io.BytesIO(base64.b64decode(png)))) for png in response.json()["images"]]


def alone(pipeline: Pipeline, body: dict[str, Any]) -> np.ndarray:
    """The images of `body` made in this process from the same weights."""
    return pipeline.generate(request_from_body(body)).images


def wait_for(condition: Callable[[], T], what: str, timeout: float = TIMEOUT) -> T:
    """The first truthy value of `condition()`, asked every 0.1 s; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(0.1)
    return value


def workers(server: TorchServe) -> dict[str, int]:
    """The READY workers: TorchServe's id of each, and its PID."""
    return {worker["id"]: worker["pid"] for worker in server.ready_workers(MODEL)}


def listed_workers(server: TorchServe) -> list[dict[str, Any]]:
    """Every worker TorchServe lists for the model, whatever its state."""
    response = requests.get(f"{server.management_url}/models/{MODEL}", timeout=TIMEOUT)
    return response.json()[0]["workers"] if response.status_code == 200 else []


def model_log(server: TorchServe) -> str:
    return (server.home / "logs" / "model_log.log").read_text()


def wait_handed_over(server: TorchServe, worker_ids: list[str], since: int) -> None:
    """Until each worker has been handed a batch (TorchServe's worker logs it) after the first `since` characters of
    the model log: the requests are in the worker, computing, no longer waiting in TorchServe's queue."""
    wait_for(
        lambda: all(
            re.search(rf"W-{worker_id}-\S+ MODEL_LOG - Backend received inference", model_log(server)[since:])
            for worker_id in worker_ids
        ),
        "batch handed to every worker",
    )


def gone(pid: int) -> bool:
    """The process has ended (a zombie not yet reaped by TorchServe has ended too)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_serves(server: TorchServe, small_image: np.ndarray) -> None:
    """A small request gets exactly its image."""
    response = predict(server, SMALL)
    assert response.status_code == 200, response.text
    assert np.array_equal(decode(response)[0], small_image)


def assert_worker_died(response: requests.Response) -> None:
    """TorchServe's explicit error JSON for a request whose worker went away: a 5xx, never a hang."""
    assert 500 <= response.status_code < 600, response.text
    assert response.json()["message"] == WORKER_DIED


def test_a_worker_killed_mid_request_is_a_5xx_and_a_new_worker_serves(
    fragile: TorchServe, small_image: np.ndarray
) -> None:
    ((worker_id, pid),) = wait_for(lambda: workers(fragile), "READY worker").items()
    logged = len(model_log(fragile))
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(lambda: (predict(fragile, BIG), time.monotonic()))
        wait_handed_over(fragile, [worker_id], logged)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        response, answered = answer.result(timeout=TIMEOUT)
    # TorchServe takes an exit by SIGKILL for the kernel's out-of-memory killer: 507 Insufficient Storage.
    assert_worker_died(response)
    assert answered - killed < RESPONSE_TIMEOUT
    wait_for(lambda: set(workers(fragile).values()) - {pid}, "new READY worker")
    replaced = time.monotonic()
    assert_serves(fragile, small_image)
    record("sigkill", status=response.status_code, answer_s=answered - killed, new_worker_s=replaced - killed,
           first_200_s=time.monotonic() - killed)  # fmt: skip


def test_a_generation_past_the_response_timeout_is_a_5xx_and_the_worker_is_replaced(
    fragile: TorchServe, small_image: np.ndarray
) -> None:
    (pid,) = wait_for(lambda: workers(fragile), "READY worker").values()
    ts_log = fragile.home / "logs" / "ts_log.log"
    logged = len(ts_log.read_text())
    sent = time.monotonic()
    response = predict(fragile, BIG)
    answered = time.monotonic()
    assert_worker_died(response)
    assert RESPONSE_TIMEOUT <= answered - sent < RESPONSE_TIMEOUT + 10
    # The log says why, and the stuck worker is ended, not left computing beside its replacement.
    assert "Backend worker did not respond in given time" in ts_log.read_text()[logged:]
    wait_for(lambda: gone(pid), "end of the timed-out worker", timeout=10)
    wait_for(lambda: set(workers(fragile).values()) - {pid}, "new READY worker")
    replaced = time.monotonic()
    assert_serves(fragile, small_image)
    record("response_timeout", status=response.status_code, answer_s=answered - sent,
           new_worker_s=replaced - answered, first_200_s=time.monotonic() - answered)  # fmt: skip


def test_a_generation_past_the_response_timeout_through_the_front_is_answered_by_the_same_worker(
    fragile: TorchServe,
) -> None:
    """The front asks TorchServe for a progress stream even for a PNG: each step line restarts TorchServe's clock, so
    a generation longer than responseTimeout as a whole (but not per step) is answered, and the worker lives on.
    Its size and steps come from the worker's speed, timed first, so that it outlasts the timeout anywhere."""
    (pid,) = wait_for(lambda: workers(fragile), "READY worker").values()
    body = long_generation(fragile, 1.5 * RESPONSE_TIMEOUT)
    # The client hears nothing until the PNG is made: it waits as long as a busy machine may take.
    with running_front(fragile.inference_url) as front, httpx.Client(timeout=3 * TIMEOUT) as http:
        sent = time.monotonic()
        response = http.post(f"{front}/imagine", json=body, headers={"Accept": "image/png"})
        answered = time.monotonic()
    assert response.status_code == 200, response.text
    assert answered - sent > RESPONSE_TIMEOUT, (
        f"the generation must outlast responseTimeout for this test to say anything: {body}, {answered - sent:.1f} s"
    )
    assert response.headers["X-Seed"] == "3"
    assert load_image(io.BytesIO(response.content)).size == (body["W"], body["H"])
    assert list(workers(fragile).values()) == [pid]
    record("past_response_timeout_through_the_front", side=body["H"], steps=body["ddim_steps"],
           answer_s=answered - sent)  # fmt: skip


def long_generation(server: TorchServe, seconds: float) -> dict[str, Any]:
    """LONG at the smallest side whose steps, timed on the server's worker, add up to `seconds` in at most 100 of
    them (the handler allows 150). Machines differ by tens of times: a fast one needs large steps to fill the time
    within the limit, and on a slow one a large step alone could outlast the timeout it must only outlast as a whole.
    Timed on the worker itself: timed in this process, in the whole suite, the steps came out too few for the worker
    (7 s in all). Each count of steps the fastest of two, so that a moment's load elsewhere makes the steps more."""

    def took(body: dict[str, Any]) -> float:
        started = time.perf_counter()
        response = predict(server, body)
        assert response.status_code == 200, response.text
        return time.perf_counter() - started

    for side in (256, 512, 768, 1024):
        body = {**LONG, "H": side, "W": side}
        took({**body, "ddim_steps": 1})  # warms this size up
        one, three = (min(took({**body, "ddim_steps": steps}) for _ in range(2)) for steps in (1, 3))
        steps = math.ceil(seconds / max((three - one) / 2, 1e-3))
        if steps <= 100:
            break
    return {**body, "ddim_steps": max(8, min(150, steps))}


def test_scaling_down_with_requests_in_flight_answers_every_request(fragile: TorchServe, pipeline: Pipeline) -> None:
    management = f"{fragile.management_url}/models/{MODEL}"
    scaled = requests.put(f"{management}?min_worker=2&max_worker=2&synchronous=true", timeout=TIMEOUT)
    assert scaled.status_code == 200, scaled.text
    # Asked until true, not once: a synchronous scale-up may answer before its worker is READY, and on a busy machine
    # the management API can miss `ready_workers`' 5 s timeout, which reads as no workers.
    worker_ids = list(wait_for(lambda: ready if len(ready := workers(fragile)) == 2 else None, "2 READY workers"))
    bodies = [{**IN_FLIGHT, "seed": 100 + i} for i in range(8)]
    logged = len(model_log(fragile))
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = [pool.submit(predict, fragile, body) for body in bodies]
        # Both workers computing a batch: the one scaled down has requests in flight.
        wait_handed_over(fragile, worker_ids, logged)
        scaling = time.monotonic()
        scaled = requests.put(f"{management}?min_worker=1&max_worker=1&synchronous=true", timeout=TIMEOUT)
        responses = [answer.result(timeout=TIMEOUT) for answer in answers]
        answered = time.monotonic()
    assert scaled.status_code == 200, scaled.text
    # Listed at all, not only READY: a worker being stopped is listed (not READY) until its thread is gone, and until
    # then it may still take a request from the queue and fail it.
    wait_for(lambda: len(listed_workers(fragile)) == len(workers(fragile)) == 1, "exactly 1 worker after scaling down")
    remaining = workers(fragile)
    lost = []
    for body, response in zip(bodies, responses, strict=True):
        if response.status_code == 200:
            assert_matches_png(decode(response)[0], alone(pipeline, body)[0])
        else:
            assert_worker_died(response)
            lost.append(body)
    # A lost request sent again (with its seed) gets the image it would have had. Once, in a full suite on a busy
    # machine, the first one sent again was lost too, with one worker listed: a client retries a 5xx, and so does
    # this, as long as the worker that remains is the same process (its death would be ours to explain).
    resent = 0
    for body in lost:
        response = predict(fragile, body)
        while response.status_code != 200 and resent < 3:
            assert_worker_died(response)
            # Its process, not the management API's list: on a busy machine that list can time out and read empty.
            assert not any(gone(pid) for pid in remaining.values()), f"the remaining worker {remaining} died"
            resent += 1
            time.sleep(1)
            response = predict(fragile, body)
        assert response.status_code == 200, response.text
        assert_matches_png(decode(response)[0], alone(pipeline, body)[0])
    record("scale_down", in_flight=len(bodies), lost=len(lost), resent=resent, all_answered_s=answered - scaling)
    if lost:
        pytest.xfail(
            f"{len(lost)} of {len(bodies)} requests in flight got {WORKER_DIED!r}: TorchServe 0.12 stops a worker "
            "it scales down mid-batch, and its batch goes back to the queue only when that wins a race with the "
            "worker's own error answer (pytorch/serve#1101)"
        )


def test_torchserve_stopped_and_started_serves_again_and_the_front_answers_503_meanwhile(
    fragile: TorchServe, small_image: np.ndarray
) -> None:
    with running_front(fragile.inference_url) as front, httpx.Client(timeout=TIMEOUT) as http:

        def imagine() -> httpx.Response:
            return http.post(f"{front}/imagine", json=SMALL, headers={"Accept": "image/png"})

        assert imagine().status_code == 200
        stopping = time.monotonic()
        fragile.stop()
        stopped = time.monotonic()
        assert not fragile.alive()
        down = imagine()
        assert down.status_code == 503 and "not reachable" in down.json()["error"], down.text
        assert http.get(f"{front}/healthz").status_code == 503
        # Started as scripts/server.py starts it: the model is named on the command line and comes back by itself.
        fragile.start(foreground=True)
        started = time.monotonic()
        # Until the model is back every answer is the 503, then the image: never another error, never a hang.
        while (response := imagine()).status_code != 200:
            assert response.status_code == 503 and response.json()["error"], response.text
            assert time.monotonic() - started < TIMEOUT, "the front did not come back"
            time.sleep(0.25)
        back = time.monotonic()
        assert np.array_equal(np.asarray(load_image(io.BytesIO(response.content))), small_image)
    assert workers(fragile)
    assert_serves(fragile, small_image)
    record("restart", stop_s=stopped - stopping, first_200_through_the_front_s=back - started)
