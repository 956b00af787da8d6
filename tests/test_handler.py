"""The TorchServe handler in-process, with a stand-in for TorchServe's context (the server itself is tested in
test_server.py): validation, responses, batching."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFile
from safetensors.torch import save_file

from handler import sd_handler
from handler.errors import RequestError
from handler.images import decode_image
from handler.request import ApiRequest, check_chunks, check_defaults, parse_request
from handler.sd_handler import StableDiffusionHandler
from handler.settings import Limits, SettingsError, check_against_model, parse_settings
from ldm.embeddings import Embedding, Vocabulary
from ldm.generation_request import SAMPLERS, GenerationRequest
from ldm.lora import short_hash
from ldm.model import StableDiffusion
from ldm.parts import load_split
from ldm.pipeline import Pipeline
from ldm.png_info import read_parameters
from tests.bad_requests import CASES, PNG_ONLY, VALID, Case, black_png, image_base64, png_base64, png_of
from tests.loras import model_lora, write_lora
from tests.reference import BF16_MIN_PSNR_DB, load_image, psnr

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"handler": {"defaults": {"H": 64, "W": 64, "ddim_steps": 3}, "limits": {"max_pixels": 1024 * 1024}}}


class FakeMetrics:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, float, dict[str, str]]] = []

    def add_metric(self, name, value, unit, idx, dimensions, metric_type) -> None:
        self.recorded.append((name, value, {d.name: d.value for d in dimensions}))


class FakeContext:
    """What the handler uses of TorchServe's Context, recording what it sets."""

    def __init__(self, model_dir: Path, headers: list[dict[str, str]] | None = None) -> None:
        self.model_name = "tiny"
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = SETTINGS
        self.metrics = FakeMetrics()
        self.headers = headers or []
        self.status: dict[int, int] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def get_request_id(self, idx: int) -> str:
        return f"request-{idx}"

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.headers[idx] if idx < len(self.headers) else {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.status[idx] = code

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key.lower()] = value

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)


@pytest.fixture(scope="module")
def handler(tiny_split: Path) -> StableDiffusionHandler:
    h = StableDiffusionHandler()
    h.initialize(FakeContext(tiny_split))
    return h


def call(handler: StableDiffusionHandler, bodies: list[Any], headers: list[dict[str, str]] | None = None):
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), headers)
    rows = [{"body": b if isinstance(b, bytes) else json.dumps(b).encode()} for b in bodies]
    return handler.handle(rows, context), context


def expected_pixels(tiny_split: Path, request: GenerationRequest) -> np.ndarray:
    return Pipeline(load_split(tiny_split)).generate(request).images


def test_every_answer_carries_the_batch_handler_time(handler: StableDiffusionHandler) -> None:
    started = time.perf_counter()
    responses, context = call(handler, [VALID, {**VALID, "seed": 9}])
    wall_ms = (time.perf_counter() - started) * 1000
    timings = [context.response_headers[idx]["server-timing"] for idx in range(len(responses))]
    assert timings[0] == timings[1]
    match = re.fullmatch(r'handler;dur=([0-9.]+);desc="batch of 2"', timings[0])
    assert match, timings[0]
    assert 0.5 * wall_ms <= float(match.group(1)) <= wall_ms  # milliseconds, nearly all of the call


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_is_a_400_naming_its_field_and_rule(handler: StableDiffusionHandler, case: Case) -> None:
    headers = [{"Accept": "image/png"}] if case.name in PNG_ONLY else None
    (response,), context = call(handler, [case.body], headers)
    assert context.status[0] == 400
    assert context.response_headers[0]["content-type"] == "application/json"
    error = json.loads(response)
    assert error["field"] == case.field
    assert case.field in error["error"] and case.says in error["error"], error["error"]


@pytest.mark.parametrize("name", ["init image 25 megapixels", "init image decompression bomb"])
def test_too_many_pixels_are_refused_from_the_header_without_decoding(name: str, monkeypatch) -> None:
    """The 30000×30000 PNG would take 900 MB decoded: no pixel of it (nor of the 5000×5000 one) may be read."""

    def decode_pixels(image: ImageFile.ImageFile) -> None:
        raise AssertionError(f"{name}: pixels decoded")

    [case] = [case for case in CASES if case.name == name]
    monkeypatch.setattr(ImageFile.ImageFile, "load", decode_pixels)
    with pytest.raises(RequestError, match="must have at most 16777216 pixels"):
        decode_image(case.body["init_image"], parse_settings(SETTINGS))


def test_a_multi_picture_jpeg_is_read_as_its_first_picture() -> None:
    """What some phones save as .jpg: the first picture is the photo, the others (here blue) are not used."""
    red, blue = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 30, 200))
    encoded = image_base64(red, "MPO", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).format == "MPO"
    image = decode_image(encoded, parse_settings(SETTINGS))
    assert image.size == (64, 48)
    assert np.abs(np.asarray(image, dtype=int) - (200, 30, 30)).max() <= 8


def test_limit_is_named_in_the_message(handler: StableDiffusionHandler) -> None:
    (response,), _ = call(handler, [{**VALID, "ddim_steps": 151}])
    assert json.loads(response)["error"] == "ddim_steps must be between 1 and 150, got 151"


def test_an_image_is_read_upright_as_its_exif_orientation_says() -> None:
    """A phone's portrait photo: stored 80×64 with orientation 6 (turn 90° clockwise to view), shown 64×80 by every
    viewer and by the page, which sizes its mask from what it shows."""
    stored = Image.new("RGB", (80, 64), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 40, 64))  # blue on the stored left: on top once turned
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(image_base64(stored, "JPEG", exif=exif), parse_settings(SETTINGS))
    assert image.size == (64, 80)
    array = np.asarray(image, dtype=int)
    assert np.abs(array[10, 32] - (30, 30, 200)).max() <= 8 and np.abs(array[70, 32] - (200, 30, 30)).max() <= 8


def test_form_body_is_415(handler: StableDiffusionHandler) -> None:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]))
    (response,) = handler.handle([{'{"prompt": "x"}': ""}], context)
    assert context.status[0] == 415 and json.loads(response)["field"] == "body"


def test_json_response_has_images_seeds_and_every_effective_parameter(handler, tiny_split: Path) -> None:
    (response,), context = call(handler, [{"prompt": "a red bicycle", "seed": 11, "n_samples": 2}])
    body = json.loads(response)
    assert body["seeds"] == [11, 12]
    assert body["parameters"] == {
        "prompt": "a red bicycle", "negative_prompt": "", "H": 64, "W": 64, "ddim_steps": 3, "scale": 7.5,
        "eta": 0.0, "seed": 11, "n_samples": 2, "n_iter": 1, "sampler": "ddim", "weighted_subprompts": False,
        "emphasis": False, "clip_skip": 1,
    }  # fmt: skip
    assert body["warnings"] == []
    expected = expected_pixels(
        tiny_split, GenerationRequest("a red bicycle", height=64, width=64, steps=3, seed=11, n_samples=2)
    )
    for png, pixels, seed in zip(body["images"], expected, (11, 12), strict=True):
        data = base64.b64decode(png)
        assert np.array_equal(np.asarray(load_image(io.BytesIO(data))), pixels)
        assert f"Seed: {seed}, Size: 64x64" in read_parameters(data)
    assert context.response_headers[0]["x-seeds"] == "11,12"
    assert context.status == {}


def test_requests_of_one_batch_each_get_their_samplers_images(handler, tiny_split: Path) -> None:
    bodies = [{**VALID, "sampler": "plms"}, VALID, {**VALID, "sampler": "euler_a"}]
    responses, _ = call(handler, bodies)
    images = set()
    for body, response in zip(bodies, responses, strict=True):
        answer = json.loads(response)
        sampler = body.get("sampler", "ddim")
        assert answer["parameters"]["sampler"] == sampler
        png = base64.b64decode(answer["images"][0])
        assert f"Sampler: {SAMPLERS[sampler]}," in read_parameters(png)
        request = GenerationRequest("a red bicycle", height=64, width=64, steps=3, seed=5, sampler=sampler)
        assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), expected_pixels(tiny_split, request)[0])
        images.add(answer["images"][0])
    assert len(images) == 3


