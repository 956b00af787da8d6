"""The web front against a stand-in for TorchServe (httpx's MockTransport answering as the inference API does):
how requests are split and seeded, what is forwarded untouched, how the progress stream is relayed, and each way
TorchServe can fail. The same front against a real TorchServe: tests/test_front.py."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from starlette.requests import Request

from front import upstream
from front.app import _body, create_app
from front.cli import parse_settings
from front.errors import FrontError
from front.imagine import MAX_SEED, is_integer, plan_fields
from front.schema import ImagineRequest
from front.settings import FrontSettings
from front.upstream import JSON, NDJSON
from handler.errors import RequestError
from handler.request import FIELDS, ApiRequest, parse_request
from handler.settings import HandlerSettings
from handler.settings import parse_settings as parse_settings_of_handler
from ldm.generation_request import SAMPLERS
from ldm.hires import UPSCALERS
from scripts import client as client_script
from tests.servers import free_port

REFUSAL = {"error": "H must be a multiple of 8, got 100", "field": "H"}
# What the handler describes (handler/description.py), in part.
DESCRIBED = {
    "model_hash": "8e79c1729f", "samplers": ["ddim", "euler_a"],
    "sampler_names": {"ddim": "DDIM", "euler_a": "Euler a"},
    "upscalers": {"latent": "Latent", "latent_bicubic": "Latent (bicubic)", "lanczos": "Lanczos"},
    "loras": ["ink"], "embeddings": ["tinyneg"], "embedding_shapes": {"tinyneg": [2, 768]},
    "defaults": {"clip_skip": 1},
}  # fmt: skip


@dataclass
class FakeInference:
    """Answers predictions as our handler does (image i of a request is the text "png<seed + i>"), and records the
    bodies it was sent. A prompt of "refuse" gets the 400 above, "fail" an error line after the first step, "long" a
    warning of words CLIP did not read."""

    bodies: list[bytes] = field(default_factory=list)
    # The Accept header of each.
    accepts: list[str] = field(default_factory=list)
    # The server's handler.defaults.n_samples, for bodies that name none.
    default_samples: int = 1
    # What `{"describe": true}` answers.
    described: dict[str, Any] = field(default_factory=lambda: dict(DESCRIBED))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ping":
            return httpx.Response(200, json={"status": "Healthy"})
        if request.url.path != "/predictions/sd":
            return httpx.Response(
                404, json={"code": 404, "type": "ModelNotFoundException", "message": "Model not found"}
            )
        self.bodies.append(request.content)
        self.accepts.append(request.headers["Accept"])
        if request.content == b'{"describe": true}':
            return httpx.Response(200, json=self.described)
        try:
            body = json.loads(request.content)
            count = body.get("n_samples", self.default_samples) * body.get("n_iter", 1)
            counted = "subseed" if body.get("subseed_strength") else "seed"
            seeds = [body["seed"] + (i if counted == "seed" else 0) for i in range(count)]
            subseeds = [body["subseed"] + i for i in range(count)] if counted == "subseed" else []
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return httpx.Response(400, json={"error": "the body is not valid", "field": "body"})
        if body["prompt"] == "refuse":
            return httpx.Response(400, json=REFUSAL)
        if not isinstance(body["prompt"], str):
            return httpx.Response(400, json={"error": "prompt must be a string", "field": "prompt"})
        answer = {"images": [f"png{seed}" for seed in seeds], "seeds": seeds, "parameters": {**body}}
        if subseeds:
            answer["subseeds"] = subseeds
        if body["prompt"] == "long":
            answer["warnings"] = ["prompt: CLIP read 75 tokens; these words did nothing: long"]
        if request.headers["Accept"] != "application/x-ndjson":
            return httpx.Response(200, json=answer, headers={"X-Seed": str(seeds[0])})
        steps = [{"step": k, "total": 2, "image_index": 0} for k in (1, 2)]
        last = {"error": "out of GPU memory", "field": "", "status": 507} if body["prompt"] == "fail" else answer
        lines = [json.dumps(line) for line in [*steps[: 1 if body["prompt"] == "fail" else 2], last]]
        return httpx.Response(200, content="\n".join(lines) + "\n", headers={"Content-Type": "application/x-ndjson"})

    def sent(self) -> list[dict[str, Any]]:
        return [json.loads(body) for body in self.bodies]


@pytest.fixture
def fake() -> FakeInference:
    return FakeInference()


@pytest.fixture
def client(fake: FakeInference) -> Iterator[TestClient]:
    with TestClient(create_app(FrontSettings(max_images=16), httpx.MockTransport(fake))) as test_client:
        yield test_client


def stream_lines(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines()]


def test_each_iteration_is_one_request_starting_after_the_last_seed(client: TestClient, fake: FakeInference) -> None:
    body = {"prompt": "a fox", "n_samples": 2, "n_iter": 5, "seed": 7}
    response = client.post("/imagine", json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.json() == [f"png{seed}" for seed in range(7, 17)]
    assert response.headers["X-Seed"] == "7" and response.headers["X-Seeds"] == ",".join(map(str, range(7, 17)))
    assert fake.sent() == [
        {"prompt": "a fox", "n_samples": 2, "n_iter": 1, "seed": seed} for seed in (7, 9, 11, 13, 15)
    ]


def test_with_variation_seeds_the_variation_seed_is_drawn_and_counts(client: TestClient, fake: FakeInference) -> None:
    client.post("/imagine", json={"prompt": "a fox", "n_samples": 2, "n_iter": 3, "seed": 5, "subseed_strength": 0.2})
    first = fake.sent()[0]["subseed"]
    assert 0 <= first <= MAX_SEED - 16 + 1
    assert [(body["seed"], body["subseed"]) for body in fake.sent()] == [(5, first), (5, first + 2), (5, first + 4)]
    response = client.post(
        "/imagine", json={"prompt": "a", "n_iter": 2, "seed": 5, "subseed": 8, "subseed_strength": 1}
    )
    assert (response.headers["X-Seeds"], response.headers["X-Subseeds"]) == ("5,5", "8,9")
    response = client.post("/imagine", json={"prompt": "a", "n_iter": 2, "subseed": MAX_SEED, "subseed_strength": 1})
    assert response.status_code == 400
    assert response.json() == {"error": f"subseed must be between 0 and {MAX_SEED - 1}, got {MAX_SEED}",
                               "field": "subseed"}  # fmt: skip


def test_iterations_continue_from_the_images_the_server_made() -> None:
    """A server whose default n_samples is 3 answers 3 images to a body that names none: the next iteration starts
    after them, not after the 1 the front would assume."""
    fake = FakeInference(default_samples=3)
    with TestClient(create_app(FrontSettings(max_images=16), httpx.MockTransport(fake))) as client:
        response = client.post("/imagine", json={"prompt": "a fox", "n_iter": 2, "seed": 10})
    assert response.headers["X-Seeds"] == "10,11,12,13,14,15"
    assert [body["seed"] for body in fake.sent()] == [10, 13]


def test_the_splits_edges(client: TestClient, fake: FakeInference, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly max_images images (16 here) are split, not refused; the last seed whose images all stay 32-bit is
    taken; a seed drawn at the top of its range still leaves room for every image; with variation seeds the seed
    (every image's) is drawn once, for all iterations; the texts' warnings, the same in each iteration, come once."""
    answer = client.post("/imagine", json={"prompt": "a", "n_samples": 4, "n_iter": 4, "seed": 1})
    assert answer.status_code == 200 and len(fake.sent()) == 4
    last = MAX_SEED - 4 + 1
    assert client.post("/imagine", json={"prompt": "a", "n_samples": 2, "n_iter": 2, "seed": last}).status_code == 200
    monkeypatch.setattr("secrets.randbelow", lambda n: n - 1)  # the highest seed the front may draw
    drawn = client.post("/imagine", json={"prompt": "a", "n_samples": 4, "n_iter": 4})
    assert max(map(int, drawn.headers["X-Seeds"].split(","))) == MAX_SEED
    monkeypatch.undo()
    fake.bodies.clear()
    varied = client.post("/imagine", json={"prompt": "a", "n_iter": 2, "subseed_strength": 0.5})
    seeds = {body["seed"] for body in fake.sent()}
    assert len(seeds) == 1 and is_integer(seed := seeds.pop())
    assert varied.headers["X-Seeds"] == f"{seed},{seed}"
    final = stream_lines(client.post("/imagine/stream", json={"prompt": "long", "n_iter": 3, "seed": 1}))[-1]
    assert final["warnings"] == ["prompt: CLIP read 75 tokens; these words did nothing: long"]


