"""On a GPU: fp32 still reproduces the CompVis reference, the fast path (fp16, channels-last, torch.compile, CUDA
graphs) stays within fp16 rounding of it, and low-memory mode gives the resident model's images.

Skipped without CUDA. Needs no conftest fixture, so `scripts/gpu_bench.sh` can run it on a machine that has torch
but not TorchServe (`pytest --noconftest -m gpu tests/test_gpu.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config import load_config
from ldm.fast_path import FastPath
from ldm.generation_request import GenerationRequest
from ldm.parts import load_checkpoint
from ldm.pipeline import Pipeline
from ldm.random_weights import random_state_dict, save_checkpoint
from tests.loras import model_lora, write_lora
from tests.reference import (
    CASES,
    TINY_CONFIG,
    TINY_SAFETENSORS,
    assert_reproduces,
    case,
    psnr,
)
from tests.reference import request_for as request_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# The bar for every fast-path switch: no further from fp32 than fp16 rounding, ≥ 35 dB.
MIN_PSNR_DB = 35.0
# Guided cases, one with η noise and one img2img: each takes the fast route. Only the first two's shape (64x64x1) is
# compiled: a cold Inductor compile takes tens of seconds even for the tiny UNet, and the GPU run has minutes for all
# of this file; the other shapes replay CUDA graphs of the eager networks (`graphs_fp16`), which is the same capture,
# buffers and replay. The benchmark's rows compile the full-size shapes.
COMPILED_CASES = ["basic", "eta"]
GRAPH_CASES = ["batch3", "steps12_wide", "img2img"]
INPAINTING_CONFIG = Path(__file__).parent / "fixtures" / "tiny-inpainting.yaml"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the LoRA `tiny-style`."""
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "tiny-style.safetensors", model_lora(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG)))
    return folder


@pytest.fixture(scope="module")
def fp32_cuda(lora_dir: Path) -> Pipeline:
    return Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, "cuda", torch.float32), lora_dir=lora_dir)


def shapes_of(case_ids: list[str]) -> tuple[str, ...]:
    """The fast path's `HxWxN` shapes the cases' requests run at."""
    requests = [request_of(case(case_id)) for case_id in case_ids]
    return tuple(dict.fromkeys(f"{r.height}x{r.width}x{r.n_samples}" for r in requests))


@pytest.fixture(scope="module")
def fast_fp16(lora_dir: Path) -> Pipeline:
    """An fp16 pipeline with the whole fast path (compiled, then captured) warmed up for COMPILED_CASES' shape."""
    model = load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, "cuda", torch.float16)
    return Pipeline(model, FastPath(shapes=shapes_of(COMPILED_CASES)), lora_dir)


@pytest.fixture(scope="module")
def graphs_fp16(lora_dir: Path) -> Pipeline:
    """An fp16 pipeline whose fast path captures GRAPH_CASES' shapes as CUDA graphs without compiling them."""
    model = load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, "cuda", torch.float16)
    return Pipeline(model, FastPath(compile=False, shapes=shapes_of(GRAPH_CASES)), lora_dir)


def test_every_configured_shape_compiles_and_captures(fast_fp16: Pipeline, graphs_fp16: Pipeline) -> None:
    """First, so that a shape this PyTorch, driver or GPU cannot compile or capture (logged, then run eagerly) is
    named here rather than found by the call counts below."""
    assert fast_fp16.fast_shapes == shapes_of(COMPILED_CASES)
    assert graphs_fp16.fast_shapes == shapes_of(GRAPH_CASES)


