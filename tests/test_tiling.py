"""A1111's Tiling (ldm/tiling.py): with every convolution padding circularly the networks see the image as a torus,
so a shift that wraps the input around wraps the output alike (which zero padding breaks at the edges); checked
against diffusers with its convolutions set the same way."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ldm.checkpoint import read_state_dict
from ldm.fast_path import FastCalls, FastPath, ShapeDispatch, warm_up
from ldm.generation_request import GenerationRequest
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.png_info import parameters_text
from ldm.request_checks import resolve
from ldm.tiling import circular_padding
from tests.reference import FLOAT_TOLERANCE, TINY_CONFIG, TINY_SAFETENSORS

REQUEST = GenerationRequest("a brick wall texture", seed=21, height=64, width=64, steps=4, tiling=True)


def test_circular_padding_makes_the_networks_wrap_around(tiny_model: StableDiffusion) -> None:
    """Rolling the latent by 2 (the tiny UNet's one downsampling divides it) rolls the UNet's output by 2 and the
    decoded image by 16 pixels; with zero padding the edges differ."""
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, tiny_model.config.text["hidden_size"], generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])

    def roll(x: torch.Tensor, by: int) -> torch.Tensor:
        return torch.roll(x, shifts=(by, by), dims=(2, 3))

    def wraps() -> tuple[float, float]:
        with torch.inference_mode():
            unet = tiny_model.unet(roll(latent, 2), t, context) - roll(tiny_model.unet(latent, t, context), 2)
            vae = tiny_model.vae.decode(roll(latent, 2)) - roll(tiny_model.vae.decode(latent), 16)
        return unet.abs().max().item(), vae.abs().max().item()

    with circular_padding(tiny_model.unet, tiny_model.vae):
        assert max(wraps()) < 1e-4
    assert min(wraps()) > 1e-2
    networks = (tiny_model.unet, tiny_model.vae)
    assert {m.padding_mode for n in networks for m in n.modules() if isinstance(m, nn.Conv2d)} == {"zeros"}


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")
def test_a_tiled_image_equals_diffusers_with_circular_convolutions(
    tiny_model: StableDiffusion, pipeline: Pipeline
) -> None:
    from scripts.peers import call_arguments, diffusers_pipeline

    request = resolve(REQUEST)
    ours = pipeline.generate(request).pixels[0]
    pipe: Any = diffusers_pipeline(tiny_model, read_state_dict(TINY_SAFETENSORS), TINY_CONFIG, torch.device("cpu"))
    for network in (pipe.unet, pipe.vae):
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                module.padding_mode = "circular"
    generator = torch.Generator().manual_seed(request.seed)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    theirs = pipe(**{**call_arguments(request), "generator": generator}, latents=latents).images[0] * 255
    assert np.abs(ours - theirs).max() < FLOAT_TOLERANCE
    plain = pipeline.generate(dataclasses.replace(request, tiling=False)).pixels[0]
    assert np.abs(ours - plain).mean() > 1


def test_a_failure_inside_a_tiled_run_leaves_the_model_as_it_was(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padding and the fast path come back whatever the run raised (a server then retries requests alone)."""
    fast = pipeline.fast

    def fail(*args: Any, **kwargs: Any) -> torch.Tensor:
        assert padding_modes(pipeline) == {"circular"} and pipeline.fast is None
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipeline, "denoise", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipeline.generate(REQUEST)
    assert padding_modes(pipeline) == {"zeros"} and pipeline.fast is fast


def test_a_tiled_run_goes_around_the_fast_paths_graphs(tiny_model: StableDiffusion, pipeline: Pipeline) -> None:
    """The fast path's graphs were captured with zero padding, which circular padding set later cannot reach (here
    copies of the networks stand in for them): a tiled request runs eagerly, the tiled image; a plain one takes the
    fast route."""
    fast_pipeline = Pipeline(tiny_model)
    unet, decode = copy.deepcopy(tiny_model.unet), copy.deepcopy(tiny_model.vae).decode
    calls = FastCalls(ShapeDispatch(tiny_model.unet, unet, False), ShapeDispatch(tiny_model.vae.decode, decode, False))
    with torch.inference_mode():
        assert warm_up(tiny_model, calls, FastPath(channels_last=False, shapes=("64x64x1",))) == ("64x64x1",)
    fast_pipeline.fast = calls
    tiled = fast_pipeline.generate(REQUEST)
    assert (calls.unet.fast_calls, calls.decode.fast_calls) == (0, 0) and fast_pipeline.fast is calls
    assert np.array_equal(tiled.pixels, pipeline.generate(REQUEST).pixels)
    fast_pipeline.generate(dataclasses.replace(REQUEST, tiling=False))
    assert (calls.unet.fast_calls, calls.decode.fast_calls) == (REQUEST.steps, 1)


def padding_modes(pipeline: Pipeline) -> set[str]:
    networks = (pipeline.model.unet, pipeline.model.vae)
    return {m.padding_mode for network in networks for m in network.modules() if isinstance(m, nn.Conv2d)}


def test_tiled_and_plain_requests_generated_together_equal_each_alone(pipeline: Pipeline) -> None:
    """Each alone, computed after the batch; the batch left every convolution as it found it."""
    requests = [REQUEST, dataclasses.replace(REQUEST, tiling=False), dataclasses.replace(REQUEST, seed=22)]
    together = pipeline.generate_many(requests)
    assert padding_modes(pipeline) == {"zeros"}
    for request, generation in zip(requests, together, strict=True):
        assert np.abs(generation.pixels - pipeline.generate(request).pixels).max() < FLOAT_TOLERANCE
    assert "Tiling: True" in parameters_text(resolve(REQUEST), 21)
    assert "Tiling" not in parameters_text(resolve(dataclasses.replace(REQUEST, tiling=False)), 21)
