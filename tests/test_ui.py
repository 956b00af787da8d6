"""The page in a real headless Chromium (Debian's `chromium`, driven by Playwright) against the front and a real
TorchServe: a user generates, watches the progress, reuses a seed, sends a result back as the init image, sees an
invalid size explained next to the size, and a prompt full of markup shown as text. A screenshot of the page is left
in the test's tmp folder and in test-artifacts/ui.png."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image, PngImagePlugin
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Route, expect, sync_playwright

from scripts.server import ROOT
from tests.reference import load_image
from tests.servers import TINY_EMBEDDING, TINY_LORA, need

pytestmark = pytest.mark.integration
# The first Chromium (or Chrome) found: Debian's, the one .ci/run installs, first.
CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (found := shutil.which(name))), None)  # fmt: skip
# Without the background-networking flags Chromium keeps dialing out, and a closed network refuses it many times.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
GENERATION = 60_000  # ms a tiny generation may take on a slow machine
# Markup that, parsed as HTML anywhere, makes an image whose error handler sets window.__xss.
MARKUP = '<img src=x onerror="window.__xss=1">'
# Records every text the progress status shows.
RECORD_STATUS = """() => {
  window.statuses = [];
  const status = document.getElementById("status");
  new MutationObserver(() => window.statuses.push(status.textContent))
    .observe(status, { childList: true, characterData: true, subtree: true });
}"""
# Records every value the progress bar takes and every preview shown, as the page sets them.
RECORD_PROGRESS = """() => {
  window.progressValues = [];
  window.previews = 0;
  const progress = document.getElementById("progress");
  new MutationObserver(() => window.progressValues.push(progress.value))
    .observe(progress, { attributes: true, attributeFilter: ["value"] });
  new MutationObserver(() => window.previews++)
    .observe(document.getElementById("preview"), { attributes: true, attributeFilter: ["src"] });
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    need(None if CHROMIUM else "no Chromium found on PATH: install it (Debian/Ubuntu: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, front: str) -> Iterator[Page]:
    """The front's page, with tiny-model settings; fails the test on any script error, console error or dialog."""
    problems: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()

    def console(message: ConsoleMessage) -> None:
        # The browser logs each 4xx answer; the invalid size's 400 is one the test asks for.
        if message.type == "error" and "status of 400" not in message.text:
            problems.append(f"console: {message.text}")

    def dialog(opened: Dialog) -> None:
        problems.append(f"dialog: {opened.message}")
        opened.dismiss()

    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("dialog", dialog)
    page.goto(front)
    page.select_option("#preset", "64x64")
    page.fill("#ddim_steps", "10")
    try:
        yield page
    finally:
        context.close()
    assert problems == []


def assert_no_markup_ran(page: Page) -> None:
    """MARKUP made no element and ran no handler."""
    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("window.__xss") is None


def generate(page: Page, shown: int) -> dict[str, Any]:
    """Clicks Generate and waits until the gallery shows `shown` results; returns the body the page sent."""
    with page.expect_request("**/imagine/stream") as sent:
        page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(shown, timeout=GENERATION)
    return json.loads(sent.value.post_data or "")


def results(page: Page) -> list[dict[str, str]]:
    """The gallery, newest first: each result's seed, prompt, parameters and image."""
    return page.eval_on_selector_all(
        "#gallery .result",
        """items => items.map(item => ({
             seed: item.querySelector(".seed").textContent, prompt: item.querySelector(".prompt").textContent,
             parameters: item.querySelector(".parameters").textContent, src: item.querySelector("img").src}))""",
    )


def test_generate_watch_progress_reuse_the_seed_and_send_back_as_init_image(page: Page) -> None:
    page.fill("#prompt", "a red bicycle in the snow")
    page.evaluate(RECORD_PROGRESS)
    page.press("#prompt", "Control+Enter")
    expect(page.locator("#gallery .result")).to_have_count(1, timeout=GENERATION)
    values = [float(value) for value in page.evaluate("window.progressValues")]
    assert any(0 < value < 1 for value in values), values
    assert values == sorted(values) and values[-1] == 1, values
    assert page.evaluate("window.previews") > 0
    expect(page.locator("#status")).to_contain_text("Done: 1 image")
    # Screen readers hear the start and the end, not each step.
    expect(page.locator("#announce")).to_contain_text("Done: 1 image")
    assert page.get_attribute("#status", "aria-live") is None
    [first] = results(page)
    assert first["prompt"] == "a red bicycle in the snow" and first["parameters"].startswith("64×64 · 10 steps")

    page.click("#gallery .result >> text=Reuse seed")
    seed = first["seed"].removeprefix("Seed ")
    assert page.input_value("#seed") == seed and page.is_checked("#seed_fixed")
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(2, timeout=GENERATION)
    again = results(page)[0]
    assert again["seed"] == first["seed"] and again["src"] == first["src"]

    page.click("#gallery .result >> nth=0 >> text=Use as init image")
    expect(page.locator("#init_preview")).to_be_visible()
    page.fill("#strength", "0.5")
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(3, timeout=GENERATION)
    assert results(page)[0]["parameters"].endswith("strength 0.5")


def test_plms_is_set_aside_for_an_init_image_and_other_samplers_run_img2img(page: Page) -> None:
    """The server runs PLMS for txt2img only: the page offers it only without an init image. Results name their
    sampler."""
    page.fill("#prompt", "a paper boat")
    page.select_option("#sampler", "plms")
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(1, timeout=GENERATION)
    assert results(page)[0]["parameters"] == "64×64 · 10 steps · guidance 7.5 · PLMS"

    page.click("#gallery .result >> text=Use as init image")
    assert page.input_value("#sampler") == "ddim"
    assert page.is_disabled("#sampler option[value='plms']")
    page.select_option("#sampler", "euler_a")
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(2, timeout=GENERATION)
    assert results(page)[0]["parameters"] == "64×64 · 10 steps · guidance 7.5 · Euler a · strength 0.75"

    page.click("#init_clear")
    assert page.is_enabled("#sampler option[value='plms']") and page.input_value("#sampler") == "euler_a"


def test_a_result_says_which_words_clip_never_read(page: Page) -> None:
    page.fill("#prompt", "a lighthouse, " + "wave " * 80)
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(1, timeout=GENERATION)
    expect(page.locator("#gallery .result .warning")).to_have_text(
        ["prompt: CLIP reads 75 tokens; the 8 after them were left out: " + "wave " * 7 + "wave"]
    )


def test_weighted_sub_prompts_are_a_choice_named_on_the_result_and_a_bad_weight_is_explained(page: Page) -> None:
    page.fill("#prompt", "a castle:0.7 a forest:0.3")
    page.check("#weighted_subprompts")
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(1, timeout=GENERATION)
    [weighted] = results(page)
    assert weighted["parameters"] == "64×64 · 10 steps · guidance 7.5 · weighted sub-prompts"

    page.click("#gallery .result >> text=Reuse seed")
    page.uncheck("#weighted_subprompts")
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(2, timeout=GENERATION)
    plain = results(page)[0]
    assert plain["seed"] == weighted["seed"] and plain["parameters"] == "64×64 · 10 steps · guidance 7.5"
    assert plain["src"] != weighted["src"]  # CLIP read the colons and numbers as text

    page.fill("#prompt", "style:watercolor a lake:2")
    page.check("#weighted_subprompts")
    page.click("#generate")
    expect(page.locator("#error-prompt")).to_contain_text(
        "prompt: 'watercolor' after 'style:' is not a weight", timeout=GENERATION
    )
    expect(page.locator("#gallery .result")).to_have_count(2)


def test_a1111_emphasis_reads_a_long_prompt_whole_and_sets_weighted_sub_prompts_aside(page: Page) -> None:
    page.fill("#prompt", "a (lighthouse:1.3), [fog], " + "wave " * 80)
    page.check("#weighted_subprompts")
    page.check("#emphasis")
    assert not page.is_checked("#weighted_subprompts")  # the two read colons each their own way
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(1, timeout=GENERATION)
    assert results(page)[0]["parameters"] == "64×64 · 10 steps · guidance 7.5 · A1111 emphasis"
    expect(page.locator("#gallery .result .warning")).to_have_count(0)  # read whole: no word left out

    page.fill("#prompt", "a (lighthouse:1..3)")
    page.click("#generate")
    expect(page.locator("#error-prompt")).to_have_text(
        "prompt: '1..3' in ':1..3)' is not a weight: write a number such as 1.3", timeout=GENERATION
    )
    page.check("#weighted_subprompts")
    assert not page.is_checked("#emphasis")


def test_tiling_is_a_choice_named_on_the_result(page: Page) -> None:
    page.fill("#prompt", "a brick wall texture")
    page.check("#tiling")
    body = generate(page, shown=1)
    assert body["tiling"] is True
    assert results(page)[0]["parameters"] == "64×64 · 10 steps · guidance 7.5 · tiling"
    page.uncheck("#tiling")
    assert "tiling" not in generate(page, shown=2)


def test_clip_skip_is_a_field_named_on_the_result_and_one_too_deep_is_explained(page: Page) -> None:
    """The prompt names the test server's LoRA too: a tag goes to the server as typed, and is no error."""
    page.fill("#prompt", "a lighthouse at dusk, <lora:tiny-style:0.8>")
    page.fill("#clip_skip", "2")
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(1, timeout=GENERATION)
    assert results(page)[0]["parameters"] == "64×64 · 10 steps · guidance 7.5 · clip skip 2"
    page.fill("#clip_skip", "4")
    page.click("#generate")
    expect(page.locator("#error-clip_skip")).to_have_text(
        "clip_skip must be in [1, 3] (this model's CLIP layers), got 4", timeout=GENERATION
    )
    expect(page.locator("#gallery .result")).to_have_count(1)


def test_a_mask_painted_over_the_init_image_inpaints_it(page: Page, front: str, tmp_path: Path) -> None:
    """A stroke down the left of the init image goes to the server as a mask of the image's own size, white under
    the stroke and black elsewhere, with the mask blur of its slider; the result says it was inpainted and is the
    image the API makes of the same request. Only masked and fill are sent as picked, and read back from the
    result's PNG. Cleared, the mask is not sent, nor how it inpaints."""
    path = tmp_path / "init.png"
    Image.new("RGB", (80, 64), (40, 90, 160)).save(path)
    page.set_input_files("#init_file", str(path))
    canvas = page.locator("#mask")
    expect(canvas).to_be_visible()
    page.fill("#brush", "40")
    box = canvas.bounding_box()
    assert box is not None and box["width"] > 80  # shown larger than the image: strokes are scaled to it
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] - 2, steps=8)
    page.mouse.up()
    page.fill("#prompt", "a door")
    page.fill("#seed", "77")
    page.fill("#mask_blur", "9")
    expect(page.locator("#mask_blur_value")).to_have_text("9")
    body = generate(page, shown=1)
    assert body["mask_blur"] == 9
    mask = np.asarray(load_image(io.BytesIO(base64.b64decode(body["mask_image"].split(",", 1)[1]))).convert("L"))
    assert mask.shape == (64, 80)
    assert (mask[4:60, 15:17] == 255).all() and (mask[:, 40:] == 0).all() and (mask[:, :8] == 0).all()
    [result] = results(page)
    assert result["parameters"] == "80×64 · 10 steps · guidance 7.5 · strength 0.75 · inpainted"
    answer = requests.post(f"{front}/imagine", json={k: v for k, v in body.items() if k != "stream"},
                           headers={"Accept": "application/json"}, timeout=GENERATION / 1000)  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert result["src"] == "data:image/png;base64," + answer.json()[0]
    assert [body[k] for k in ("masked_content", "inpaint_area", "resize_mode")] == [
        "original", "whole_picture", "just_resize"
    ]  # fmt: skip
    assert "masked_area_padding" not in body

    # A1111's Only masked, filled: sent, the API's image, and read back from the PNG's settings.
    assert page.is_disabled("#masked_area_padding")  # the only-masked box's
    page.check("#invert_mask")
    page.select_option("#masked_content", "fill")
    page.select_option("#inpaint_area", "only_masked")
    page.fill("#masked_area_padding", "8")
    expect(page.locator("#masked_area_padding_value")).to_have_text("8")
    body = generate(page, shown=2)
    assert {k: body[k] for k in ("invert_mask", "masked_content", "inpaint_area", "masked_area_padding")} == {
        "invert_mask": True, "masked_content": "fill", "inpaint_area": "only_masked", "masked_area_padding": 8
    }  # fmt: skip
    answer = requests.post(f"{front}/imagine", json={k: v for k, v in body.items() if k != "stream"},
                           headers={"Accept": "application/json"}, timeout=GENERATION / 1000)  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert results(page)[0]["src"] == "data:image/png;base64," + answer.json()[0]
    assert results(page)[0]["parameters"].endswith("strength 0.75 · inpainted, only masked")
    (tmp_path / "only_masked.png").write_bytes(base64.b64decode(answer.json()[0]))
    page.select_option("#masked_content", "original")
    page.select_option("#inpaint_area", "whole_picture")
    page.uncheck("#invert_mask")
    page.set_input_files("#settings_file", str(tmp_path / "only_masked.png"))
    expect(page.locator("#settings_note")).to_have_text("Settings of only_masked.png set.")
    assert [page.input_value(f"#{id}") for id in ("masked_content", "inpaint_area", "masked_area_padding")] == [
        "fill", "only_masked", "8"
    ]  # fmt: skip
    assert page.is_checked("#invert_mask")

    page.click("#mask_clear")
    body = generate(page, shown=3)
    assert not {"mask_image", "mask_blur", "invert_mask", "masked_content", "inpaint_area"} & set(body)
    assert results(page)[0]["parameters"].endswith("strength 0.75")


