"""The optimizedSD-compatible command lines (ldm/cli.py): reference images through them, file names and numbering,
the parameters each file carries, and every optimizedSD flag — accepted, or refused with a clear message."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from safetensors.torch import save_file

from ldm import arguments, cli
from ldm.cli import main, next_index, read_prompts
from ldm.cli_flags import DEFAULT_CKPT, DEFAULT_PROMPT, Mode, build_parser
from ldm.generation_request import SAMPLERS
from ldm.lora import short_hash
from ldm.output_names import prompt_folder
from ldm.parts import load_checkpoint, write_split
from ldm.pipeline import Pipeline
from ldm.png_info import read_parameters
from tests.bad_requests import black_png
from tests.loras import model_lora, write_lora
from tests.reference import (
    BF16_MIN_PSNR_DB,
    REFERENCE,
    TINY_CONFIG,
    TINY_SAFETENSORS,
    assert_matches_png,
    case,
    load_image,
    psnr,
    reference_png,
    request_for,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--device", "cpu", "--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG)]
# First 10 hex digits of the fixture's sha256 (reference README): what "Model hash" must say.
TINY_HASH = "8e79c1729f"


def case_argv(case_id: str, size: bool = True) -> list[str]:
    """The flags that run a reference case (n_samples given: optimizedSD's default is 5); `size` False: no --H/--W."""
    r = case(case_id)["request"]
    argv = ["--prompt", r["prompt"], "--seed", str(r["seed"])]
    if size:
        argv += ["--H", str(r["H"]), "--W", str(r["W"])]
    argv += ["--ddim_steps", str(r["ddim_steps"]), "--scale", str(r["scale"]), "--ddim_eta", str(r["eta"])]
    argv += ["--n_samples", str(r["n_samples"]), "--n_iter", str(r["n_iter"])]
    if r["negative_prompt"]:
        argv += ["--negative_prompt", r["negative_prompt"]]
    if r["init_image"]:
        argv += ["--init-img", str(REFERENCE / r["init_image"]), "--strength", str(r["strength"])]
    return argv


def run_cli(argv: list[str], mode: Mode = "txt2img") -> int:
    """main's exit code, whether it returns it or argparse exits."""
    try:
        return main(argv, mode)
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture(autouse=True)
def cpu_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the command lines print must not depend on the CPU running the tests: the AMX note has its own test."""
    monkeypatch.setattr(cli, "has_amx_bf16", lambda: False)


@pytest.mark.parametrize(
    ("flags", "noted"),
    [([], True), (["--precision", "full"], True), (["--precision", "bf16"], False), (["--n_samples", "0"], False)],
)
def test_an_amx_cpu_is_told_bf16_would_be_faster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str], noted: bool
) -> None:
    """Once every input is checked, on a CPU running float32: a refused command says only why it was refused."""
    monkeypatch.setattr(cli, "has_amx_bf16", lambda: True)
    main([*case_argv("basic"), *MODEL, "--ddim_steps", "2", "--skip_save", *flags])
    note = "note: this CPU has AMX: --precision bf16 makes images about twice as fast"
    assert (note in capsys.readouterr().err) is noted


@pytest.fixture
def model_must_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if the command gets as far as loading the model: its input should have been refused first."""

    def fail(*args: object) -> None:
        pytest.fail("the model loaded before the input was refused")

    monkeypatch.setattr(cli, "load_model", fail)


STOPPED = "stopped where the model would load"


@pytest.fixture
def model_stops_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command ends, with STOPPED as its error, where the model would load: every input was taken."""

    def stop(*args: object) -> None:
        raise cli.CliError(STOPPED)

    monkeypatch.setattr(cli, "load_model", stop)


def read_png(path: Path) -> tuple[np.ndarray, str | None]:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return pixels, read_parameters(data)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# optimizedSD's folder for the reference cases' prompts under --outdir: the prompt's words joined by "_".
BASIC, MOSAIC = "a_cottage_garden_full_of_tulips", "a_mosaic_of_colorful_tiles"


def test_txt2img_basic_matches_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*case_argv("basic"), *MODEL, "--outdir", str(tmp_path)]) == 0
    assert names(tmp_path) == [BASIC] and names(tmp_path / BASIC) == ["seed_1000_00000.png"]
    pixels, parameters = read_png(tmp_path / BASIC / "seed_1000_00000.png")
    assert_matches_png(pixels, reference_png(case("basic")["images"][0]))
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(tmp_path / BASIC / "seed_1000_00000.png")]
    assert "10/10" in err  # the progress bar counted every denoising step
    # (e) the parameters chunk: prompt, steps, seed, size, and which weights made it.
    assert parameters is not None
    prompt_line, settings = parameters.split("\n")
    assert prompt_line == "a cottage garden full of tulips"
    for item in (
        "Steps: 10",
        "Sampler: DDIM",
        "CFG scale: 7.5",
        "Seed: 1000",
        "Size: 64x64",
        f"Model hash: {TINY_HASH}",
        "Model: tiny-dev",  # the checkpoint's file name, by which civitai links it
    ):
        assert item in settings.split(", ")


@pytest.mark.parametrize("sampler", ["plms", "euler_a"])
def test_txt2img_sampler_by_name_writes_the_pipelines_image(
    pipeline: Pipeline, sampler: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """optimizedSD's default sampler and an ancestral one: the image is the pipeline's (tests/test_pipeline.py holds
    those against diffusers), labelled so, and the progress bar counts the 10 steps."""
    assert main([*case_argv("basic"), *MODEL, "--sampler", sampler, "--outdir", str(tmp_path)]) == 0
    pixels, parameters = read_png(tmp_path / BASIC / "seed_1000_00000.png")
    expected = pipeline.generate(replace(request_for(case("basic")), sampler=sampler)).images[0]
    assert np.array_equal(pixels, expected)
    assert parameters is not None and f"Sampler: {SAMPLERS[sampler]}" in parameters.split("\n")[1].split(", ")
    assert "10/10" in capsys.readouterr().err


def test_img2img_with_a_k_diffusion_sampler(pipeline: Pipeline, tmp_path: Path) -> None:
    """optimizedSD's img2img ran DDIM alone; ours takes the other samplers too (but PLMS)."""
    argv = [*case_argv("img2img"), *MODEL, "--sampler", "dpmpp_2m_karras", "--outdir", str(tmp_path)]
    assert main(argv, mode="img2img") == 0
    pixels, parameters = read_png(tmp_path / MOSAIC / "seed_4242_00000.png")
    expected = pipeline.generate(replace(request_for(case("img2img")), sampler="dpmpp_2m_karras")).images[0]
    assert np.array_equal(pixels, expected)
    assert parameters is not None and "Sampler: DPM++ 2M Karras" in parameters


def test_img2img_with_a_mask_inpaints(pipeline: Pipeline, tmp_path: Path) -> None:
    """--mask: the pipeline's inpainting of the init image, the opaque half repainted (a white stroke on
    transparent white, as editors export one: its alpha is the mask), its seam as --mask_blur says (here 0, not the
    default 4)."""
    half = np.repeat([[0] * 40 + [255] * 40], 64, axis=0).astype(np.uint8)
    mask = tmp_path / "mask.png"
    Image.merge("RGBA", [Image.new("L", (80, 64), 255)] * 3 + [Image.fromarray(half)]).save(mask)
    argv = [*case_argv("img2img"), *MODEL, "--mask", str(mask), "--mask_blur", "0", "--outdir", str(tmp_path / "out")]
    assert main(argv, mode="img2img") == 0
    pixels, _ = read_png(tmp_path / "out" / MOSAIC / "seed_4242_00000.png")
    request = replace(request_for(case("img2img")), mask_image=Image.fromarray(half), mask_blur=0)
    assert np.array_equal(pixels, pipeline.generate(request).images[0])
    assert not np.array_equal(pixels, pipeline.generate(replace(request, mask_blur=4)).images[0])
    assert not np.array_equal(pixels, pipeline.generate(request_for(case("img2img"))).images[0])


@pytest.mark.parametrize(
    ("flags", "change"),
    [
        (["--H", "64", "--W", "64", "--resize_mode", "crop_and_resize"],
         {"height": 64, "width": 64, "resize_mode": "crop_and_resize"}),
        (["--mask", "MASK", "--invert_mask"], {"invert_mask": True}),
        (["--mask", "MASK", "--masked_content", "fill"], {"masked_content": "fill"}),
        (["--mask", "MASK", "--inpaint_area", "only_masked", "--masked_area_padding", "8"],
         {"inpaint_area": "only_masked", "masked_area_padding": 8}),
    ],
    ids=["resize_mode", "invert_mask", "masked_content", "masked_area_padding"],
)  # fmt: skip
def test_img2img_flags_reach_the_pipeline(
    pipeline: Pipeline, tmp_path: Path, flags: list[str], change: dict[str, Any]
) -> None:
    """A1111's img2img settings by flag (MASK: a 30×24 box to repaint): the pipeline's image of the request they
    set, which is not the one without them (the flag must matter here)."""
    box = np.zeros((64, 80), np.uint8)
    box[20:44, 25:55] = 255
    mask = tmp_path / "mask.png"
    Image.fromarray(box).save(mask)
    argv = [*case_argv("img2img"), *MODEL, *[str(mask) if flag == "MASK" else flag for flag in flags]]
    assert main([*argv, "--outdir", str(tmp_path / "out")], mode="img2img") == 0
    (written,) = (tmp_path / "out").rglob("*.png")
    request = replace(request_for(case("img2img")), mask_image=Image.fromarray(box) if "--mask" in flags else None)
    expected = pipeline.generate(replace(request, **change)).images[0]
    assert np.array_equal(read_png(written)[0], expected)
    assert not np.array_equal(expected, pipeline.generate(request).images[0])


def test_txt2img_hires_fix_flags(pipeline: Pipeline, tmp_path: Path) -> None:
    """--hr_scale, --hr_upscaler, --hr_steps and --strength: the pipeline's hires fix, its size in the file and its
    settings in the file's parameters."""
    flags = ["--hr_scale", "1.5", "--hr_upscaler", "lanczos", "--hr_steps", "3", "--strength", "0.6"]
    argv = [*case_argv("basic"), *MODEL, *flags, "--outdir", str(tmp_path)]
    assert main(argv) == 0
    pixels, parameters = read_png(tmp_path / BASIC / "seed_1000_00000.png")
    request = replace(request_for(case("basic")), hr_scale=1.5, hr_upscaler="lanczos", hr_steps=3, strength=0.6)
    assert pixels.shape == (96, 96, 3)
    assert np.array_equal(pixels, pipeline.generate(request).images[0])
    assert parameters is not None
    assert "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Lanczos" in parameters
    # --hr_resize_x and --hr_resize_y: A1111's "Hires resize" instead of the scale.
    flags = ["--hr_resize_x", "80", "--hr_resize_y", "72", "--hr_steps", "3", "--strength", "0.6"]
    assert main([*case_argv("basic"), *MODEL, *flags, "--outdir", str(tmp_path)]) == 0
    pixels, parameters = read_png(tmp_path / BASIC / "seed_1000_00001.png")
    request = replace(request_for(case("basic")), hr_resize_x=80, hr_resize_y=72, hr_steps=3, strength=0.6)
    assert pixels.shape == (72, 80, 3)
    assert np.array_equal(pixels, pipeline.generate(request).images[0])
    assert parameters is not None and "Hires resize: 80x72, Hires steps: 3, Hires upscaler: Latent" in parameters
    # --hr_prompt, --hr_negative_prompt and --hr_sampler: the second pass's own.
    flags = ["--hr_scale", "1.5", "--hr_steps", "3", "--strength", "0.6", "--hr_prompt", "a stormy sea",
             "--hr_negative_prompt", "sunny", "--hr_sampler", "euler_a"]  # fmt: skip
    assert main([*case_argv("basic"), *MODEL, *flags, "--outdir", str(tmp_path)]) == 0
    pixels, parameters = read_png(tmp_path / BASIC / "seed_1000_00002.png")
    request = replace(request_for(case("basic")), hr_scale=1.5, hr_steps=3, strength=0.6, hr_prompt="a stormy sea",
                      hr_negative_prompt="sunny", hr_sampler="euler_a")  # fmt: skip
    assert np.array_equal(pixels, pipeline.generate(request).images[0])
    assert parameters is not None
    assert "Hires sampler: Euler a, Hires prompt: a stormy sea, Hires negative prompt: sunny," in parameters


def test_variation_seeds_keep_the_seed_and_count_the_variation_seed_over_the_run(
    pipeline: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--subseed and --subseed_strength: each file is the pipeline's image of seed 1000 and its own variation seed,
    counting on across iterations; the closing line says both."""
    argv = [*case_argv("basic"), *MODEL, "--subseed", "50", "--subseed_strength", "0.5", "--n_iter", "2"]
    assert main([*argv, "--outdir", str(tmp_path)]) == 0
    assert names(tmp_path / BASIC) == ["seed_1000_00000.png", "seed_1000_00001.png"]
    pixels, parameters = read_png(tmp_path / BASIC / "seed_1000_00001.png")
    request = replace(request_for(case("basic")), subseed=51, subseed_strength=0.5)
    assert np.array_equal(pixels, pipeline.generate(request).images[0])
    assert parameters is not None and "Seed: 1000, Size: 64x64" in parameters
    assert "Variation seed: 51, Variation seed strength: 0.5" in parameters
    assert "seed 1000, subseeds 50..51" in capsys.readouterr().err


def test_seed_resize_flags_paint_the_pipelines_image(pipeline: Pipeline, tmp_path: Path) -> None:
    flags = ["--seed_resize_from_h", "32", "--seed_resize_from_w", "48"]
    assert main([*case_argv("basic"), *MODEL, *flags, "--outdir", str(tmp_path)]) == 0
    pixels, parameters = read_png(tmp_path / BASIC / "seed_1000_00000.png")
    request = replace(request_for(case("basic")), seed_resize_from_h=32, seed_resize_from_w=48)
    assert np.array_equal(pixels, pipeline.generate(request).images[0])
    assert not np.array_equal(pixels, pipeline.generate(request_for(case("basic"))).images[0])
    assert parameters is not None
    assert f"Seed: 1000, Size: 64x64, Model hash: {TINY_HASH}, Model: tiny-dev, Seed resize from: 48x32, RNG: CPU" in (
        parameters
    )


def test_tiling_flag_paints_the_pipelines_tiled_image(pipeline: Pipeline, tmp_path: Path) -> None:
    assert main([*case_argv("basic"), *MODEL, "--tiling", "--outdir", str(tmp_path)]) == 0
    pixels, parameters = read_png(tmp_path / BASIC / "seed_1000_00000.png")
    assert np.array_equal(pixels, pipeline.generate(replace(request_for(case("basic")), tiling=True)).images[0])
    assert parameters is not None and "Tiling: True" in parameters


def test_an_inpainting_checkpoint_defaults_to_the_inpainting_config(tmp_path: Path) -> None:
    from ldm.config import INPAINTING_CONFIG, TEXT_TO_IMAGE_CONFIG, load_config
    from ldm.random_weights import random_state_dict, save_checkpoint

    ckpt = tmp_path / "sd-v1-5-inpainting.ckpt"
    save_checkpoint(random_state_dict(load_config(REPO / "tests" / "fixtures" / "tiny-inpainting.yaml")), ckpt)
    assert cli.locate_model(str(ckpt), None).config_path == INPAINTING_CONFIG
    assert cli.locate_model(str(TINY_SAFETENSORS), None).config_path == TEXT_TO_IMAGE_CONFIG


def test_txt2img_script_as_subprocess(tmp_path: Path) -> None:
    command = [sys.executable, "-W", "error", "scripts/txt2img.py", *case_argv("basic"), *MODEL]
    done = subprocess.run([*command, "--outdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(tmp_path / BASIC / "seed_1000_00000.png")]
    assert_matches_png(read_png(tmp_path / BASIC / "seed_1000_00000.png")[0], reference_png(case("basic")["images"][0]))


def test_img2img_matches_reference(tmp_path: Path) -> None:
    assert main([*case_argv("img2img"), *MODEL, "--outdir", str(tmp_path)], mode="img2img") == 0
    assert names(tmp_path / MOSAIC) == ["seed_4242_00000.png"]
    pixels, parameters = read_png(tmp_path / MOSAIC / "seed_4242_00000.png")
    assert_matches_png(pixels, reference_png(case("img2img")["images"][0]))
    assert parameters is not None
    assert "Size: 80x64" in parameters
    assert "Denoising strength: 0.5" in parameters


def test_img2img_size_defaults_to_init_image(tmp_path: Path) -> None:
    assert main([*case_argv("img2img", size=False), *MODEL, "--outdir", str(tmp_path)], mode="img2img") == 0
    assert_matches_png(
        read_png(tmp_path / MOSAIC / "seed_4242_00000.png")[0], reference_png(case("img2img")["images"][0])
    )


def test_emphasis_reads_a1111_syntax(pipeline: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--emphasis: the pipeline's image for the prompt in A1111's syntax, read whole past 75 tokens (no warning)."""
    prompt = "a (lighthouse:1.3) in a storm, " * 12
    argv = [*case_argv("basic"), *MODEL, "--prompt", prompt, "--emphasis", "--outdir", str(tmp_path)]
    assert main(argv) == 0
    (written,) = tmp_path.rglob("seed_1000_00000.png")  # in the prompt's folder, its name cut at 150 characters
    assert len(str(written.parent)) == 150 and written.parent.name.startswith("a_(lighthouse_1.3)_in_a_storm,_a_")
    pixels, parameters = read_png(written)
    request = replace(request_for(case("basic")), prompt=prompt, emphasis=True)
    assert np.array_equal(pixels, pipeline.generate(request).images[0])
    assert parameters is not None and "Emphasis: Original" in parameters
    assert "warning" not in capsys.readouterr().err


def test_a_lora_tag_merges_a_file_of_the_lora_dir(tmp_path: Path) -> None:
    """`<lora:name:w>` in --prompt reads name.safetensors from --lora_dir: the pipeline's image with that folder, the
    tag kept in the PNG's prompt."""
    folder = tmp_path / "loras"
    write_lora(folder / "ink.safetensors", model_lora(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)))
    prompt = "a lighthouse in a storm <lora:ink:0.9>"
    argv = [*case_argv("basic"), *MODEL, "--lora_dir", str(folder)]
    assert main([*argv, "--prompt", prompt, "--outdir", str(tmp_path / "out")]) == 0
    pixels, parameters = read_png(tmp_path / "out" / "a_lighthouse_in_a_storm_<lora_ink_0.9>" / "seed_1000_00000.png")
    request = replace(request_for(case("basic")), prompt=prompt)
    lora_pipeline = Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG), lora_dir=folder)
    assert np.array_equal(pixels, lora_pipeline.generate(request).images[0])
    assert parameters is not None and parameters.startswith(prompt + "\n")
    assert parameters.endswith(f', Lora hashes: "ink: {short_hash(folder / "ink.safetensors")}"')