def test_a_configured_default_eta_is_ddims_alone() -> None:
    """η is DDIM's: a request naming another sampler without an eta runs, though the operator's default eta is
    0.3."""
    settings = parse_settings({"handler": {"defaults": {"eta": 0.3}}})
    for sampler in ("plms", "euler_a"):
        assert parse_request({"prompt": "x", "sampler": sampler}, settings).generation.eta == 0.0
    assert parse_request({"prompt": "x"}, settings).generation.eta == 0.3


def test_sizes_are_checked_against_the_served_models_geometry() -> None:
    """A model whose VAE downsamples by 4 takes sides that are multiples of 4, and its hires fix and its "Resize seed
    from" are sized by that factor; one trained on 100 timesteps bounds the hires fix's steps by them. The handler
    hands its model's to every request it reads."""
    settings = parse_settings(None)
    body = {"prompt": "x", "H": 68, "W": 64}
    with pytest.raises(RequestError, match="H must be a multiple of 8, got 68"):
        parse_request(body, settings)
    assert parse_request(body, settings, factor=4).generation.height == 68
    with pytest.raises(RequestError, match="H must be a multiple of 4, got 66"):
        parse_request({**body, "H": 66}, settings, factor=4)
    resize = {"prompt": "x", "seed_resize_from_h": 68, "seed_resize_from_w": 64}
    with pytest.raises(RequestError, match=r"seed_resize_from_h must be 0 .* multiple of 8"):
        parse_request(resize, settings)
    assert parse_request(resize, settings, factor=4).generation.seed_resize_from_h == 68
    hires = {"prompt": "x", "H": 64, "W": 64, "hr_scale": 2, "hr_steps": 120}
    assert parse_request(hires, settings).generation.hr_steps == 120
    with pytest.raises(RequestError) as refused:
        parse_request(hires, settings, num_timesteps=100)
    assert refused.value.field == "hr_steps"


def test_the_handler_reads_requests_by_its_models_geometry(
    handler: StableDiffusionHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A side the model's VAE factor divides is read as such (SD v1's 8 would refuse 68)."""
    assert handler.pipeline is not None
    monkeypatch.setattr(handler.pipeline, "factor", 4)
    (read,) = handler.preprocess([{"body": json.dumps({"prompt": "x", "H": 68, "W": 64}).encode()}])
    assert isinstance(read, ApiRequest) and read.generation.height == 68


def test_every_limit_admits_its_own_value() -> None:
    """A limit is the most a request may have, not the first it may not: the last seed whose images all stay 32-bit,
    an init image of exactly max_init_image_pixels and of exactly max_init_image_bytes, an only-masked answer of
    exactly max_images·max_pixels; one more is refused."""
    settings = parse_settings(None)
    last = 2**32 - 2  # image 2 of 2 has seed 2³² − 1
    assert parse_request({"prompt": "x", "seed": last, "n_iter": 2}, settings).generation.seed == last
    with pytest.raises(RequestError, match=f"seed must be between 0 and {last}, got {last + 1}"):
        parse_request({"prompt": "x", "seed": last + 1, "n_iter": 2}, settings)
    with pytest.raises(RequestError, match="seed must be between 0 and 4294967295, got -1"):
        parse_request({"prompt": "x", "seed": -1}, settings)  # the API's own: only /imagine draws for A1111's -1
    sent = png_base64(64, 64)
    sent_bytes = len(sent) * 3 // 4
    exact = parse_settings(
        {"handler": {"limits": {"max_init_image_pixels": 64 * 64, "max_init_image_bytes": sent_bytes}}}
    )
    assert parse_request({"prompt": "x", "init_image": sent}, exact).generation.init_image is not None
    for limit in ({"max_init_image_pixels": 64 * 64 - 1}, {"max_init_image_bytes": sent_bytes - 1}):
        with pytest.raises(RequestError, match="init_image must"):
            parse_request({"prompt": "x", "init_image": sent}, parse_settings({"handler": {"limits": limit}}))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (20, 20, 40, 40))
    only_masked = {"prompt": "x", "init_image": sent, "mask_image": image_base64(mask), "inpaint_area": "only_masked"}
    one_image = parse_settings({"handler": {"limits": {"max_images": 1, "max_pixels": 64 * 64}}})
    assert parse_request({**only_masked, "H": 64, "W": 64}, one_image).generation.inpaint_area == "only_masked"
    smaller = parse_settings({"handler": {"limits": {"max_images": 1, "max_pixels": 64 * 64 - 64, "min_side": 8}}})
    with pytest.raises(RequestError, match="inpaint_area only_masked answers at its size"):
        parse_request({**only_masked, "H": 64, "W": 56}, smaller)


def test_how_an_answer_is_asked_for_and_how_a_value_is_quoted() -> None:
    """JSON wins over PNG when Accept names both; a data URL's type in capitals still decodes; a wrong value is
    quoted whole up to 40 characters, and cut with "…" past them."""
    settings = parse_settings(None)
    assert not parse_request({"prompt": "x"}, settings, "application/json, image/png").want_png
    assert parse_request({"prompt": "x"}, settings, "image/png").want_png
    shouted = "data:IMAGE/PNG;base64," + png_base64(64, 64)
    assert parse_request({"prompt": "x", "init_image": shouted}, settings).generation.init_image is not None
    for text, quoted in (("x" * 38, f'"{"x" * 38}"'), ("x" * 39, f'"{"x" * 39}…')):
        with pytest.raises(RequestError) as refused:
            parse_request({"prompt": "x", "H": text}, settings)
        assert str(refused.value).endswith(f"got {quoted}")


def test_a_configured_default_of_plms_is_txt2imgs_alone() -> None:
    """PLMS runs txt2img alone: an img2img request that names no sampler runs (DDIM) though the default is plms;
    one that names plms is refused, naming the field. Other defaults run img2img too."""
    settings = parse_settings({"handler": {"defaults": {"sampler": "plms"}}})
    assert parse_request({"prompt": "x"}, settings).generation.sampler == "plms"
    img2img = parse_request({"prompt": "x", "init_image": png_base64()}, settings).generation
    assert (img2img.sampler, img2img.init_image is not None) == ("ddim", True)
    with pytest.raises(RequestError, match="sampler plms is for txt2img only") as refused:
        parse_request({"prompt": "x", "init_image": png_base64(), "sampler": "plms"}, settings)
    assert refused.value.field == "sampler"
    karras = parse_settings({"handler": {"defaults": {"sampler": "dpmpp_2m_karras"}}})
    assert parse_request({"prompt": "x", "init_image": png_base64()}, karras).generation.sampler == "dpmpp_2m_karras"
    # eta with a default sampler that takes none: the error says whose the sampler was.
    with pytest.raises(RequestError) as default_sampler:
        parse_request({"prompt": "x", "eta": 0.5}, karras)
    assert default_sampler.value.field == "eta"
    assert str(default_sampler.value) == (
        "eta is DDIM's: it must be 0 with sampler dpmpp_2m_karras, got 0.5 (dpmpp_2m_karras is this server's "
        'default sampler; send "sampler": "ddim")'
    )


def test_weighted_subprompts_follow_the_configured_default_and_limit() -> None:
    """An operator whose clients wrote optimizedSD's `a:0.7 b:0.3` turns the split on for every request that does not
    say otherwise; a request can still turn it off."""
    settings = parse_settings({"handler": {"defaults": {"weighted_subprompts": True}, "limits": {"max_subprompts": 2}}})
    assert parse_request({"prompt": "a:1 b:2"}, settings).generation.weighted_subprompts is True
    # Off, the text is read as written: neither the weights nor their count are checked.
    plain = parse_request({"prompt": "a:1 b:2 c:-3", "weighted_subprompts": False}, settings).generation
    assert plain.weighted_subprompts is False
    with pytest.raises(RequestError, match=r"^prompt: at most 2 weighted sub-prompts, got 3$"):
        parse_request({"prompt": "a:1 b:2 c:3"}, settings)
    assert parse_request({"prompt": "a:1 b:2"}, parse_settings(None)).generation.weighted_subprompts is False


@pytest.mark.parametrize(
    ("field", "a1111", "ours"),
    [
        ("sampler", "Euler a", "euler_a"),
        ("sampler", "DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"),
        ("sampler", "euler_a", "euler_a"),
        ("hr_upscaler", "Latent (bicubic)", "latent_bicubic"),
        ("hr_sampler", "DPM++ 2M Karras", "dpmpp_2m_karras"),
    ],
)
def test_samplers_and_upscalers_go_by_a1111s_names_too(field: str, a1111: str, ours: str) -> None:
    """A1111's clients send its display names (front/a1111.py passes them on); a name of neither is still refused."""
    body = {"prompt": "a fox", field: a1111, **({"hr_scale": 2} if field.startswith("hr_") else {})}
    assert getattr(parse_request(body, parse_settings(None)).generation, field) == ours