def test_hires_fix_sends_its_settings_and_shows_the_larger_image_with_its_second_pass(page: Page, front: str) -> None:
    """Upscale by 2 with Lanczos, 4 Heun hires steps at strength 0.5: the page sends them (the hires slider as the
    strength), the result is the API's 128x128 image and says how it was made, the passes share the bar by cost as
    the server weighs it and the second says it is the hires fix's. A strength the server refuses for the hires fix
    is shown under the hires slider; PLMS is set aside while the fix is on; at 1, or with an init image (which
    disables the section), nothing of it is sent."""
    page.fill("#prompt", "a lighthouse")
    page.fill("#seed", "12")
    page.select_option("#sampler", "plms")
    page.fill("#hr_scale", "2")
    assert page.input_value("#sampler") == "ddim"
    assert page.is_disabled("#sampler option[value='plms']")
    page.select_option("#hr_upscaler", "lanczos")
    page.fill("#hr_steps", "4")
    page.fill("#hr_strength", "0.5")
    expect(page.locator("#hr_strength_value")).to_have_text("0.5")
    page.select_option("#hr_sampler", "heun")
    page.evaluate(RECORD_PROGRESS)
    page.evaluate(RECORD_STATUS)
    body = generate(page, shown=1)
    assert {k: body[k] for k in ("hr_scale", "hr_upscaler", "hr_steps", "strength", "hr_sampler")} == {
        "hr_scale": 2, "hr_upscaler": "lanczos", "hr_steps": 4, "strength": 0.5, "hr_sampler": "heun",
    }  # fmt: skip
    [result] = results(page)
    assert result["parameters"] == (
        "64×64 → 128×128 · 10 steps · guidance 7.5 · hires fix ×2 (Lanczos, 4 steps) · strength 0.5"
    )
    answer = requests.post(f"{front}/imagine", json={k: v for k, v in body.items() if k != "stream"},
                           headers={"Accept": "image/png"}, timeout=GENERATION / 1000)  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert load_image(io.BytesIO(answer.content)).size == (128, 128)
    assert result["src"] == "data:image/png;base64," + base64.b64encode(answer.content).decode()
    statuses = page.evaluate("window.statuses")
    assert "Step 10 of 10" in statuses and "Hires fix: step 4 of 4" in statuses, statuses
    values = [float(value) for value in page.evaluate("window.progressValues")]
    # The first pass's 10 steps cost 10 UNet calls, the second's 4 Heun steps two each but the last at twice the
    # size (4·2 − 1)·2² = 28: the first fills 10/38 of the bar, step by step, then each second-pass step a quarter
    # of the rest.
    first = 10 / 38
    expected = [first * k / 10 for k in range(1, 11)] + [first + (1 - first) * k / 4 for k in range(1, 5)]
    assert values[0] == 0 and values[-1] == 1 and values == sorted(values), values
    assert all(any(abs(value - e) < 1e-6 for value in values) for e in expected), values

    page.fill("#hr_steps", "150")
    page.fill("#hr_strength", "0.05")
    page.click("#generate")
    expect(page.locator("#error-hr_strength")).to_contain_text("the last of a run of 3000", timeout=GENERATION)
    assert page.get_attribute("#hr_strength", "aria-invalid") == "true"
    page.fill("#hr_scale", "1")
    assert page.is_enabled("#sampler option[value='plms']")
    body = generate(page, shown=2)
    assert not {"hr_scale", "hr_upscaler", "hr_steps", "strength"} & set(body)
    page.fill("#hr_scale", "2")
    page.click("#gallery .result button:has-text('Use as init image')")
    expect(page.locator("#hr_scale")).to_be_disabled()
    body = generate(page, shown=3)
    assert "init_image" in body and not {"hr_scale", "hr_upscaler", "hr_steps"} & set(body)