@pytest.mark.parametrize("seed", [None, -1])
def test_a_seed_is_drawn_when_none_is_given(client: TestClient, fake: FakeInference, seed: int | None) -> None:
    """No seed, or A1111's -1 for "random" (which clients written for it send to every API)."""
    response = client.post("/imagine", json={"prompt": "a fox", "n_iter": 3, "seed": seed, "subseed": -1})
    first = fake.sent()[0]["seed"]
    assert 0 <= first <= MAX_SEED - 16 + 1
    assert [body["seed"] for body in fake.sent()] == [first, first + 1, first + 2]
    assert response.headers["X-Seeds"] == f"{first},{first + 1},{first + 2}"
    assert all("subseed" not in body for body in fake.sent())  # no variation: nothing to draw
    response = client.post("/imagine", json={"prompt": "a", "subseed": -1, "subseed_strength": 0.5, "seed": 3})
    assert 0 <= int(response.headers["X-Subseeds"]) <= MAX_SEED - 16 + 1
    refused = client.post("/imagine", json={"prompt": "a", "seed": -2})
    assert refused.status_code == 400 and refused.json()["field"] == "seed"
    # A body the front forwards whole for TorchServe to judge goes with -1 drawn too: the handler names the field at
    # fault, not the seed it reads first. A seed of -1.0 is no integer, so no A1111 "random": the handler names it.
    for other in ({"subseed_strength": "x"}, {"n_samples": 0}, {"stream": 1}, {"seed": -1.0}):
        body = json.loads(plan_fields({"prompt": "a", "seed": -1, **other}, b"", 8).whole())
        with pytest.raises(RequestError) as error:
            parse_request(body, parse_settings_of_handler(None))
        assert error.value.field == next(iter(other))