def test_a_sampler_named_by_neither_is_refused() -> None:
    with pytest.raises(RequestError, match="sampler 'euler a' is not available"):
        parse_request({"prompt": "a fox", "sampler": "euler a"}, parse_settings(None))


def test_and_sub_prompts_are_bounded_by_their_own_limit() -> None:
    """Each of A1111's AND sub-prompts is a UNet row per image at every step, a text-encoder row only for
    weighted sub-prompts: `max_and_subprompts` bounds the first, in A1111's syntax alone."""
    settings = parse_settings({"handler": {"limits": {"max_and_subprompts": 2, "max_subprompts": 9}}})
    assert parse_request({"prompt": "a AND b:0.5", "emphasis": True}, settings).generation.prompt == "a AND b:0.5"
    with pytest.raises(RequestError, match=r"^prompt: at most 2 sub-prompts joined by AND, got 3$"):
        parse_request({"prompt": "a AND b AND c", "emphasis": True}, settings)
    # Counted first: 70 of them also read more texts than prompt editing allows, but this is what is wrong.
    many = " AND ".join(f"word{i}" for i in range(70))
    with pytest.raises(RequestError, match=r"^prompt: at most 8 sub-prompts joined by AND, got 70$"):
        parse_request({"prompt": many, "emphasis": True}, parse_settings(None))
    assert parse_request({"prompt": "a AND b AND c"}, settings).generation.emphasis is False  # text, as written
    assert Limits().max_and_subprompts == 8


def test_emphasis_follows_the_configured_default_and_reaches_the_image(handler, tiny_split: Path) -> None:
    """An operator whose clients write A1111's prompts turns its syntax on for every request that does not say
    otherwise; the answer is the pipeline's image for it and says so."""
    settings = parse_settings({"handler": {"defaults": {"emphasis": True}}})
    assert parse_request({"prompt": "a (red) door"}, settings).generation.emphasis is True
    assert parse_request({"prompt": "a (red) door", "emphasis": False}, settings).generation.emphasis is False
    # One syntax a request turns on sets the server's default for the other aside (both defaults on stops the worker:
    # test_a_default_that_no_request_may_leave_out_stops_the_worker).
    chosen = parse_request({"prompt": "a:1 b:2", "weighted_subprompts": True}, settings).generation
    assert (chosen.weighted_subprompts, chosen.emphasis) == (True, False)
    weighted = parse_settings({"handler": {"defaults": {"weighted_subprompts": True}}})
    chosen = parse_request({"prompt": "a (red) door", "emphasis": True}, weighted).generation
    assert (chosen.weighted_subprompts, chosen.emphasis) == (False, True)
    (response,), _ = call(handler, [{**VALID, "prompt": "a (red:1.4) bicycle", "emphasis": True}])
    answer = json.loads(response)
    assert answer["parameters"]["emphasis"] is True
    png = base64.b64decode(answer["images"][0])
    request = GenerationRequest("a (red:1.4) bicycle", height=64, width=64, steps=3, seed=5, emphasis=True)
    assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), expected_pixels(tiny_split, request)[0])
    assert "Emphasis: Original" in read_parameters(png)


def test_describe_says_what_the_worker_serves_and_lists_files_added_since(tiny_split: Path, tmp_path: Path) -> None:
    """The management API's `GET /models/NAME?customized=true` reaches the handler as a request with the header
    `describe: True`: the answer names the model, its defaults and limits, and the LoRAs and embeddings a prompt may
    name, read when asked."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_split, model_dir)
    handler = StableDiffusionHandler()
    handler.initialize(FakeContext(model_dir))
    describe = FakeContext(model_dir, [{"describe": "True"}])

    def described() -> dict[str, Any]:
        (response,) = handler.handle([{}], describe)  # what TorchServe sends: no body
        return json.loads(response)

    first = described()
    assert (first["model_hash"], first["inpainting"]) == (load_split(tiny_split).model_hash, False)
    assert (first["device"], first["dtype"], first["low_memory"]) == ("cpu", "float32", False)
    assert "vae" not in first and "fast_path" not in first  # the checkpoint's own VAE; no fast path on the CPU
    assert first["samplers"] == list(SAMPLERS)
    assert (first["defaults"]["H"], first["defaults"]["ddim_steps"], first["defaults"]["sampler"]) == (64, 3, "ddim")
    assert first["limits"]["max_pixels"] == 1024 * 1024 and first["limits"]["max_images"] == 8
    assert (first["loras"], first["embeddings"]) == ([], [])
    write_lora(model_dir / "loras" / "style" / "ink.safetensors", model_lora(load_split(model_dir)))
    (model_dir / "embeddings").mkdir()
    save_file({"emb_params": torch.ones(1, 32)}, str(model_dir / "embeddings" / "tinyneg.safetensors"))
    (model_dir / "embeddings" / "broken.pt").write_bytes(b"not an embedding")
    later = described()
    assert (later["loras"], later["embeddings"]) == (["ink"], ["tinyneg"])  # an unreadable file is no word
    assert describe.status == {}  # answered, not refused
    # A client's inference requests carrying the header are generated, the batch's other requests with them.
    responses, context = call(handler, [VALID, {**VALID, "seed": 6}], [{"describe": "True"}, {}])
    assert [json.loads(r)["seeds"] for r in responses] == [[5], [6]] and context.status == {}


def test_the_inference_api_describes_beside_a_batchs_generations(handler: StableDiffusionHandler) -> None:
    """`{"describe": true}` alone is the description, answered in place in its batch; any other body with the
    field is a request like any other, refused for the unknown field."""
    bodies = [VALID, {"describe": True}, {"describe": True, "prompt": "a"}, {"describe": 1}, {"describe": False}]
    responses, context = call(handler, bodies)
    assert json.loads(responses[0])["seeds"] == [5]
    described = json.loads(responses[1])
    assert described["sampler_names"]["euler_a"] == "Euler a" and described["upscalers"]["latent"] == "Latent"
    assert described["samplers"] == list(SAMPLERS) and "limits" in described
    assert context.status == {2: 400, 3: 400, 4: 400}
    assert [json.loads(r)["field"] for r in responses[2:]] == ["describe"] * 3
    # A form beside it is its own 415, as without it; describe rows alone are answered alone.
    form = FakeContext(Path(handler.context.system_properties["model_dir"]))
    responses = handler.handle([{"body": json.dumps({"describe": True}).encode()}, {"prompt": b"a form field"}], form)
    assert json.loads(responses[0])["samplers"] == list(SAMPLERS) and json.loads(responses[1])["field"] == "body"
    assert form.status == {1: 415}


def test_a_prompt_reads_the_loras_and_embeddings_of_the_model_folder(tiny_split: Path, tmp_path: Path) -> None:
    """`<lora:name:w>` finds name.safetensors in the model folder's `loras/`, and a word naming a file of its
    `embeddings/` stands for that embedding (handler.lora_dir's and embeddings_dir's defaults): the image is the
    pipeline's with those folders; absolute folders are read as they are. The PNG keeps the tag in its prompt, as
    A1111 writes it, with the LoRA's hash."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_split, model_dir)
    write_lora(model_dir / "loras" / "tiny-style.safetensors", model_lora(load_split(model_dir)))
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(8))
    (model_dir / "embeddings").mkdir()
    save_file({"emb_params": vectors}, str(model_dir / "embeddings" / "tinyneg.safetensors"))
    prompt, negative = "a red bicycle <lora:tiny-style:0.8>", "tinyneg, blurry"
    request = GenerationRequest(prompt, negative, height=64, width=64, steps=3, seed=5)
    folders = {"lora_dir": model_dir / "loras", "embeddings_dir": model_dir / "embeddings"}
    expected = Pipeline(load_split(model_dir), **folders).generate(request).images[0]
    plain = expected_pixels(tiny_split, dataclasses.replace(request, prompt="a red bicycle", negative_prompt=""))[0]
    assert np.abs(expected.astype(int) - plain).mean() > 1
    elsewhere = {"handler": {**SETTINGS["handler"], **{k: str(v) for k, v in folders.items()}}}
    for folder, settings in ((model_dir, SETTINGS), (tiny_split, elsewhere)):
        handler = StableDiffusionHandler()
        context = FakeContext(folder)
        context.model_yaml_config = settings
        handler.initialize(context)
        (response,), _ = call(handler, [{**VALID, "prompt": prompt, "negative_prompt": negative}])
        png = base64.b64decode(json.loads(response)["images"][0])
        assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), expected)
        parameters = read_parameters(png)
        assert parameters.startswith(f"{prompt}\nNegative prompt: {negative}\n")
        digest = short_hash(model_dir / "loras" / "tiny-style.safetensors")
        embedded = hashlib.sha256((model_dir / "embeddings" / "tinyneg.safetensors").read_bytes()).hexdigest()[:12]
        assert parameters.endswith(f', Lora hashes: "tiny-style: {digest}", TI hashes: "tinyneg: {embedded}"')
    without = Pipeline(load_split(model_dir), lora_dir=folders["lora_dir"]).generate(request).images[0]
    assert np.abs(expected.astype(int) - without).mean() > 1  # the embedding counted