def test_hires_resize_is_sent_in_place_of_the_scale_and_reused_from_its_png(page: Page) -> None:
    """A width to resize to: sent with a height of 0 and without the scale (which A1111 does not read then either),
    the result at the server's size, PLMS set aside. Too large a size is shown under the resize boxes. The result's
    PNG says "Hires resize: 96x0": "Reuse settings" on it, after the boxes are emptied, sets them again and makes the
    same image."""
    page.fill("#prompt", "a lighthouse")
    page.fill("#seed", "12")
    page.fill("#hr_scale", "2")
    page.fill("#hr_resize_x", "96")
    page.fill("#hr_scale", "1")
    assert page.is_disabled("#sampler option[value='plms']")  # the resize alone asks for the fix
    page.fill("#hr_steps", "3")
    page.fill("#hr_strength", "0.6")
    body = generate(page, shown=1)
    assert {k: body.get(k) for k in ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_steps", "strength")} == {
        "hr_scale": None, "hr_resize_x": 96, "hr_resize_y": 0, "hr_steps": 3, "strength": 0.6,
    }  # fmt: skip
    [result] = results(page)
    assert (
        result["parameters"] == "64×64 → 96×96 · 10 steps · guidance 7.5 · hires fix resize (Latent, 3 steps) · "
        "strength 0.6"
    )

    page.fill("#hr_resize_y", "4096")
    page.click("#generate")
    expect(page.locator("#error-hr_resize")).to_contain_text("hr_resize_y", timeout=GENERATION)
    assert page.get_attribute("#hr_resize_y", "aria-invalid") == "true"
    page.fill("#hr_resize_x", "00")  # a number box keeps what was typed: 0 all the same
    page.fill("#hr_resize_y", "")
    page.fill("#hr_steps", "0")
    assert page.is_enabled("#sampler option[value='plms']")
    page.click("#gallery .result button:has-text('Reuse settings')")
    expect(page.locator("#settings_note")).to_contain_text("Settings of the result of seed 12 set.")
    assert (page.input_value("#hr_resize_x"), page.input_value("#hr_resize_y"), page.input_value("#hr_steps")) == (
        "96",
        "0",
        "3",
    )
    generate(page, shown=2)
    again, first = results(page)
    assert again["src"] == first["src"]