@pytest.fixture
def exact_convolutions() -> Iterator[None]:
    """cuDNN's default, deterministic algorithms while fp32 is held to the CPU's reference: the fast fixtures turn
    its per-shape search on for the whole process, and the algorithms it may pick (FFT, Winograd) round coarser."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize("case_data", CASES, ids=lambda c: c["id"])
def test_fp32_on_cuda_reproduces_reference(fp32_cuda: Pipeline, case_data: dict, exact_convolutions: None) -> None:
    generation = fp32_cuda.generate(request_of(case_data))
    assert_reproduces(case_data, generation)


@pytest.mark.parametrize(
    ("case_id", "pipeline"),
    [(c, "fast_fp16") for c in COMPILED_CASES]
    + [(c, "graphs_fp16") for c in GRAPH_CASES]
    # Three images on the pipeline prepared for one: each UNet call of the batch runs as three compiled replays.
    + [("batch3", "fast_fp16")],
)
def test_fast_path_within_fp16_rounding(
    fp32_cuda: Pipeline, case_id: str, pipeline: str, request: pytest.FixtureRequest
) -> None:
    fast_pipeline: Pipeline = request.getfixturevalue(pipeline)
    generation = request_of(case(case_id))
    assert fast_pipeline.fast is not None
    unet_before, decode_before = fast_pipeline.fast.unet.fast_calls, fast_pipeline.fast.decode.fast_calls
    fast = fast_pipeline.generate(generation)
    exact = fp32_cuda.generate(generation)
    # Every UNet call and every decode of this request took the fast route: compiled and replayed, or replayed.
    assert fast_pipeline.fast.unet.fast_calls - unet_before == generation.denoising_steps * generation.n_iter
    assert fast_pipeline.fast.decode.fast_calls - decode_before == generation.n_images
    assert psnr(fast.pixels, exact.pixels) >= MIN_PSNR_DB


# A sampler, a case of a warmed-up shape, the pipeline warmed up for it, and the UNet calls of that case's run
# (S = 10 steps; img2img: m = 5).
SAMPLER_RUNS = [("plms", "basic", "fast_fp16", 11), ("euler_a", "basic", "fast_fp16", 10),
                ("heun", "basic", "fast_fp16", 19), ("dpmpp_2m_karras", "basic", "fast_fp16", 10),
                ("dpmpp_sde_karras", "basic", "fast_fp16", 19), ("dpmpp_2s_a", "basic", "fast_fp16", 19),
                ("euler_a", "img2img", "graphs_fp16", 5)]  # fmt: skip


@pytest.mark.parametrize(("sampler", "case_id", "pipeline", "unet_calls"), SAMPLER_RUNS)
def test_every_sampler_takes_the_fast_path_within_fp16_rounding(
    fp32_cuda: Pipeline, sampler: str, case_id: str, pipeline: str, unet_calls: int, request: pytest.FixtureRequest
) -> None:
    """The other samplers call the UNet at fractional timesteps, some twice a step: every call still replays the
    captured graph (whose timestep input is a float32 buffer), within fp16 rounding of fp32."""
    fast_pipeline: Pipeline = request.getfixturevalue(pipeline)
    generation = dataclasses.replace(request_of(case(case_id)), sampler=sampler)
    assert fast_pipeline.fast is not None
    before = fast_pipeline.fast.unet.fast_calls
    fast = fast_pipeline.generate(generation)
    assert fast_pipeline.fast.unet.fast_calls - before == unet_calls
    assert psnr(fast.pixels, fp32_cuda.generate(generation).pixels) >= MIN_PSNR_DB


def test_unwarmed_shape_runs_eagerly_with_the_same_images(fast_fp16: Pipeline) -> None:
    """A shape nobody configured is not compiled on a user's request: it runs eagerly, and gives the image that
    a plain fp16 pipeline gives."""
    assert fast_fp16.fast is not None
    request = request_of(case("scale1"))  # unguided: a UNet batch of 1, never warmed up
    calls = fast_fp16.fast.unet.fast_calls
    fast = fast_fp16.generate(request)
    assert fast_fp16.fast.unet.fast_calls == calls
    plain = Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, "cuda", torch.float16)).generate(request)
    assert psnr(fast.pixels, plain.pixels) >= MIN_PSNR_DB


def _masked(case_id: str) -> GenerationRequest:
    """A case's img2img request with its left half repainted."""
    request = request_of(case(case_id))
    assert request.init_image is not None
    mask = Image.new("L", request.init_image.size, 0)
    mask.paste(255, (0, 0, request.init_image.size[0] // 2, request.init_image.size[1]))
    return dataclasses.replace(request, mask_image=mask)


def test_inpainting_takes_the_fast_path_within_fp16_rounding(
    fp32_cuda: Pipeline, graphs_fp16: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A text-to-image model keeps the unmasked latents on CUDA as on the CPU; an inpainting model's 9-channel UNet
    and its decoder are captured for the configured shape. Both within fp16 rounding of fp32."""
    request = _masked("img2img")
    assert graphs_fp16.fast is not None
    before = graphs_fp16.fast.unet.fast_calls
    fast = graphs_fp16.generate(request)
    assert graphs_fp16.fast.unet.fast_calls - before == request.denoising_steps
    assert psnr(fast.pixels, fp32_cuda.generate(request).pixels) >= MIN_PSNR_DB

    checkpoint = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting.safetensors"
    save_checkpoint(random_state_dict(load_config(INPAINTING_CONFIG), seed=5), checkpoint)
    shape = f"{request.height}x{request.width}x1"
    inpainting = Pipeline(
        load_checkpoint(checkpoint, INPAINTING_CONFIG, "cuda", torch.float16), FastPath(compile=False, shapes=(shape,))
    )
    exact = Pipeline(load_checkpoint(checkpoint, INPAINTING_CONFIG, "cuda", torch.float32))
    assert inpainting.fast is not None
    fast = inpainting.generate(request)
    assert inpainting.fast.unet.fast_calls == request.denoising_steps and inpainting.fast.decode.fast_calls == 1
    assert psnr(fast.pixels, exact.generate(request).pixels) >= MIN_PSNR_DB


@pytest.mark.parametrize("content", ["fill", "latent_noise"])
def test_only_masked_inpainting_takes_the_fast_path_within_fp16_rounding(
    fp32_cuda: Pipeline, graphs_fp16: Pipeline, content: str
) -> None:
    """Its box is painted at the request's size, the configured shape: replayed, within fp16 rounding of fp32, and
    put back into the init image's size."""
    request = dataclasses.replace(
        _masked("img2img"), inpaint_area="only_masked", masked_content=content, masked_area_padding=8
    )
    assert graphs_fp16.fast is not None and request.init_image is not None
    before = graphs_fp16.fast.unet.fast_calls
    fast = graphs_fp16.generate(request)
    assert graphs_fp16.fast.unet.fast_calls - before == request.denoising_steps
    assert fast.images.shape[1:3] == request.init_image.size[::-1]
    assert psnr(fast.pixels, fp32_cuda.generate(request).pixels) >= MIN_PSNR_DB


def test_a_long_prompt_in_a1111_syntax_runs_eagerly_beside_the_fast_path(
    fp32_cuda: Pipeline, fast_fp16: Pipeline
) -> None:
    """Its 154-token context is not a configured shape: eager UNet calls, still within fp16 rounding of fp32."""
    request = dataclasses.replace(request_of(case("basic")), prompt="a red door, stone wall, " * 12, emphasis=True)
    assert fast_fp16.fast is not None
    before = fast_fp16.fast.unet.fast_calls
    fast = fast_fp16.generate(request)
    assert fast_fp16.fast.unet.fast_calls == before
    assert psnr(fast.pixels, fp32_cuda.generate(request).pixels) >= MIN_PSNR_DB


def test_and_runs_its_rows_in_slices_beside_the_fast_path(fp32_cuda: Pipeline, fast_fp16: Pipeline) -> None:
    """A1111's AND: three UNet rows for one image, more than the two a batch of one image has, so each call runs in
    slices of two rows (`Pipeline.denoise`): the first is the configured shape and replays, the other runs eagerly;
    still within fp16 rounding of fp32."""
    request = dataclasses.replace(request_of(case("basic")), prompt="a red door AND a stone wall:0.6", emphasis=True)
    assert fast_fp16.fast is not None
    before = fast_fp16.fast.unet.fast_calls
    fast = fast_fp16.generate(request)
    assert fast_fp16.fast.unet.fast_calls - before == request.denoising_steps
    assert psnr(fast.pixels, fp32_cuda.generate(request).pixels) >= MIN_PSNR_DB


def test_a_lora_reaches_the_captured_graphs(fp32_cuda: Pipeline, fast_fp16: Pipeline) -> None:
    """A LoRA is merged into the weights in place, where the compiled graphs read them: its image on the fast path
    (replayed, not recaptured) is within fp16 rounding of fp32's with it, far from the image without it, and the
    weights come back for the next request."""
    plain = request_of(case("basic"))
    request = dataclasses.replace(plain, prompt=f"{plain.prompt} <lora:tiny-style:0.8>")
    assert fast_fp16.fast is not None
    before = fast_fp16.fast.unet.fast_calls
    fast = fast_fp16.generate(request)
    assert fast_fp16.fast.unet.fast_calls - before == request.denoising_steps
    assert psnr(fast.pixels, fp32_cuda.generate(request).pixels) >= MIN_PSNR_DB
    without = fast_fp16.generate(plain)
    assert psnr(fast.pixels, without.pixels) < MIN_PSNR_DB - 5  # 25.6 dB in fp32 on the CPU; fp16 rounding: 55
    assert psnr(without.pixels, fp32_cuda.generate(plain).pixels) >= MIN_PSNR_DB


def test_a_prompt_edit_swaps_contexts_under_the_captured_graphs(fp32_cuda: Pipeline, fast_fp16: Pipeline) -> None:
    """A1111's prompt editing changes the context between UNet calls; the graphs copy their inputs in at every
    replay, so every call of an edited prompt (77 tokens before and after) still replays, within fp16 rounding of
    fp32. The edit moves the tiny model's image little (37.7 dB on the CPU), so that it shows is asked of the
    difference it makes: on the fast path, at least half what it makes in fp32 (a graph blind to it would make
    none)."""
    plain = request_of(case("basic"))
    request = dataclasses.replace(plain, prompt=f"[{plain.prompt}:a blue gate, brick wall:3]", emphasis=True)
    assert fast_fp16.fast is not None
    before = fast_fp16.fast.unet.fast_calls
    fast = fast_fp16.generate(request).pixels
    assert fast_fp16.fast.unet.fast_calls - before == request.denoising_steps
    exact = fp32_cuda.generate(request).pixels
    assert psnr(fast, exact) >= MIN_PSNR_DB
    fast_edit = np.abs(fast - fast_fp16.generate(plain).pixels).mean()
    assert fast_edit > 0.5 * np.abs(exact - fp32_cuda.generate(plain).pixels).mean() > 0


def test_the_hires_fix_replays_its_first_pass_and_runs_its_second_eagerly(
    fp32_cuda: Pipeline, fast_fp16: Pipeline
) -> None:
    """The hires fix's first pass at a warmed-up shape replays the graphs; its second, at a shape nobody
    configured, runs eagerly (interpolated on the GPU, Euler a's noise from the CPU generator): within fp16 rounding
    of fp32 either way."""
    request = dataclasses.replace(request_of(case("basic")), sampler="euler_a", hr_scale=1.5, hr_steps=4, strength=0.6)
    assert fast_fp16.fast is not None
    before = fast_fp16.fast.unet.fast_calls
    fast = fast_fp16.generate(request).pixels
    assert fast_fp16.fast.unet.fast_calls - before == request.denoising_steps
    assert fast.shape == (1, 96, 96, 3)
    assert psnr(fast, fp32_cuda.generate(request).pixels) >= MIN_PSNR_DB


def test_a_tiled_request_runs_eagerly_and_the_fast_path_then_resumes(fp32_cuda: Pipeline, fast_fp16: Pipeline) -> None:
    """Tiling pads circularly, which the captured graphs (zero padding) cannot: its calls run eagerly, within fp16
    rounding of fp32, and the next plain request replays the graphs again."""
    request = dataclasses.replace(request_of(case("basic")), tiling=True)
    assert fast_fp16.fast is not None
    before, decodes = fast_fp16.fast.unet.fast_calls, fast_fp16.fast.decode.fast_calls
    tiled = fast_fp16.generate(request).pixels
    assert (fast_fp16.fast.unet.fast_calls, fast_fp16.fast.decode.fast_calls) == (before, decodes)
    assert psnr(tiled, fp32_cuda.generate(request).pixels) >= MIN_PSNR_DB
    plain = dataclasses.replace(request, tiling=False)
    fast_fp16.generate(plain)
    assert fast_fp16.fast.unet.fast_calls - before == plain.denoising_steps
    assert fast_fp16.fast.decode.fast_calls - decodes == 1


def test_low_memory_mode_gives_the_resident_images() -> None:
    request = request_of(case("basic"))
    resident = Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, "cuda", torch.float16))
    low = Pipeline(load_checkpoint(TINY_SAFETENSORS, TINY_CONFIG, "cuda", torch.float16, low_memory=True))
    expected = resident.generate(request).pixels
    actual = low.generate(request).pixels
    assert np.abs(actual - expected).max() <= 0.5
    # Between calls the networks wait on the CPU: that is the mode's point.
    assert next(low.model.unet.parameters()).device.type == "cpu"