def test_the_chunk_limit_counts_an_embeddings_vectors(handler: StableDiffusionHandler) -> None:
    """A short word standing for 75 vectors fills a chunk of its own: nine of them are nine chunks, past 8."""
    tokenizer = handler.pipeline.model.text_encoder.tokenizer
    wide = Embedding("wide", tuple(tokenizer.tokenize("wide")), torch.zeros(75, 32), "0" * 12)
    request = parse_request({"prompt": "wide " * 9, "emphasis": True}, handler.settings)
    check_chunks(request.generation, tokenizer, handler.settings, Vocabulary())
    with pytest.raises(RequestError, match="prompt: at most 8 chunks of 75 tokens with emphasis, got 9"):
        check_chunks(request.generation, tokenizer, handler.settings, Vocabulary([wide]))


def test_clip_skip_reads_an_earlier_clip_layer(handler: StableDiffusionHandler, tiny_split: Path) -> None:
    """The pipeline's image for clip skip 2, named in the JSON parameters and in the PNG as A1111 names it."""
    (response,), _ = call(handler, [{**VALID, "clip_skip": 2}])
    answer = json.loads(response)
    assert answer["parameters"]["clip_skip"] == 2
    png = base64.b64decode(answer["images"][0])
    request = GenerationRequest("a red bicycle", height=64, width=64, steps=3, seed=5, clip_skip=2)
    assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), expected_pixels(tiny_split, request)[0])
    assert "Clip skip: 2" in read_parameters(png)


def test_png_response_with_seed_header(handler: StableDiffusionHandler, tiny_split: Path) -> None:
    (response,), context = call(handler, [VALID], [{"accept": "image/png"}])
    assert context.response_headers[0]["content-type"] == "image/png"
    assert context.response_headers[0]["x-seed"] == "5"
    request = GenerationRequest("a red bicycle", height=64, width=64, steps=3, seed=5)
    assert np.array_equal(np.asarray(load_image(io.BytesIO(response))), expected_pixels(tiny_split, request)[0])


def test_a_cpu_worker_in_bf16_serves_bf16_images(tiny_split: Path) -> None:
    """`precision: bf16` reaches a CPU worker's model (channels-last there, as every bf16 CPU pipeline), and the
    answer is that model's image, within bf16's rounding of the float32 one."""
    context = FakeContext(tiny_split)
    context.model_yaml_config = {"handler": {**SETTINGS["handler"], "precision": "bf16"}}
    bf16 = StableDiffusionHandler()
    bf16.initialize(context)
    weight = bf16.pipeline.model.unet.input_blocks[0][0].weight
    assert (weight.dtype, weight.is_contiguous(memory_format=torch.channels_last)) == (torch.bfloat16, True)
    (response,), _ = call(bf16, [VALID], [{"accept": "image/png"}])
    request = GenerationRequest("a red bicycle", height=64, width=64, steps=3, seed=5)
    expected = Pipeline(load_split(tiny_split, dtype=torch.bfloat16)).generate(request).images[0]
    image = np.asarray(load_image(io.BytesIO(response)))
    assert np.array_equal(image, expected)
    assert BF16_MIN_PSNR_DB <= psnr(image, expected_pixels(tiny_split, request)[0]) < math.inf


@pytest.mark.parametrize(("precision", "amx", "hinted"), [("auto", True, True), ("fp32", True, True),
                                                          ("fp32", False, False), ("bf16", True, False)])  # fmt: skip
def test_a_cpu_worker_with_amx_says_bf16_would_be_faster(
    tiny_split: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, precision: str, amx: bool,
    hinted: bool,
) -> None:  # fmt: skip
    monkeypatch.setattr(sd_handler, "has_amx_bf16", lambda: amx)
    context = FakeContext(tiny_split)
    context.model_yaml_config = {"handler": {**SETTINGS["handler"], "precision": precision}}
    with caplog.at_level("INFO", logger=sd_handler.logger.name):
        StableDiffusionHandler().initialize(context)
    assert ("`precision: bf16` in model-config.yaml makes images about twice as fast" in caplog.text) is hinted


def test_missing_seed_is_drawn_and_reported(handler: StableDiffusionHandler) -> None:
    body = {k: v for k, v in VALID.items() if k != "seed"}
    (response,), _ = call(handler, [body])
    result = json.loads(response)
    assert result["parameters"]["seed"] == result["seeds"][0]


def test_img2img_size_defaults_to_the_init_image(handler: StableDiffusionHandler) -> None:
    init = png_base64(80, 64)
    (response,), _context = call(
        handler,
        [
            {
                "prompt": "tiles",
                "init_image": "data:image/png;base64," + init,
                "strength": 0.5,
                "ddim_steps": 4,
                "seed": 1,
            }
        ],
    )
    body = json.loads(response)
    assert (body["parameters"]["W"], body["parameters"]["H"], body["parameters"]["strength"]) == (80, 64, 0.5)