def test_variation_seeds_are_sent_named_on_each_result_and_reused(page: Page, front: str) -> None:
    """A variation strength sends the variation seed the user typed; each of the two results keeps the seed and
    names its own variation seed, as the API's images; "Reuse seed" on the second puts its seeds and strength back,
    and on a plain result the strength goes back to 0."""
    page.fill("#prompt", "a lighthouse")
    page.fill("#seed", "12")
    page.fill("#n_samples", "2")
    page.fill("#subseed", "300")
    page.fill("#subseed_strength", "0.4")
    expect(page.locator("#subseed_strength_value")).to_have_text("0.4")
    body = generate(page, shown=2)
    assert (body["seed"], body["subseed"], body["subseed_strength"]) == (12, 300, 0.4)
    shown = results(page)
    assert [result["seed"] for result in shown] == ["Seed 12 · variation 300 (0.4)", "Seed 12 · variation 301 (0.4)"]
    downloads = page.eval_on_selector_all("#gallery .result a[download]", "links => links.map(link => link.download)")
    assert downloads == ["seed_12_variation_300.png", "seed_12_variation_301.png"]
    answer = requests.post(f"{front}/imagine", json={k: v for k, v in body.items() if k != "stream"},
                           headers={"Accept": "application/json"}, timeout=GENERATION / 1000)  # fmt: skip
    assert [result["src"] for result in shown] == ["data:image/png;base64," + png for png in answer.json()]
    page.locator("#gallery .result button:has-text('Reuse seed')").nth(1).click()
    assert (page.input_value("#seed"), page.input_value("#subseed")) == ("12", "301")
    assert page.input_value("#subseed_strength") == "0.4"
    page.fill("#subseed_strength", "0")
    body = generate(page, shown=4)
    assert not {"subseed", "subseed_strength"} & set(body)
    assert results(page)[0]["seed"] == "Seed 12"
    page.locator("#gallery .result button:has-text('Reuse seed')").first.click()
    assert (page.input_value("#subseed"), page.input_value("#subseed_strength")) == ("", "0")


def test_markup_is_text_and_an_invalid_size_is_explained_next_to_it(page: Page, tmp_path: Path) -> None:
    page.fill("#prompt", MARKUP)
    page.fill("#negative_prompt", MARKUP)
    page.click("#generate")
    expect(page.locator("#gallery .result")).to_have_count(1, timeout=GENERATION)
    assert results(page)[0]["prompt"] == MARKUP
    assert page.text_content("#gallery .result .negative") == f"Negative: {MARKUP}"
    assert_no_markup_ran(page)

    page.fill("#W", "100")
    assert page.input_value("#preset") == "custom"
    page.click("#generate")
    expect(page.locator("#error-size")).to_contain_text("W must be a multiple of 8, got 100", timeout=GENERATION)
    assert page.get_attribute("#W", "aria-invalid") == "true"
    expect(page.locator("#gallery .result")).to_have_count(1)

    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copyfile(shot, artifacts / "ui.png")