@pytest.mark.parametrize(
    "raw",
    [
        b"{prompt: a fox",
        b'["a fox"]',
        b'{"prompt": "a", "prompt": "b", "seed": 1}',
        b'{"prompt": "a fox", "n_iter": "2", "seed": 1}',
        b'{"prompt": "a fox", "n_iter": 2, "seed": 1.5}',
        b'{"prompt": "a fox", "n_iter": 0, "seed": 1}',
        b'{"prompt": "a fox", "stream": "yes"}',
        b'{"prompt": ["a fox"], "n_iter": 2, "seed": 1}',
    ],
)
def test_what_the_front_cannot_split_is_forwarded_as_it_came(
    client: TestClient, fake: FakeInference, raw: bytes
) -> None:
    """TorchServe's handler is the one validator: it gets the body unchanged and names the field."""
    client.post("/imagine", content=raw, headers={"Content-Type": "application/json"})
    assert len(fake.bodies) == 1
    assert fake.bodies[0] == raw or json.loads(fake.bodies[0]) == json.loads(raw)


def test_handler_errors_pass_through(client: TestClient) -> None:
    for path in ("/imagine", "/imagine/stream"):
        response = client.post(path, json={"prompt": "refuse", "n_iter": 2})
        assert (response.status_code, response.json()) == (400, REFUSAL), path
        assert response.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"prompt": "a", "n_samples": 4, "n_iter": 5}, "n_iter"), ({"prompt": "a", "n_samples": 17}, "n_samples"),
     ({"prompt": "a", "n_iter": 2, "seed": MAX_SEED}, "seed"), ({"prompt": "a", "seed": -2}, "seed")],
)  # fmt: skip
def test_the_fronts_own_rules(client: TestClient, fake: FakeInference, body: dict[str, Any], field: str) -> None:
    """Refused before anything is sent: for the seed, TorchServe would refuse only a later iteration's request."""
    for path in ("/imagine", "/imagine/stream"):
        response = client.post(path, json=body)
        assert response.status_code == 400 and response.json()["field"] == field, path
    assert fake.bodies == []


def test_a_body_nested_nearly_as_deep_as_the_parser_allows_is_forwarded_not_a_500(
    client: TestClient, fake: FakeInference
) -> None:
    """Parsing succeeds a little deeper than writing back out does: every depth around the parser's limit must be
    forwarded as it came (or refused by the parser) for TorchServe to name, never crash the front."""
    for depth in range(850, 1050):
        raw = b'{"prompt": "a", "x": ' + b"[" * depth + b"]" * depth + b"}"
        response = client.post("/imagine", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, depth
        assert fake.bodies[-1] == raw, depth


# Every field of the original app's request (optimizedSD's Arguments) besides ours, with its defaults there.
ORIGINAL_EXTRAS = {"ddim_eta": 0.3, "unet_bs": 1, "turbo": True, "precision": "autocast", "device": "cuda",
                   "n_rows": 0, "outdir": "outputs/txt2img-samples", "skip_grid": True, "skip_save": False,
                   "fixed_code": True, "C": 4, "f": 8, "format": "png", "from_file": False}  # fmt: skip


def test_the_original_apps_own_fields_are_read_as_it_meant_them(client: TestClient, fake: FakeInference) -> None:
    """Its `ddim_eta` is our `eta`; the rest shaped how it ran on its own GPU and disk, and are dropped."""
    body = {"prompt": "a fox", "seed": 3, "sampler": "ddim", "scale": 7.5, **ORIGINAL_EXTRAS}
    response = client.post("/imagine", json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    assert fake.sent() == [{"prompt": "a fox", "seed": 3, "sampler": "ddim", "scale": 7.5, "eta": 0.3}]


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [({"C": 8}, "C", "C must be 4 (the model's latent channels), got 8"),
     ({"f": True}, "f", "f must be 8 (the VAE's downsampling factor), got true"),
     ({"format": "jpg"}, "format", 'format must be "png" (answers are PNGs), got "jpg"'),
     ({"from_file": "prompts.txt"}, "from_file",
      "from_file must be empty: this server reads no prompt files; send the prompt itself"),
     ({"ddim_eta": 0.5, "eta": 0.5}, "ddim_eta", "ddim_eta and eta are the same setting: give one of them")],
)  # fmt: skip
def test_an_original_field_we_cannot_honour_is_a_400(
    client: TestClient, fake: FakeInference, extra: dict[str, Any], field: str, says: str
) -> None:
    response = client.post("/imagine", json={"prompt": "a fox", **extra})
    assert response.status_code == 400 and response.json() == {"error": says, "field": field}
    assert fake.bodies == []


def test_every_generation_is_followed_as_a_stream(client: TestClient, fake: FakeInference) -> None:
    """A PNG or a JSON array is asked of TorchServe as a progress stream, whose step lines keep TorchServe from giving
    up on its worker (and the front on TorchServe) while a long generation runs; the answer is the stream's last
    line, its images as they were made: the PNG the base64 in it."""
    response = client.post("/imagine", json={"prompt": "a fox", "seed": 3}, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    assert response.content == base64.b64decode("png3")
    assert (response.headers["X-Seed"], response.headers["X-Seeds"]) == ("3", "3")
    response = client.post("/imagine", json={"prompt": "a fox", "n_iter": 2, "seed": 3})
    assert response.json() == ["png3", "png4"]
    iterations = [{"prompt": "a fox", "n_iter": 1, "seed": seed} for seed in (3, 4)]
    assert fake.sent() == [{"prompt": "a fox", "seed": 3}, *iterations]
    assert fake.accepts == [NDJSON] * 3


@pytest.mark.parametrize(
    ("body", "default_samples", "field", "images"),
    [({"n_samples": 2}, 1, "n_samples", 2), ({"n_samples": 2, "n_iter": 3}, 1, "n_iter", 6), ({}, 3, "n_samples", 3)],
)
def test_a_png_of_several_images_is_refused(
    body: dict[str, Any], default_samples: int, field: str, images: int
) -> None:
    """Before anything is sent when the request names its counts; once made when the server's default n_samples
    makes several and the front has no description of the worker yet (the next test has one): a PNG holds one image,
    and the client is told to ask for JSON rather than given the first."""
    fake = FakeInference(default_samples=default_samples)
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(fake))) as client:
        response = client.post("/imagine", json={"prompt": "a", "seed": 1, **body}, headers={"Accept": "image/png"})
    says = f"Accept: image/png returns one image, but this request makes {images} (n_samples×n_iter); ask for JSON"
    assert response.status_code == 400 and response.json()["field"] == field
    assert response.json()["error"].startswith(says)
    assert len(fake.bodies) == (1 if default_samples > 1 else 0)


