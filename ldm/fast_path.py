"""The GPU fast path: the UNet and the VAE decoder compiled by `torch.compile` and replayed as CUDA graphs.

Why: an SD v1 UNet call is about a thousand kernel launches, most of them a few microseconds of GPU work (group
norms, SiLUs, residual adds). Launched one by one from Python, a fast GPU waits on the CPU. Compiling fuses that
elementwise work into fewer kernels, and a CUDA graph replays every launch of a call as one. Both need fixed shapes,
so they apply to the shapes named in `FastPath.shapes`, which `warm_up` compiles and captures once at load. A larger
batch of the same image size runs as several prepared calls when prepared batch sizes add up to it (on an H200 a
batch-1 replay took 6.3 ms and an eager batch-4 call 32: docs/PERFORMANCE.md); any other shape runs eagerly: correct,
slower, and never a request stalled for a minute of compilation.

What may change the image: nothing beyond the rounding of the chosen precision (tests/test_gpu.py holds fp16 fast
against fp32 eager at ≥ 35 dB PSNR). Weights stay where they are (the graphs read them in place), so the fast path
and low-memory mode, which moves weights between devices, exclude each other.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ldm.model import StableDiffusion
from ldm.tokenizer import CONTEXT_LENGTH

logger = logging.getLogger(__name__)
# Runs before a capture: the first compiles, the others settle cuDNN's algorithm choice and cuBLAS' workspaces.
WARMUP_RUNS = 3
SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True)
class FastPath:
    """Switches of the fast path (model-config.yaml's `handler.fast_path`); all on by default, CUDA only.

    `shapes`: "HxWxN" — image height, width and images per UNet batch (a batch of N guided images is a UNet call
    on 2N latents). Requests whose batches have these shapes get compiled CUDA-graph replay.
    """

    channels_last: bool = True
    compile: bool = True
    cuda_graphs: bool = True
    shapes: tuple[str, ...] = ("512x512x1",)

    def __post_init__(self) -> None:
        for shape in self.shapes:
            match = SHAPE.match(shape)
            if match is None or min(int(g) for g in match.groups()) < 1:
                raise ValueError(f"fast path shape {shape!r}: expected HxWxN with positive integers, e.g. 512x512x1")

    def sizes(self) -> list[tuple[int, int, int]]:
        """(height, width, images) of each configured shape."""
        return [tuple(int(g) for g in SHAPE.match(s).groups()) for s in self.shapes]  # type: ignore[union-attr,misc]


class _Route:
    """The fast call for one input signature: inputs copied into buffers laid out as at warm-up, then the compiled
    function run on them, or its CUDA graph replayed.

    The buffers keep the layout (channels-last or not) the function was compiled for, so a caller's tensors of any
    layout neither trigger a recompile nor miss the graph.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], example: Sequence[torch.Tensor], graph: bool) -> None:
        self.fn = fn
        self.inputs = [tensor.clone() for tensor in example]
        self.graph: torch.cuda.CUDAGraph | None = None
        if not graph:
            for _ in range(WARMUP_RUNS):
                fn(*self.inputs)
            return
        # Warm up on a side stream, as capture needs: nothing the warm-up queued may be pending on the capture stream.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self.inputs, args, strict=True):
            buffer.copy_(value)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        # The next replay overwrites `output`; the caller gets its own copy.
        return self.output.clone()


Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def _signature(args: Sequence[torch.Tensor]) -> Signature:
    return tuple((tuple(a.shape), a.dtype) for a in args)


def _rows(key: Signature) -> int:
    """The batch size of a call's inputs when they all have the same one (a UNet call's x, t and context), else 0."""
    sizes = {shape[0] if shape else 0 for shape, _ in key}
    return sizes.pop() if len(sizes) == 1 else 0


def _per_row(key: Signature) -> Signature:
    """`key` without the batch dimension: two calls alike in it differ only in how many rows they run."""
    return tuple((shape[1:], dtype) for shape, dtype in key)