@pytest.mark.parametrize(
    ("width", "height", "sent", "size"),
    [
        (80, 64, {}, (80, 64)),  # its own size, as the original's
        (83, 70, {}, (80, 64)),  # rounded down to 8
        (80, 64, {"W": 128}, (128, 64)),  # a side sent is the request's; the other stays the image's
        # Over the limits (1024², 2048 a side): scaled to fit, its shape kept (3.0, 6.0, 4/3, 5.0), not each side
        # clamped (2048×683, 2048×496, refused for 12 megapixels, 64×200).
        (4096, 1366, {}, (1768, 584)),
        (3000, 500, {}, (2048, 336)),
        (4032, 3024, {}, (1176, 880)),
        (40, 200, {}, (64, 320)),  # up to the least side
        (4032, 3024, {"W": 1024}, (1024, 880)),
    ],
)
def test_img2img_size_defaults_to_the_init_images_within_the_limits(
    width: int, height: int, sent: dict[str, int], size: tuple[int, int]
) -> None:
    body = {"prompt": "x", "init_image": base64.b64encode(black_png(width, height, 8, 2)).decode(), **sent}
    generation = parse_request(body, parse_settings({})).generation
    assert (generation.width, generation.height) == size


def test_a_16_bit_colour_png_is_read_as_its_high_bytes() -> None:
    """PIL reads 16-bit RGB as 8-bit without a word, exactly: each value's high byte."""
    high = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint16)
    samples = (high << 8) | 0xA5  # low bytes that rounding would carry up
    image = decode_image(base64.b64encode(png_of(samples)).decode(), parse_settings({}))
    assert np.array_equal(np.asarray(image), high.astype(np.uint8))


def test_webp_and_base64_in_lines_are_read() -> None:
    """WebP (lossless here, so exactly), and base64 wrapped at 76 characters as `base64` writes it."""
    image = Image.new("RGB", (24, 8), (10, 200, 30))
    image.paste((250, 0, 90), (0, 0, 12, 8))
    encoded = image_base64(image)
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + "\n"
    for sent in (wrapped, image_base64(image, "WEBP", lossless=True)):
        assert np.array_equal(np.asarray(decode_image(sent, parse_settings({}))), np.asarray(image))


def test_a_mask_with_transparency_is_read_by_its_alpha() -> None:
    """A white stroke on transparent white (an editor's export) repaints the stroke, not everything."""
    alpha = Image.new("L", (8, 8))
    alpha.paste(255, (2, 2, 6, 6))
    mask = Image.merge("RGBA", [Image.new("L", (8, 8), 255)] * 3 + [alpha])
    decoded = decode_image(image_base64(mask), parse_settings({}), "mask_image")
    assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), np.asarray(alpha))
    assert decode_image(image_base64(mask), parse_settings({})).mode == "RGB"  # the init image: its colours


def test_inpainting_answers_the_pipelines_image(handler: StableDiffusionHandler, tiny_split: Path) -> None:
    """A mask (here an RGBA PNG, read as gray) beside the init image, with its blur: the image the pipeline paints
    for them. The server's default blur is A1111's 4, and a bad one in model-config.yaml is named there."""
    mask = Image.new("RGBA", (80, 64), (0, 0, 0, 255))
    mask.paste((255, 255, 255, 255), (0, 0, 40, 64))
    body = {"prompt": "tiles", "init_image": png_base64(80, 64), "mask_image": image_base64(mask), "seed": 4}
    (response,), context = call(handler, [{**body, "mask_blur": 2}])
    answer = json.loads(response)
    assert context.status == {} and answer["parameters"]["strength"] == 0.75
    assert answer["parameters"]["mask_blur"] == 2 and handler.settings.defaults.mask_blur == 4
    request = GenerationRequest(
        "tiles", height=64, width=80, steps=3, seed=4, init_image=load_image(io.BytesIO(base64.b64decode(
            body["init_image"]))), mask_image=mask, mask_blur=2,
    )  # fmt: skip
    png = base64.b64decode(answer["images"][0])
    assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), expected_pixels(tiny_split, request)[0])
    img2img = expected_pixels(tiny_split, dataclasses.replace(request, mask_image=None))[0]
    assert not np.array_equal(np.asarray(load_image(io.BytesIO(png))), img2img)


def test_only_masked_inpainting_answers_at_the_init_images_size(
    handler: StableDiffusionHandler, tiny_split: Path
) -> None:
    """A1111's names are taken for the inpaint area and the masked content: the box is painted at H×W and the answer
    is the pipeline's image at the init image's size, with its fields echoed."""
    mask = Image.new("L", (160, 96))
    mask.paste(255, (100, 30, 130, 50))
    body = {"prompt": "tiles", "init_image": png_base64(160, 96), "mask_image": image_base64(mask), "seed": 4,
            "H": 64, "W": 64, "inpaint_area": "Only masked", "masked_content": "latent noise",
            "masked_area_padding": 6}  # fmt: skip
    (response,), context = call(handler, [body])
    answer = json.loads(response)
    assert context.status == {}
    assert {k: answer["parameters"][k] for k in ("inpaint_area", "masked_content", "masked_area_padding", "H")} == {
        "inpaint_area": "only_masked", "masked_content": "latent_noise", "masked_area_padding": 6, "H": 64
    }  # fmt: skip
    request = GenerationRequest(
        "tiles", height=64, width=64, steps=3, seed=4, init_image=load_image(io.BytesIO(base64.b64decode(
            body["init_image"]))), mask_image=mask, inpaint_area="only_masked", masked_content="latent_noise",
        masked_area_padding=6,
    )  # fmt: skip
    png = np.asarray(load_image(io.BytesIO(base64.b64decode(answer["images"][0]))))
    assert png.shape == (96, 160, 3) and np.array_equal(png, expected_pixels(tiny_split, request)[0])