@contextmanager
def described_client(fake: FakeInference, defaults: dict[str, int]) -> Iterator[TestClient]:
    """A front whose worker has the handler defaults `defaults`, described once, as the page asks first."""
    fake.described["defaults"] = {"clip_skip": 1, **defaults}
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(fake))) as client:
        assert client.get("/imagine/description").json()["defaults"] == fake.described["defaults"]
        yield client


@pytest.mark.parametrize(
    ("defaults", "field", "images"), [({"n_samples": 3}, "n_samples", 3), ({"n_iter": 2}, "n_iter", 2)]
)
def test_once_described_a_png_of_the_servers_default_several_images_is_refused_before_it_is_made(
    defaults: dict[str, int], field: str, images: int
) -> None:
    """From the worker's description on, a body that names no counts is checked against the server's defaults
    before anything is generated."""
    fake = FakeInference(default_samples=defaults.get("n_samples", 1))
    with described_client(fake, defaults) as client:
        response = client.post("/imagine", json={"prompt": "a", "seed": 1}, headers={"Accept": "image/png"})
    says = f"Accept: image/png returns one image, but this request makes {images} (n_samples×n_iter); ask for JSON"
    assert response.status_code == 400 and response.json()["field"] == field
    assert response.json()["error"].startswith(says)
    assert fake.bodies == [b'{"describe": true}']


def test_once_described_a_png_request_naming_one_image_is_made_whatever_the_default() -> None:
    fake = FakeInference(default_samples=3)
    with described_client(fake, {"n_samples": 3}) as client:
        response = client.post(
            "/imagine", json={"prompt": "a", "seed": 1, "n_samples": 1}, headers={"Accept": "image/png"}
        )
    assert response.status_code == 200 and response.content == base64.b64decode("png1")
    assert fake.sent()[1]["n_samples"] == 1


