"""AUTOMATIC1111's API on the front (front/a1111.py) against the stand-in TorchServe of tests/test_front_offline.py:
what each A1111 request is sent to TorchServe as, what is refused, and the answer's shape. Against a real TorchServe,
its images: tests/test_front.py."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from front import a1111_progress
from front.a1111 import png_parameters
from front.a1111_progress import Job, Jobs
from front.app import create_app
from front.settings import FrontSettings
from front.upstream import NDJSON
from handler.description import describe
from handler.settings import parse_settings
from ldm.embeddings import Embedding, Vocabulary
from ldm.png_info import encode_with_parameters
from tests.test_front_offline import FakeInference, ParsingInference

TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"


@pytest.fixture
def fake() -> FakeInference:
    return FakeInference()


@pytest.fixture
def client(fake: FakeInference) -> Iterator[TestClient]:
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(fake))) as test_client:
        yield test_client


def test_a_txt2img_request_of_every_translated_field(client: TestClient, fake: FakeInference) -> None:
    body = {
        "prompt": "a castle AND a lake:0.5", "negative_prompt": "blurry", "seed": 7.0, "subseed": 30,
        "subseed_strength": 0.2, "seed_resize_from_h": 512, "seed_resize_from_w": -1, "sampler_name": "DPM++ 2M",
        "scheduler": "karras", "steps": 20, "cfg_scale": 6.5, "width": 768, "height": 512, "batch_size": 2,
        "n_iter": 2, "tiling": 1, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic)",
        "hr_second_pass_steps": 10, "denoising_strength": 0.55, "hr_prompt": "a castle AND a lake:0.5",
        "hr_sampler_name": "Use same sampler", "override_settings": {"CLIP_stop_at_last_layers": 2.0,
        "samples_save": False}, "save_images": True, "s_noise": 1, "restore_faces": False, "styles": None,
    }  # fmt: skip
    response = client.post(TXT2IMG, json=body)
    assert response.status_code == 200, response.text
    first = {
        "emphasis": True, "sampler": "DPM++ 2M Karras", "clip_skip": 2, "ddim_steps": 20, "scale": 6.5, "W": 768,
        "H": 512, "n_samples": 2, "prompt": "a castle AND a lake:0.5", "negative_prompt": "blurry", "n_iter": 1,
        "subseed_strength": 0.2, "seed_resize_from_h": 512, "seed_resize_from_w": -1, "seed": 7, "subseed": 30,
        "tiling": True, "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic)", "hr_steps": 10, "strength": 0.55,
    }  # fmt: skip
    # One request per batch (n_iter), the variation seed counting on from the last batch's.
    assert fake.sent() == [first, {**first, "subseed": 32}]
    assert type(fake.sent()[0]["clip_skip"]) is int  # 2.0 == 2 above, but the handler refuses a float clip skip
    answer = response.json()
    assert answer["images"] == ["png7", "png7", "png7", "png7"] and answer["parameters"] == body
    info = json.loads(answer["info"])
    assert (info["seed"], info["all_seeds"], info["subseed"], info["all_subseeds"]) == (
        7,
        [7] * 4,
        30,
        [30, 31, 32, 33],
    )
    assert (info["width"], info["height"], info["sampler_name"], info["cfg_scale"]) == (
        768,
        512,
        "DPM++ 2M Karras",
        6.5,
    )
    assert info["infotexts"] == [""] * 4  # the stand-in's images are no PNGs


def test_a1111s_defaults_not_the_servers(client: TestClient, fake: FakeInference) -> None:
    """Euler, 50 steps, scale 7, 512×512, one image, clip skip 1 (A1111's API defaults, whatever this server's
    handler.defaults say); a seed of -1 is drawn by the front, as `/imagine` draws one; without enable_hr the hires
    fields are not sent."""
    client.post(TXT2IMG, json={"seed": -1, "subseed": -1, "hr_scale": 2, "denoising_strength": 0.3, "eta": 0.4})
    sent = fake.sent()[0]
    assert 0 <= sent.pop("seed") <= 2**32 - 64  # room for FrontSettings' max_images of seeds after it
    assert sent == {
        "emphasis": True, "sampler": "Euler", "clip_skip": 1, "ddim_steps": 50, "scale": 7.0, "W": 512, "H": 512,
        "n_samples": 1, "prompt": "", "n_iter": 1,
    }  # fmt: skip
    client.post(TXT2IMG, json={"seed": 3, "enable_hr": True, "hr_upscaler": "None", "sampler_index": "DDIM"})
    assert {k: fake.sent()[1][k] for k in ("sampler", "eta", "hr_scale", "hr_upscaler", "hr_steps", "strength")} == {
        "sampler": "DDIM", "eta": 0.0, "hr_scale": 2.0, "hr_upscaler": "Lanczos", "hr_steps": 0, "strength": 0.75
    }  # fmt: skip
    # "Hires resize": its sides in place of the scale, which A1111 then does not read (its UI sends both); a side
    # sent as a float whole number is read as one, a side of 0 left to the handler's default.
    client.post(TXT2IMG, json={"enable_hr": True, "hr_scale": 2, "hr_resize_x": 1024.0, "hr_resize_y": 0})
    assert {k: fake.sent()[2].get(k) for k in ("hr_scale", "hr_resize_x", "hr_resize_y")} == {
        "hr_scale": None, "hr_resize_x": 1024, "hr_resize_y": None,
    }  # fmt: skip
    client.post(TXT2IMG, json={"hr_resize_x": 1024, "hr_resize_y": 768})  # without enable_hr: not read
    assert not {"hr_scale", "hr_resize_x", "hr_resize_y"} & set(fake.sent()[3])
    # At 1×, A1111 1.6 runs a second pass at the same size: sent as a resize to it (our hr_scale 1 is none).
    client.post(TXT2IMG, json={"enable_hr": True, "hr_scale": 1, "width": 640, "height": 448})
    assert {k: fake.sent()[4].get(k) for k in ("hr_scale", "hr_resize_x", "hr_resize_y")} == {
        "hr_scale": None, "hr_resize_x": 640, "hr_resize_y": 448,
    }  # fmt: skip
    # No hr_upscaler: A1111's default latent upscale mode ("Latent", its latent_upscale_default_mode setting).
    client.post(TXT2IMG, json={"seed": 3, "enable_hr": True})
    assert fake.sent()[5]["hr_upscaler"] == "Latent"
    # A null is a field left out: A1111's default, not a null the handler would fill with this server's.
    nulls = {"steps": None, "cfg_scale": None, "width": None, "height": None, "batch_size": None, "n_iter": None}
    client.post(TXT2IMG, json={"seed": 3, **nulls})
    assert {k: fake.sent()[6][k] for k in ("ddim_steps", "scale", "W", "H", "n_samples", "n_iter")} == {
        "ddim_steps": 50, "scale": 7.0, "W": 512, "H": 512, "n_samples": 1, "n_iter": 1,
    }  # fmt: skip


@pytest.mark.parametrize(("side", "painted"), [(520, 520), (527, 520), (1000, 1000), (4, 4)])
def test_a_side_is_painted_at_its_latents_size(
    client: TestClient, fake: FakeInference, side: int, painted: int
) -> None:
    """A1111 paints 8·⌊side/8⌋ pixels, its latent's side // 8 times 8 (520 stays, 527 is 520); a side under 8 has no
    latent at all and goes as sent, for the handler to refuse naming it."""
    assert client.post(TXT2IMG, json={"seed": 1, "width": side, "height": side}).status_code == 200
    assert (fake.sent()[0]["W"], fake.sent()[0]["H"]) == (painted, painted)


def test_batches_are_one_request_each_their_seeds_counting_on(client: TestClient, fake: FakeInference) -> None:
    """12 images (more than TorchServe's 8 a request) as 3 requests of 4, as `/imagine` splits them; A1111's answer
    and info hold them all; past the front's `max_images` (64) refused."""
    response = client.post(TXT2IMG, json={"prompt": "a fox", "seed": 100, "batch_size": 4, "n_iter": 3})
    assert response.status_code == 200, response.text
    assert [(body["seed"], body["n_samples"], body["n_iter"]) for body in fake.sent()] == [
        (100, 4, 1), (104, 4, 1), (108, 4, 1)
    ]  # fmt: skip
    answer = response.json()
    info = json.loads(answer["info"])
    assert answer["images"] == [f"png{seed}" for seed in range(100, 112)]
    assert (info["all_seeds"], info["batch_size"], info["seed"]) == (list(range(100, 112)), 4, 100)
    refused = client.post(TXT2IMG, json={"seed": 1, "batch_size": 8, "n_iter": 9})
    assert refused.status_code == 400 and refused.json() == {
        "error": "batch_size×n_iter must be at most 64 images, got 72", "field": "n_iter",
        "detail": "batch_size×n_iter must be at most 64 images, got 72",
    }  # fmt: skip
    assert len(fake.bodies) == 3


@pytest.mark.parametrize(
    ("sampler", "scheduler", "sent"),
    [
        ("DPM++ 2M", None, "DPM++ 2M"),  # 1.6: the name is the schedule
        ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),  # 1.9's default for it
        ("Euler a", "Automatic", "Euler a"),
        ("DPM++ 2M Karras", "Uniform", "DPM++ 2M"),
        ("DPM2 a", "Karras", "DPM2 a Karras"),
        ("DPM2 a", "Automatic", "DPM2 a Karras"),  # each of 1.9's Karras defaults
        ("DPM2", "Automatic", "DPM2 Karras"),
        ("DPM++ SDE", "Automatic", "DPM++ SDE Karras"),
        ("DPM++ 2S a", "Automatic", "DPM++ 2S a Karras"),
        ("DPM++ 2M", "", "DPM++ 2M Karras"),  # a name A1111 lacks is its Automatic
        ("DDIM", "Karras", "DDIM"),  # A1111's DDIM and PLMS run their own timesteps, whatever the scheduler
        ("PLMS", "Automatic", "PLMS"),
    ],
)
def test_schedulers_as_a1111_picks_them(client: TestClient, fake: FakeInference, sampler: str, scheduler: Any,
                                        sent: str) -> None:  # fmt: skip
    client.post(TXT2IMG, json={"seed": 1, "sampler_name": sampler, "scheduler": scheduler})
    assert fake.sent()[0]["sampler"] == sent