def test_hires_fix_answers_the_pipelines_larger_image(handler: StableDiffusionHandler, tiny_split: Path) -> None:
    """hr_scale: the pipeline's hires fix, its fields echoed as run (hr_steps 0 as the steps it ran), the image at
    the larger size; the server's default upscaler and steps, and a default of plms set aside as img2img's are."""
    body = {"prompt": "tiles", "seed": 4, "hr_scale": 1.5, "strength": 0.5, "sampler": "euler"}
    (response,), context = call(handler, [body])
    answer = json.loads(response)
    assert context.status == {}
    parameters = answer["parameters"]
    assert {k: parameters[k] for k in ("H", "W", "hr_scale", "hr_upscaler", "hr_steps", "strength")} == {
        "H": 64, "W": 64, "hr_scale": 1.5, "hr_upscaler": "latent", "hr_steps": 3, "strength": 0.5,
    }  # fmt: skip
    request = GenerationRequest("tiles", height=64, width=64, steps=3, seed=4, hr_scale=1.5, strength=0.5,
                                sampler="euler")  # fmt: skip
    pixels = np.asarray(load_image(io.BytesIO(base64.b64decode(answer["images"][0]))))
    assert pixels.shape == (96, 96, 3)
    assert np.array_equal(pixels, expected_pixels(tiny_split, request)[0])
    plain = json.loads(call(handler, [{"prompt": "tiles", "seed": 4}])[0][0])["parameters"]
    assert not {"hr_scale", "hr_upscaler", "hr_steps", "strength"} & set(plain)
    # A "Hires resize" is echoed in place of hr_scale, its image at that size.
    (response,), _ = call(handler, [{**body, "hr_scale": 1, "hr_resize_x": 80, "hr_resize_y": 72}])
    answer = json.loads(response)
    assert {k: answer["parameters"].get(k) for k in ("hr_scale", "hr_resize_x", "hr_resize_y")} == {
        "hr_scale": None, "hr_resize_x": 80, "hr_resize_y": 72,
    }  # fmt: skip
    resized = dataclasses.replace(request, hr_scale=1.0, hr_resize_x=80, hr_resize_y=72)
    pixels = np.asarray(load_image(io.BytesIO(base64.b64decode(answer["images"][0]))))
    assert pixels.shape == (72, 80, 3)
    assert np.array_equal(pixels, expected_pixels(tiny_split, resized)[0])
    settings = parse_settings({"handler": {"defaults": {"sampler": "plms", "hr_upscaler": "lanczos", "hr_steps": 9}}})
    hires = parse_request({"prompt": "x", "hr_scale": 2}, settings).generation
    assert (hires.sampler, hires.hr_upscaler, hires.hr_steps) == ("ddim", "lanczos", 9)
    # With a sampler of its own for the second pass, the first may be PLMS's; both, and its prompts, are echoed.
    own = {"prompt": "x", "hr_scale": 2, "hr_sampler": "Euler a", "hr_prompt": "y", "hr_negative_prompt": "z"}
    hires = parse_request(own, settings).generation
    assert (hires.sampler, hires.hr_sampler, hires.hr_prompt, hires.hr_negative_prompt) == ("plms", "euler_a", "y", "z")
    # A configured default η is DDIM's alone, in either pass; an error of the hires sampler's is not the default's.
    ddim = parse_settings({"handler": {"defaults": {"eta": 0.3}}})
    assert parse_request({**own, "sampler": "ddim", "hr_sampler": "euler"}, ddim).generation.eta == 0.0
    with pytest.raises(RequestError) as refused:
        parse_request({"prompt": "x", "hr_scale": 2, "hr_sampler": "euler", "eta": 0.5}, ddim)
    assert str(refused.value) == "eta is DDIM's: it must be 0 with hr_sampler euler, got 0.5"
    (response,), _ = call(handler, [{**body, **own, "prompt": "tiles"}])
    echoed = json.loads(response)["parameters"]
    assert {k: echoed.get(k) for k in own} == {**own, "prompt": "tiles", "hr_sampler": "euler_a"}
    resized = parse_request({"prompt": "x", "hr_resize_y": 128}, settings).generation
    assert (resized.sampler, resized.hr_resize_x, resized.hr_resize_y) == ("ddim", 0, 128)
    # A resize to the image's own size runs a second pass at that size, as in A1111 1.6, and so does a scale whose
    # int(side·scale) is the size: its sampler is the configured default's img2img one (not PLMS), and a cut too
    # small for a side is refused.
    generation = parse_request({"prompt": "x", "hr_scale": 1.001}, settings).generation
    assert generation.hires and generation.sampler == "ddim" and generation.hires_plan(8).size == (512, 512)
    with pytest.raises(RequestError, match="hr_resize_x 512 makes 512x32 images; each side at least 64 pixels"):
        parse_request({"prompt": "x", "hr_resize_x": 512, "hr_resize_y": 32}, settings)
    # A latent upscaler's upscale before the cut is within no limit, its image is: 512×768 to 1024×1024 (1024×1536
    # before the cut).
    cut = {"prompt": "x", "W": 512, "H": 768, "hr_resize_x": 1024, "hr_resize_y": 1024, "hr_upscaler": "latent"}
    assert parse_request(cut, settings).generation.hires_plan(8).size == (1024, 1024)
    with pytest.raises(RequestError, match="upscales the images to 1024x1536 to cut them to 1024x1024, 1572864 pix"):
        parse_request({**cut, "hr_upscaler": "lanczos"}, settings)


def test_variation_seeds_answer_each_images_seeds_and_parameters(
    handler: StableDiffusionHandler, tiny_split: Path
) -> None:
    """Every image keeps the seed, each has its variation seed (the JSON's `subseeds`, its PNG's parameters); a
    request without them answers no `subseeds`."""
    body = {"prompt": "tiles", "seed": 4, "n_samples": 2, "subseed": 70, "subseed_strength": 0.25}
    (response,), context = call(handler, [body])
    answer = json.loads(response)
    assert (answer["seeds"], answer["subseeds"]) == ([4, 4], [70, 71])
    assert context.response_headers[0]["x-seeds"] == "4,4"
    assert (answer["parameters"]["subseed"], answer["parameters"]["subseed_strength"]) == (70, 0.25)
    second = base64.b64decode(answer["images"][1])
    assert "Seed: 4, Size: 64x64, Model hash: " in read_parameters(second)
    assert "Variation seed: 71, Variation seed strength: 0.25" in read_parameters(second)
    request = GenerationRequest("tiles", height=64, width=64, steps=3, seed=4, n_samples=2, subseed=70,
                                subseed_strength=0.25)  # fmt: skip
    assert np.array_equal(np.asarray(load_image(io.BytesIO(second))), expected_pixels(tiny_split, request)[1])
    plain = json.loads(call(handler, [{"prompt": "tiles", "seed": 4, "subseed": 70}])[0][0])
    assert "subseeds" not in plain and "subseed" not in plain["parameters"] and plain["seeds"] == [4]


def test_a_seed_resize_answers_the_pipelines_image(handler: StableDiffusionHandler, tiny_split: Path) -> None:
    """The resize in the answer's parameters and its PNG's, and the pipeline's image; A1111's API sends -1 for none,
    which is none here too."""
    body = {"prompt": "tiles", "seed": 4, "W": 96, "seed_resize_from_h": 64, "seed_resize_from_w": 64}
    answer = json.loads(call(handler, [body])[0][0])
    assert (answer["parameters"]["seed_resize_from_h"], answer["parameters"]["seed_resize_from_w"]) == (64, 64)
    png = base64.b64decode(answer["images"][0])
    assert "Seed: 4, Size: 96x64, Model hash: " in read_parameters(png)
    assert ", Seed resize from: 64x64, RNG: CPU, " in read_parameters(png)
    request = GenerationRequest("tiles", height=64, width=96, steps=3, seed=4, seed_resize_from_h=64,
                                seed_resize_from_w=64)  # fmt: skip
    assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), expected_pixels(tiny_split, request)[0])
    off = json.loads(call(handler, [{**body, "seed_resize_from_h": -1, "seed_resize_from_w": -1}])[0][0])
    assert "seed_resize_from_h" not in off["parameters"]
    assert off["images"] == json.loads(call(handler, [{"prompt": "tiles", "seed": 4, "W": 96}])[0][0])["images"]
    assert off["images"] != answer["images"]


def test_tiling_answers_the_pipelines_wrapped_image(handler: StableDiffusionHandler, tiny_split: Path) -> None:
    (response,), _ = call(handler, [{"prompt": "bricks", "seed": 6, "tiling": True}])
    answer = json.loads(response)
    assert answer["parameters"]["tiling"] is True
    png = base64.b64decode(answer["images"][0])
    assert "Tiling: True" in read_parameters(png)
    request = GenerationRequest("bricks", height=64, width=64, steps=3, seed=6, tiling=True)
    assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), expected_pixels(tiny_split, request)[0])
    plain = json.loads(call(handler, [{"prompt": "bricks", "seed": 6}])[0][0])
    assert "tiling" not in plain["parameters"] and plain["images"] != answer["images"]


def test_batch_answers_each_request_with_its_own_images_and_errors_alone(handler, tiny_split: Path) -> None:
    bodies = [
        {"prompt": "one", "seed": 1, "H": 64, "W": 64},
        {"prompt": "bad", "ddim_steps": 0},
        {"prompt": "two", "seed": 2, "H": 72, "W": 64, "scale": 1.0},
        {"prompt": "three", "seed": 3, "H": 64, "W": 64, "negative_prompt": "fog " * 80},
    ]
    responses, context = call(handler, bodies)
    assert context.status == {1: 400}
    # Each answer's warnings are its own request's: the 80-token negative prompt's last 5 tokens went unread.
    assert [json.loads(responses[i])["warnings"] for i in (0, 2, 3)] == [
        [],
        [],
        ["negative_prompt: CLIP reads 75 tokens; the 5 after them were left out: fog fog fog fog fog"],
    ]
    pipeline = Pipeline(load_split(tiny_split))
    for index in (0, 2, 3):
        body = bodies[index]
        request = GenerationRequest(
            body["prompt"],
            body.get("negative_prompt", ""),
            body["H"],
            body["W"],
            3,
            body.get("scale", 7.5),
            seed=body["seed"],
        )
        alone = pipeline.generate(request).images[0]
        got = np.asarray(load_image(io.BytesIO(base64.b64decode(json.loads(responses[index])["images"][0]))))
        assert np.abs(got.astype(int) - alone).max() <= 1