def test_a_word_naming_an_embedding_of_the_embeddings_dir_stands_for_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--embeddings_dir's `glow.safetensors` makes `glow` in the prompt its vectors: the pipeline's image with that
    folder; the words CLIP will not read are counted with the embedding's width before the model loads."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file(
        {"emb_params": torch.randn(3, 32, generator=torch.Generator().manual_seed(4))}, str(folder / "glow.safetensors")
    )
    prompt = "a lighthouse in a storm, glow"
    argv = [*case_argv("basic"), *MODEL, "--embeddings_dir", str(folder), "--outdir", str(tmp_path / "out")]
    assert main([*argv, "--prompt", prompt]) == 0
    pixels, _ = read_png(tmp_path / "out" / "a_lighthouse_in_a_storm,_glow" / "seed_1000_00000.png")
    request = replace(request_for(case("basic")), prompt=prompt)
    expected = Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG), embeddings_dir=folder).generate(request)
    assert np.array_equal(pixels, expected.images[0])
    capsys.readouterr()
    assert main([*argv, "--prompt", "wave " * 73 + "glow", "--skip_save"]) == 0
    assert "the 3 after them were left out: glow" in capsys.readouterr().err  # whole, as CLIP leaves it out


def test_a_lora_the_folder_lacks_fails_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_must_not_load: None
) -> None:
    """Also in a --from-file prompt after the first: every prompt's tags are checked before minutes of loading."""
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ink.safetensors").write_bytes(b"")
    argv = [*case_argv("basic"), *MODEL, "--lora_dir", str(tmp_path / "loras"), "--skip_save"]
    assert run_cli([*argv, "--prompt", "a lighthouse <lora:inc:1>"]) == 2
    assert "error: --prompt: prompt: no LoRA named 'inc'; the LoRA folder holds: ink" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse <lora:ink:1>\na harbour <lora:ink:much>\n")
    assert run_cli([*argv, "--from-file", str(prompts)]) == 2
    assert "error: --from-file: prompt: '<lora:ink:much>': 'much' is not a number" in capsys.readouterr().err
    # And a hires prompt that must name each prompt's LoRAs.
    prompts.write_text("a lighthouse\na harbour <lora:ink:1>\n")
    assert run_cli([*argv, "--from-file", str(prompts), "--hr_scale", "2", "--hr_prompt", "at night"]) == 2
    assert "error: --hr_prompt: hr_prompt: its LoRA tags (<lora:…>) must be the prompt's" in capsys.readouterr().err