@pytest.mark.parametrize(
    ("sampler", "eta", "sent"),
    [("DDIM", 0.3, 0.3), ("Euler a", 1, None), ("Euler a", None, None), ("Euler", 0.5, None), ("PLMS", 0, None)],
)
def test_eta_as_a1111_runs_it(client: TestClient, fake: FakeInference, sampler: str, eta: Any, sent: Any) -> None:
    """DDIM's η is sent; the ancestral samplers run at A1111's default η of 1; the others have none."""
    client.post(TXT2IMG, json={"seed": 1, "sampler_name": sampler, "eta": eta})
    assert fake.sent()[0].get("eta") == sent


def test_the_hires_fixs_own_prompts_and_sampler(client: TestClient, fake: FakeInference) -> None:
    """Sent where they differ from the first pass's, the sampler with the request's scheduler (1.9's "Use same
    scheduler"); without enable_hr, ignored, as A1111 ignores them."""
    own = {"prompt": "a fox", "negative_prompt": "blur", "sampler_name": "Euler", "scheduler": "Karras",
           "hr_prompt": "a wolf", "hr_negative_prompt": "fog", "hr_sampler_name": "DPM++ 2M"}  # fmt: skip
    assert client.post(TXT2IMG, json={**own, "seed": 1, "enable_hr": True}).status_code == 200
    assert client.post(TXT2IMG, json={**own, "seed": 1}).status_code == 200
    same = {"hr_prompt": "a fox", "hr_negative_prompt": "", "hr_sampler_name": "Use same sampler", "enable_hr": True}
    assert client.post(TXT2IMG, json={**own, **same, "seed": 1}).status_code == 200
    assert client.post(TXT2IMG, json={"seed": 1, "enable_hr": True, "hr_sampler_name": "Euler"}).status_code == 200
    with_hires, without, repeated, named_alike = fake.sent()
    assert {k: with_hires[k] for k in ("sampler", "hr_sampler", "hr_prompt", "hr_negative_prompt")} == {
        "sampler": "Euler Karras", "hr_sampler": "DPM++ 2M Karras", "hr_prompt": "a wolf", "hr_negative_prompt": "fog"
    }  # fmt: skip
    for sent in (without, repeated, named_alike):
        assert not {"hr_prompt", "hr_negative_prompt", "hr_sampler"} & set(sent)
    assert repeated["hr_scale"] == 2.0 and "hr_scale" not in without
    # 1.9's hr_scheduler: the hires sampler's own schedule (here the first pass's sampler under another schedule).
    body = {"seed": 1, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "enable_hr": True, "hr_scheduler": "Uniform"}
    assert client.post(TXT2IMG, json=body).status_code == 200
    assert (fake.sent()[-1]["sampler"], fake.sent()[-1]["hr_sampler"]) == ("DPM++ 2M Karras", "DPM++ 2M")
    body = {**body, "hr_sampler_name": "DPM2", "hr_scheduler": "Use same scheduler"}
    assert client.post(TXT2IMG, json=body).status_code == 200 and fake.sent()[-1]["hr_sampler"] == "DPM2 Karras"
    # A DDIM pass beside another sampler's runs at A1111's default η, 0.
    body = {"seed": 1, "sampler_name": "Euler a", "enable_hr": True, "hr_sampler_name": "DDIM"}
    assert client.post(TXT2IMG, json=body).status_code == 200
    assert (fake.sent()[-1]["hr_sampler"], fake.sent()[-1]["eta"]) == ("DDIM", 0.0)