def test_a_request_validation_fails_on_is_a_500_for_it_alone(
    handler: StableDiffusionHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in validating one request (here: an exception no rule expects) answers that request, not its batch."""
    validate = sd_handler.parse_request

    def broken_on_x(data: Any, *args: Any) -> Any:
        if b'"x"' in data:
            raise OverflowError("a bug")
        return validate(data, *args)

    monkeypatch.setattr(sd_handler, "parse_request", broken_on_x)
    responses, context = call(handler, [{"prompt": "x"}, VALID])
    assert context.status == {0: 500}
    assert json.loads(responses[0]) == {
        "error": "the server failed to read this request; its log says why",
        "field": "body",
    }
    assert json.loads(responses[1])["seeds"] == [5]


def test_metrics_are_recorded(handler: StableDiffusionHandler) -> None:
    _, context = call(handler, [VALID, {"prompt": 1}])
    names = {name: (value, dims) for name, value, dims in context.metrics.recorded}
    assert names["ImagesGenerated"][0] == 1
    assert names["UNetStepsPerSecond"][0] > 0
    assert names["FailedRequests"] == (1, {"ModelName": "tiny", "Level": "Model", "Reason": "Bad Request"})


def test_a_batch_out_of_gpu_memory_is_retried_request_by_request(
    handler: StableDiffusionHandler, tiny_split: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the request that cannot fit alone gets the 507: here the 128×128 one (its UNet batches are made to run
    out of memory), while the 64×64 request beside it, which ran out only in its company, gets its own image."""
    denoise = handler.pipeline.denoise
    calls: list[int] = []

    def tight(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(x.shape[-1])
        if x.shape[-1] == 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return denoise(x, *args, **kwargs)

    monkeypatch.setattr(handler.pipeline, "denoise", tight)
    small, big = {**VALID, "seed": 11}, {**VALID, "H": 128, "W": 128, "n_samples": 2}
    responses, context = call(handler, [big, small, {"prompt": 1}])
    assert context.status == {0: 507, 2: 400}
    assert "out of GPU memory" in json.loads(responses[0])["error"]
    answer = json.loads(responses[1])
    assert answer["seeds"] == [11]
    got = np.asarray(load_image(io.BytesIO(base64.b64decode(answer["images"][0]))))
    alone = expected_pixels(tiny_split, GenerationRequest("a red bicycle", "", 64, 64, 3, seed=11))[0]
    assert np.abs(got.astype(int) - alone).max() <= 1
    # The batch failed on its first group (the 128-wide latents), then each request ran alone.
    assert calls == [16, 16, 8]


def test_a_worker_error_met_alone_after_a_retry_fails_that_request_alone(
    handler: StableDiffusionHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch out of memory is retried request by request; one that then fails for the worker's reason (a cuDNN
    error, not the request's) gets a 500, and its neighbour keeps the image it got."""
    denoise = handler.pipeline.denoise
    errors = iter([torch.cuda.OutOfMemoryError("CUDA out of memory"), RuntimeError("cuDNN error: INTERNAL_ERROR")])

    def failing(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[-1] == 16:
            raise next(errors)
        return denoise(x, *args, **kwargs)

    monkeypatch.setattr(handler.pipeline, "denoise", failing)
    responses, context = call(handler, [{**VALID, "H": 128, "W": 128}, {**VALID, "seed": 11}])
    assert context.status == {0: 500}
    assert json.loads(responses[0])["error"] == "generation failed; the server log has the details"
    assert json.loads(responses[1])["seeds"] == [11]


def test_settings_reject_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(SettingsError, match="unknown keys"):
        parse_settings({"handler": {"limits": {"max_stepz": 3}}})
    with pytest.raises(SettingsError, match="max_steps: expected int"):
        parse_settings({"handler": {"limits": {"max_steps": "3"}}})
    with pytest.raises(SettingsError, match="preview_every: 0 \\(never\\) or more, got -1"):
        parse_settings({"handler": {"preview_every": -1}})
    # YAML's true is no number, and 1 no switch.
    for section, message in (
        ({"defaults": {"scale": True}}, "handler.defaults.scale: expected float, got True"),
        ({"limits": {"max_steps": True}}, "handler.limits.max_steps: expected int, got True"),
        ({"low_memory": 1}, "handler.low_memory: expected bool, got 1"),
    ):
        with pytest.raises(SettingsError, match=re.escape(message)):
            parse_settings({"handler": section})
    assert parse_settings({"handler": {"defaults": {"scale": 7}}}).defaults.scale == 7.0
    assert parse_settings({"handler": {"preview_every": 0}}).preview_every == 0
    assert parse_settings({"handler": {"limits": {"min_side": 512, "max_side": 512}}}).limits.min_side == 512
    assert parse_settings(None).limits.max_images == 8
    assert parse_settings(None).preview_every == 5
    # A setting that would fail every batch later fails the worker's start now, saying which and why.
    for section, message in (
        ({"max_batch_images": 0}, "handler.max_batch_images: 1 or more, got 0"),
        ({"limits": {"max_images": 0}}, "handler.limits: max_images must be at least 1, got 0"),
        ({"limits": {"max_scale": -1.0}}, "handler.limits: max_scale must be at least 0, got -1.0"),
        ({"limits": {"min_side": 512, "max_side": 256}}, "handler.limits: min_side 512 is above max_side 256"),
        ({"limits": {"max_eta": 1.5}}, "handler.limits: max_eta must be at most 1, got 1.5"),
    ):
        with pytest.raises(SettingsError, match=re.escape(message)):
            parse_settings({"handler": section})
    steps = parse_settings({"handler": {"limits": {"max_steps": 1000}}})
    message = "handler.limits.max_steps: at most 999 for this model, got 1000"
    with pytest.raises(SettingsError, match=re.escape(message)):
        check_against_model(steps, 1000)
    check_against_model(parse_settings({"handler": {"limits": {"max_steps": 999}}}), 1000)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"defaults": {"H": 4096}}, "H: a request that leaves H out would be refused: H must be between 64 and 2048 "),
        ({"defaults": {"H": 512}, "limits": {"max_side": 256}}, "H must be between 64 and 256 pixels, got 512"),
        ({"defaults": {"W": 100}}, "handler.defaults.W: a request that leaves W out would be refused: W must be a "),
        (
            {"defaults": {"H": 1024, "W": 2048}},
            "handler.defaults.W: a request that leaves W out would be refused: H×W must",
        ),
        ({"defaults": {"ddim_steps": 151}}, "ddim_steps must be between 1 and 150, got 151"),
        ({"defaults": {"n_samples": 4, "n_iter": 4}}, "n_samples×n_iter must be at most 8 images, got 16"),
        ({"defaults": {"scale": 51.0}}, "handler.defaults.scale: a request that leaves scale out would be refused"),
        ({"defaults": {"eta": 0.5}, "limits": {"max_eta": 0.25}}, "eta must be in [0.0, 0.25], got 0.5"),
        ({"defaults": {"strength": 0.0}}, "handler.defaults.strength: a request that leaves strength out would be"),
        ({"defaults": {"strength": 0.01}}, "strength 0.01 × ddim_steps 50 leaves no denoising step"),
        ({"defaults": {"sampler": "euler", "eta": 0.5}, "limits": {"max_eta": 0.25}}, "eta must be in [0.0, 0.25]"),
        ({"defaults": {"sampler": "k_euler"}}, "handler.defaults.sampler: a request that leaves sampler out would be"),
        ({"defaults": {"clip_skip": 0}}, "clip_skip must be between 1 and 12, got 0"),
        ({"defaults": {"clip_skip": 4}}, "clip_skip must be in [1, 3] (this model's CLIP layers), got 4"),
        ({"defaults": {"mask_blur": 65}}, "handler.defaults.mask_blur: a request that leaves mask_blur out would be"),
        ({"defaults": {"hr_upscaler": "esrgan"}}, "hr_upscaler 'esrgan' is not available; choose one of: latent,"),
        ({"defaults": {"hr_steps": 151}}, "hr_steps must be between 0 and 150, got 151"),
        (
            {"defaults": {"emphasis": True, "weighted_subprompts": True}},
            "handler.defaults.emphasis: a request that leaves emphasis out would be refused: emphasis and ",
        ),
    ],
)
def test_a_default_that_no_request_may_leave_out_stops_the_worker(
    tiny_split: Path, section: dict[str, Any], message: str
) -> None:
    """A default the limits or the model refuse would have every request that leaves its field out answered with a
    400 for a field it never sent: the worker's start fails instead, naming the setting."""
    context = FakeContext(tiny_split)
    context.model_yaml_config = {"handler": section}
    with pytest.raises(SettingsError, match=re.escape(message)):
        StableDiffusionHandler().initialize(context)