class _CutShort(httpx.AsyncByteStream):
    """A stream that breaks off after its first line, as TorchServe's does when its connection drops."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"step": 1, "total": 2, "image_index": 0}\n'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.parametrize("accept", ["image/png", "application/json"])
def test_an_answer_torchserve_cuts_short_is_a_502_not_a_short_file(fake: FakeInference, accept: str) -> None:
    """The client, which may be saving the body to a file, is told."""

    def cut(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_CutShort(), headers={"Content-Type": NDJSON, "X-Seed": "3"})

    with TestClient(create_app(FrontSettings(), httpx.MockTransport(cut))) as client:
        response = client.post("/imagine", json={"prompt": "a fox", "seed": 3}, headers={"Accept": accept})
    assert response.status_code == 502
    assert response.json()["error"].startswith("TorchServe at http://127.0.0.1:8080 broke off its answer")


def test_a_png_that_is_not_base64_is_a_502(fake: FakeInference) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        answer = {"images": ["not base64!"], "seeds": [3], "parameters": {}}
        return httpx.Response(200, content=json.dumps(answer) + "\n", headers={"Content-Type": NDJSON})

    with TestClient(create_app(FrontSettings(), httpx.MockTransport(broken))) as client:
        response = client.post("/imagine", json={"prompt": "a fox", "seed": 3}, headers={"Accept": "image/png"})
    assert response.status_code == 502 and response.json()["error"].startswith("TorchServe answered without images")


def test_stream_numbers_steps_across_iterations_and_gathers_the_images(client: TestClient) -> None:
    for path, body in [("/imagine/stream", {}), ("/imagine", {"stream": True})]:
        response = client.post(path, json={"prompt": "a fox", "n_samples": 2, "n_iter": 2, "seed": 5, **body})
        assert response.headers["Content-Type"] == "application/x-ndjson" and response.headers["X-Seed"] == "5"
        *steps, final = stream_lines(response)
        assert [(s["iteration"], s["step"], s["image_index"], s["n_iter"]) for s in steps] == [
            (0, 1, 0, 2), (0, 2, 0, 2), (1, 1, 2, 2), (1, 2, 2, 2)]  # fmt: skip
        assert final["images"] == ["png5", "png6", "png7", "png8"] and final["seeds"] == [5, 6, 7, 8]
        assert final["parameters"]["n_iter"] == 2 and final["parameters"]["seed"] == 5


def test_an_error_line_ends_the_stream(client: TestClient, fake: FakeInference) -> None:
    response = client.post("/imagine/stream", json={"prompt": "fail", "n_iter": 3, "seed": 1})
    assert stream_lines(response) == [{"step": 1, "total": 2, "image_index": 0, "iteration": 0, "n_iter": 3},
                                      {"error": "out of GPU memory", "field": "", "status": 507}]  # fmt: skip
    assert len(fake.bodies) == 1


def test_torchserves_own_error_line_ends_the_stream_as_the_handlers_would(fake: FakeInference) -> None:
    """TorchServe ends a stream with its own JSON when its worker dies: relayed with the error and status the page
    shows, not as a line the page cannot read."""

    def dying(request: httpx.Request) -> httpx.Response:
        if request.headers["Accept"] != NDJSON:
            return fake(request)
        died = {"code": 500, "type": "InternalServerException", "message": "Worker died."}
        lines = [json.dumps({"step": 1, "total": 2, "image_index": 0}), json.dumps(died)]
        return httpx.Response(200, content="\n".join(lines) + "\n", headers={"Content-Type": NDJSON})

    with TestClient(create_app(FrontSettings(), httpx.MockTransport(dying))) as client:
        response = client.post("/imagine/stream", json={"prompt": "a fox", "seed": 1})
    assert stream_lines(response)[-1] == {"error": "Worker died.", "field": "", "status": 500}
    # The same through a JSON answer: TorchServe's status, as when it answered the plain request itself.
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(dying))) as client:
        response = client.post("/imagine", json={"prompt": "a fox", "seed": 1}, headers={"Accept": "image/png"})
    assert (response.status_code, response.json()) == (500, {"error": "Worker died.", "field": ""})


def test_the_description_the_page_starts_from_is_the_workers(client: TestClient, fake: FakeInference) -> None:
    fake.described = {**DESCRIBED, "defaults": {"sampler": "euler_a", "clip_skip": 2}, "limits": {"max_steps": 300}}
    response = client.get("/imagine/description")
    assert response.status_code == 200 and response.json() == fake.described
    assert fake.sent() == [{"describe": True}]


def test_torchserve_down_is_a_503_that_says_so() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with TestClient(create_app(FrontSettings(inference_url=url))) as test_client:
        for path in ("/imagine", "/imagine/stream"):
            response = test_client.post(path, json={"prompt": "a fox"})
            assert response.status_code == 503
            assert response.json() == {"error": f"TorchServe is not reachable at {url}: start it (scripts/serve.sh) "
                                       "or set SD_INFERENCE_URL", "field": ""}  # fmt: skip
        health = test_client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        # The page's defaults too: it keeps its own.
        assert test_client.get("/imagine/description").status_code == 503
        # Liveness is the front's own: a restart would not bring TorchServe back.
        assert test_client.get("/livez").json() == {"status": "ok"}


BUSY = {
    "code": 503,
    "type": "ServiceUnavailableException",
    "message": "Model sd has no worker to serve inference request. Please use scale workers API to add workers.",
}


@dataclass
class BusyOnce(FakeInference):
    """Answers 503 as TorchServe does with its queue full, to the predictions request numbered `busy` (0 first)."""

    busy: int = 1
    count: int = 0
    answer: dict[str, Any] = field(default_factory=lambda: BUSY)
    status: int = 503

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/predictions/sd" and request.content != b'{"describe": true}':
            self.count += 1
            if self.count - 1 == self.busy:
                return httpx.Response(self.status, json=self.answer)
        return super().__call__(request)


@pytest.mark.parametrize("path", ["/imagine", "/imagine/stream", "/sdapi/v1/txt2img"])
def test_a_later_batch_torchserve_finds_busy_is_offered_again(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Its earlier batches are made and their client waits for all: a queue full for a moment costs a wait, not the
    request. The first batch's 503 is the answer at once (TorchServe's message as it is, A1111's route too), and so
    is a later one still busy after the front's patience."""
    monkeypatch.setattr(upstream, "BUSY_FIRST_WAIT", 0.01)
    fake = BusyOnce(busy=1)
    body = {"prompt": "a fox", "n_iter": 3, "seed": 7}
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(fake))) as test_client:
        response = test_client.post(path, json=body, headers={"Accept": "application/json"})
        assert response.status_code == 200, response.text
        # Four requests (the second batch's twice), three answered.
        assert [sent["seed"] for sent in fake.sent() if "describe" not in sent] == [7, 8, 9] and fake.count == 4
        first = BusyOnce(busy=0)
        with TestClient(create_app(FrontSettings(), httpx.MockTransport(first))) as busy_client:
            refused = busy_client.post(path, json=body, headers={"Accept": "application/json"})
        assert refused.status_code == 503 and first.count == 1
        said = "TorchServe: busy (its queue is full, or no worker is ready): retry in a few seconds. It said: "
        assert refused.json()["error"] == said + BUSY["message"]  # not A1111's field names in it
    monkeypatch.setattr(upstream, "BUSY_PATIENCE", 0.0)
    always = BusyOnce(busy=1)
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(always))) as test_client:
        response = test_client.post(path, json=body, headers={"Accept": "application/json"})
    said = stream_lines(response)[-1] if path == "/imagine/stream" else response.json()
    assert "Please use scale workers API" in said["error"] and always.count == 2