def test_values_are_read_as_a1111s_api_converts_them(client: TestClient, fake: FakeInference) -> None:
    """Pydantic 1's conversions, which A1111's API runs: integers from strings and truncated floats, numbers from
    strings, flags from words; sides not a multiple of 8 painted as A1111 paints them, at the latent's 8·⌊side/8⌋."""
    body = {"seed": "42", "steps": 20.9, "cfg_scale": "6.5", "tiling": "false", "enable_hr": "Yes", "width": "516",
            "height": 519.5, "batch_size": True, "restore_faces": "off", "hr_second_pass_steps": "3"}  # fmt: skip
    assert client.post(TXT2IMG, json=body).status_code == 200
    sent = fake.sent()[0]
    assert {k: sent.get(k) for k in ("seed", "ddim_steps", "scale", "tiling", "W", "H", "n_samples", "hr_steps")} == {
        "seed": 42, "ddim_steps": 20, "scale": 6.5, "tiling": None, "W": 512, "H": 512, "n_samples": 1, "hr_steps": 3,
    }  # fmt: skip
    assert sent["hr_scale"] == 2.0


@pytest.mark.parametrize(
    ("word", "tiling"),
    [*((word, True) for word in ("1", "on", "t", "true", "y", "yes", "TRUE", "Yes", 1, True)),
     *((word, None) for word in ("0", "off", "f", "false", "n", "no", "FALSE", "Off", 0, False))],
)  # fmt: skip
def test_a_flag_is_read_from_each_of_pydantic_1s_words(
    client: TestClient, fake: FakeInference, word: Any, tiling: Any
) -> None:
    """Pydantic 1 (A1111's API) reads a flag from any case of 1, on, t, true, y, yes and 0, off, f, false, n, no,
    and from the numbers 1 and 0."""
    assert client.post(TXT2IMG, json={"seed": 1, "tiling": word}).status_code == 200
    assert fake.sent()[0].get("tiling") is tiling


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"seed": 1, "steps": Infinity}', "steps"),  # JSON as Python reads it; no integer: pydantic refuses it
        (b'{"seed": 1, "sampler_name": 5, "scheduler": "Karras"}', "sampler_name"),
        (b'{"seed": 1, "enable_hr": true, "hr_scale": 100}', "hr_scale"),
        (b'{"seed": 1, "steps": 1000}', "steps"),
    ],
)
def test_a_value_refused_here_or_by_the_handler_is_a_400_in_a1111s_words(body: bytes, field: str) -> None:
    """Refused by the front or by TorchServe's handler (its own parser, as shipped), never a 500: the field and the
    message as A1111 names them, and only whole names renamed (hr_scale is A1111's too, not hr_cfg_scale)."""
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(ParsingInference()))) as test_client:
        response = test_client.post(TXT2IMG, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["field"] == field
    assert re.match(r"\w+", response.json()["error"]).group() == field  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "settings",
    [
        {"sd_model_checkpoint": "sd [8e79c1729f]", "sd_vae": "Automatic", "eta_noise_seed_delta": 0},
        {"sd_model_checkpoint": "8e79c1729f", "sd_vae": "None", "CLIP_stop_at_last_layers": 2, "samples_format": "png"},
    ],
)
def test_override_settings_naming_what_is_served_change_nothing(
    client: TestClient, fake: FakeInference, settings: dict[str, Any]
) -> None:
    """As clients send them with every request: the served model, its VAE (or A1111's default, Automatic), an option
    at the value it has here; clip skip is the request's."""
    assert client.post(TXT2IMG, json={"seed": 1, "override_settings": settings}).status_code == 200
    assert fake.sent()[0] == {"describe": True}
    assert fake.sent()[1]["clip_skip"] == settings.get("CLIP_stop_at_last_layers", 1)
    assert client.post("/sdapi/v1/options", json=settings | {"CLIP_stop_at_last_layers": 1}).status_code == 200


def test_extensions_sent_turned_off_are_left_out(client: TestClient, fake: FakeInference) -> None:
    scripts = {"ControlNet": {"args": [{"enabled": False, "module": "canny"}]}, "ADetailer": {"args": [False]},
               "Dynamic Prompts": {"args": []}}  # fmt: skip
    assert client.post(TXT2IMG, json={"seed": 1, "alwayson_scripts": scripts}).status_code == 200


def test_what_clients_ask_at_start_is_answered(client: TestClient) -> None:
    """Their health checks and feature probes: no command-line flags, scripts or extensions here."""
    assert client.get("/sdapi/v1/cmd-flags").json() == {}
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/script-info").json() == [] and client.get("/sdapi/v1/extensions").json() == []


def test_the_info_holds_every_key_a1111_writes(client: TestClient, fake: FakeInference) -> None:
    """Its `Processed.js` keys, the model by TorchServe's name and the VAE and kind from the description."""
    client.get("/sdapi/v1/options")  # the front's copy of the description
    fake.described = {**fake.described, "vae": {"name": "mse.safetensors", "hash": "0a1b"}}
    client.post("/sdapi/v1/refresh-vae")
    info = json.loads(client.post(TXT2IMG, json={"seed": 1}).json()["info"])
    assert set(info) == {
        "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
        "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
        "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
        "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
        "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
        "is_using_inpainting_conditioning", "version",
    }  # fmt: skip
    assert (info["sd_model_name"], info["sd_vae_name"], info["sd_vae_hash"]) == ("sd", "mse.safetensors", "0a1b")
    assert info["is_using_inpainting_conditioning"] is False and re.fullmatch(r"\d{14}", info["job_timestamp"])


def test_the_info_of_a_plain_request_says_what_a1111_says(client: TestClient, fake: FakeInference) -> None:
    """As A1111's `Processed.js`: a prompt per image of every batch, the negative prompt "" when none was sent,
    the steps run, and a seed resize's sides -1 (its API's default: none) and a variation strength 0 when not sent."""
    body = {"prompt": "a fox", "seed": 3, "batch_size": 2, "n_iter": 2, "steps": 20}
    info = json.loads(client.post(TXT2IMG, json=body).json()["info"])
    said = ("prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "steps", "seed_resize_from_w",
            "seed_resize_from_h", "subseed_strength", "batch_size")  # fmt: skip
    assert {k: info[k] for k in said} == {
        "prompt": "a fox", "all_prompts": ["a fox"] * 4, "negative_prompt": "", "all_negative_prompts": [""] * 4,
        "steps": 20, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "subseed_strength": 0, "batch_size": 2,
    }  # fmt: skip