def test_a_seed_resize_is_sent_and_one_side_alone_is_shown_as_the_servers_error(page: Page) -> None:
    page.fill("#prompt", "a lighthouse")
    page.fill("#seed_resize_from_w", "64")
    page.click("#generate")
    expect(page.locator("#error-seed_resize")).to_have_text(
        "seed_resize_from_h must be set too, since seed_resize_from_w is 64: a seed resize needs both sides "
        "(both 0: none)",
        timeout=GENERATION,
    )
    assert page.get_attribute("#seed_resize_from_h", "aria-invalid") == "true"
    page.locator("#seed_resize_from_h").press_sequentially("64e")  # text the browser cannot read as a number
    page.click("#generate")
    expect(page.locator("#error-seed_resize")).to_have_text(
        "seed_resize_from_h must be a whole number of pixels (empty or 0: none)"
    )
    page.fill("#seed_resize_from_h", "64")
    body = generate(page, shown=1)
    assert (body["seed_resize_from_w"], body["seed_resize_from_h"]) == (64, 64)
    assert "seed from 64×64" in results(page)[0]["parameters"]
    page.fill("#seed_resize_from_w", "")
    page.fill("#seed_resize_from_h", "0")
    body = generate(page, shown=2)
    assert not {"seed_resize_from_w", "seed_resize_from_h"} & set(body)
    assert body["n_iter"] == 1  # the page's images are one batch, whatever the server's default
    # An upscale the browser cannot read as a number would read as empty, which is "no hires fix": named instead.
    page.fill("#hr_scale", "")
    page.locator("#hr_scale").press_sequentially("2e")
    page.click("#generate")
    expect(page.locator("#error-hr_scale")).to_have_text("hr_scale must be a number (1: no hires fix)")


def test_the_servers_loras_and_embeddings_are_offered_and_added_to_the_prompts(page: Page) -> None:
    """The pickers list what the worker describes; a LoRA goes at the end of the prompt as its tag (after a comma,
    not a second one), an embedding's word at the end of the prompt typed in last; the request then sends them."""
    for field in ("#lora_field", "#embedding_field"):  # each shown once its list has come
        expect(page.locator(field)).to_be_visible(timeout=GENERATION)
    assert page.eval_on_selector_all("#lora_pick option", "options => options.map(o => o.value)") == [TINY_LORA]
    options = page.eval_on_selector_all("#embedding_pick option", "options => options.map(o => o.value)")
    assert options == [TINY_EMBEDDING]
    page.fill("#prompt", "a lighthouse, ")
    page.click("#lora_add")
    assert page.input_value("#prompt") == f"a lighthouse, <lora:{TINY_LORA}:1>"
    assert page.input_value("#hr_prompt") == ""  # empty: the prompt's, tags and all
    page.fill("#hr_prompt", "a lighthouse, stormy")
    page.click("#lora_add")  # a hires prompt of its own must carry the prompt's LoRAs: it gets the tag too
    assert page.input_value("#hr_prompt") == f"a lighthouse, stormy, <lora:{TINY_LORA}:1>"
    page.fill("#hr_prompt", "")
    page.fill("#prompt", f"a lighthouse, <lora:{TINY_LORA}:1>")
    page.click("#embedding_add")  # nothing typed in the negative prompt yet: the prompt
    assert page.input_value("#prompt") == f"a lighthouse, <lora:{TINY_LORA}:1>, {TINY_EMBEDDING}"
    page.fill("#negative_prompt", "blurry")
    page.click("#embedding_add")
    assert page.input_value("#negative_prompt") == f"blurry, {TINY_EMBEDDING}"
    body = generate(page, shown=1)
    assert body["prompt"] == f"a lighthouse, <lora:{TINY_LORA}:1>, {TINY_EMBEDDING}"
    assert body["negative_prompt"] == f"blurry, {TINY_EMBEDDING}"


def test_an_error_message_is_shown_as_text(page: Page) -> None:
    """The server's error text goes on the page as text too: a stand-in answer carries markup in its message."""
    answer = json.dumps({"error": f"prompt must not be {MARKUP}", "field": "prompt"})
    page.route("**/imagine/stream", lambda route: route.fulfill(status=400, content_type="application/json",
                                                               body=answer))  # fmt: skip
    page.fill("#prompt", "a lighthouse")
    page.click("#generate")
    expect(page.locator("#error-prompt")).to_have_text(f"prompt must not be {MARKUP}")
    assert_no_markup_ran(page)


def stream_of(*lines: dict) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


def test_progress_counts_images_when_a_request_is_split_over_unet_batches(page: Page) -> None:
    """Six images in UNet batches of 4 and 2 (a stand-in stream): each batch restarts its steps, the bar never
    goes back, and the status says which images are stepping."""
    steps = [{"step": k, "total": 2, "image_index": first, "image_count": count}
             for first, count in ((0, 4), (4, 2)) for k in (1, 2)]  # fmt: skip
    final = {"images": [], "seeds": [], "parameters": {}}
    page.route("**/imagine/stream", lambda route: route.fulfill(status=200, content_type="application/x-ndjson",
                                                               body=stream_of(*steps, final)))  # fmt: skip
    page.fill("#n_samples", "6")
    page.fill("#prompt", "a lighthouse")
    page.evaluate(RECORD_PROGRESS)
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done")
    values = [round(float(value), 3) for value in page.evaluate("window.progressValues")]
    # Waiting, then images done + the batch in flight by its share of steps, over 6: 2/6, 4/6, 4/6 + 1/6, 6/6; done.
    assert values == [0, 0.333, 0.667, 0.833, 1, 1], values


