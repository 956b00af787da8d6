"""The web front in front of a real TorchServe (tests/conftest.py starts both): the original app's two documented
requests, shrunk to the tiny model's size, answered in the original form with TorchServe's own images; the progress
stream; errors and health. The same front against a stand-in TorchServe: tests/test_front_offline.py."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from scripts.server import TorchServe
from tests.bad_requests import CASES, PNG_ONLY, Case, image_base64
from tests.servers import MODEL, TIMEOUT, TINY_LORA

pytestmark = pytest.mark.integration
TINY = {"H": 64, "W": 64, "ddim_steps": 3}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def direct(http: httpx.Client, server: TorchServe, body: dict[str, Any], accept: str) -> httpx.Response:
    """The same request straight to TorchServe."""
    return http.post(f"{server.inference_url}/predictions/{MODEL}", json=body, headers={"Accept": accept})


def test_png_request(http: httpx.Client, front: str, server: TorchServe) -> None:
    body = {"prompt": "a photograph of an astronaut riding a horse", "seed": 42, **TINY}
    response = http.post(f"{front}/imagine", json=body, headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/png" and response.headers["X-Seed"] == "42"
    assert response.content.startswith(PNG_SIGNATURE)
    assert response.content == direct(http, server, body, "image/png").content


def test_json_array_request_of_ten_images(http: httpx.Client, front: str, server: TorchServe) -> None:
    """n_samples 2 × n_iter 5: more than TorchServe's 8 per request, as the original app allowed."""
    body = {"prompt": "a photograph of an astronaut riding a horse", "n_samples": 2, "n_iter": 5, "seed": 7, **TINY}
    response = http.post(f"{front}/imagine", json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    images = response.json()
    assert isinstance(images, list) and len(images) == 10
    assert all(base64.b64decode(image, validate=True).startswith(PNG_SIGNATURE) for image in images)
    assert response.headers["X-Seed"] == "7" and response.headers["X-Seeds"] == ",".join(map(str, range(7, 17)))
    # Iteration k is image 2k and 2k+1: exactly TorchServe's images of that batch.
    for k in range(5):
        batch = direct(http, server, {**body, "n_iter": 1, "seed": 7 + 2 * k}, "application/json").json()
        assert images[2 * k : 2 * k + 2] == batch["images"], k


def test_a_request_with_every_field_of_the_original_app_gets_the_image_ours_would(
    http: httpx.Client, front: str, server: TorchServe
) -> None:
    """The original app took its command line's options in the body (front/original_fields.py): `ddim_eta` is our
    `eta`, the rest changed how it ran, not the image."""
    original = {"prompt": "a lighthouse", "seed": 5, **TINY, "ddim_eta": 0.5, "unet_bs": 1, "turbo": True,
                "precision": "autocast", "device": "cuda", "n_rows": 0, "outdir": "outputs/txt2img-samples",
                "fixed_code": True, "C": 4, "f": 8, "format": "png", "from_file": False, "sampler": "ddim"}  # fmt: skip
    response = http.post(f"{front}/imagine", json=original, headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    ours = {"prompt": "a lighthouse", "seed": 5, **TINY, "eta": 0.5}
    assert response.content == direct(http, server, ours, "image/png").content


def test_a1111s_txt2img_and_img2img_answer_torchserves_images_and_infotexts(
    http: httpx.Client, front: str, server: TorchServe
) -> None:
    """A1111's API (front/a1111.py): the images TorchServe makes of the translated request, in A1111's syntax, with
    A1111's sampler name, its two batches sent as two requests making the images of one; `info` holds the seeds and
    each PNG's infotext; a refusal names A1111's field."""
    a1111 = {"prompt": "a castle AND (a lake:1.2):0.5", "negative_prompt": "blurry", "seed": 11, "steps": 3,
             "width": 64, "height": 64, "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M",
             "scheduler": "Karras"}  # fmt: skip
    response = http.post(f"{front}/sdapi/v1/txt2img", json=a1111)
    assert response.status_code == 200, response.text
    ours = {"prompt": a1111["prompt"], "negative_prompt": "blurry", "ddim_steps": 3, **TINY, "n_samples": 2,
            "sampler": "dpmpp_2m_karras", "scale": 7.0, "emphasis": True}  # fmt: skip
    # Each batch of 2 as its own request (a batch of 4 may differ by a level where the CPU rounds otherwise).
    batches = [direct(http, server, {**ours, "seed": seed}, "application/json").json() for seed in (11, 13)]
    answer = response.json()
    assert answer["images"] == batches[0]["images"] + batches[1]["images"] and answer["parameters"] == a1111
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["sampler_name"] == "DPM++ 2M Karras"
    assert info["infotexts"][3].startswith("a castle AND (a lake:1.2):0.5\nNegative prompt: blurry\nSteps: 3, ")
    assert "Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 14, Size: 64x64" in info["infotexts"][3]
    # Its PNG read back as A1111's clients read one (`/sdapi/v1/png-info`).
    read = http.post(f"{front}/sdapi/v1/png-info", json={"image": answer["images"][3]}).json()
    fields = read["parameters"]
    assert read["info"] == info["infotexts"][3] and fields["Model hash"] == info["sd_model_hash"]
    assert fields["Model"] == info["sd_model_name"] == "tiny-dev"  # the checkpoint's name, as A1111 names it
    assert (fields["Prompt"], fields["Negative prompt"], fields["Steps"], fields["Sampler"], fields["Seed"]) == (
        a1111["prompt"], "blurry", "3", "DPM++ 2M Karras", "14",
    )  # fmt: skip
    assert (fields["CFG scale"], fields["Size-1"], fields["Size-2"]) == ("7.0", "64", "64")

    init = answer["images"][0]
    a1111 = {"prompt": "a lighthouse", "seed": 3, "steps": 4, "width": 64, "height": 64, "init_images": [init],
             "denoising_strength": 0.5, "sampler_name": "Euler a"}  # fmt: skip
    response = http.post(f"{front}/sdapi/v1/img2img", json=a1111)
    assert response.status_code == 200, response.text
    ours = {"prompt": "a lighthouse", "seed": 3, **TINY, "ddim_steps": 4, "init_image": init, "strength": 0.5,
            "sampler": "euler_a", "scale": 7.0, "emphasis": True}  # fmt: skip
    assert response.json()["images"] == direct(http, server, ours, "application/json").json()["images"]
    # Inpainting sent with A1111's defaults alone: its fill and only-masked area, painted by TorchServe.
    mask = Image.new("L", (64, 64))
    mask.paste(255, (20, 24, 40, 40))
    response = http.post(f"{front}/sdapi/v1/img2img", json={**a1111, "mask": image_base64(mask)})
    assert response.status_code == 200, response.text
    inpainted = {**ours, "mask_image": image_base64(mask), "mask_blur": 4, "masked_content": "fill",
                 "inpaint_area": "only_masked", "masked_area_padding": 0}  # fmt: skip
    assert response.json()["images"] == direct(http, server, inpainted, "application/json").json()["images"]
    assert "Inpaint area: Only masked, Masked area padding: 0, Masked content: fill" in response.json()["info"]

    drawn = http.post(f"{front}/sdapi/v1/txt2img", json={"seed": -1, "steps": 2, "width": 64, "height": 64}).json()
    info = json.loads(drawn["info"])
    assert f", Seed: {info['seed']}, Size: 64x64" in info["infotexts"][0] and info["all_seeds"] == [info["seed"]]

    samplers = http.get(f"{front}/sdapi/v1/samplers").json()
    assert {"name": "DPM++ 2M Karras", "aliases": ["dpmpp_2m_karras"], "options": {}} in samplers
    [model] = http.get(f"{front}/sdapi/v1/sd-models").json()
    assert model["title"] == f"{MODEL} [{info['sd_model_hash']}]" and len(model["hash"]) == 10
    options = http.get(f"{front}/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == model["title"]
    picked = http.post(f"{front}/sdapi/v1/options", json={"sd_model_checkpoint": model["title"]})
    assert picked.status_code == 200 and picked.json() is None
    assert http.post(f"{front}/sdapi/v1/refresh-loras").json() is None  # the worker described again
    assert [lora["name"] for lora in http.get(f"{front}/sdapi/v1/loras").json()] == [TINY_LORA]

    refused = http.post(f"{front}/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "steps": 1000})
    assert refused.status_code == 400
    assert refused.json()["field"] == "steps"
    assert refused.json()["detail"] == "steps must be between 1 and 150, got 1000"
    refused = http.post(f"{front}/sdapi/v1/txt2img", json={"enable_hr": True, "hr_sampler_name": "PLMS"})
    assert refused.status_code == 400 and refused.json()["field"] == "hr_sampler_name"
    assert refused.json()["detail"].startswith("hr_sampler_name plms is for txt2img only")


def test_a1111s_progress_follows_a_request_in_flight(http: httpx.Client, front: str) -> None:
    """Polled while an A1111 txt2img of two batches runs: a fraction between 0 and 1 that only grows, with the step
    count, the batch running and a preview; then nothing in flight."""
    done: list[httpx.Response | Exception] = []
    body = {"prompt": "a lighthouse", "seed": 2, "steps": 50, "width": 64, "height": 64, "n_iter": 2}

    def generate() -> None:
        try:
            done.append(httpx.post(f"{front}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT))
        except Exception as error:  # said below, not lost in the thread
            done.append(error)

    worker = threading.Thread(target=generate)
    worker.start()
    seen: list[dict[str, Any]] = []
    while worker.is_alive():
        progress = http.get(f"{front}/sdapi/v1/progress").json()
        if progress["state"]["job_count"]:
            seen.append(progress)
        time.sleep(0.01)
    worker.join()
    [answer] = done
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    fractions = [progress["progress"] for progress in seen]
    assert any(0 < fraction < 1 for fraction in fractions) and fractions == sorted(fractions), fractions
    steps = [(progress["state"]["sampling_step"], progress["state"]["sampling_steps"]) for progress in seen]
    assert any(total == 50 for _, total in steps), steps
    assert [progress["state"]["job_no"] for progress in seen][-1] == 1, steps
    previews = [bool(progress["current_image"]) for progress in seen]
    assert any(previews), list(zip(steps, previews, strict=True))  # the stream's previews, every few steps
    idle = http.get(f"{front}/sdapi/v1/progress").json()
    assert (idle["progress"], idle["state"]["job_count"], idle["current_image"]) == (0, 0, None)


def test_variation_seeds_split_over_iterations_are_one_requests_images(
    http: httpx.Client, front: str, server: TorchServe
) -> None:
    """With variation seeds every image keeps the seed and the variation seed counts: iteration k sends subseed
    100 + 2k, and the four images are those TorchServe makes of the two iterations (each batch of 2 as its own
    request: one batch of 4 may differ by a level where the CPU rounds otherwise), whose subseeds the stream's answer
    lists."""
    body = {"prompt": "a lighthouse", "n_samples": 2, "n_iter": 2, "seed": 7, "subseed": 100,
            "subseed_strength": 0.5, **TINY}  # fmt: skip
    response = http.post(f"{front}/imagine", json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    assert (response.headers["X-Seeds"], response.headers["X-Subseeds"]) == ("7,7,7,7", "100,101,102,103")
    batches = [direct(http, server, {**body, "n_iter": 1, "subseed": s}, "application/json").json() for s in (100, 102)]
    images = batches[0]["images"] + batches[1]["images"]
    assert response.json() == images and batches[1]["subseeds"] == [102, 103]
    streamed = http.post(f"{front}/imagine/stream", json=body).text.splitlines()
    final = json.loads(streamed[-1])
    assert final["images"] == images and final["subseeds"] == [100, 101, 102, 103]
    assert (final["parameters"]["subseed"], final["parameters"]["subseed_strength"]) == (100, 0.5)


def test_without_a_seed_the_drawn_one_is_reported(http: httpx.Client, front: str, server: TorchServe) -> None:
    body = {"prompt": "a lighthouse", "n_iter": 2, **TINY}
    response = http.post(f"{front}/imagine", json=body, headers={"Accept": "application/json"})
    seeds = [int(seed) for seed in response.headers["X-Seeds"].split(",")]
    assert seeds == [seeds[0], seeds[0] + 1] and response.headers["X-Seed"] == str(seeds[0])
    again = direct(http, server, {**body, "n_iter": 1, "seed": seeds[1]}, "application/json").json()
    assert response.json()[1] == again["images"][0]


def test_stream_steps_in_order_then_the_same_images(http: httpx.Client, front: str) -> None:
    """The prompt is 83 tokens: the final line says once which 8 CLIP never read, though two iterations ran."""
    prompt = "a lighthouse, " + "wave " * 80
    body = {"prompt": prompt, "n_samples": 2, "n_iter": 2, "seed": 11, **TINY, "ddim_steps": 4}
    lines: list[tuple[float, dict[str, Any]]] = []
    with http.stream("POST", f"{front}/imagine/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/x-ndjson" and response.headers["X-Seed"] == "11"
        lines = [(time.monotonic(), json.loads(line)) for line in response.iter_lines() if line]
    *steps, (finished, final) = lines
    assert steps, "no step lines: does the handler stream its progress?"
    assert all("step" in line for _, line in steps)
    progress = [(line["iteration"], line["step"]) for _, line in steps]
    assert progress == sorted(progress) and {iteration for iteration, _ in progress} == {0, 1}
    assert all(line["total"] == 4 for _, line in steps)
    assert steps[-1][0] <= finished
    plain = http.post(f"{front}/imagine", json=body, headers={"Accept": "application/json"}).json()
    assert final["images"] == plain and final["seeds"] == [11, 12, 13, 14]
    assert final["parameters"]["n_iter"] == 2 and final["parameters"]["seed"] == 11
    assert final["warnings"] == [
        "prompt: CLIP reads 75 tokens; the 8 after them were left out: " + "wave " * 7 + "wave"
    ]


@pytest.mark.parametrize("path", ["/imagine", "/imagine/stream"])
def test_validation_errors_pass_through(http: httpx.Client, front: str, path: str) -> None:
    for body, field in [({"prompt": "a", "H": 100}, "H"), ({"prompt": "a", "ddim_step": 3}, "ddim_step")]:
        response = http.post(f"{front}{path}", json=body)
        assert response.status_code == 400 and response.headers["Content-Type"] == "application/json"
        assert response.json()["field"] == field, response.json()


def test_png_of_several_images_is_refused_with_advice(http: httpx.Client, front: str) -> None:
    body = {"prompt": "a", "n_samples": 2, **TINY}
    response = http.post(f"{front}/imagine", json=body, headers={"Accept": "image/png"})
    assert response.status_code == 400 and response.json()["field"] == "n_samples"
    assert "Accept: application/json" in response.json()["error"]


def test_health(http: httpx.Client, front: str) -> None:
    response = http.get(f"{front}/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok", "torchserve": "Healthy", "model": MODEL}


# Where /imagine differs from TorchServe's own rules on purpose: it splits n_iter into one request per iteration
# (up to the front's 64 images), and its `stream` flag streams whatever the Accept header says.
FRONT_ALLOWS = {"too many images", "stream as png"}
IMAGINE_CASES = [case for case in CASES if case.name not in FRONT_ALLOWS]
# And what it refuses itself before TorchServe sees it, in its own words.
FRONT_SAYS = {"n_samples huge": "n_samples×n_iter must be at most 64 images, got 10000"}


@pytest.mark.parametrize("case", IMAGINE_CASES, ids=[case.name for case in IMAGINE_CASES])
def test_bad_request_through_imagine_is_a_400_naming_its_field_and_rule(
    http: httpx.Client, front: str, case: Case
) -> None:
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    accept = "image/png" if case.name in PNG_ONLY else "application/json"
    response = http.post(
        f"{front}/imagine", content=content, headers={"Content-Type": "application/json", "Accept": accept}
    )
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["field"] == case.field and FRONT_SAYS.get(case.name, case.says) in error["error"], error


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_a_form_is_a_415_as_torchserve_answers_it(
    http: httpx.Client, front: str, server: TorchServe, content_type: str
) -> None:
    body, headers = json.dumps({"prompt": "a", **TINY}).encode(), {"Content-Type": content_type}
    response = http.post(f"{front}/imagine", content=body, headers=headers)
    direct = http.post(f"{server.inference_url}/predictions/{MODEL}", content=body, headers=headers)
    assert response.status_code == direct.status_code == 415
    assert response.json() == direct.json() and response.json()["field"] == "body"


def test_more_images_than_the_front_allows_is_a_400(http: httpx.Client, front: str) -> None:
    response = http.post(f"{front}/imagine", json={"prompt": "x", "n_samples": 8, "n_iter": 9, **TINY})
    assert response.status_code == 400
    assert response.json()["field"] in ("n_samples", "n_iter")