def test_the_info_names_the_model_as_its_images_infotexts_do(fake: FakeInference) -> None:
    """A1111's `sd_model_name` and `sd_model_hash` are what its infotexts write as Model and Model hash (the
    checkpoint's name and short hash), here read from each PNG's parameters chunk; TorchServe's model name only
    where the images say none."""
    text = (
        "a fox\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 8x8, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly"
    )
    [png] = encode_with_parameters([np.zeros((8, 8, 3), np.uint8)], [text])
    painted = base64.b64encode(png).decode("ascii")

    def with_pngs(request: httpx.Request) -> httpx.Response:
        lines = [json.loads(line) for line in fake(request).text.splitlines()]
        lines[-1]["images"] = [painted] * len(lines[-1].get("images", []))
        return httpx.Response(200, content="\n".join(map(json.dumps, lines)) + "\n", headers={"Content-Type": NDJSON})

    with TestClient(create_app(FrontSettings(), httpx.MockTransport(with_pngs))) as test_client:
        info = json.loads(test_client.post(TXT2IMG, json={"prompt": "a fox", "seed": 3}).json()["info"])
    assert (info["sd_model_name"], info["sd_model_hash"], info["infotexts"]) == (
        "v1-5-pruned-emaonly", "6ce0161689", [text]
    )  # fmt: skip


def test_an_img2img_request(client: TestClient, fake: FakeInference) -> None:
    body = {"prompt": "a fox", "seed": 4, "init_images": ["aW1n"], "denoising_strength": 0.4, "mask": "bWFzaw==",
            "mask_blur": 8, "inpainting_fill": 1, "inpaint_full_res": False, "enable_hr": True}  # fmt: skip
    answer = client.post(IMG2IMG, json=body).json()
    assert {k: fake.sent()[0][k] for k in ("init_image", "strength", "mask_image", "mask_blur")} == {
        "init_image": "aW1n", "strength": 0.4, "mask_image": "bWFzaw==", "mask_blur": 8
    }  # fmt: skip
    assert "hr_scale" not in fake.sent()[0]  # A1111's img2img has no hires fix
    assert answer["parameters"] == {**body, "init_images": None, "mask": None}
    answer = client.post(IMG2IMG, json={"prompt": "a fox", "seed": 4, "init_images": ["aW1n"],
                                        "include_init_images": True}).json()  # fmt: skip
    assert fake.sent()[1]["strength"] == 0.75 and "mask_image" not in fake.sent()[1]
    assert fake.sent()[0]["resize_mode"] == fake.sent()[1]["resize_mode"] == "just_resize"  # A1111's default, 0
    assert answer["parameters"]["init_images"] == ["aW1n"]
    # 1.6's blur of each axis, without mask_blur: one blur here where they agree.
    blurs = {"mask_blur_x": 6, "mask_blur_y": 6, "mask_blur": None}
    assert client.post(IMG2IMG, json={**body, **blurs}).status_code == 200 and fake.sent()[2]["mask_blur"] == 6
    assert fake.sent()[2]["masked_content"] == "original" and "inpaint_area" not in fake.sent()[2]
    assert "invert_mask" not in fake.sent()[2]
    client.post(IMG2IMG, json={**body, "inpainting_mask_invert": 1})
    assert fake.sent()[-1]["invert_mask"] is True
    for mode, ours in enumerate(("just_resize", "crop_and_resize", "resize_and_fill")):
        client.post(IMG2IMG, json={"prompt": "a fox", "init_images": ["aW1n"], "resize_mode": mode})
        assert fake.sent()[-1]["resize_mode"] == ours
    client.post(IMG2IMG, json={"prompt": "a fox", "init_images": ["aW1n"], "mask": "bWFzaw=="})
    assert fake.sent()[-1]["mask_blur"] == 4  # A1111's API default, whatever this server's is
    # mask_blur, when sent, sets both axes' blurs (1.6's setter of it), whatever they said.
    blurs = {"mask_blur": 8, "mask_blur_x": 16, "mask_blur_y": 2}
    assert client.post(IMG2IMG, json={**body, **blurs}).status_code == 200 and fake.sent()[-1]["mask_blur"] == 8


def test_inpainting_conditioning_is_said_for_an_inpainting_models_img2img_alone() -> None:
    """Once the front has the worker's description (a client's listings fetch it; the answers do not wait for it)."""
    inpainting = FakeInference(described={**FakeInference().described, "inpainting": True})
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(inpainting))) as client:
        client.get("/sdapi/v1/sd-models")
        for path, body, said in (
            (TXT2IMG, {"prompt": "a fox", "seed": 1}, False),
            (IMG2IMG, {"prompt": "a fox", "seed": 1, "init_images": ["aW1n"]}, True),
        ):
            info = json.loads(client.post(path, json=body).json()["info"])
            assert info["is_using_inpainting_conditioning"] is said, path


def test_the_numbers_a1111_gives_inpainting_and_resize_modes_are_ldms_names_in_its_order() -> None:
    from front.a1111 import MASKED_CONTENT, RESIZE_MODES
    from ldm.generation_request import MASKED_CONTENTS
    from ldm.init_images import RESIZE_MODES as OURS

    assert (tuple(MASKED_CONTENTS), tuple(OURS)) == (MASKED_CONTENT, RESIZE_MODES)


@pytest.mark.parametrize(
    ("sent", "ours"),
    [
        ({}, {"masked_content": "fill", "inpaint_area": "only_masked", "masked_area_padding": 0}),
        ({"inpainting_fill": 2, "inpaint_full_res_padding": 32},
         {"masked_content": "latent_noise", "inpaint_area": "only_masked", "masked_area_padding": 32}),
        ({"inpainting_fill": "3", "inpaint_full_res": "false"}, {"masked_content": "latent_nothing"}),
    ],
)  # fmt: skip
def test_inpainting_runs_a1111s_masked_content_and_area(
    client: TestClient, fake: FakeInference, sent: dict, ours: dict
) -> None:
    """A1111's API defaults (fill, only masked, no padding) where not sent; its numbers and flags as it reads them."""
    body = {"prompt": "a fox", "seed": 4, "init_images": ["aW1n"], "mask": "bWFzaw==", **sent}
    assert client.post(IMG2IMG, json=body).status_code == 200
    fields = ("masked_content", "inpaint_area", "masked_area_padding")
    assert {k: fake.sent()[0][k] for k in fields if k in fake.sent()[0]} == ours