def test_a_later_batch_a_worker_with_a_failed_gpu_refused_is_offered_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler's own 503 (its GPU failed, and TorchServe is about to start a fresh worker) is waited out as
    TorchServe's busy one is: the batches already made are kept."""
    monkeypatch.setattr(upstream, "BUSY_FIRST_WAIT", 0.01)
    failed = {"error": "the GPU failed; this worker restarts: retry in a minute", "field": ""}
    fake = BusyOnce(busy=1, answer=failed)
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(fake))) as test_client:
        response = test_client.post("/imagine", json={"prompt": "a fox", "n_iter": 3, "seed": 7})
    assert response.status_code == 200 and response.json() == ["png7", "png8", "png9"] and fake.count == 4


@pytest.mark.parametrize("path", ["/imagine", "/sdapi/v1/txt2img"])
def test_a_later_batch_whose_prediction_failed_is_not_sent_again(path: str) -> None:
    """TorchServe's other 503, a worker's error in its batch: the same request again would fail again, beside other
    clients' requests in the next batch. Its answer is the error, at once."""
    failed = {"code": 503, "type": "InternalServerException", "message": "Prediction failed"}
    fake = BusyOnce(busy=1, answer=failed)
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(fake))) as test_client:
        response = test_client.post(path, json={"prompt": "a fox", "n_iter": 3, "seed": 7})
    assert response.status_code == 503 and fake.count == 2
    assert response.json()["error"] == "TorchServe: Prediction failed"


@pytest.mark.parametrize(
    ("status", "refusal"),
    [(507, {"error": "out of GPU memory; retry, or ask for fewer or smaller images", "field": ""}),
     (400, {"error": "no LoRA named ink in the loras folder (removed since the first batch)", "field": "prompt"})],
)  # fmt: skip
def test_a_later_batch_refused_but_by_a_503_is_the_answer_at_once(
    monkeypatch: pytest.MonkeyPatch, status: int, refusal: dict[str, Any]
) -> None:
    """Only a 503 (TorchServe busy, or a worker about to be replaced) is worth waiting out: the handler's other
    refusals would be the same again."""
    monkeypatch.setattr(upstream, "BUSY_FIRST_WAIT", 0.01)
    fake = BusyOnce(busy=1, answer=refusal, status=status)
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(fake))) as test_client:
        response = test_client.post("/imagine", json={"prompt": "a fox", "n_iter": 3, "seed": 7})
    assert (response.status_code, response.json(), fake.count) == (status, refusal, 2)


def test_a_busy_torchserve_is_offered_the_batch_again_at_doubling_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """BUSY_FIRST_WAIT (1 s), then each wait twice the last, so that a queue full for long is not asked every
    second."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(upstream, "asyncio", SimpleNamespace(sleep=sleep))
    answers = iter([*(httpx.Response(503, json=BUSY) for _ in range(3)), httpx.Response(200, json={})])
    api = upstream.InferenceApi(FrontSettings(), httpx.MockTransport(lambda request: next(answers)))

    async def offered() -> int:
        try:
            return (await api.open(b"{}", JSON, patient=True)).status_code
        finally:
            await api.aclose()

    assert asyncio.run(offered()) == 200 and waits == [1.0, 2.0, 4.0]


def test_a_stream_with_a_blank_line_is_read_as_without_it(fake: FakeInference) -> None:
    """NDJSON lets a reader skip empty lines: one between a stream's lines is no line, not a 502."""

    def spaced(request: httpx.Request) -> httpx.Response:
        response = fake(request)
        return httpx.Response(200, content=response.text.replace("\n", "\n\n", 1), headers={"Content-Type": NDJSON})

    with TestClient(create_app(FrontSettings(), httpx.MockTransport(spaced))) as test_client:
        response = test_client.post("/imagine", json={"prompt": "a fox", "seed": 3}, headers={"Accept": JSON})
    assert (response.status_code, response.json()) == (200, ["png3"])


def test_a_connection_that_times_out_is_torchserve_not_reachable() -> None:
    """No connection made in time (a host down, or dropping packets) is TorchServe unreachable, a 503, not a slow
    answer's 504 that would say to raise SD_FRONT_TIMEOUT."""

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    with TestClient(create_app(FrontSettings(), httpx.MockTransport(unreachable))) as test_client:
        response = test_client.post("/imagine", json={"prompt": "a fox"})
    assert response.status_code == 503 and response.json()["error"].startswith("TorchServe is not reachable at")


def test_torchserve_unhealthy_is_unavailable() -> None:
    """TorchServe's health check answers 500 `{"status": "Unhealthy"}` while a model lacks its workers: not ready."""
    unhealthy = httpx.MockTransport(lambda request: httpx.Response(500, json={"status": "Unhealthy"}))
    with TestClient(create_app(FrontSettings(), unhealthy)) as test_client:
        health = test_client.get("/healthz")
    assert (health.status_code, health.json()) == (
        503,
        {"status": "unavailable", "torchserve": "Unhealthy", "model": "sd"},
    )