def test_the_form_starts_from_the_servers_defaults_and_keeps_what_was_changed(page: Page) -> None:
    """An operator's handler.defaults are the page's: each control the user has not changed takes the server's
    default once its description comes (a stand-in one here, held back until a field is changed), and the boxes
    take its limits."""
    held: list[Route] = []
    page.route("**/imagine/description", lambda route: held.append(route))
    page.reload()
    page.fill("#clip_skip", "3")  # changed before the description comes: kept
    page.fill("#scale", "7.5")  # set to what it already held: the user chose it, kept too
    described = {
        "defaults": {"W": 64, "H": 64, "ddim_steps": 20, "sampler": "euler_a", "clip_skip": 2, "emphasis": True,
                     "scale": 9, "strength": 0.5, "hr_upscaler": "lanczos", "n_iter": 3},
        "limits": {"max_steps": 300, "max_images": 4, "min_side": 64, "max_side": 1024},
    }  # fmt: skip
    for _ in range(100):  # the page asked at load; its request reaches this thread while Playwright is called
        if held:
            break
        page.wait_for_timeout(50)
    held[0].fulfill(status=200, content_type="application/json", body=json.dumps(described))
    expect(page.locator("#sampler")).to_have_value("euler_a")
    ids = ("W", "H", "ddim_steps", "clip_skip", "scale", "hr_upscaler", "preset")
    assert {id: page.input_value(f"#{id}") for id in ids} == {
        "W": "64", "H": "64", "ddim_steps": "20", "clip_skip": "3", "scale": "7.5", "hr_upscaler": "lanczos",
        "preset": "64x64",
    }  # fmt: skip
    assert page.is_checked("#emphasis") and page.is_disabled("#eta")  # η is DDIM's
    expect(page.locator("#strength_value")).to_have_text("0.5")  # img2img's; the hires fix's stays A1111's 0.7
    expect(page.locator("#hr_strength_value")).to_have_text("0.7")
    assert (page.get_attribute("#ddim_steps", "max"), page.get_attribute("#n_samples", "max")) == ("300", "4")
    assert page.get_attribute("#W", "max") == "1024"


def test_an_answer_that_breaks_off_is_not_called_unreachable(page: Page) -> None:
    """The server answered and its stream then broke (here: a line cut short): the page says so, not that the
    server could not be reached, and the bar keeps how far it got."""
    step = stream_of({"step": 1, "total": 2, "image_index": 0, "image_count": 1})
    page.route("**/imagine/stream", lambda route: route.fulfill(status=200, content_type="application/x-ndjson",
                                                               body=step + '{"step": 2, "tot'))  # fmt: skip
    page.fill("#prompt", "a lighthouse")
    page.click("#generate")
    expect(page.locator("#error-form")).to_contain_text("The server's answer broke off: ")
    assert float(page.get_attribute("#progress", "value") or 0) == 0.5


def test_an_emptied_seed_box_means_a_random_seed_and_an_unreadable_one_is_explained(page: Page) -> None:
    sent: list[dict] = []

    def answer(route: Route) -> None:
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, content_type="application/x-ndjson",
                      body=stream_of({"images": [], "seeds": [], "parameters": {}}))  # fmt: skip

    page.route("**/imagine/stream", answer)
    page.fill("#prompt", "a lighthouse")
    page.fill("#seed", "42")
    assert page.is_checked("#seed_fixed")
    page.fill("#seed", "")
    assert page.is_checked("#seed_random")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done")
    assert "seed" not in sent[-1]

    page.click("#seed_fixed")
    page.locator("#seed").press_sequentially("12e")
    page.click("#generate")
    expect(page.locator("#error-seed")).to_have_text("seed must be a whole number from 0 to 4294967295")
    assert len(sent) == 1


def test_an_init_image_sets_the_size_to_its_own_within_the_limits(page: Page, tmp_path: Path) -> None:
    """The server stretches an init image to W×H: the form takes the image's shape, in multiples of 8, scaled into
    the server's 1024·1024 pixels (or up to its 64-pixel least side), and its resize mode may be picked. A file
    refused before it was read leaves no error once a good one is picked."""
    assert page.is_disabled("#resize_mode")
    page.set_input_files("#init_file", files=[{"name": "big.png", "mimeType": "image/png",
                                               "buffer": bytes(10 * 2**20 + 1)}])  # fmt: skip
    expect(page.locator("#error-init_image")).to_have_text(
        "big.png is 10.0 MB: init_image must be at most 10485760 bytes"
    )
    for (width, height), expected in (((100, 60), ("104", "64")), ((3000, 2000), ("1248", "832"))):
        path = tmp_path / f"photo-{width}.png"
        Image.new("RGB", (width, height), (40, 90, 160)).save(path)
        page.set_input_files("#init_file", str(path))
        expect(page.locator("#W")).to_have_value(expected[0])
        expect(page.locator("#H")).to_have_value(expected[1])
        assert page.input_value("#preset") == "custom"
        expect(page.locator("#error-init_image")).to_have_text("")
        assert not page.is_disabled("#resize_mode")