@pytest.mark.parametrize(
    ("path", "change", "field"),
    [
        (TXT2IMG, {"restore_faces": True}, "restore_faces"),
        (TXT2IMG, {"styles": ["watercolor"]}, "styles"),
        (TXT2IMG, {"alwayson_scripts": {"controlnet": {}}}, "alwayson_scripts.controlnet"),
        (TXT2IMG, {"s_churn": 0.5}, "s_churn"),
        (TXT2IMG, {"s_tmin": 0.5}, "s_tmin"),
        (TXT2IMG, {"s_noise": 0.9}, "s_noise"),
        (TXT2IMG, {"s_min_uncond": 0.2}, "s_min_uncond"),
        (TXT2IMG, {"initial_noise_multiplier": 0.9}, "initial_noise_multiplier"),
        (TXT2IMG, {"disable_extra_networks": True}, "disable_extra_networks"),
        (TXT2IMG, {"script_name": "x/y/z plot"}, "script_name"),
        (TXT2IMG, {"script_args": [1]}, "script_args"),
        (TXT2IMG, {"refiner_checkpoint": "sd_xl_refiner_1.0.safetensors"}, "refiner_checkpoint"),
        (TXT2IMG, {"enable_hr": True, "firstpass_image": "aW1n"}, "firstpass_image"),
        (TXT2IMG, {"enable_hr": True, "firstphase_height": 256}, "firstphase_height"),
        (TXT2IMG, {"alwayson_scripts": ["ControlNet"]}, "alwayson_scripts"),
        (
            TXT2IMG,
            {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": False}, {"enabled": True}]}}},
            "alwayson_scripts.ControlNet",
        ),  # one unit of several on
        (TXT2IMG, {"enable_hr": True, "hr_scheduler": "Exponential"}, "hr_scheduler"),
        (TXT2IMG, {"enable_hr": True, "hr_checkpoint_name": "other.ckpt"}, "hr_checkpoint_name"),
        (TXT2IMG, {"enable_hr": "maybe"}, "enable_hr"),
        (TXT2IMG, {"steps": "many"}, "steps"),
        (TXT2IMG, {"seed": [1]}, "seed"),
        (TXT2IMG, {"cfg_scale": {"value": 7}}, "cfg_scale"),
        (TXT2IMG, {"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, "alwayson_scripts.ADetailer"),
        (TXT2IMG, {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts.ControlNet"),
        (TXT2IMG, {"infotext": "a fox\nSteps: 20"}, "infotext"),
        (TXT2IMG, {"enable_hr": True, "firstphase_width": 256}, "firstphase_width"),
        (TXT2IMG, {"override_settings": {"eta_noise_seed_delta": 31337}}, "override_settings.eta_noise_seed_delta"),
        (TXT2IMG, {"override_settings": {"sd_vae": "kl-f8-anime.ckpt"}}, "override_settings.sd_vae"),
        (TXT2IMG, {"override_settings": {"img2img_fix_steps": True}}, "override_settings.img2img_fix_steps"),
        (TXT2IMG, {"scheduler": "Exponential"}, "scheduler"),
        (TXT2IMG, {"scheduler": ["Karras"]}, "scheduler"),
        (TXT2IMG, {"sampler_name": "DPM++ 2M SDE", "scheduler": "Automatic"}, "scheduler"),
        (TXT2IMG, {"sampler_name": "Euler a", "eta": 0}, "eta"),
        # η runs every pass in A1111: an ancestral hires sampler at another, DDIM's beside another sampler's.
        (TXT2IMG, {"sampler_name": "DDIM", "eta": 0, "enable_hr": True, "hr_sampler_name": "Euler a"}, "eta"),
        (TXT2IMG, {"sampler_name": "DDIM", "eta": 0.5, "enable_hr": True, "hr_sampler_name": "Euler"}, "eta"),
        (TXT2IMG, {"sampler_name": "Euler a", "eta": 1, "enable_hr": True, "hr_sampler_name": "DDIM"}, "eta"),
        (
            TXT2IMG,
            {"override_settings": {"sd_model_checkpoint": "other.ckpt"}},
            "override_settings.sd_model_checkpoint",
        ),
        (TXT2IMG, {"override_settings": ["x"]}, "override_settings"),
        (IMG2IMG, {"init_images": []}, "init_images"),
        (IMG2IMG, {"init_images": ["aW1n", "aW1n"]}, "init_images"),
        (IMG2IMG, {"init_images": ["aW1n"], "mask": "bWFzaw==", "inpainting_fill": 4}, "inpainting_fill"),
        # A1111 fills for any number but 1, 2 and 3 (never latent nothing, the last of the four).
        (IMG2IMG, {"init_images": ["aW1n"], "mask": "bWFzaw==", "inpainting_fill": -1}, "inpainting_fill"),
        (IMG2IMG, {"init_images": ["aW1n"], "resize_mode": 3}, "resize_mode"),
        (
            IMG2IMG,
            {
                "init_images": ["aW1n"],
                "mask": "bWFzaw==",
                "inpainting_fill": 1,
                "inpaint_full_res": False,
                "mask_blur_x": 16,
                "mask_blur_y": 2,
            },
            "mask_blur_y",
        ),
    ],
)
def test_what_is_not_done_here_is_refused_naming_the_field(
    client: TestClient, fake: FakeInference, path: str, change: dict, field: str
) -> None:
    response = client.post(path, json={"seed": 1, **change})
    assert response.status_code == 400 and response.json()["field"] == field
    assert response.json()["detail"] == response.json()["error"] and response.json()["error"].startswith(field)
    assert all(body == {"describe": True} for body in fake.sent())  # override_settings are judged by the served


def test_errors_name_fields_as_a1111_does_and_carry_its_detail(client: TestClient) -> None:
    response = client.post(TXT2IMG, json={"prompt": "refuse", "seed": 1})  # the stand-in refuses H
    assert response.status_code == 400
    assert response.json() == {"error": "height must be a multiple of 8, got 100", "field": "height",
                               "detail": "height must be a multiple of 8, got 100"}  # fmt: skip
    for raw in (b"[1, 2]", b"{", b"[" * 100_000):
        assert client.post(TXT2IMG, content=raw).json()["field"] == "body"
    deep = {"prompt": json.loads("[" * 900 + "]" * 900)}
    assert client.post(TXT2IMG, json=deep).status_code == 400
    assert client.post(TXT2IMG, content=b"x", headers={"Content-Type": "multipart/form-data"}).json()["detail"]


def test_torchserve_down_or_answering_nonsense_is_a_5xx_with_detail() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with TestClient(create_app(FrontSettings(), httpx.MockTransport(down))) as client:
        response = client.post(TXT2IMG, json={"seed": 1})
    assert response.status_code == 503 and response.json()["detail"].startswith("TorchServe is not reachable")
    nonsense = httpx.MockTransport(lambda request: httpx.Response(200, json={"images": []}))
    with TestClient(create_app(FrontSettings(), nonsense)) as client:
        response = client.post(TXT2IMG, json={"seed": 1})
    assert response.status_code == 502 and "without images" in response.json()["detail"]


def test_the_schedulers_listed_are_those_a_request_may_name(client: TestClient, fake: FakeInference) -> None:
    listed = client.get("/sdapi/v1/schedulers").json()
    assert [(item["name"], item["label"]) for item in listed] == [
        ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras")
    ]  # fmt: skip
    assert listed[2] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                         "need_inner_model": False}  # fmt: skip
    for item in listed:
        for named in (item["name"], item["label"]):
            assert client.post(TXT2IMG, json={"seed": 1, "sampler_name": "DPM2", "scheduler": named}).status_code == 200
    assert [body["sampler"] for body in fake.sent()] == ["DPM2 Karras"] * 2 + ["DPM2"] * 2 + ["DPM2 Karras"] * 2


def test_a1111s_listings_come_from_the_workers_description(client: TestClient, fake: FakeInference) -> None:
    def get(name: str) -> Any:
        response = client.get(f"/sdapi/v1/{name}")
        assert response.status_code == 200, response.text
        return response.json()

    assert get("samplers") == [{"name": "DDIM", "aliases": ["ddim"], "options": {}},
                               {"name": "Euler a", "aliases": ["euler_a"], "options": {}}]  # fmt: skip
    assert [upscaler["name"] for upscaler in get("upscalers")] == ["None", "Lanczos"]
    assert get("latent-upscale-modes") == [{"name": "Latent"}, {"name": "Latent (bicubic)"}]
    [model] = get("sd-models")
    assert (model["title"], model["model_name"], model["hash"]) == ("sd [8e79c1729f]", "sd", "8e79c1729f")
    assert [lora["name"] for lora in get("loras")] == ["ink"]
    assert get("embeddings") == {
        "loaded": {"tinyneg": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768,
                               "vectors": 2}},
        "skipped": {},
    }  # fmt: skip
    assert get("options") == {"sd_model_checkpoint": "sd [8e79c1729f]", "sd_vae": "None",
                              "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0,
                              "randn_source": "CPU", "eta_noise_seed_delta": 0}  # fmt: skip
    assert fake.sent() == [{"describe": True}]  # the front's copy answers the six after it (front/description.py)


def test_a_refresh_lists_new_files_at_once_and_what_is_not_done_here_is_listed_empty(
    client: TestClient, fake: FakeInference
) -> None:
    """A1111's clients ask for a rescan after adding files: the front's copy of the description is fetched anew."""
    assert client.get("/sdapi/v1/sd-vae").json() == []
    fake.described = {**fake.described, "loras": ["ink", "pencil"], "vae": {"name": "mse.safetensors", "hash": "0a1b"}}
    assert [lora["name"] for lora in client.get("/sdapi/v1/loras").json()] == ["ink"]  # the copy, not yet old
    for name in ("refresh-loras", "refresh-vae", "refresh-checkpoints", "refresh-embeddings"):
        response = client.post(f"/sdapi/v1/{name}")
        assert response.status_code == 200 and response.json() is None
    assert [lora["name"] for lora in client.get("/sdapi/v1/loras").json()] == ["ink", "pencil"]
    assert client.get("/sdapi/v1/sd-vae").json() == [{"model_name": "mse.safetensors", "filename": "mse.safetensors"}]
    assert fake.sent() == [{"describe": True}] * 5
    for name in ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles"):
        assert client.get(f"/sdapi/v1/{name}").json() == []


def test_with_a_vae_file_served_the_checkpoints_own_is_another(fake: FakeInference) -> None:
    """A1111's sd_vae "None" is the checkpoint's own VAE, not the file served beside it: refused; the file's name,
    or A1111's default Automatic (the file beside the checkpoint), changes nothing."""
    fake.described = {**fake.described, "vae": {"name": "mse.safetensors", "hash": "0a1b"}}
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(fake))) as test_client:
        said = {
            vae: test_client.post("/sdapi/v1/options", json={"sd_vae": vae}).json()
            for vae in ("mse.safetensors", "Automatic", "None")
        }
    assert (said["mse.safetensors"], said["Automatic"], said["None"]["field"]) == (None, None, "sd_vae")


def test_the_embeddings_listing_reads_the_description_the_handler_writes(tmp_path: Path) -> None:
    """A1111 lists an embedding's `vectors` (the tokens it takes) and `shape` (each vector's width, 768 in SD v1's
    CLIP): read from handler/description.py's description of an embedding of 3 vectors, as it goes over JSON."""
    embedding = Embedding("tinyneg", (1, 2), torch.zeros(3, 768), "0123456789ab")
    model = SimpleNamespace(
        vae_file=None, model_hash="8e79c1729f", config=SimpleNamespace(inpainting=False), device=torch.device("cpu"),
        dtype=torch.float32, low_memory=False,
    )  # fmt: skip
    pipeline = SimpleNamespace(
        model=model, fast_shapes=(), embeddings=SimpleNamespace(vocabulary=lambda: Vocabulary([embedding])),
        loras=SimpleNamespace(folder=tmp_path),
    )  # fmt: skip
    described = json.loads(json.dumps(describe(pipeline, parse_settings(None))))  # type: ignore[arg-type]
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(FakeInference(described=described)))) as client:
        listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"]["tinyneg"] == {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 3
    }  # fmt: skip


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"sd_model_checkpoint": "sd [8e79c1729f]"}, None),
        ({"sd_model_checkpoint": "sd", "samples_save": False, "save_to_dirs": True}, None),
        ({"sd_model_checkpoint": "8e79c1729f"}, None),
        ({"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]"}, "sd_model_checkpoint"),
        ({"CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last_layers"),
        ({"sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors"}, "sd_vae"),
        ({"CLIP_stop_at_last_layers": 1, "sd_vae": "None", "eta_ddim": 0.0, "randn_source": "CPU"}, None),  # as read
        # Where A1111 saves files: nothing of the image.
        (
            {
                "outdir_samples": "/data/out",
                "outdir_txt2img_samples": "/data/t2i",
                "grid_save": False,
                "save_to_dirs": True,
                "export_for_4chan": False,
                "jpeg_quality": 80,
                "webp_lossless": True,
                "use_original_name_batch": True,
                "directories_filename_pattern": "[date]",
                "samples_format": "jpg",
            },
            None,
        ),
        (["sd"], "body"),
    ],
)
def test_setting_options_names_the_served_model_or_is_refused(client: TestClient, options: Any, field: Any) -> None:
    """What A1111's clients send to pick a checkpoint: the one served, by title, name or hash, changes nothing; so
    do the options as GET reads them (clients send back what they read with one key changed)."""
    response = client.post("/sdapi/v1/options", json=options)
    if field is None:
        assert response.status_code == 200 and response.json() is None
    else:
        assert response.status_code == 400 and response.json()["field"] == field