def test_the_health_check_waits_no_longer_than_a_readiness_probe() -> None:
    """Its own timeout, not SD_FRONT_TIMEOUT's 900 s: a TorchServe that takes connections and answers nothing is
    unavailable within the probe's time, and said so, not 'raise SD_FRONT_TIMEOUT'."""
    timeouts: list[dict[str, Any]] = []

    def silent(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        raise httpx.ReadTimeout("no answer", request=request)

    with TestClient(create_app(FrontSettings(), httpx.MockTransport(silent))) as test_client:
        health = test_client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["torchserve"].endswith(f"did not answer /ping within {upstream.PING_TIMEOUT:g} s")
    assert timeouts[0]["read"] == upstream.PING_TIMEOUT


def test_an_upload_given_up_half_way_is_no_server_error() -> None:
    async def disconnect() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "headers": []}, disconnect)
    with pytest.raises(FrontError) as refused:
        asyncio.run(_body(request, 100))
    assert refused.value.status == 400 and refused.value.field == "body"


@pytest.mark.parametrize(
    ("answer", "variation"),
    [
        ({"images": []}, False),
        ({"images": [], "seeds": [], "parameters": {}}, False),
        ({"images": ["a"], "seeds": []}, False),
        ({"images": ["a"], "seeds": [1], "parameters": "x"}, False),
        ([1], False),
        ({"images": ["a", "b"], "seeds": [1, 2], "subseeds": [3], "parameters": {}}, False),
        ({"images": ["a"], "seeds": ["1"], "parameters": {}}, False),
        ({"images": ["a"], "seeds": [1.5], "parameters": {}}, False),
        ({"images": ["a"], "seeds": [1], "parameters": {}}, True),  # variation seeds, none answered
    ],
)
def test_an_answer_without_images_seeds_and_parameters_is_a_502(answer: Any, variation: bool) -> None:
    """Found in the iteration that brings it, before the next one counts on its seeds (it was a 500, or an empty
    200), in a JSON answer and in a stream's last line (both are a stream's last line from TorchServe)."""
    nonsense = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    body = {"prompt": "a fox", "n_iter": 2, **({"subseed_strength": 0.5} if variation else {})}
    with TestClient(create_app(FrontSettings(), nonsense)) as test_client:
        said = "not a JSON object" if isinstance(answer, list) else "without images, a seed for each"
        response = test_client.post("/imagine", json=body, headers={"Accept": "application/json"})
        assert response.status_code == 502 and said in response.json()["error"]
        streamed = stream_lines(test_client.post("/imagine/stream", json=body))
        assert streamed[-1]["status"] == 502 and said in streamed[-1]["error"]


def test_a_model_torchserve_does_not_serve_is_a_503(fake: FakeInference) -> None:
    app = create_app(FrontSettings(model="nope"), httpx.MockTransport(fake))
    with TestClient(app) as test_client:
        response = test_client.post("/imagine", json={"prompt": "a fox"})
        assert response.status_code == 503 and "does not serve the model 'nope'" in response.json()["error"]
        assert test_client.get("/healthz").json() == {"status": "ok", "torchserve": "Healthy", "model": "nope"}


def test_docs_are_served_from_here(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "cdn" not in page.lower()
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    operation = client.get("/openapi.json").json()["paths"]["/imagine"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(FIELDS) <= set(schema["properties"])  # every field TorchServe's handler reads is documented
    assert set(operation["responses"]["200"]["content"]) == {"image/png", "application/json", "application/x-ndjson"}


def shipped_settings() -> HandlerSettings:
    """The handler's settings as this repository ships them (model-config.yaml)."""
    return parse_settings_of_handler(yaml.safe_load((Path(__file__).parents[1] / "model-config.yaml").read_text()))


@dataclass
class ParsingInference(FakeInference):
    """FakeInference behind the handler's own request parser with the shipped settings: what it refuses gets the
    handler's error answer, what it accepts is kept as parsed. A prompt of "silent" gets no answer in time."""

    parsed: list[ApiRequest] = field(default_factory=list)
    settings: HandlerSettings = field(default_factory=shipped_settings)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/predictions/sd":
            if b'"silent"' in request.content:
                raise httpx.ReadTimeout("no answer", request=request)
            try:
                self.parsed.append(parse_request(request.content, self.settings, request.headers["Accept"]))
            except RequestError as error:
                return httpx.Response(error.status, json=error.body())
        return super().__call__(request)


def imagine_operation(test_client: TestClient) -> dict[str, Any]:
    return test_client.get("/openapi.json").json()["paths"]["/imagine"]["post"]


# The fields /docs shows without a default: the prompt (required), the seeds (drawn, as their descriptions say), the
# images (none: txt2img), and ddim_eta (the original app's second name for eta, whose default applies).
UNDEFAULTED = {"prompt", "seed", "subseed", "init_image", "mask_image", "ddim_eta"}
# The handler's names for the fields the original app names otherwise.
GENERATION_NAMES = {"H": "height", "W": "width", "ddim_steps": "steps"}


def test_every_default_the_docs_show_is_the_one_the_server_applies() -> None:
    """The defaults /docs shows for /imagine are written by hand (front/schema.py), apart from those the server
    applies (model-config.yaml's handler.defaults, and GenerationRequest's); clients read them to know what they
    need not send. A request of a prompt alone, forwarded by the front and read by the handler's parser as shipped,
    gets every one of them."""
    inference = ParsingInference()
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(inference))) as test_client:
        schema = imagine_operation(test_client)["requestBody"]["content"]["application/json"]["schema"]
        answer = test_client.post("/imagine", json={"prompt": "a fox"})
    assert answer.status_code == 200, answer.text
    [parsed] = inference.parsed
    documented = {name: value["default"] for name, value in schema["properties"].items() if "default" in value}
    assert set(schema["properties"]) - set(documented) == UNDEFAULTED
    # The front's own (it asks TorchServe for a stream either way): an answer that is no progress stream.
    assert documented.pop("stream") == answer.headers["Content-Type"].startswith(NDJSON)
    assert documented == {name: getattr(parsed.generation, GENERATION_NAMES.get(name, name)) for name in documented}