def test_settings_from_a_png_made_here_make_its_image_again(page: Page, tmp_path: Path) -> None:
    """A result's PNG picked as "Settings from a PNG" on a fresh page sets every field it was made with (its line
    break, written as \\n, a line break again; its brackets read as written, the PNG saying "Emphasis: None"), and
    Generate makes the same PNG, to the byte; a plain prompt's too (read as written, not as A1111's syntax)."""
    page.fill("#prompt", "a lighthouse\n(at dusk)")
    page.fill("#negative_prompt", "fog, rain")
    page.select_option("#sampler", "dpmpp_2m_karras")
    page.fill("#scale", "6")
    page.fill("#clip_skip", "2")
    page.check("#seed_fixed")
    page.fill("#seed", "42")
    page.fill("#subseed_strength", "0.3")
    page.fill("#subseed", "7")
    page.check("#tiling")
    page.fill("#hr_scale", "1.5")
    page.select_option("#hr_upscaler", "latent_bicubic")
    page.fill("#hr_steps", "3")
    page.fill("#hr_strength", "0.55")
    plms = "#sampler option[value='plms']"
    assert page.is_disabled(plms)  # the second pass is an img2img, which PLMS cannot run
    page.fill("#hr_prompt", "a lighthouse at night, stormy")
    page.select_option("#hr_sampler", "euler")
    assert not page.is_disabled(plms)  # now the first pass may be PLMS's
    assert page.is_disabled("#eta")  # DDIM's alone
    body = generate(page, 1)
    assert "eta" not in body and "hr_negative_prompt" not in body
    assert (body["hr_prompt"], body["hr_sampler"]) == ("a lighthouse at night, stormy", "euler")
    page.fill("#prompt", "a red bicycle")
    page.fill("#negative_prompt", "")
    page.fill("#hr_scale", "1")
    page.uncheck("#tiling")
    page.select_option("#sampler", "ddim")
    page.fill("#eta", "0.5")
    assert generate(page, 2)["eta"] == 0.5
    plain, made = results(page)
    paths = []
    for name, result in (("made.png", made), ("plain.png", plain)):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(base64.b64decode(result["src"].split(",", 1)[1]))

    page.reload()
    page.set_input_files("#settings_file", str(paths[0]))
    expect(page.locator("#settings_note")).to_have_text("Settings of made.png set.")
    fields = ("prompt", "negative_prompt", "W", "H", "preset", "ddim_steps", "scale", "sampler", "clip_skip", "seed",
              "subseed", "subseed_strength", "hr_scale", "hr_upscaler", "hr_steps", "hr_strength", "hr_prompt",
              "hr_negative_prompt", "hr_sampler")  # fmt: skip
    assert {field: page.input_value(f"#{field}") for field in fields} == {
        "prompt": "a lighthouse\n(at dusk)", "negative_prompt": "fog, rain", "W": "64", "H": "64", "preset": "64x64",
        "ddim_steps": "10", "scale": "6", "sampler": "dpmpp_2m_karras", "clip_skip": "2", "seed": "42",
        "subseed": "7", "subseed_strength": "0.3", "hr_scale": "1.5", "hr_upscaler": "latent_bicubic",
        "hr_steps": "3", "hr_strength": "0.55", "hr_prompt": "a lighthouse at night, stormy",
        "hr_negative_prompt": "", "hr_sampler": "euler",
    }  # fmt: skip
    assert page.is_checked("#seed_fixed") and page.is_checked("#tiling") and not page.is_checked("#emphasis")
    generate(page, 1)
    assert results(page)[0]["src"] == made["src"]
    page.set_input_files("#settings_file", str(paths[1]))
    expect(page.locator("#settings_note")).to_have_text("Settings of plain.png set.")
    assert not page.is_checked("#emphasis") and not page.is_checked("#tiling")
    assert page.input_value("#hr_scale") == "1" and page.input_value("#negative_prompt") == ""
    assert (page.input_value("#hr_prompt"), page.input_value("#hr_sampler")) == ("", "")
    assert (page.input_value("#sampler"), page.input_value("#eta")) == ("ddim", "0.5")
    generate(page, 2)
    assert results(page)[0]["src"] == plain["src"]
    assert results(page)[0]["parameters"] == "64×64 · 10 steps · guidance 6 · η 0.5 · clip skip 2"

    # A result's own "Reuse settings" reads its PNG the same way: the first PNG's settings back, and its image.
    page.click("#gallery .result >> nth=1 >> text=Reuse settings")
    expect(page.locator("#settings_note")).to_have_text("Settings of the result of seed 42, variation 7 set.")
    assert (page.input_value("#prompt"), page.input_value("#sampler")) == ("a lighthouse\n(at dusk)", "dpmpp_2m_karras")
    generate(page, 3)
    assert results(page)[0]["src"] == made["src"]