def test_a_sideways_stored_photo_is_read_upright(tmp_path: Path) -> None:
    """An init image with an EXIF orientation (a phone's portrait photo) is used as viewers show it: its size too."""
    photo = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80×64, turned 90° clockwise to view
    load_image(REFERENCE / "init_dev_80x64.png").convert("RGB").save(photo, exif=exif)
    argv = [*case_argv("img2img", size=False), *MODEL, "--init-img", str(photo), "--outdir", str(tmp_path / "out")]
    assert main(argv, mode="img2img") == 0
    assert read_png(tmp_path / "out" / MOSAIC / "seed_4242_00000.png")[0].shape == (80, 64, 3)


@pytest.mark.parametrize("case_id", ["negative", "eta", "scale1"])
def test_txt2img_flags_reach_the_pipeline(case_id: str, tmp_path: Path) -> None:
    """--negative_prompt, --ddim_eta, --scale 1 and a non-square --H/--W, each against its reference image."""
    assert main([*case_argv(case_id), *MODEL, "--outdir", str(tmp_path)]) == 0
    image = case(case_id)["images"][0]
    folder = tmp_path / case(case_id)["request"]["prompt"].replace(" ", "_")
    assert_matches_png(read_png(folder / f"seed_{image['seed']}_00000.png")[0], reference_png(image))