def test_a_refused_value_is_quoted_short(client: TestClient) -> None:
    """An error quotes what was sent by its first characters, and an array or object by its kind: never megabytes
    back to the client."""
    checkpoint = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "x" * 1_000_000}).json()["error"]
    vae = client.post("/sdapi/v1/options", json={"sd_vae": [[1] * 10_000]}).json()["error"]
    assert checkpoint.endswith(f'got "{"x" * 39}…') and len(checkpoint) < 200
    assert vae.endswith("got an array")


@pytest.mark.parametrize(
    ("answer", "said"),
    [(httpx.Response(200, json={"images": []}), "no description"), (httpx.Response(200, text="{"), "with no JSON")],
)
def test_a_worker_that_describes_nothing_is_a_502(answer: httpx.Response, said: str) -> None:
    silent = httpx.MockTransport(lambda request: answer)
    with TestClient(create_app(FrontSettings(), silent)) as client:
        response = client.get("/sdapi/v1/samplers")
    assert response.status_code == 502 and said in response.json()["detail"]


def test_a_failure_after_the_stream_began_keeps_its_status(client: TestClient) -> None:
    response = client.post(TXT2IMG, json={"prompt": "fail", "seed": 1})
    assert response.status_code == 507
    assert response.json() == {"error": "out of GPU memory", "field": "", "detail": "out of GPU memory"}


