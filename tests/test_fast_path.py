"""The fast path's CPU-checkable parts: its settings, its shape routing and fallbacks, that it leaves CPU pipelines
untouched, and that both networks trace into one graph each for `torch.compile`. What only a GPU can show (the
generated kernels and CUDA graphs within fp16 rounding) is tests/test_gpu.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from handler.settings import SettingsError, parse_settings
from ldm.fast_path import FastCalls, FastPath, ShapeDispatch, accelerate, compile_network, warm_up
from ldm.model import StableDiffusion
from ldm.pipeline import Pipeline
from ldm.tokenizer import CONTEXT_LENGTH
from tests.reference import assert_reproduces, case
from tests.reference import request_for as request_of


def test_shapes_parse_and_bad_ones_are_refused() -> None:
    assert FastPath(shapes=("512x768x2", "64x64x1")).sizes() == [(512, 768, 2), (64, 64, 1)]
    for bad in ("512x512", "512 x 512 x 1", "0x512x1", "512x512x0", "ax512x1"):
        with pytest.raises(ValueError, match="HxWxN"):
            FastPath(shapes=(bad,))


def test_model_config_section() -> None:
    settings = parse_settings(
        {"handler": {"fast_path": {"compile": False, "shapes": ["512x512x1", "768x512x4"]}}}
    ).fast_path
    assert settings == FastPath(channels_last=True, compile=False, cuda_graphs=True, shapes=("512x512x1", "768x512x4"))
    assert parse_settings({}).fast_path == FastPath()
    with pytest.raises(SettingsError, match=r"handler\.fast_path: fast path shape '512x512'"):
        parse_settings({"handler": {"fast_path": {"shapes": ["512x512"]}}})
    with pytest.raises(SettingsError, match=r"handler\.fast_path: unknown keys \['graphs'\]"):
        parse_settings({"handler": {"fast_path": {"graphs": True}}})
    with pytest.raises(SettingsError, match=r"handler\.fast_path\.shapes: expected tuple"):
        parse_settings({"handler": {"fast_path": {"shapes": [512]}}})


def test_cpu_pipelines_are_untouched(tiny_model: StableDiffusion, pipeline: Pipeline) -> None:
    """On the CPU the fast path does nothing at all: same route, same layout, same pixels."""
    assert accelerate(tiny_model, FastPath()) is None
    fast = Pipeline(tiny_model, FastPath())
    assert fast.fast is None
    assert next(tiny_model.unet.parameters()).is_contiguous()
    request = request_of(case("basic"))
    assert np.array_equal(fast.generate(request).pixels, pipeline.generate(request).pixels)


class Counting:
    """A stand-in network: doubles its input and counts calls, optionally failing them."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail:
            raise RuntimeError("cannot compile this")
        return x * 2


def test_prepared_shapes_take_the_fast_route_others_the_eager_one() -> None:
    eager, fast = Counting(), Counting()
    dispatch = ShapeDispatch(eager, fast, graphs=False)
    assert dispatch.prepare(torch.zeros(2, 4, 8, 8))
    warm_up_calls = fast.calls
    assert warm_up_calls > 0
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    assert torch.equal(dispatch(x), x * 2)
    assert (fast.calls - warm_up_calls, eager.calls, dispatch.fast_calls) == (1, 0, 1)
    y = torch.randn(1, 4, 8, 8)
    assert torch.equal(dispatch(y), y * 2)
    assert (eager.calls, dispatch.fast_calls) == (1, 1)
    # Same shape, other dtype: not the prepared route.
    dispatch(x.double())
    assert eager.calls == 2


def test_a_shape_that_fails_to_prepare_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    eager = Counting()
    dispatch = ShapeDispatch(eager, Counting(fail=True), graphs=False)
    with caplog.at_level(logging.WARNING, logger="ldm.fast_path"):
        assert not dispatch.prepare(torch.zeros(2, 4, 8, 8))
    assert "run eagerly" in caplog.text
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(dispatch(x), x * 2)
    assert (eager.calls, dispatch.fast_calls) == (1, 0)


class Rows:
    """A stand-in UNet of two inputs: each row's x doubled plus its own t, so a row put back in the wrong place shows;
    records the batch size of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return x * 2 + t[:, None, None, None]


def rows(n: int, side: int = 8, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A call's inputs of `n` rows, every row's t its own."""
    return torch.randn(n, 4, side, side, dtype=dtype), torch.arange(n, dtype=dtype) * 10