def test_batch_gives_each_image_its_seed_and_number(tmp_path: Path) -> None:
    assert main([*case_argv("batch3"), *MODEL, "--outdir", str(tmp_path)]) == 0
    folder = tmp_path / "a_paper_boat_floating_down_a_stream"
    assert names(folder) == ["seed_31337_00000.png", "seed_31338_00001.png", "seed_31339_00002.png"]
    for index, image in enumerate(case("batch3")["images"]):
        pixels, parameters = read_png(folder / f"seed_{image['seed']}_{index:05}.png")
        assert_matches_png(pixels, reference_png(image))
        assert f"Seed: {image['seed']}" in (parameters or "")


@pytest.mark.parametrize("kind", ["ckpt", "split folder"])
def test_other_checkpoint_forms(kind: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    if kind == "ckpt":
        source = ["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG)]
    else:
        write_split(TINY_SAFETENSORS, TINY_CONFIG, tmp_path / "split", dtype="fp32")
        source = ["--ckpt", str(tmp_path / "split")]
    out = tmp_path / "out"
    assert main([*case_argv("basic"), "--device", "cpu", *source, "--outdir", str(out)]) == 0
    assert_matches_png(read_png(out / BASIC / "seed_1000_00000.png")[0], reference_png(case("basic")["images"][0]))


def test_numbering_continues_after_the_highest_existing_number_in_the_prompts_folder(tmp_path: Path) -> None:
    folder = tmp_path / BASIC
    folder.mkdir()
    # A sidecar named after an image (seed_2_00050.png.json) is no image of ours: its number is not taken.
    for name in ("seed_1_00000.png", "seed_9_00004.jpg", "grid-0011.png", "notes.txt", "seed_x_00099.png",
                 "seed_2_00050.png.json"):  # fmt: skip
        (folder / name).write_bytes(b"")
    (tmp_path / "seed_1_00041.png").write_bytes(b"")  # beside the prompt's folder: another prompt's count
    assert next_index(folder) == 5
    assert main([*case_argv("basic"), *MODEL, "--outdir", str(tmp_path), "--n_iter", "2"]) == 0
    assert {"seed_1000_00005.png", "seed_1001_00006.png"} <= set(names(folder))
    assert_matches_png(read_png(folder / "seed_1000_00005.png")[0], reference_png(case("basic")["images"][0]))
    assert next_index(folder) == 7


@pytest.mark.parametrize(
    ("outdir", "prompt", "folder"),
    [
        ("/out", "a castle: night", "a_castle__night"),  # optimizedSD's: split at spaces and colons, joined by "_"
        ("/out", "a/b ../../etc", "a_b_.._.._etc"),  # never another folder than the prompt's own under --outdir
        ("/out", "..", "_"),
        ("/out", "", ""),  # --outdir itself, as optimizedSD's
        ("/out", "x" * 200, "x" * (150 - len("/out/"))),  # the path cut at 150 characters
        ("/out", "龘" * 200, "龘" * 85),  # and a name at 255 bytes
        ("/" + "d" * 139, "x" * 40, "x" * 16),  # 140 characters of --outdir leave 9 for the name: it keeps 16
    ],
)
def test_each_prompt_has_optimizedsds_folder(outdir: str, prompt: str, folder: str) -> None:
    assert prompt_folder(Path(outdir), prompt) == Path(outdir) / folder


def test_next_index_of_an_empty_or_missing_folder(tmp_path: Path) -> None:
    assert next_index(tmp_path) == 0
    assert next_index(tmp_path / "missing") == 0


def test_from_file_runs_each_prompt_with_continuing_seeds(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cottage garden full of tulips\n\na mosaic of colorful tiles\n", encoding="utf-8")
    out = tmp_path / "out"
    settings = ["--seed", "1000", "--H", "64", "--W", "64", "--ddim_steps", "10", "--n_samples", "1"]
    assert main(["--from-file", str(prompts), *settings, "--n_iter", "2", *MODEL, "--outdir", str(out)]) == 0
    # optimizedSD's order: iterations outside, prompts inside; the seed goes up by one per image; each prompt's
    # images in its own folder, numbered there.
    expected = {
        f"{BASIC}/seed_1000_00000.png": "a cottage garden full of tulips",
        f"{MOSAIC}/seed_1001_00000.png": "a mosaic of colorful tiles",
        f"{BASIC}/seed_1002_00001.png": "a cottage garden full of tulips",
        f"{MOSAIC}/seed_1003_00001.png": "a mosaic of colorful tiles",
    }
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*.png")) == sorted(expected)
    for name, prompt in expected.items():
        parameters = read_png(out / name)[1] or ""
        assert parameters.split("\n")[0] == prompt
    assert_matches_png(read_png(out / BASIC / "seed_1000_00000.png")[0], reference_png(case("basic")["images"][0]))
    first, second = read_png(out / BASIC / "seed_1000_00000.png")[0], read_png(out / MOSAIC / "seed_1001_00000.png")[0]
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 10


def test_seeds_count_on_image_by_image_over_batches_prompts_and_iterations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """optimizedSD's loop raised the seed by one after every image it saved: across a batch's --n_samples, then the
    next prompt's batch, then the next iteration; the closing line counts every image."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na hen\n", encoding="utf-8")
    out = tmp_path / "out"
    settings = ["--seed", "1000", "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "2"]
    assert main(["--from-file", str(prompts), *settings, *MODEL, "--outdir", str(out)]) == 0
    # (prompt's folder, seed, number in the folder) in the order they are made.
    made = [("a_fox", 1000, 0), ("a_fox", 1001, 1), ("a_hen", 1002, 0), ("a_hen", 1003, 1),
            ("a_fox", 1004, 2), ("a_fox", 1005, 3), ("a_hen", 1006, 2), ("a_hen", 1007, 3)]  # fmt: skip
    expected = {f"{folder}/seed_{seed}_{n:05}.png": seed for folder, seed, n in made}
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*.png")) == sorted(expected)
    for name, seed in expected.items():
        assert f"Seed: {seed}," in (read_png(out / name)[1] or "")
    assert "8 image(s) in " in (err := capsys.readouterr().err) and f", seeds 1000..1007, in {out}\n" in err


def test_weighted_subprompts_write_the_pipelines_weighted_image(pipeline: Pipeline, tmp_path: Path) -> None:
    """tests/test_subprompts.py holds the pipeline's conditioning against CLIP's embeddings of each sub-prompt."""
    argv = [*case_argv("basic"), "--prompt", "a castle:0.7 a forest:0.3", "--weighted_subprompts"]
    assert main([*argv, *MODEL, "--outdir", str(tmp_path)]) == 0
    pixels, parameters = read_png(tmp_path / "a_castle_0.7_a_forest_0.3" / "seed_1000_00000.png")
    request = replace(request_for(case("basic")), prompt="a castle:0.7 a forest:0.3")
    assert np.array_equal(pixels, pipeline.generate(replace(request, weighted_subprompts=True)).images[0])
    assert not np.array_equal(pixels, pipeline.generate(request).images[0])
    assert parameters is not None and parameters.split("\n")[1].endswith(", Weighted subprompts: True, Emphasis: None")


def test_words_clip_never_reads_are_a_warning_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_stops_loading: None
) -> None:
    """Once per text, however many prompts share it (the negative prompt) and however many iterations run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n" + "cat " * 73 + "in the style of a watercolor\n", encoding="utf-8")
    argv = ["--from-file", str(prompts), "--negative_prompt", "fog " * 76, "--n_iter", "2", "--skip_save"]
    assert run_cli([*argv, *MODEL]) == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: negative_prompt: CLIP reads 75 tokens; the 1 after them were left out: fog",
        "warning: prompt: CLIP reads 75 tokens; the 4 after them were left out: style of a watercolor",
    ]


def test_a_from_file_prompt_with_bad_weights_fails_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_must_not_load: None
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a castle:0.7 a forest:0.3\na harbour:1 a storm:-1\n", encoding="utf-8")
    argv = ["--from-file", str(prompts), "--weighted_subprompts", *MODEL, "--outdir", str(tmp_path / "out")]
    assert run_cli(argv) == 2
    assert "error: --from-file: prompt: the sub-prompts' weights add up to 0" in capsys.readouterr().err


def test_compatibility_flags_leave_the_images_unchanged(tmp_path: Path) -> None:
    """--turbo, --unet_bs, --skip_grid, --n_rows, autocast on the CPU (float32), the model's own --C/--f: same
    pixels."""
    flags = ["--turbo", "--unet_bs", "2", "--skip_grid", "--n_rows", "2", "--precision", "autocast", "--C", "4"]
    flags += ["--f", "8", "--sampler", "ddim", "--format", "png"]
    assert main([*case_argv("basic"), *MODEL, *flags, "--outdir", str(tmp_path)]) == 0
    assert_matches_png(read_png(tmp_path / BASIC / "seed_1000_00000.png")[0], reference_png(case("basic")["images"][0]))


def test_bf16_precision_runs_in_bf16(tmp_path: Path) -> None:
    """--precision bf16 (ours): the reference image within bfloat16's rounding, and not float32's image."""
    assert main([*case_argv("basic"), *MODEL, "--precision", "bf16", "--outdir", str(tmp_path)]) == 0
    image, expected = read_png(tmp_path / BASIC / "seed_1000_00000.png")[0], reference_png(case("basic")["images"][0])
    assert psnr(image, expected) >= BF16_MIN_PSNR_DB
    assert np.abs(image.astype(int) - expected.astype(int)).max() > 1


def test_low_memory_mode_gives_the_same_image(tmp_path: Path) -> None:
    assert main([*case_argv("basic"), *MODEL, "--low_memory", "--outdir", str(tmp_path)]) == 0
    assert_matches_png(read_png(tmp_path / BASIC / "seed_1000_00000.png")[0], reference_png(case("basic")["images"][0]))


def test_jpg_format_with_parameters_in_exif(tmp_path: Path) -> None:
    assert main([*case_argv("basic"), *MODEL, "--format", "jpg", "--outdir", str(tmp_path)]) == 0
    assert names(tmp_path / BASIC) == ["seed_1000_00000.jpg"]
    with Image.open(tmp_path / BASIC / "seed_1000_00000.jpg") as image:
        assert image.format == "JPEG"
        pixels = np.asarray(image.convert("RGB"))
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    # JPEG is lossy (and this noise-like image loses a lot): compare with the reference through the same encoder.
    buffer = io.BytesIO()
    Image.fromarray(reference_png(case("basic")["images"][0])).save(buffer, format="JPEG")
    with Image.open(buffer) as reference:
        expected = np.asarray(reference.convert("RGB"))
    assert np.abs(pixels.astype(int) - expected.astype(int)).mean() < 0.5
    assert comment.startswith(b"UNICODE\0")
    text = comment[8:].decode("utf-16-be")
    assert text.startswith("a cottage garden full of tulips\n")
    assert "Seed: 1000" in text


# (flag tokens, attribute, parsed value) for every flag of optimized_txt2img.py we take, plus ours.
COMMON_FLAGS: list[tuple[list[str], str, Any]] = [
    (["--prompt", "a red fox"], "prompt", "a red fox"),
    (["--from-file", "prompts.txt"], "from_file", "prompts.txt"),
    (["--outdir", "out/x"], "outdir", "out/x"),
    (["--ddim_steps", "30"], "ddim_steps", 30),
    (["--ddim_eta", "0.5"], "ddim_eta", 0.5),
    (["--n_iter", "3"], "n_iter", 3),
    (["--H", "640"], "H", 640),
    (["--W", "384"], "W", 384),
    (["--C", "4"], "C", 4),
    (["--f", "8"], "f", 8),
    (["--n_samples", "2"], "n_samples", 2),
    (["--scale", "9.5"], "scale", 9.5),
    (["--seed", "42"], "seed", 42),
    (["--device", "cuda:1"], "device", "cuda:1"),
    (["--precision", "full"], "precision", "full"),
    (["--precision", "bf16"], "precision", "bf16"),
    (["--format", "jpg"], "format", "jpg"),
    (["--sampler", "ddim"], "sampler", "ddim"),
    (["--turbo"], "turbo", True),
    (["--unet_bs", "2"], "unet_bs", 2),
    (["--skip_grid"], "skip_grid", True),
    (["--skip_save"], "skip_save", True),
    (["--n_rows", "2"], "n_rows", 2),
    (["--fixed_code"], "fixed_code", True),
    (["--ckpt", "sd-v1-4.safetensors"], "ckpt", "sd-v1-4.safetensors"),
    (["--config", "my.yaml"], "config", "my.yaml"),
    (["--negative_prompt", "blurry"], "negative_prompt", "blurry"),
    (["--low_memory"], "low_memory", True),
    (["--weighted_subprompts"], "weighted_subprompts", True),
    (["--clip_skip", "2"], "clip_skip", 2),
    (["--lora_dir", "my/loras"], "lora_dir", "my/loras"),
    (["--embeddings_dir", "my/embeddings"], "embeddings_dir", "my/embeddings"),
    (["--strength", "0.4"], "strength", 0.4),
    (["--subseed", "12"], "subseed", 12),
    (["--subseed_strength", "0.3"], "subseed_strength", 0.3),
    (["--seed_resize_from_h", "512"], "seed_resize_from_h", 512),
    (["--seed_resize_from_w", "768"], "seed_resize_from_w", 768),
    (["--tiling"], "tiling", True),
]
TXT2IMG_FLAGS: list[tuple[list[str], str, Any]] = [
    (["--hr_scale", "2"], "hr_scale", 2.0),
    (["--hr_upscaler", "latent_bicubic"], "hr_upscaler", "latent_bicubic"),
    (["--hr_steps", "20"], "hr_steps", 20),
    (["--hr_resize_x", "1024"], "hr_resize_x", 1024),
    (["--hr_resize_y", "768"], "hr_resize_y", 768),
    (["--hr_prompt", "a sea"], "hr_prompt", "a sea"),
    (["--hr_negative_prompt", "fog"], "hr_negative_prompt", "fog"),
    (["--hr_sampler", "dpm2"], "hr_sampler", "dpm2"),
]
IMG2IMG_FLAGS: list[tuple[list[str], str, Any]] = [
    (["--mask", "mask.png"], "mask", "mask.png"),
    (["--mask_blur", "8"], "mask_blur", 8),
    (["--masked_content", "latent_nothing"], "masked_content", "latent_nothing"),
    (["--invert_mask"], "invert_mask", True),
    (["--inpaint_area", "only_masked"], "inpaint_area", "only_masked"),
    (["--masked_area_padding", "64"], "masked_area_padding", 64),
]
FLAG_CASES = [("txt2img", *f) for f in COMMON_FLAGS + TXT2IMG_FLAGS] + [
    ("img2img", *f) for f in COMMON_FLAGS + IMG2IMG_FLAGS
]


@pytest.mark.parametrize(("mode", "tokens", "attribute", "value"), FLAG_CASES, ids=lambda v: str(v))
def test_every_flag_parses(mode: Mode, tokens: list[str], attribute: str, value: Any) -> None:
    required = ["--init-img", "in.png"] if mode == "img2img" else []
    args = build_parser(mode).parse_args([*required, *tokens])
    assert getattr(args, attribute) == value


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_defaults_are_optimizedsd_defaults(mode: Mode) -> None:
    required = ["--init-img", "in.png"] if mode == "img2img" else []
    args = build_parser(mode).parse_args(required)
    expected = {
        "outdir": f"outputs/{mode}-samples",
        "ddim_steps": 50,
        "ddim_eta": 0.0,
        "n_iter": 1,
        "n_samples": 5,
        "scale": 7.5,
        "seed": None,
        "device": "cuda",
        "precision": "autocast",
        "format": "png",
        "unet_bs": 1,
        "turbo": False,
        "skip_grid": False,
        "skip_save": False,
        "n_rows": 0,
        "fixed_code": False,
        # Ours, where optimizedSD's default would fail or cannot apply: see ldm/cli.py.
        "sampler": "ddim",
        "ckpt": DEFAULT_CKPT,
        "config": None,
        "H": None,
        "W": None,
        "C": None,
        "f": None,
        "low_memory": False,
        "weighted_subprompts": False,
        "prompt": None,  # not given: optimizedSD's default prompt, unless --from-file gives the prompts
    }
    if mode == "img2img":
        expected |= {"init_img": "in.png", "strength": 0.75}
    else:
        expected |= {
            "hr_scale": 1.0,
            "hr_upscaler": None,
            "hr_steps": None,
            "strength": None,
            "hr_resize_x": 0,
            "hr_resize_y": 0,
            "hr_prompt": None,
            "hr_negative_prompt": None,
            "hr_sampler": None,
        }
    assert {k: getattr(args, k) for k in expected} == expected
    assert read_prompts(args) == [DEFAULT_PROMPT]


# (mode, flags, what the error line must say); MODEL and the basic case's flags come first, these override them.
REFUSED: list[tuple[Mode, list[str], str]] = [
    ("txt2img", ["--clip_skip", "4"], "--clip_skip: clip_skip must be in [1, 3] (this model's CLIP layers), got 4"),
    (
        "txt2img",
        ["--sampler", "k_euler"],
        "--sampler k_euler is not available; choose one of: ddim, plms, euler, euler_a, heun, dpm2, dpm2_a, lms, "
        "dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_a, dpmpp_sde, euler_karras, euler_a_karras, heun_karras, lms_karras, "
        "dpm2_karras, dpm2_a_karras, dpmpp_2m_karras, "
        "dpmpp_2m_sde_karras, dpmpp_2s_a_karras, dpmpp_sde_karras",
    ),
    (
        "txt2img",
        ["--sampler", "plms", "--ddim_eta", "0.5"],
        "--ddim_eta: eta is DDIM's: it must be 0 with sampler plms, got 0.5",
    ),
    ("img2img", ["--sampler", "plms"], "--sampler: sampler plms is for txt2img only; img2img runs every other sampler"),
    ("txt2img", ["--C", "3"], "--C 3: this model has 4 latent channels"),
    ("txt2img", ["--f", "4"], "--f 4: this model's VAE downsamples by 8"),
    ("txt2img", ["--H", "60"], "--H: H must be a positive multiple of 8, got 60"),
    ("txt2img", ["--ddim_steps", "0"], "--ddim_steps: ddim_steps must be in [1, 999], got 0"),
    ("txt2img", ["--ddim_steps", "1000"], "--ddim_steps: ddim_steps must be in [1, 999], got 1000"),
    ("txt2img", ["--n_samples", "0"], "--n_samples: n_samples must be at least 1"),
    ("txt2img", ["--unet_bs", "0"], "--unet_bs must be at least 1"),
    ("txt2img", ["--n_iter", "0"], "--n_iter must be at least 1, got 0"),
    ("txt2img", ["--ddim_eta", "-0.1"], "--ddim_eta: eta must be in [0, 1], got -0.1"),
    ("txt2img", ["--ddim_eta", "1.1"], "--ddim_eta: eta must be in [0, 1], got 1.1"),  # black images past 1
    ("txt2img", ["--scale", "nan"], "--scale: scale must be a finite number, got nan"),
    ("txt2img", ["--seed", "-1"], "--seed: seed must be in [0, 4294967295] for every image (seed + i), got -1"),
    ("txt2img", ["--seed", "4294967295", "--n_samples", "2"], "the run's last seed 4294967296 would exceed"),
    ("txt2img", ["--device", "tpu"], "--device 'tpu' is not a device; use cpu, cuda, cuda:N or mps"),
    ("txt2img", ["--device", "meta"], "--device meta: only cpu, cuda, cuda:N and mps are supported"),
    ("txt2img", ["--precision", "half"], "argument --precision: invalid choice: 'half'"),
    ("txt2img", ["--format", "webp"], "argument --format: invalid choice: 'webp'"),
    ("txt2img", ["--low_memory", "--turbo"], "argument --turbo: not allowed with argument --low_memory"),
    ("txt2img", ["--fixed_code"], "--fixed_code is not supported: image i starts from its own noise, seeded seed + i"),
    ("img2img", ["--fixed_code"], "--fixed_code is not supported: image i starts from its own noise, seeded seed + i"),
    ("txt2img", ["--ckpt", "model.bin"], "checkpoint not found"),
    ("img2img", ["--strength", "0"], "--strength: strength must be in (0, 1], got 0.0"),
    ("img2img", ["--strength", "0.05"], "strength 0.05 × ddim_steps 10 leaves no denoising step"),
    ("img2img", ["--init-img", "missing.png"], "--init-img missing.png: no such file"),
    ("txt2img", ["--hr_scale", "8"], "--hr_scale: hr_scale must be in [1, 4], got 8.0"),
    ("txt2img", ["--hr_scale", "2", "--sampler", "plms"], "--sampler: sampler plms is for txt2img only, and the hires"),
    ("img2img", ["--hr_scale", "2"], "unrecognized arguments: --hr_scale 2"),
    ("txt2img", ["--hr_steps", "10"], "--hr_steps needs --hr_scale or --hr_resize_x/--hr_resize_y: it is the hires"),
    ("txt2img", ["--hr_prompt", "x"], "--hr_prompt needs --hr_scale or --hr_resize_x/--hr_resize_y: it is the hires"),
    ("txt2img", ["--hr_sampler", "euler"], "--hr_sampler needs --hr_scale or --hr_resize_x/--hr_resize_y: it is the"),
    ("txt2img", ["--hr_scale", "2", "--hr_sampler", "plms"], "argument --hr_sampler: invalid choice: 'plms'"),
    ("img2img", ["--hr_prompt", "x"], "unrecognized arguments: --hr_prompt x"),
    ("txt2img", ["--hr_resize_x", "96", "--hr_scale", "2"], "--hr_resize_x: hr_resize_x sets the hires fix's size"),
    ("img2img", ["--hr_resize_y", "96"], "unrecognized arguments: --hr_resize_y 96"),
    ("txt2img", ["--subseed_strength", "2"], "--subseed_strength: subseed_strength must be in [0, 1]"),
    (
        "txt2img",
        ["--subseed", "4294967295", "--subseed_strength", "0.5", "--n_samples", "2"],
        "--subseed 4294967295: the run's last subseed 4294967296 would exceed 4294967295",
    ),
    ("txt2img", ["--strength", "0.5"], "--strength needs --hr_scale or --hr_resize_x/--hr_resize_y: it is the"),
    ("img2img", ["--mask", "missing.png"], "--mask missing.png: no such file"),
    ("img2img", ["--inpaint_area", "only_masked"], "--inpaint_area: inpaint_area needs a mask_image"),
    ("txt2img", ["--emphasis", "--weighted_subprompts"], "--emphasis: emphasis and weighted_subprompts read"),
    ("txt2img", ["--emphasis", "--prompt", "(a:1..2)"], "--prompt: prompt: '1..2' in ':1..2)' is not a weight"),
    (
        "txt2img",
        ["--prompt", "style:watercolor a lake:2", "--weighted_subprompts"],
        "--prompt: prompt: 'watercolor' after 'style:' is not a weight",
    ),
    (
        "img2img",
        ["--negative_prompt", "a:1 b:-1", "--weighted_subprompts"],
        "--negative_prompt: negative_prompt: the sub-prompts' weights add up to 0",
    ),
]


@pytest.mark.parametrize(("mode", "flags", "message"), REFUSED, ids=lambda v: str(v))
def test_values_we_cannot_honour_fail_clearly(
    mode: Mode, flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert (
        run_cli([*case_argv("basic" if mode == "txt2img" else "img2img"), *MODEL, "--outdir", str(out), *flags], mode)
        == 2
    )
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()  # refused before anything was loaded or written


@pytest.mark.parametrize(
    "flags",
    [
        ["--seed", "4294967295", "--n_samples", "1"],  # the run's one seed is the last there is
        ["--seed", "4294967294", "--n_samples", "2"],
        ["--subseed", "4294967295", "--subseed_strength", "0.5", "--n_samples", "1"],
    ],
    ids=str,
)
def test_a_run_may_end_on_the_last_seed_there_is(
    flags: list[str], capsys: pytest.CaptureFixture[str], model_stops_loading: None
) -> None:
    """Seeds are in [0, 2³² − 1] (numpy's and the server's range): a run whose last image takes 4294967295 is taken."""
    assert run_cli([*case_argv("basic"), *MODEL, *flags, "--skip_save"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"txt2img.py: error: {STOPPED}"


@pytest.mark.parametrize(("size", "flags"), [((8, 64), []), ((5, 64), ["--H", "64", "--W", "64"])], ids=str)
def test_an_init_image_the_run_can_size_is_taken(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model_stops_loading: None,
    size: tuple[int, int],
    flags: list[str],
) -> None:
    """8 px, one latent pixel, is the shortest side left to the init image; a shorter one is taken when --H and --W
    resize it, as the refusal of one says (test_init_image_smaller_than_8_px_without_size_flags)."""
    small = tmp_path / "small.png"
    Image.new("RGB", size).save(small)
    argv = [*case_argv("img2img", size=False), *MODEL, "--init-img", str(small), *flags, "--skip_save"]
    assert run_cli(argv, "img2img") == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"img2img.py: error: {STOPPED}"


def test_an_init_image_whose_pixels_would_not_look_as_they_do_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """16-bit grayscale (PIL clips it to 8 bits: mostly white), CMYK (converted without its colour profile) and an
    animation are refused, as the server refuses them."""
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(gray16)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (64, 64)).save(cmyk)
    animation = tmp_path / "animation.gif"
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    frames[0].save(animation, save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    modes = "must be RGB, RGBA, 8-bit grayscale or palette, got"
    for path, says in (
        (gray16, f"{modes} I;16: convert it to 8-bit RGB first"),
        (cmyk, f"{modes} CMYK"),
        (animation, "must be a single still image, not an animation"),
    ):
        argv = [*case_argv("img2img"), *MODEL, "--outdir", str(out), "--init-img", str(path)]
        assert run_cli(argv, "img2img") == 2
        err = capsys.readouterr().err
        assert f"--init-img {path} {says}" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_default_checkpoint_says_where_it_looked_and_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--device", "cpu"]) == 2  # all other flags at their defaults: only the weights are missing
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("txt2img.py: error: checkpoint not found: ")
    for part in (str(tmp_path / DEFAULT_CKPT), "sd-v1-4.ckpt", "python scripts/make_tiny_checkpoint.py"):
        assert part in lines[0]


def test_ckpt_must_be_a_checkpoint_file_or_a_split_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    basic = [*case_argv("basic"), "--device", "cpu"]
    (tmp_path / "weights.bin").write_bytes(b"")
    assert main([*basic, "--ckpt", str(tmp_path / "weights.bin")]) == 2
    assert "expected a .ckpt or .safetensors file or a split folder" in capsys.readouterr().err
    write_split(TINY_SAFETENSORS, TINY_CONFIG, tmp_path / "split", dtype="fp32")
    assert main([*basic, "--ckpt", str(tmp_path / "split"), "--config", str(TINY_CONFIG)]) == 2
    assert "--config cannot be used with the split folder" in capsys.readouterr().err
    (tmp_path / "split" / "manifest.json").unlink()
    assert main([*basic, "--ckpt", str(tmp_path / "split")]) == 2
    assert "is a folder without manifest.json" in capsys.readouterr().err
    assert main([*basic, *MODEL[2:4], "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config not found: " in capsys.readouterr().err


def test_from_file_must_hold_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    for name, message in (("blank.txt", "holds no prompt"), ("missing.txt", "No such file or directory")):
        assert main(["--from-file", str(tmp_path / name), *MODEL]) == 2
        assert f"--from-file {tmp_path / name}" in (err := capsys.readouterr().err)
        assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_says_to_use_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """optimizedSD's default device is CUDA: a machine without it is told what it has (a Mac: its GPU)."""
    argv = [*case_argv("basic"), "--ckpt", str(TINY_SAFETENSORS), "--config", str(TINY_CONFIG), "--device", "cuda"]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main([*argv, "--outdir", str(tmp_path / "out")]) == 2
    assert "CUDA is not available on this machine; pass --device cpu" in capsys.readouterr().err
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert main([*argv, "--outdir", str(tmp_path / "out")]) == 2
    assert "CUDA is not available on this machine; pass --device mps" in capsys.readouterr().err


def test_mps_is_a_device_where_torch_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(cli.CliError, match="--device mps: this machine has no Apple silicon GPU"):
        cli.select_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert cli.select_device("mps") == torch.device("mps")
    assert cli.select_dtype("autocast", torch.device("mps")) == torch.float32  # not measured here: the exact one
    with pytest.raises(cli.CliError, match="only cpu, cuda, cuda:N and mps are supported"):
        cli.select_device("xpu")


def test_a_cuda_device_must_be_one_of_the_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:N counts from 0: on a machine of two, cuda:1 is the last."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.select_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(cli.CliError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\)$"):
        cli.select_device("cuda:2")


@pytest.mark.parametrize(
    ("precision", "device", "dtype"),
    [
        ("autocast", "cuda", torch.float16),  # optimizedSD's default: autocast halves the networks on the GPU
        ("full", "cuda", torch.float32),  # and --precision full keeps them float32 there
        ("autocast", "cpu", torch.float32),  # on the CPU float16 is slow: float32
        ("bf16", "cpu", torch.bfloat16),  # ours, asked for by name
        ("bf16", "cuda", torch.bfloat16),
    ],
    ids=str,
)
def test_precision_picks_optimizedsds_dtype(precision: str, device: str, dtype: torch.dtype) -> None:
    assert cli.select_dtype(precision, torch.device(device)) == dtype


def test_skip_save_writes_no_file_and_still_reports_the_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main([*case_argv("batch3"), *MODEL, "--skip_save", "--outdir", str(out)]) == 0
    assert not out.exists()
    stdout, err = capsys.readouterr()
    assert stdout == ""  # stdout lists the files written: none
    assert "3 image(s) in " in err
    assert ", seeds 31337..31339, not saved (--skip_save)" in err


def test_from_file_prompts_win_over_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """optimizedSD took both and used the file: so do we, and say that --prompt went unused. The file as Windows'
    Notepad saves it (a byte-order mark, CRLF) with a blank first line holds the one prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeff\r\na cottage garden full of tulips\r\n".encode())
    out = tmp_path / "out"
    argv = [*case_argv("basic"), "--prompt", "a red fox", "--from-file", str(prompts), *MODEL, "--outdir", str(out)]
    assert main(argv) == 0
    pixels, parameters = read_png(out / BASIC / "seed_1000_00000.png")
    assert (parameters or "").split("\n")[0] == "a cottage garden full of tulips"
    assert_matches_png(pixels, reference_png(case("basic")["images"][0]))
    notes = [line for line in capsys.readouterr().err.splitlines() if "--prompt" in line]
    assert notes == ["txt2img.py: warning: --prompt is ignored because --from-file is given"]


def test_from_file_must_be_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str], model_must_not_load: None) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a café\n".encode("latin-1"))
    assert run_cli(["--from-file", str(prompts), *MODEL, "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"txt2img.py: error: --from-file {prompts} must be UTF-8 text; byte 5 (0xe9) is not"]
    prompts.write_bytes(b"\xef\xbb\xbf" + "a café\n".encode("latin-1"))  # counted in the file, its mark too
    assert run_cli(["--from-file", str(prompts), *MODEL, "--outdir", str(tmp_path / "out")]) == 2
    assert "byte 8 (0xe9) is not" in capsys.readouterr().err


def test_outdir_that_cannot_be_a_folder_fails_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_must_not_load: None
) -> None:
    file = tmp_path / "taken"
    file.write_bytes(b"")
    for outdir, message in (
        (file, f"--outdir {file} is a file, not a folder"),
        (file / "sub", f"--outdir {file / 'sub'}: cannot create it: Not a directory"),
    ):
        assert run_cli([*case_argv("basic"), *MODEL, "--outdir", str(outdir)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"txt2img.py: error: {message}"]


def test_outdir_that_is_not_writable_fails_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], model_must_not_load: None
) -> None:
    """A folder that exists but takes no file, even from root (who may write into a read-only folder): procfs."""
    locked = Path("/proc/self")
    assert run_cli([*case_argv("basic"), *MODEL, "--outdir", str(locked)]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith(f"txt2img.py: error: --outdir {locked}: cannot write there: ")


def test_init_image_too_large_to_decode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_must_not_load: None
) -> None:
    huge = tmp_path / "huge.png"
    huge.write_bytes(black_png(20000, 20000))  # a few KB whose header claims 400 megapixels
    out = tmp_path / "out"
    assert run_cli([*case_argv("img2img"), *MODEL, "--init-img", str(huge), "--outdir", str(out)], "img2img") == 2
    lines = capsys.readouterr().err.splitlines()
    limit = 2 * Image.MAX_IMAGE_PIXELS  # PIL refuses to decode beyond twice its decompression-bomb warning limit
    assert lines == [f"img2img.py: error: --init-img {huge}: more than the {limit:,} pixels PIL will decode"]
    assert not out.exists()


def test_init_image_smaller_than_8_px_without_size_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_must_not_load: None
) -> None:
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (5, 64)).save(tiny)
    out = tmp_path / "out"
    argv = [*case_argv("img2img", size=False), *MODEL, "--init-img", str(tiny), "--outdir", str(out)]
    assert run_cli(argv, mode="img2img") == 2
    assert not out.exists()
    assert capsys.readouterr().err.splitlines() == [
        f"img2img.py: error: --init-img {tiny} is 5×64 px: too small, its sides must be at least 8 px "
        "(or pass --H and --W to resize it)"
    ]


@pytest.mark.parametrize(("kind", "text", "value"), [("seconds", "0.5", 0.5), ("at_least_one", "1", 1)], ids=str)
def test_the_shared_flag_types_take_what_they_name(kind: str, text: str, value: float) -> None:
    """ldm/arguments.py's argparse types, shared by scripts/client.py and scripts/load_test.py."""
    assert getattr(arguments, kind)(text) == value


@pytest.mark.parametrize(
    ("kind", "text", "says"),
    [
        ("seconds", "soon", "expected seconds above 0, got 'soon'"),  # tests/test_client.py holds 0, nan and inf
        ("at_least_one", "1.5", "expected a whole number of at least 1, got '1.5'"),
        ("at_least_one", "many", "expected a whole number of at least 1, got 'many'"),
    ],
    ids=str,
)
def test_the_shared_flag_types_refuse_the_rest_as_usage_errors(kind: str, text: str, says: str) -> None:
    """A value that cannot be used is argparse's error (exit 2, naming it), never a traceback later."""
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(says)}$"):
        getattr(arguments, kind)(text)
