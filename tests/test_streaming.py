"""Streamed progress in-process: the handler with the stand-in context of test_handler.py, and a recorder in place of
the one function that writes intermediate responses to TorchServe's socket (test_server.py streams for real)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from handler.request import NDJSON
from handler.sd_handler import StableDiffusionHandler
from ldm.generation_request import GenerationRequest
from ldm.parts import load_split
from ldm.pipeline import Pipeline, Progress
from ldm.preview import preview_jpeg
from tests.bad_requests import VALID, png_base64
from tests.reference import load_image
from tests.test_handler import SETTINGS, FakeContext, call

PREVIEW_EVERY = 2


@dataclasses.dataclass
class Sent:
    """One intermediate response: the line for each batch position it is for, and what TorchServe was told."""

    lines: dict[int, dict[str, Any]]
    request_ids: dict[int, str]
    content_types: dict[int, str]


@pytest.fixture(scope="module")
def handler(tiny_split: Path) -> StableDiffusionHandler:
    context = FakeContext(tiny_split)
    context.model_yaml_config = {"handler": {**SETTINGS["handler"], "preview_every": PREVIEW_EVERY}}
    h = StableDiffusionHandler()
    h.initialize(context)
    return h


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """Every intermediate response, decoded, in the order sent; each chunk checked to be one JSON object and '\\n'."""
    recorded: list[Sent] = []

    def record(ret: dict[int, str], req_id_map: dict[int, str], message: str, code: int, context: Any) -> None:
        assert code == 200 and set(ret) == set(req_id_map)
        for chunk in ret.values():
            assert chunk.endswith("\n") and chunk.count("\n") == 1
        recorded.append(
            Sent(
                {idx: json.loads(chunk) for idx, chunk in ret.items()},
                dict(req_id_map),
                {idx: context.response_headers[idx]["content-type"] for idx in ret},
            )
        )

    monkeypatch.setattr("handler.streaming.send_intermediate_predict_response", record)
    return recorded


def steps_of(sent: list[Sent], idx: int) -> list[dict[str, Any]]:
    return [s.lines[idx] for s in sent if idx in s.lines]


def expected_latents(tiny_split: Path, request: GenerationRequest, max_batch_images: int) -> list[Progress]:
    """Every step of an independent run batched as the handler batches: the latents the previews must show."""
    seen: list[Progress] = []
    Pipeline(load_split(tiny_split)).generate_many([request], max_batch_images, seen.append)
    return seen


def decode_png(png_b64: str) -> np.ndarray:
    return np.asarray(load_image(io.BytesIO(base64.b64decode(png_b64))))


def test_step_lines_with_previews_then_exactly_the_json_response(handler, sent, tiny_split: Path) -> None:
    body = {**VALID, "ddim_steps": 5, "n_samples": 2, "n_iter": 2}
    (streamed,), context = call(handler, [{**body, "stream": True}])
    lines = steps_of(sent, 0)
    assert [(line["step"], line["total"], line["image_index"], line["image_count"]) for line in lines] == [
        (k, 5, 0, 4) for k in range(1, 6)
    ]
    assert [k for k, line in enumerate(lines, 1) if "preview" in line] == [2, 4, 5]
    assert {s.request_ids[0] for s in sent} == {"request-0"}
    assert {s.content_types[0] for s in sent} == {NDJSON}, "the first chunk carries the headers"
    request = GenerationRequest("a red bicycle", height=64, width=64, steps=5, seed=5, n_samples=2, n_iter=2)
    expected = expected_latents(tiny_split, request, handler.settings.max_batch_images)
    for line in lines:
        if "preview" in line:
            preview = base64.b64decode(line["preview"])
            assert preview == preview_jpeg(expected[line["step"] - 1].latents[0])
            with Image.open(io.BytesIO(preview)) as image:
                assert (image.format, image.size) == ("JPEG", (8, 8))

    assert streamed.endswith("\n") and streamed.count("\n") == 1
    assert context.response_headers[0]["content-type"] == NDJSON
    (plain,), _ = call(handler, [body])
    assert json.loads(streamed) == json.loads(plain)
    assert json.loads(streamed)["seeds"] == [5, 6, 7, 8] and "stream" not in json.loads(streamed)["parameters"]


def test_images_split_across_unet_batches_restart_the_steps(handler, sent, monkeypatch) -> None:
    monkeypatch.setattr(handler, "settings", dataclasses.replace(handler.settings, max_batch_images=2))
    call(handler, [{**VALID, "ddim_steps": 3, "n_samples": 2, "n_iter": 2, "stream": True}])
    lines = [(line["step"], line["total"], line["image_index"], line["image_count"]) for line in steps_of(sent, 0)]
    assert lines == [(1, 3, 0, 2), (2, 3, 0, 2), (3, 3, 0, 2), (1, 3, 2, 2), (2, 3, 2, 2), (3, 3, 2, 2)]


def test_img2img_counts_its_own_steps_and_accept_ndjson_streams(handler, sent) -> None:
    body = {"prompt": "tiles", "init_image": png_base64(64, 64), "strength": 0.5, "ddim_steps": 5, "seed": 1}
    (streamed,), context = call(handler, [body], [{"Accept": "application/x-ndjson"}])
    # ⌊0.5 · 5⌋ = 2 denoising steps.
    assert [(line["step"], line["total"]) for line in steps_of(sent, 0)] == [(1, 2), (2, 2)]
    assert "preview" in steps_of(sent, 0)[-1], "the last step always has a preview"
    assert context.response_headers[0]["content-type"] == NDJSON
    assert json.loads(streamed)["parameters"]["strength"] == 0.5


def test_the_hires_fix_streams_its_second_pass_as_such(handler, sent, tiny_split: Path) -> None:
    """The first pass's steps, then the second pass's from 1 again, each line saying `hires`, its previews of the
    larger latent; every line of the request says it runs two passes, and the first pass's share of their UNet work
    (calls times pixels), a resize to the size it has too (a second pass at that size, as A1111 1.6 runs one); a plain
    one in the same batch runs one."""
    body = {**VALID, "ddim_steps": 4, "hr_scale": 2, "hr_steps": 3, "strength": 0.5, "stream": True}
    same = {**VALID, "ddim_steps": 4, "hr_resize_x": 64, "hr_steps": 3, "strength": 0.5, "stream": True}
    # Heun calls the UNet twice a step but the last, at 96×96 for this resize: 4 calls at 64×64 against 2·2 − 1 at
    # 2.25 times the pixels.
    heun = {**VALID, "ddim_steps": 4, "hr_resize_x": 96, "hr_steps": 2, "hr_sampler": "heun", "stream": True}
    bodies = [body, same, {**VALID, "ddim_steps": 4, "stream": True}, heun]
    (streamed, _, _, _), _ = call(handler, bodies)
    lines = steps_of(sent, 0)
    assert [(line["step"], line["total"], line.get("hires", False)) for line in lines] == [
        (1, 4, False), (2, 4, False), (3, 4, False), (4, 4, False), (1, 3, True), (2, 3, True), (3, 3, True),
    ]  # fmt: skip
    assert {(line["passes"], line["first_pass_share"]) for line in lines} == {(2, 4 / (4 + 3 * 4))}
    assert {line["first_pass_share"] for line in steps_of(sent, 3)} == {4 / (4 + 3 * 2.25)}
    assert {(line["passes"], line["first_pass_share"]) for line in steps_of(sent, 1)} == {(2, 4 / (4 + 3))}
    one_pass = [(line["step"], line["passes"], "first_pass_share" in line) for line in steps_of(sent, 2)]
    assert one_pass == [(1, 1, False), (2, 1, False), (3, 1, False), (4, 1, False)]
    with Image.open(io.BytesIO(base64.b64decode(lines[-1]["preview"]))) as image:
        assert image.size == (16, 16)
    assert decode_png(json.loads(streamed)["images"][0]).shape == (128, 128, 3)


def test_preview_every_zero_sends_none(handler, sent, monkeypatch) -> None:
    monkeypatch.setattr(handler, "settings", dataclasses.replace(handler.settings, preview_every=0))
    call(handler, [{**VALID, "stream": True}])
    keys = ["image_count", "image_index", "passes", "step", "total"]
    assert [sorted(line) for line in steps_of(sent, 0)] == [keys] * 3


def test_a_batch_streams_only_to_the_requests_that_asked(handler, sent, tiny_split: Path) -> None:
    bodies = [
        {"prompt": "one", "seed": 1, "stream": True},
        {"prompt": "two", "seed": 2, "n_samples": 2},  # plain, in the same UNet batch as "one"
        {"prompt": "bad", "ddim_steps": 0, "stream": True},
        {"prompt": "wide", "seed": 3, "W": 72, "ddim_steps": 2, "stream": True},  # its own UNet batch
        {"prompt": "five", "seed": 4, "n_samples": 2, "stream": True},
    ]
    responses, context = call(handler, bodies)
    # One intermediate response per step of each UNet batch, for every streamed request in it.
    assert [sorted(s.lines) for s in sent] == [[0, 4]] * 3 + [[3]] * 2
    assert [(line["step"], line["total"], line["image_index"]) for line in steps_of(sent, 4)] == [
        (1, 3, 0),
        (2, 3, 0),
        (3, 3, 0),
    ]
    # Each request's own images in the shared UNet batch of 5 (1 + 2 + 2), not the batch's.
    assert {line["image_count"] for line in steps_of(sent, 0)} == {1}
    assert {line["image_count"] for line in steps_of(sent, 4)} == {2}
    assert context.status == {2: 400}
    types = {idx: headers["content-type"] for idx, headers in context.response_headers.items()}
    assert types == {0: NDJSON, 1: "application/json", 2: "application/json", 3: NDJSON, 4: NDJSON}
    assert json.loads(responses[2])["field"] == "ddim_steps"
    pipeline = Pipeline(load_split(tiny_split))
    for idx in (0, 1, 3, 4):
        body = bodies[idx]
        answer = json.loads(responses[idx])
        request = GenerationRequest(body["prompt"], height=64, width=body.get("W", 64),
                                    steps=body.get("ddim_steps", 3), seed=body["seed"],
                                    n_samples=body.get("n_samples", 1))  # fmt: skip
        assert answer["seeds"] == request.seeds
        assert answer["parameters"]["W"] == request.width
        got = np.stack([decode_png(png) for png in answer["images"]])
        assert np.abs(got.astype(int) - pipeline.generate(request).images).max() <= 1


@pytest.mark.parametrize(
    ("error", "status", "message", "steps"),
    [
        # Whatever failed, the batch's requests are tried again one by one: the stream's steps start over, once.
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), 507, "out of GPU memory",
         [1, 2, 3, 1, 2, 3]),
        (RuntimeError("a bug"), 500, "generation failed", [1, 2, 3, 1, 2, 3]),
    ],
    ids=["out of memory", "any other failure"],
)  # fmt: skip
def test_failure_after_the_stream_started_ends_it_with_an_error_line(
    handler, sent, monkeypatch, error: Exception, status: int, message: str, steps: list[int]
) -> None:
    """The VAE runs after the last step: the streamed request has had its 200 and every step line by then."""

    def fail(latents: torch.Tensor) -> torch.Tensor:
        raise error

    monkeypatch.setattr(handler.pipeline, "decode", fail)
    responses, context = call(handler, [{**VALID, "stream": True}, VALID])
    assert [line["step"] for line in steps_of(sent, 0)] == steps
    assert responses[0].endswith("\n")
    line = json.loads(responses[0])
    assert line["field"] == "" and line["error"].startswith(message) and line["status"] == status
    assert context.response_headers[0]["content-type"] == NDJSON
    # The plain neighbour gets an ordinary error response with that status.
    assert context.status == {1: status}
    assert {**json.loads(responses[1]), "status": status} == line


def test_the_pngs_failing_after_the_stream_started_end_it_with_an_error_line(handler, sent, monkeypatch) -> None:
    """Host memory met while the batch's PNGs are written, after every step line: the stream's last line is the
    507, its plain neighbour a 507 response, and the worker serves on."""

    from handler import sd_handler

    real, failed = sd_handler.png_files, []

    def exhausted_once(*args: Any) -> list[list[bytes]]:
        if not failed:
            failed.append(True)
            raise MemoryError
        return real(*args)

    monkeypatch.setattr(sd_handler, "png_files", exhausted_once)
    responses, context = call(handler, [{**VALID, "stream": True}, VALID])
    assert [line["step"] for line in steps_of(sent, 0)] == [1, 2, 3]
    line = json.loads(responses[0])
    assert line["status"] == 507 and line["error"].startswith("out of host memory")
    assert context.status == {1: 507} and json.loads(responses[1])["error"] == line["error"]
    (response,), context = call(handler, [VALID])
    assert context.status == {} and len(json.loads(response)["images"]) == 1


def test_failure_before_anything_was_streamed_is_an_ordinary_response(handler, sent, monkeypatch) -> None:
    def exhausted(*_: Any) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(handler.pipeline.prompts, "embed", exhausted)
    (response,), context = call(handler, [{**VALID, "stream": True}])
    assert sent == []
    assert context.status == {0: 507}
    assert context.response_headers[0]["content-type"] == "application/json"
    assert "out of GPU memory" in json.loads(response)["error"]


def test_an_unexpected_failure_before_anything_was_streamed_is_an_ordinary_500(handler, sent, monkeypatch) -> None:
    """A fault of the worker's met by a streamed request before its first line: its own 500 JSON, not TorchServe's
    503 for the batch."""

    def broken(*_: Any) -> torch.Tensor:
        raise RuntimeError("a bug")

    monkeypatch.setattr(handler.pipeline.prompts, "embed", broken)
    (response,), context = call(handler, [{**VALID, "stream": True}])
    assert sent == []
    assert context.status == {0: 500} and context.response_headers[0]["content-type"] == "application/json"
    assert json.loads(response)["error"] == "generation failed; the server log has the details"


def test_validation_errors_of_a_stream_are_plain_400s(handler, sent) -> None:
    (response,), context = call(handler, [{**VALID, "stream": True, "H": 100}])
    assert sent == []
    assert context.status == {0: 400} and context.response_headers[0]["content-type"] == "application/json"
    assert json.loads(response)["field"] == "H"