def test_a_batch_that_prepared_batches_add_up_to_replays_them_largest_first() -> None:
    eager, fast = Rows(), Rows()
    dispatch = ShapeDispatch(eager, fast, graphs=False)
    assert dispatch.prepare(*rows(2)) and dispatch.prepare(*rows(8))
    fast.batches.clear()
    x, t = rows(12)
    assert torch.equal(dispatch(x, t), x * 2 + t[:, None, None, None])
    assert (fast.batches, eager.batches, dispatch.fast_calls) == ([8, 2, 2], [], 1)
    fast.batches.clear()
    x, t = rows(6)
    assert torch.equal(dispatch(x, t), x * 2 + t[:, None, None, None])
    assert (fast.batches, eager.batches, dispatch.fast_calls) == ([2, 2, 2], [], 2)


def test_a_batch_that_prepared_batches_do_not_add_up_to_runs_eagerly() -> None:
    eager, fast = Rows(), Rows()
    dispatch = ShapeDispatch(eager, fast, graphs=False)
    dispatch(*rows(8))  # nothing prepared yet
    assert dispatch.prepare(*rows(4))
    fast.batches.clear()
    for n in (6, 3, 2):  # 4 + 2 left over, fewer rows than any route, and fewer again
        dispatch(*rows(n))
    dispatch(*rows(8, side=16))  # another latent size
    dispatch(*rows(8, dtype=torch.float64))  # another dtype
    x, t = rows(8)
    dispatch(x, t[:1])  # inputs of different batch sizes (a t for all): not a batch of rows
    assert (eager.batches, fast.batches, dispatch.fast_calls) == ([8, 6, 3, 2, 8, 8, 8], [], 0)
    dispatch(*rows(8))  # the call refused before the route was prepared now takes it, twice
    assert (fast.batches, dispatch.fast_calls) == ([4, 4], 1)


def test_a_batch_split_into_prepared_calls_gives_the_reference_images(tiny_model: StableDiffusion) -> None:
    """Three guided images, prepared for one: each UNet call of the batch runs as three, and the images are still
    the CompVis reference's (the UNet computes every row alone: splitting the batch changes no image)."""
    batches: list[int] = []

    def prepared_unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batches.append(len(x))
        return tiny_model.unet(x, t, context)

    split = Pipeline(tiny_model)
    decode = tiny_model.vae.decode
    split.fast = FastCalls(ShapeDispatch(tiny_model.unet, prepared_unet, False), ShapeDispatch(decode, decode, False))
    with torch.inference_mode():
        assert warm_up(tiny_model, split.fast, FastPath(shapes=("64x64x1",))) == ("64x64x1",)
    batches.clear()
    case_data = case("batch3")
    request = request_of(case_data)
    generation = split.generate(request)
    assert split.fast.unet.fast_calls == request.steps and split.fast.decode.fast_calls == 3
    assert batches == [2] * 3 * request.steps
    assert_reproduces(case_data, generation)


def test_warm_up_says_which_shapes_took_the_fast_route(tiny_model: StableDiffusion) -> None:
    """What the handler's describe call lists: a shape that failed to prepare runs eagerly and is not among them."""

    def picky_unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 10:  # the 64x80 shape's latent width
            raise RuntimeError("cannot compile this shape")
        return tiny_model.unet(x, t, context)

    decode = tiny_model.vae.decode
    calls = FastCalls(ShapeDispatch(tiny_model.unet, picky_unet, False), ShapeDispatch(decode, decode, False))
    with torch.inference_mode():
        assert warm_up(tiny_model, calls, FastPath(shapes=("64x64x1", "64x80x1"))) == ("64x64x1",)


@torch.inference_mode()
def test_unet_and_decoder_each_compile_to_one_graph(tiny_model: StableDiffusion) -> None:
    """`accelerate` compiles both networks with `compile_network` (one graph, static shapes) for the GPU: a graph
    break (a `.item()`, a print, data-dependent control flow) would fail there, and the worker would fall back to
    eager at full cost. Tracing needs no GPU, so the CPU checks it here (with the `aot_eager` backend: the same graph
    capture without code generation, seconds instead of a minute) and that the traced route computes the eager values
    (to float rounding: the traced decoder may pick another memory layout for its attention's output, and so another
    summation order)."""
    config = tiny_model.config
    x = torch.randn(2, config.latent_channels, 8, 8)
    t = torch.tensor([999, 999])
    context = torch.randn(2, CONTEXT_LENGTH, config.unet.context_dim)
    networks = [(tiny_model.unet, (x, t, context)), (tiny_model.vae.decode, (x[:1],))]
    try:
        for network, example in networks:
            dispatch = ShapeDispatch(network, compile_network(network, backend="aot_eager"), False)
            assert dispatch.prepare(*example)
            torch.testing.assert_close(dispatch(*example), network(*example))
            assert dispatch.fast_calls == 1
    finally:
        torch._dynamo.reset()