class ShapeDispatch:
    """A network call that takes the fast route for prepared input shapes and the eager one for any other.

    A call of more rows than any prepared route of its kind (the same inputs but for the batch dimension) runs as
    prepared calls, the largest that fit first, when they add up to its rows exactly; otherwise eagerly. A server's
    batches of a few requests thus replay the graph prepared for one. `fast_calls` counts calls that took a fast
    route, split or not, so tests and logs can tell that it was taken at all.
    """

    def __init__(self, eager: Callable[..., torch.Tensor], fast: Callable[..., torch.Tensor], graphs: bool) -> None:
        self.eager = eager
        self.fast = fast
        self.graphs = graphs
        self.routes: dict[Signature, _Route] = {}
        self.splits: dict[Signature, list[_Route] | None] = {}
        self.fast_calls = 0

    def prepare(self, *example: torch.Tensor) -> bool:
        """Compile (and capture) the route for inputs shaped like `example`; their values do not matter.

        A shape that fails to compile or capture (a PyTorch, driver or GPU this was never tried on) is logged and
        left to the eager route: slower, never a worker that cannot start. Returns whether the fast route is ready.
        """
        key = _signature(example)
        if key in self.routes:
            return True
        self.splits.clear()  # a new route may serve calls that had none
        try:
            self.routes[key] = _Route(self.fast, example, self.graphs)
        except Exception:
            logger.warning("fast path unavailable for inputs %s; they run eagerly", key, exc_info=True)
            return False
        return True

    def split(self, key: Signature) -> list[_Route] | None:
        """The prepared routes whose calls, one after the other, cover a call of signature `key` (None: none do)."""
        if key not in self.splits:
            self.splits[key] = self._cover(key)
        return self.splits[key]

    def _cover(self, key: Signature) -> list[_Route] | None:
        kind = _per_row(key)
        sizes = {_rows(k): route for k, route in self.routes.items() if _per_row(k) == kind and _rows(k)}
        pieces = []
        left = _rows(key)
        while left:
            size = max((size for size in sizes if size <= left), default=0)
            if not size:
                return None
            pieces.append(sizes[size])
            left -= size
        return pieces or None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = _signature(args)
        route = self.routes.get(key)
        if route is not None:
            self.fast_calls += 1
            return route(*args)
        pieces = self.split(key)
        if pieces is None:
            return self.eager(*args)
        self.fast_calls += 1
        outputs, start = [], 0
        for piece in pieces:
            rows = piece.inputs[0].shape[0]
            outputs.append(piece(*(arg[start : start + rows] for arg in args)))
            start += rows
        return torch.cat(outputs)


def compile_network(network: Callable[..., torch.Tensor], backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """`network` compiled as the fast path needs it: one graph per call (`fullgraph`: a graph break would fall back
    to Python mid-call), specialised to each shape (`dynamic=False`: by default a second shape turns the graph into a
    dynamic-shape one, with generic kernels and longer compiles, where each configured shape is captured alone)."""
    return torch.compile(network, fullgraph=True, dynamic=False, backend=backend)


@dataclass
class FastCalls:
    """The UNet's `(x, t, context)` call and the VAE's `decode(latent)`, each routed by shape."""

    unet: ShapeDispatch
    decode: ShapeDispatch


def accelerate(model: StableDiffusion, fast_path: FastPath) -> FastCalls | None:
    """Fast routes for `model` (None where the fast path does not apply: off the GPU, or in low-memory mode).

    Sets cuDNN to pick the fastest convolution algorithm per shape, a global switch: the fast path owns the GPU.
    """
    if model.device.type != "cuda" or model.low_memory:
        logger.info("fast path off: %s", "low-memory mode" if model.low_memory else f"device {model.device}")
        return None
    torch.backends.cudnn.benchmark = True
    if fast_path.channels_last:
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    unet: Callable[..., torch.Tensor] = model.unet
    decode: Callable[..., torch.Tensor] = model.vae.decode
    if fast_path.compile:
        unet = compile_network(model.unet)
        decode = compile_network(model.vae.decode)
    return FastCalls(
        ShapeDispatch(model.unet, unet, fast_path.cuda_graphs),
        ShapeDispatch(model.vae.decode, decode, fast_path.cuda_graphs),
    )


@torch.inference_mode()
def warm_up(model: StableDiffusion, calls: FastCalls, fast_path: FastPath) -> tuple[str, ...]:
    """Compile and capture every configured shape now, at load, instead of on some user's request; returns the
    shapes whose UNet and decode both took the fast route (a shape that failed runs eagerly).

    Guided shapes only (a UNet batch of 2N latents for N images): requests with scale 1 are rare and run eagerly.
    """
    ready_shapes = []
    factor = model.config.vae.downsampling_factor
    unet_channels = model.config.unet.in_channels  # an inpainting UNet also reads the mask and the masked image
    memory_format = torch.channels_last if fast_path.channels_last else torch.contiguous_format
    for shape, (height, width, images) in zip(fast_path.shapes, fast_path.sizes(), strict=True):
        if height % factor or width % factor:
            raise ValueError(f"fast path shape {height}x{width}: sides must be multiples of {factor}")
        side = (height // factor, width // factor)
        batch = 2 * images
        like = {"device": model.device, "dtype": model.dtype}
        x = torch.randn(batch, unet_channels, *side, **like).contiguous(memory_format=memory_format)
        latent = torch.randn(1, model.config.latent_channels, *side, **like).contiguous(memory_format=memory_format)
        t = torch.full((batch,), 999, device=model.device, dtype=torch.float32)  # as the pipeline passes it
        context = torch.randn(batch, CONTEXT_LENGTH, model.config.unet.context_dim, **like)
        started = time.perf_counter()
        unet_ready = calls.unet.prepare(x, t, context)
        ready = calls.decode.prepare(latent) and unet_ready
        logger.info(
            "fast path %s for %dx%d, %d image(s) per batch, in %.1f s",
            "ready" if ready else "NOT ready (eager)",
            height,
            width,
            images,
            time.perf_counter() - started,
        )
        if ready:
            ready_shapes.append(shape)
    return tuple(ready_shapes)
