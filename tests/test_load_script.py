"""scripts/load_test.py against a small stand-in server: the mix it draws from, that it keeps every answer in order
with at most N requests in flight, its percentiles and throughput (against numpy's), and its exit status."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
import pytest

from scripts.load_test import Mix, Report, Result, main, run
from tests.servers import free_port, http_server, send_json

# The stand-in's answers: images named after the request, a 503 for this seed, a 500 for any other model than "sd".
FULL_QUEUE_SEED = 44


class StandIn:
    """Counts the requests in flight, the most at once, and answers as TorchServe would."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.02)
        with self.lock:
            self.in_flight -= 1
        if path == "/predictions/busy":  # a model whose queue is always full
            return 503, {"code": 503, "type": "ServiceUnavailableException", "message": "queue full"}
        if path != "/predictions/sd":
            return 500, {"code": 500, "type": "InternalServerException", "message": "Worker died."}
        if body["seed"] == FULL_QUEUE_SEED:
            return 503, {"code": 503, "type": "ServiceUnavailableException", "message": "queue full"}
        return 200, {"images": [base64.b64encode(name.encode()).decode() for name in names(body)],
                     "seeds": [body["seed"] + i for i in range(body["n_samples"])]}  # fmt: skip


def names(body: dict[str, Any]) -> list[str]:
    """What the stand-in sends as the bytes of each image of `body`."""
    return [f"{body['prompt']}/{body['seed'] + i}/{body['H']}x{body['W']}" for i in range(body["n_samples"])]


@pytest.fixture
def stand_in() -> Iterator[tuple[str, StandIn]]:
    fake = StandIn()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe: each client reuses its connection

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, answer = fake.answer(self.path, body)
            send_json(self, status, answer)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    with http_server(Handler) as url:
        yield url, fake


def test_the_mix_is_every_combination_and_a_draw_is_reproducible() -> None:
    mix = Mix()
    distinct = mix.distinct()
    assert len({json.dumps(body, sort_keys=True) for body in distinct}) == 3 * 4 * 2 * 2 == len(distinct)
    assert all(body["ddim_steps"] == 2 for body in distinct)
    drawn = mix.draw(300)
    assert drawn == mix.draw(300) and drawn != mix.draw(300, seed=1)
    assert all(body in distinct for body in drawn)
    # 300 draws from 48 bodies reach every one of them.
    assert len({json.dumps(body, sort_keys=True) for body in drawn}) == 48


def test_run_keeps_every_answer_in_order_with_at_most_n_in_flight(stand_in: tuple[str, StandIn]) -> None:
    url, fake = stand_in
    bodies = Mix().draw(60)
    report = run(url, "sd", bodies, clients=4)
    assert [result.body for result in report.results] == bodies
    assert fake.most == 4
    full = sum(body["seed"] == FULL_QUEUE_SEED for body in bodies)
    assert report.statuses == {200: len(bodies) - full, 503: full} and not report.unexpected()
    for result in report.succeeded:
        assert [image.decode() for image in result.images()] == names(result.body)
        assert result.seconds >= 0.02
    assert report.seconds >= 0.02 * len(bodies) / 4


def test_throughput_and_latency_percentiles() -> None:
    body = {"seed": 1, "n_samples": 2}
    seconds = np.random.default_rng(0).uniform(0.1, 5.0, size=101)
    results = [Result(body, 200, float(s)) for s in seconds] + [Result(body, 503, 0.001), Result(body, 0, 120.0)]
    report = Report(results, seconds=20.0, clients=16)
    assert report.requests_per_second == 101 / 20 and report.images_per_second == 2 * 101 / 20
    for percent in (50, 95, 99):
        # Only the 200s count, interpolated linearly between ranks as numpy's default does.
        assert report.latency(percent) == pytest.approx(np.percentile(seconds, percent))
    assert [result.status for result in report.unexpected()] == [0]


def test_exit_status_says_whether_every_request_got_images_or_a_503(
    stand_in: tuple[str, StandIn], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = stand_in
    assert main(["--url", url, "--model", "sd", "--clients", "2", "--requests", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("12 requests from 2 clients in ") and "requests/s" in out and "p99" in out
    assert main(["--url", url, "--model", "other", "--clients", "2", "--requests", "3"]) == 1
    assert "load_test: 500: " in capsys.readouterr().err
    nobody = f"http://127.0.0.1:{free_port()}"
    assert main(["--url", nobody, "--clients", "1", "--requests", "1", "--timeout", "5"]) == 1
    assert "load_test: no answer: " in capsys.readouterr().err
    # Nothing but full queues: every answer expected, yet nothing measured.
    assert main(["--url", url, "--model", "busy", "--clients", "2", "--requests", "3"]) == 1
    assert capsys.readouterr().out.startswith("3 requests from 2 clients")


@pytest.mark.parametrize("option", [["--clients", "0"], ["--requests", "-1"], ["--timeout", "0"], ["--timeout", "inf"]])
def test_a_bad_count_or_timeout_is_a_usage_error(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(option)
    assert exit_.value.code == 2 and "expected" in capsys.readouterr().err