@pytest.mark.parametrize(
    ("model", "body", "status", "field_at_fault"),
    [
        ("sd", b"", 400, "body"),  # the request body /docs marks as required
        ("sd", b'{"prompt": "a fox", "H": 100}', 400, "H"),
        ("sd", b"prompt=a+fox", 415, "body"),  # a form, as `curl -d` sends it
        ("nope", b'{"prompt": "a fox"}', 503, ""),  # a model TorchServe does not serve
        ("sd", b'{"prompt": "silent"}', 504, ""),
    ],
)
def test_the_errors_the_docs_show_are_the_answers_given(
    model: str, body: bytes, status: int, field_at_fault: str
) -> None:
    """Each error /docs lists for /imagine, as the front answers it: under that status, with the keys its documented
    schema has (`field` naming the field at fault, which clients show beside it); a request without a body is one,
    as /docs says in marking the body required."""
    with TestClient(create_app(FrontSettings(model=model), httpx.MockTransport(ParsingInference()))) as test_client:
        operation = imagine_operation(test_client)
        form = status == 415
        content_type = "application/x-www-form-urlencoded" if form else "application/json"
        response = test_client.post("/imagine", content=body, headers={"Content-Type": content_type})
    assert operation["requestBody"]["required"] is True
    assert response.status_code == status and str(status) in operation["responses"], response.text
    documented = operation["responses"][str(status)]["content"]["application/json"]["schema"]["properties"]
    assert set(response.json()) == set(documented) and response.json()["field"] == field_at_fault


class PageParts(HTMLParser):
    """The ids of a page's form controls, the ids its labels name, the addresses it loads, and the options of its
    sampler select as (value, label)."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[str] = []
        self.labelled: set[str] = set()
        self.loads: list[str] = []
        self.samplers: list[tuple[str, str]] = []
        self.select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "select":
            self.select = attributes.get("id")
        if tag == "option" and self.select == "sampler":
            self.samplers.append((str(attributes.get("value")), ""))
        if tag in ("input", "select", "textarea", "progress"):
            self.controls.append(str(attributes.get("id")))
        if tag == "label":
            self.labelled.add(str(attributes.get("for")))
        if tag in ("script", "link", "img") and (attributes.get("src") or attributes.get("href")):
            self.loads.append(str(attributes.get("src") or attributes.get("href")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self.select = None

    def handle_data(self, data: str) -> None:
        if self.select == "sampler" and self.samplers and data.strip():
            value, label = self.samplers[-1]
            self.samplers[-1] = (value, label + data.strip())


def test_the_page_labels_every_control_and_loads_nothing_from_elsewhere(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    page = PageParts()
    page.feed(response.text)
    assert len(page.controls) >= 12
    assert set(page.controls) <= page.labelled
    assert page.loads == ["data:,", "/static/style.css", "/static/app.js"]
    for asset in page.loads[1:]:
        assert client.get(asset).status_code == 200


def test_the_api_docs_and_the_client_name_every_sampler_upscaler_and_field() -> None:
    """What /docs and client.py's --help list by hand (neither imports the model code) is what ldm offers, and the
    client sends every field TorchServe's handler reads (prompt and images aside, and the stream it never asks for)."""
    described = ImagineRequest.model_json_schema()["properties"]
    helps = {action.dest: action.help or "" for action in client_script.build_parser()._actions}
    for names, texts in (
        (SAMPLERS, (described["sampler"]["description"], helps["sampler"])),
        (UPSCALERS, (described["hr_upscaler"]["description"], helps["hr_upscaler"])),
    ):
        for text in texts:
            assert set(names) <= set(re.findall(r"\w+", text)), text
    assert set(FIELDS) - set(client_script.OPTIONAL_FIELDS) == {"prompt", "init_image", "mask_image", "stream"}
    assert set(client_script.OPTIONAL_FIELDS) <= set(FIELDS)


def test_the_page_offers_every_sampler_by_the_name_its_pngs_give(client: TestClient) -> None:
    page = PageParts()
    page.feed(client.get("/").text)
    assert page.samplers == list(SAMPLERS.items())


def test_a_body_over_the_limit_is_refused_unread(client: TestClient, fake: FakeInference) -> None:
    body = b'{"prompt": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    response = client.post("/imagine", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["field"] == "body"
    assert fake.bodies == []


def test_settings_from_the_command_line_over_the_environment() -> None:
    environ = {"SD_FRONT_PORT": "6000", "SD_INFERENCE_URL": "http://ts:8080", "SD_MODEL_NAME": "env-model"}
    settings = parse_settings(["--model", "cli-model"], environ)
    assert (settings.port, settings.inference_url, settings.model) == (6000, "http://ts:8080", "cli-model")
    assert parse_settings([], {}) == FrontSettings()
    with pytest.raises(SystemExit, match="SD_FRONT_PORT must be int"):
        parse_settings([], {"SD_FRONT_PORT": "five thousand"})