def test_settings_from_an_a1111_png_and_what_is_not_done_here(page: Page, tmp_path: Path) -> None:
    """AUTOMATIC1111 1.9's text (UTF-8, so an iTXt chunk): its lines, quoted values and schedule read as A1111 reads
    them (no Emphasis field: its default, our A1111 syntax); what this server does not do is named. A PNG without
    settings is explained."""
    text = (
        "a café, (masterpiece:1.2)\nsoft light\nNegative prompt: blurry\nlowres\n"
        "Steps: 24, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 987, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
        "Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (bicubic), Hires sampler: DPM++ SDE, "
        'Hires prompt: "a café, at night", Lora hashes: "ink: 0123abcd", '
        "Face restoration: CodeFormer, Version: v1.9.4"
    )
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", text)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    page.set_input_files("#settings_file", str(path))
    expect(page.locator("#settings_note")).to_have_text(
        "Settings of a1111.png set. Not available here: RNG: GPU (noise is drawn on the CPU here); "
        "Face restoration: CodeFormer."
    )
    fields = ("prompt", "negative_prompt", "W", "H", "preset", "ddim_steps", "scale", "sampler", "seed",
              "clip_skip", "hr_scale", "hr_steps", "hr_upscaler", "hr_strength", "subseed_strength",
              "seed_resize_from_w", "hr_prompt", "hr_sampler")  # fmt: skip
    assert {field: page.input_value(f"#{field}") for field in fields} == {
        "prompt": "a café, (masterpiece:1.2)\nsoft light", "negative_prompt": "blurry\nlowres", "W": "512",
        "H": "768", "preset": "512x768", "ddim_steps": "24", "scale": "6.5", "sampler": "dpmpp_2m_karras",
        "seed": "987", "clip_skip": "2", "hr_scale": "1.5", "hr_steps": "12", "hr_upscaler": "latent_bicubic",
        "hr_strength": "0.45", "subseed_strength": "0", "seed_resize_from_w": "", "hr_prompt": "a café, at night",
        "hr_sampler": "dpmpp_sde_karras",  # its schedule too, Karras
    }  # fmt: skip
    assert page.is_checked("#emphasis") and not page.is_checked("#weighted_subprompts")
    expect(page.locator("#hr_strength_value")).to_have_text("0.45")

    # Then a PLMS PNG without a seed, its variation strength between the slider's steps: PLMS is allowed again
    # (no hires fix), the seed is drawn, and the rounding is named.
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox\nSteps: 5, Sampler: PLMS, CFG scale: 7, Size: 64x64, Variation seed: 3, "
                                "Variation seed strength: 0.125, Eta DDIM: 0.3, RNG: CPU, Emphasis: None")  # fmt: skip
    Image.new("RGB", (8, 8)).save(tmp_path / "plms.png", pnginfo=info)
    page.set_input_files("#settings_file", str(tmp_path / "plms.png"))
    expect(page.locator("#settings_note")).to_have_text(
        "Settings of plms.png set. Not available here: Variation seed strength: 0.125 (set to 0.13); Eta DDIM: 0.3."
    )
    assert (page.input_value("#sampler"), page.input_value("#hr_scale"), page.input_value("#seed")) == ("plms", "1", "")
    assert page.is_checked("#seed_random") and not page.is_checked("#emphasis")
    assert page.input_value("#eta") == "0" and page.is_disabled("#eta")  # DDIM's η, not PLMS's
    # DDIM's η beside a hires sampler of another kind, which runs at none here: named too.
    info = PngImagePlugin.PngInfo()
    text = "a fox\nSteps: 5, Sampler: DDIM, CFG scale: 7, Size: 64x64, Eta DDIM: 0.3, Hires upscale: 2, Hires "
    info.add_text("parameters", text + "upscaler: Latent, Denoising strength: 0.5, Hires sampler: Euler")
    Image.new("RGB", (8, 8)).save(tmp_path / "ddim.png", pnginfo=info)
    page.set_input_files("#settings_file", str(tmp_path / "ddim.png"))
    expect(page.locator("#settings_note")).to_contain_text(
        "Not available here: RNG: GPU (noise is drawn on the CPU here); Eta DDIM: 0.3."
    )
    assert (page.input_value("#sampler"), page.input_value("#hr_sampler")) == ("ddim", "euler")
    assert page.is_disabled("#eta")
    # A1111 1.9's hires schedule of its own: the first pass's sampler under it.
    info = PngImagePlugin.PngInfo()
    text = "a fox\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Size: 64x64, Hires upscale: 2, "
    info.add_text("parameters", text + "Denoising strength: 0.5, Hires schedule type: Uniform, RNG: CPU")
    Image.new("RGB", (8, 8)).save(tmp_path / "uniform.png", pnginfo=info)
    page.set_input_files("#settings_file", str(tmp_path / "uniform.png"))
    expect(page.locator("#settings_note")).to_have_text("Settings of uniform.png set.")
    assert (page.input_value("#sampler"), page.input_value("#hr_sampler")) == ("dpmpp_2m_karras", "dpmpp_2m")
    # A1111 1.9's Automatic: its default for the sampler, Karras for DPM2 a; DPM++ 2M SDE's exponential one is named.
    for sampler, chosen, note in (("DPM2 a", "dpm2_a_karras", ""),
                                  ("DPM++ 2M SDE", "dpmpp_2m_sde", " Not available here: Schedule type: Automatic "
                                                                    "(exponential).")):  # fmt: skip
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"a fox\nSteps: 5, Sampler: {sampler}, Schedule type: Automatic, CFG scale: 7, "
                                    "Size: 64x64, RNG: CPU")  # fmt: skip
        Image.new("RGB", (8, 8)).save(tmp_path / "automatic.png", pnginfo=info)
        page.set_input_files("#settings_file", str(tmp_path / "automatic.png"))
        expect(page.locator("#settings_note")).to_have_text(f"Settings of automatic.png set.{note}")
        assert page.input_value("#sampler") == chosen
    # A1111 1.6's hires fix at 1×, a second pass at the same size: a resize to it here (the form's scale 1 is none).
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox\nSteps: 5, Sampler: Euler, CFG scale: 7, Size: 64x48, Denoising strength: 0.5, "
                                "Hires upscale: 1, Hires upscaler: Latent, RNG: CPU")  # fmt: skip
    Image.new("RGB", (8, 8)).save(tmp_path / "refine.png", pnginfo=info)
    page.set_input_files("#settings_file", str(tmp_path / "refine.png"))
    expect(page.locator("#settings_note")).to_have_text("Settings of refine.png set.")
    assert [page.input_value(f"#{side}") for side in ("hr_scale", "hr_resize_x", "hr_resize_y")] == ["1", "64", "48"]

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    page.set_input_files("#settings_file", str(plain))
    expect(page.locator("#error-settings_file")).to_have_text(
        "plain.png holds no generation settings (a PNG made here, or by AUTOMATIC1111, does)"
    )
    assert page.input_value("#prompt") == "a fox"  # the form as it was

    # A prompt alone on one long line of words (another tool's PNG): read in no time, where trying a key at each of
    # its positions took the page minutes.
    long_line = PngImagePlugin.PngInfo()
    long_line.add_text("parameters", "a lighthouse " * 30_000)
    Image.new("RGB", (8, 8)).save(tmp_path / "long.png", pnginfo=long_line)
    page.set_input_files("#settings_file", str(tmp_path / "long.png"))
    expect(page.locator("#error-settings_file")).to_have_text(
        "long.png holds no generation settings (a PNG made here, or by AUTOMATIC1111, does)"
    )

    page.set_input_files("#init_file", str(plain))  # a text-to-image PNG's settings beside an init image
    expect(page.locator("#init_preview")).to_be_visible()
    page.set_input_files("#settings_file", str(path))
    expect(page.locator("#settings_note")).to_contain_text("It was made without an init image: remove yours.")