def test_progress_follows_the_step_lines_of_the_oldest_request() -> None:
    """Images done plus the UNet batch's share of steps, never going back; a hires fix's passes weigh as the lines
    say (`first_pass_share`), or from a worker older than that by steps times pixels (here 2 steps at twice the
    size: 8 first-pass steps' worth against 2)."""
    jobs = Jobs()
    idle = jobs.progress(with_image=True)
    assert (idle["progress"], idle["eta_relative"], idle["state"]["job_count"], idle["current_image"]) == (
        0,
        0,
        0,
        None,
    )
    job = Job({"n_samples": 2, "ddim_steps": 4})
    job.advance({"step": 1, "total": 4, "image_index": 0, "image_count": 2})
    assert job.fraction == 0.25
    job.advance({"step": 2, "total": 4, "image_index": 1, "image_count": 1, "preview": "anBn"})
    assert (job.fraction, job.step, job.steps, job.preview) == (0.75, 2, 4, "anBn")
    job.advance({"step": 1, "total": 4, "image_index": 0, "image_count": 1})  # a batch behind: no going back
    # The handler sends a preview every few steps (handler.preview_every): the last one stays until the next.
    assert (job.fraction, job.preview) == (0.75, "anBn")
    # Three batches sent as three requests: the second's step lines count from a third of the way.
    split = Job({"n_samples": 2, "n_iter": 3, "ddim_steps": 4}, requests=3, request=1)
    split.advance({"step": 2, "total": 4, "image_index": 0, "image_count": 2})
    assert (split.fraction, split.iteration) == (pytest.approx((1 + 0.5) / 3), 1)
    hires = Job({"n_samples": 1, "n_iter": 2, "ddim_steps": 2, "hr_scale": 2.0, "hr_steps": 2}, requests=2)
    assert hires.jobs == (4, 0)  # A1111 counts each pass of each batch as a job
    # The first pass's share of the work as the lines say (here made up: a plain estimate would give 0.2).
    shared = {"image_index": 0, "image_count": 1, "passes": 2, "first_pass_share": 0.1}
    hires.advance({"step": 2, "total": 2, **shared})
    assert hires.fraction == 0.1 / 2 and hires.jobs == (4, 0)
    hires.advance({"step": 1, "total": 2, **shared, "hires": True})
    assert hires.fraction == pytest.approx((0.1 + 0.9 * 0.5) / 2) and hires.jobs == (4, 1)
    hires.request = 1
    hires.advance({"step": 1, "total": 2, **shared})
    assert hires.jobs == (4, 2)
    # Polled while TorchServe refuses fields that are not numbers: one job, not an error.
    assert Job({"hr_scale": "2", "n_iter": "2"}).jobs == (1, 0)
    assert Job({"hr_resize_x": "1024"}).jobs == (1, 0)
    # A worker older than `first_pass_share`: steps times pixels. A "Hires resize" to 1024 wide from 512×256: 4 times
    # the pixels, as a scale of 2; both sides: their product.
    for resize in ({"hr_resize_x": 1024}, {"hr_resize_y": 512}, {"hr_resize_x": 512, "hr_resize_y": 1024}):
        resized = Job({"n_samples": 1, "ddim_steps": 2, "hr_steps": 2, "W": 512, "H": 256, **resize})
        resized.advance({"step": 2, "total": 2, "image_index": 0, "image_count": 1, "passes": 2})
        assert resized.fraction == 0.2 and resized.jobs == (2, 0)
    # Lines that say one pass (a worker that ran none, as one before A1111 1.6's rule did for a resize to the size the
    # image has): their word counts over the request's.
    idle = Job({"n_samples": 1, "ddim_steps": 2, "W": 512, "H": 512, "hr_resize_x": 512})
    assert idle.jobs == (2, 0)  # what the request asks, until TorchServe says
    idle.advance({"step": 2, "total": 2, "image_index": 0, "image_count": 1, "passes": 1})
    assert idle.fraction == 1.0 and idle.jobs == (1, 0)
    # A worker older than `passes`: the request's word, until a second pass says so.
    older = Job({"n_samples": 1, "ddim_steps": 2, "hr_steps": 2, "hr_scale": 2})
    older.advance({"step": 2, "total": 2, "image_index": 0, "image_count": 1})
    assert older.fraction == 0.2 and older.jobs == (2, 0)
    older.advance({"step": 1, "total": 2, "image_index": 0, "image_count": 1, "hires": True})
    assert older.fraction == pytest.approx(0.6) and older.jobs == (2, 1)


async def _two_jobs(jobs: Jobs) -> tuple[dict[str, Any], ...]:
    async with jobs.running({"n_samples": 2, "n_iter": 3, "ddim_steps": 4}, "img2img") as first:
        starting = jobs.progress(with_image=True)
        first.advance({"step": 2, "total": 4, "image_index": 2, "image_count": 2, "preview": "anBn"})
        async with jobs.running({"n_samples": 1, "ddim_steps": 4}, "txt2img"):
            both = jobs.progress(with_image=True)
        return starting, both, jobs.progress(with_image=False)


def test_progress_reports_the_oldest_job_as_a1111_reports_its_one() -> None:
    """Its batches (n_iter) as A1111's job count and the running one as the job number; at the start A1111's
    least progress, so that the ETA is not 0."""
    jobs = Jobs()
    starting, both, without_image = asyncio.run(_two_jobs(jobs))
    assert (starting["progress"], starting["state"]["job"], starting["current_image"]) == (
        0.01,
        "scripts_img2img",
        None,
    )
    assert starting["eta_relative"] >= 0
    assert both["progress"] == pytest.approx(3 / 6) and both["current_image"] == "anBn"
    assert {k: both["state"][k] for k in ("job_count", "job_no", "sampling_step", "sampling_steps")} == {
        "job_count": 3, "job_no": 1, "sampling_step": 2, "sampling_steps": 4
    }  # fmt: skip
    assert without_image["current_image"] is None and jobs.progress(with_image=True)["state"]["job_count"] == 0


def test_a_hires_fix_at_scale_1_is_one_pass() -> None:
    job = Job({"n_samples": 1, "ddim_steps": 2, "hr_scale": 1.0})
    job.advance({"step": 2, "total": 2, "image_index": 0, "image_count": 1})
    assert job.fraction == 1.0


