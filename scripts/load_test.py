"""A bounded load test of the inference API: N clients send M requests drawn from a small mix, then throughput and
latency percentiles are printed.

    python -m scripts.load_test --url http://127.0.0.1:8080 --model sd --clients 16 --requests 300
    python -m scripts.load_test --model sd --sizes 512x512,512x768 --steps 20 --requests 64   # a real checkpoint

Why a mix from a small set: with batching on, requests of different prompts, seeds, sizes and image counts share
TorchServe's batches, which is where one request's images could end up in another's answer; and since the set is
small, each distinct request comes back many times and can be checked against the images it gives alone
(tests/test_load.py does, importing `run`). Every answer is kept whole for that: status, latency and body.

Each client sends its next request as soon as it has an answer, so the server is never offered more than N requests
at once. A 503 (TorchServe's queue is full) is an answer like any other, counted apart; the latency percentiles are
those of the 200s. Exit status: 0 when every request got a 200 or a 503 and at least one got its images, 1 otherwise
(another status, no answer within --timeout, or nothing but 503s: a run that measured nothing), 2 on a bad command
line.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from ldm.arguments import at_least_one, seconds

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MODEL = "sd"
PROMPTS = ("a red bicycle", "a lighthouse at dawn", "a bowl of fruit on a table")
# Far apart, so that image i of one request (seed + i) is never the first image of another.
SEEDS = (11, 22, 33, 44)
# The answers a loaded server may give: the images, or "the queue is full, come back later".
ACCEPTED = frozenset({200, 503})


@dataclass(frozen=True)
class Mix:
    """The set requests are drawn from: every prompt × seed × (H, W) × n_samples, all with `steps` DDIM steps."""

    sizes: tuple[tuple[int, int], ...] = ((64, 64), (64, 96))
    n_samples: tuple[int, ...] = (1, 2)
    steps: int = 2
    prompts: tuple[str, ...] = PROMPTS
    seeds: tuple[int, ...] = SEEDS

    def distinct(self) -> list[dict[str, Any]]:
        """Every request body of the mix once."""
        combinations = itertools.product(self.prompts, self.seeds, self.sizes, self.n_samples)
        return [
            {"prompt": prompt, "seed": seed, "H": h, "W": w, "ddim_steps": self.steps, "n_samples": n}
            for prompt, seed, (h, w), n in combinations
        ]

    def draw(self, count: int, seed: int = 0) -> list[dict[str, Any]]:
        """`count` request bodies drawn from the mix; the same `seed` draws the same ones."""
        bodies = self.distinct()
        rng = random.Random(seed)
        return [rng.choice(bodies) for _ in range(count)]


@dataclass(frozen=True)
class Result:
    """One request and what came back: HTTP status (0: no answer, `error` says why), seconds, body as received."""

    body: dict[str, Any]
    status: int
    seconds: float
    content: bytes = b""
    error: str = ""

    def answer(self) -> dict[str, Any]:
        """The JSON body of the answer (the images and seeds of a 200, TorchServe's or our error otherwise)."""
        return json.loads(self.content)

    def images(self) -> list[bytes]:
        """The PNG files of a 200, as the server encoded them."""
        return [base64.b64decode(image, validate=True) for image in self.answer()["images"]]


@dataclass(frozen=True)
class Report:
    """Every result of a run and how long the run took, from the first request sent to the last answer."""

    results: list[Result]
    seconds: float
    clients: int

    @property
    def statuses(self) -> Counter[int]:
        return Counter(result.status for result in self.results)

    @property
    def succeeded(self) -> list[Result]:
        return [result for result in self.results if result.status == 200]

    @property
    def requests_per_second(self) -> float:
        """Answered with images, per second of the run."""
        return len(self.succeeded) / self.seconds

    @property
    def images_per_second(self) -> float:
        return sum(result.body.get("n_samples", 1) for result in self.succeeded) / self.seconds

    def latency(self, percent: int) -> float:
        """Seconds within which `percent` % of the successful requests were answered (linear interpolation)."""
        seconds = [result.seconds for result in self.succeeded]
        if len(seconds) < 2:
            return seconds[0] if seconds else float("nan")
        return statistics.quantiles(seconds, n=100, method="inclusive")[percent - 1]

    def unexpected(self) -> list[Result]:
        """Results that are neither images nor an explicit 503."""
        return [result for result in self.results if result.status not in ACCEPTED]

    def summary(self) -> str:
        statuses = ", ".join(f"{count} × {status or 'no answer'}" for status, count in sorted(self.statuses.items()))
        head = f"{len(self.results)} requests from {self.clients} clients in {self.seconds:.1f} s: {statuses}"
        if not self.succeeded:
            return f"{head}\nno request got its images"
        return (
            f"{head}\nthroughput: {self.requests_per_second:.1f} requests/s, {self.images_per_second:.1f} images/s\n"
            f"latency of the 200s: p50 {self.latency(50):.2f} s, p95 {self.latency(95):.2f} s, "
            f"p99 {self.latency(99):.2f} s"
        )


def run(url: str, model: str, bodies: Sequence[dict[str, Any]], clients: int, timeout: float = 120.0) -> Report:
    """Send `bodies` to `{url}/predictions/{model}` from `clients` threads, each with its own connection, each
    sending the next body as soon as it has an answer; every result in the order of `bodies`."""
    endpoint = f"{url.rstrip('/')}/predictions/{model}"
    results: list[Result] = [Result(body, 0, 0.0, error="not sent") for body in bodies]
    pending = iter(enumerate(bodies))
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    index, body = next(pending, (-1, {}))
                if index < 0:
                    return
                results[index] = _send(session, endpoint, body, timeout)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients, thread_name_prefix="load-client") as pool:
        for running in [pool.submit(client) for _ in range(clients)]:
            running.result()
    return Report(results, time.perf_counter() - started, clients)


def _send(session: requests.Session, endpoint: str, body: dict[str, Any], timeout: float) -> Result:
    started = time.perf_counter()
    try:
        response = session.post(endpoint, json=body, headers={"Accept": "application/json"}, timeout=timeout)
    except requests.RequestException as error:
        return Result(body, 0, time.perf_counter() - started, error=repr(error))
    return Result(body, response.status_code, time.perf_counter() - started, response.content)


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'64x64,64x96' → ((64, 64), (64, 96)), as H×W."""
    try:
        return tuple((int(h), int(w)) for h, w in (size.split("x") for size in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are HxW separated by commas, e.g. 64x64,64x96; got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help="TorchServe's inference address (%(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name on the server (%(default)s)")
    parser.add_argument("--clients", type=at_least_one, default=16, help="concurrent clients (%(default)s)")
    parser.add_argument("--requests", type=at_least_one, default=300, help="requests in all (%(default)s)")
    parser.add_argument("--sizes", type=_sizes, default=Mix.sizes, help="HxW sizes to draw from (64x64,64x96)")
    parser.add_argument("--steps", type=int, default=Mix.steps, help="DDIM steps of every request (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw of requests from the mix (%(default)s)")
    parser.add_argument("--timeout", type=seconds, default=900.0, help="seconds to wait for one answer (%(default)g)")
    args = parser.parse_args(argv)
    bodies = Mix(sizes=args.sizes, steps=args.steps).draw(args.requests, args.seed)
    report = run(args.url, args.model, bodies, args.clients, args.timeout)
    print(report.summary())
    for result in report.unexpected()[:5]:
        print(f"load_test: {result.status or 'no answer'}: {result.error or result.content[:200]!r}", file=sys.stderr)
    return 1 if report.unexpected() or not report.succeeded else 0


if __name__ == "__main__":
    sys.exit(main())