@pytest.mark.parametrize(
    "defaults",
    [
        {"H": 2048, "W": 512},
        {"ddim_steps": 150, "hr_steps": 150},
        {"n_samples": 2, "n_iter": 4},
        {"clip_skip": 3},
        {"scale": 50.0, "eta": 1.0},
        {"mask_blur": 64},
    ],
)
def test_a_default_at_its_limit_is_one_a_request_may_leave_out(
    tiny_model: StableDiffusion, defaults: dict[str, Any]
) -> None:
    """The limits are inclusive for the defaults as for requests (the tiny model's CLIP has 3 layers)."""
    check_defaults(parse_settings({"handler": {"defaults": defaults}}), tiny_model)


def test_the_shipped_and_the_tests_defaults_are_what_a_request_may_leave_out(tiny_model: StableDiffusion) -> None:
    """The settings the server ships with and those these tests serve pass the check that stops a worker."""
    for settings in (
        parse_settings(yaml.safe_load((ROOT / "model-config.yaml").read_text())),
        parse_settings(SETTINGS),
    ):
        check_defaults(settings, tiny_model)


def test_the_worker_ends_itself_a_moment_after_a_gpu_fault() -> None:
    """`_exit_soon` returns at once (the batch's answers still to be sent) and ends the process RESTART_AFTER_S later,
    whatever its main thread is doing: TorchServe reads the exit as a dead worker and starts another."""
    script = (
        "import time\nfrom handler import sd_handler\nsd_handler._exit_soon()\nprint('returned', flush=True)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == "returned\n", done.stderr
    assert time.monotonic() - started < 30


def test_a_gpu_fault_answers_503s_and_ends_the_worker_for_torchserve_to_replace(
    tiny_split: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA fault that is not memory leaves the process's CUDA context unusable: the batch is answered 503 at once
    (no request tried again alone), the worker's end is scheduled once, and every later request is a 503 without
    touching the GPU. A CUDA out-of-memory error, also an AcceleratorError, stays a 507 and ends nothing."""
    faulty = StableDiffusionHandler()
    faulty.initialize(FakeContext(tiny_split))
    exits: list[bool] = []
    calls: list[int] = []
    monkeypatch.setattr(sd_handler, "_exit_soon", lambda: exits.append(True))

    def fault(requests: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(len(requests))
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    def exhausted(requests: Any, *args: Any, **kwargs: Any) -> None:
        raise torch.AcceleratorError("CUDA error: out of memory")

    monkeypatch.setattr(faulty.pipeline, "generate_many", exhausted)
    (response,), context = call(faulty, [VALID])
    assert context.status == {0: 507} and json.loads(response)["error"].startswith("out of GPU memory") and exits == []
    monkeypatch.setattr(faulty.pipeline, "generate_many", fault)
    responses, context = call(faulty, [VALID, {**VALID, "seed": 6}, {"prompt": 1}])
    assert context.status == {0: 503, 1: 503, 2: 400}
    assert json.loads(responses[0]) == {"error": "the GPU failed; this worker restarts: retry in a minute", "field": ""}
    assert calls == [2] and exits == [True]
    (response,), context = call(faulty, [VALID])
    assert context.status == {0: 503} and json.loads(response)["error"].startswith("the GPU failed")
    assert calls == [2] and exits == [True]


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of GPU memory"),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
            "out of GPU memory",
        ),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "out of GPU memory"),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"),
            "out of GPU memory",
        ),
        (RuntimeError("CUDA error: out of memory"), "out of GPU memory"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes."),
            "out of host memory",
        ),
        (MemoryError(), "out of host memory"),  # Python's own: numpy's or PIL's allocation
    ],
    ids=["allocator", "cublas", "cudnn", "cublas-handle", "runtime", "cpu", "python"],
)
def test_out_of_memory_is_a_507_and_the_handler_serves_on(
    handler: StableDiffusionHandler, monkeypatch: pytest.MonkeyPatch, error: Exception, says: str
) -> None:
    """No GPU here: the pipeline is made to raise what PyTorch's allocator, cuBLAS, cuDNN, the CUDA runtime or the
    CPU allocator raise when memory runs out."""

    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise error

    with monkeypatch.context() as patch:
        patch.setattr(handler.pipeline, "generate_many", exhausted)
        responses, context = call(handler, [VALID, {"prompt": 1}])
    assert context.status == {0: 507, 1: 400}
    assert says in json.loads(responses[0])["error"]
    (response,), context = call(handler, [VALID])
    assert context.status == {} and json.loads(response)["seeds"] == [5]


def test_a_request_that_meets_a_fault_of_the_workers_fails_alone(
    handler: StableDiffusionHandler, monkeypatch: pytest.MonkeyPatch, tiny_split: Path
) -> None:
    """Not the request's fault, nor memory (a bug met by one request): the batch is generated again request by
    request, the one that meets it answers a 500 JSON (not a 507), and its neighbours get their images and their
    400s, where TorchServe would have answered them all with its own 503. A fault the first request alone meets again
    is taken for one every request meets: a 500 for each, without trying each."""
    real = handler.pipeline.generate_many

    def broken_on_seed_6(requests: Any, *args: Any, **kwargs: Any) -> Any:
        if any(request.seed == 6 for request in requests):
            raise RuntimeError("a bug that seed 6 meets")
        return real(requests, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(handler.pipeline, "generate_many", broken_on_seed_6)
        responses, context = call(handler, [VALID, {**VALID, "seed": 6}, {"prompt": 1}])
    assert context.status == {1: 500, 2: 400}
    assert json.loads(responses[1]) == {"error": "generation failed; the server log has the details", "field": ""}
    request = GenerationRequest("a red bicycle", height=64, width=64, steps=3, seed=5)
    png = base64.b64decode(json.loads(responses[0])["images"][0])
    assert np.array_equal(np.asarray(load_image(io.BytesIO(png))), expected_pixels(tiny_split, request)[0])

    calls: list[int] = []

    def broken(requests: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(len(requests))
        raise RuntimeError("a bug every request meets")

    with monkeypatch.context() as patch:
        patch.setattr(handler.pipeline, "generate_many", broken)
        responses, context = call(handler, [VALID, {**VALID, "seed": 6}, {**VALID, "seed": 7}])
    # The first request alone meets the batch's very fault: the others are answered it untried.
    assert context.status == {0: 500, 1: 500, 2: 500} and calls == [3, 1]
    (response,), context = call(handler, [VALID])
    assert context.status == {} and json.loads(response)["seeds"] == [5]