@pytest.mark.parametrize(("hr_steps", "share"), [(2, 4 / (4 + 2 * 4)), (0, 4 / (4 + 4 * 4))])
def test_an_older_workers_second_pass_weighs_its_own_steps(hr_steps: int, share: float) -> None:
    """From a worker older than `first_pass_share`: the first pass's 4 steps against the second's at 4 times the
    pixels (a scale of 2), its own steps, or A1111's as many as the first pass's for 0."""
    job = Job({"n_samples": 1, "ddim_steps": 4, "hr_steps": hr_steps, "hr_scale": 2.0})
    job.advance({"step": 4, "total": 4, "image_index": 0, "image_count": 1})
    assert job.fraction == pytest.approx(share)


def test_progress_never_passes_the_whole() -> None:
    """A request naming no n_samples gets the server's default, which may be more than the one image the front
    counts: A1111's progress stops at 1 (and its ETA at 0)."""
    job = Job({"ddim_steps": 2})
    job.advance({"step": 2, "total": 2, "image_index": 2, "image_count": 1})
    assert job.fraction == 1.0


def test_the_eta_is_the_time_left_at_the_pace_so_far(monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111's `eta_relative`: the elapsed time over the progress, less the elapsed time (30 s for a quarter: 90 s
    to go)."""

    monkeypatch.setattr(a1111_progress, "time", SimpleNamespace(monotonic=lambda: 130.0, strftime=time.strftime))

    async def scenario() -> dict[str, Any]:
        jobs = Jobs()
        async with jobs.running({"n_samples": 1, "ddim_steps": 4}, "txt2img") as job:
            job.started = 100.0
            job.advance({"step": 1, "total": 4, "image_index": 0, "image_count": 1})
            return jobs.progress(with_image=False)

    answer = asyncio.run(scenario())
    assert (answer["progress"], answer["eta_relative"]) == (0.25, pytest.approx(90.0))


def test_an_interrupt_marks_the_oldest_job_alone() -> None:
    """A1111 runs one job, which its interrupt stops: here the oldest, which its progress reports."""

    async def scenario() -> tuple[bool, bool]:
        jobs = Jobs()
        async with jobs.running({}, "txt2img") as oldest, jobs.running({}, "img2img") as newest:
            jobs.interrupt()
            return oldest.interrupted, newest.interrupted

    assert asyncio.run(scenario()) == (True, False)


@pytest.mark.parametrize(
    ("line", "status", "says"),
    [
        ([1], 502, "not a JSON object"),
        ({"error": "out of GPU memory", "status": "507"}, 502, "out of GPU memory"),
        ({"error": "fine?", "status": 200}, 502, "fine?"),
        ({"code": 503, "type": "ServiceUnavailableException", "message": "Model sd has no worker"}, 503, "no worker"),
        (None, 502, "ended the progress stream without the images"),
    ],
)
def test_a_stream_that_fails_oddly_is_a_5xx_and_the_job_ends(line: Any, status: int, says: str) -> None:
    steps = [json.dumps({"step": 1, "total": 2, "image_index": 0, "image_count": 1})]
    lines = steps + ([] if line is None else [json.dumps(line)])
    content = "\n".join(lines) + "\n"
    stream = httpx.MockTransport(lambda request: httpx.Response(200, content=content))
    with TestClient(create_app(FrontSettings(), stream)) as client:
        response = client.post(TXT2IMG, json={"seed": 1})
        assert response.status_code == status and says in response.json()["detail"]
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_an_interrupt_stops_the_oldest_request_after_its_batch_in_flight(fake: FakeInference) -> None:
    """Of 3 batches, the one TorchServe computes when the interrupt comes is the answer; the next request runs
    whole."""
    release = threading.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return fake(request)

    answers: list[httpx.Response] = []
    with TestClient(create_app(FrontSettings(), httpx.MockTransport(held))) as client:
        body = {"seed": 5, "batch_size": 2, "n_iter": 3}
        worker = threading.Thread(target=lambda: answers.append(client.post(TXT2IMG, json=body)))
        worker.start()
        deadline = time.monotonic() + 10
        while client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.post("/sdapi/v1/interrupt").json() == {}
        assert client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True
        release.set()
        worker.join(timeout=10)
        [interrupted] = answers
        assert interrupted.status_code == 200 and interrupted.json()["images"] == ["png5", "png6"]
        assert len(fake.bodies) == 1
        assert client.post("/sdapi/v1/interrupt").json() == {}  # nothing in flight: nothing to stop
        assert client.post(TXT2IMG, json=body).json()["images"] == [f"png{seed}" for seed in range(5, 11)]


@pytest.mark.parametrize(("path", "accept"), [(TXT2IMG, b"*/*"), ("/imagine", b"application/json")])
def test_a_client_gone_gets_no_further_batches(fake: FakeInference, path: str, accept: bytes) -> None:
    """Of 3 batches, the one sent before the client went away; the answer goes nowhere."""
    app = create_app(FrontSettings(), httpx.MockTransport(fake))
    messages = [{"type": "http.request", "body": json.dumps({"prompt": "a", "seed": 5, "n_iter": 3}).encode()}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def call() -> None:
        headers = [(b"content-type", b"application/json"), (b"accept", accept)]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 5000)}  # fmt: skip
        await app(scope, receive, send)

    with TestClient(app) as client:  # its lifespan opens the front's client of TorchServe
        client.portal.call(call)
    assert [body["seed"] for body in fake.sent()] == [5]


def test_progress_when_nothing_runs(client: TestClient) -> None:
    idle = client.get("/sdapi/v1/progress?skip_current_image=true").json()
    assert (idle["progress"], idle["eta_relative"], idle["current_image"], idle["state"]["job_count"]) == (
        0,
        0,
        None,
        0,
    )


@pytest.mark.parametrize("off", [False, "false", 0])
def test_send_images_false_answers_the_info_alone(client: TestClient, off: Any) -> None:
    answer = client.post(TXT2IMG, json={"prompt": "a fox", "seed": "9", "send_images": off}).json()
    assert answer["images"] == [] and json.loads(answer["info"])["all_seeds"] == [9]
    assert answer["parameters"]["seed"] == 9  # echoed as A1111's API read it


@pytest.mark.parametrize("text", ["a fox\nSteps: 20, Seed: 1", "un renard, café\nSteps: 20"])
def test_an_infotext_is_read_from_its_pngs_parameters_chunk(text: str) -> None:
    """tEXt for Latin-1, iTXt beyond it, as our encoder writes them."""
    [png] = encode_with_parameters([np.zeros((8, 8, 3), np.uint8)], [text + " ✓" if "café" in text else text])
    encoded = base64.b64encode(png).decode("ascii")
    assert png_parameters(encoded) == (text + " ✓" if "café" in text else text)
    assert png_parameters("bm90IGEgcG5n") == "" and png_parameters("!!") == ""
