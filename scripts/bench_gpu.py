"""GPU rows of the benchmark: full-size SD v1 (random weights) at 512×512, 50 DDIM steps, scale 7.5, ours next to
diffusers on the same weights, in one process, one run.

Rows, most important first and the cheap before the costly, so a run cut short by `--budget` still has the headline
and as many rows as fit: batch 1 for diffusers eager, ours eager and ours with the fast path (fp16, channels-last,
torch.compile, CUDA graphs); the fast path without compilation; low-memory mode (as a worker runs it: without cuDNN's
algorithm search, which the fast path turns on); batches 4 and 8 eager, ours and diffusers'; then the rows that
compile again: the fast path at 4 and 8, and bf16, each skipped when it cannot fit in the time left (a compile
lasts about as long as batch 1's did) or when batch 1's failed. Each row: seconds per image (prompt to uint8 image,
decode included), denoising steps per second (steps 2..50 timed between the step callbacks, so text encoding and
decoding stay out), the row's peak VRAM over what was allocated before it (and over what the allocator had reserved,
nearer what nvidia-smi shows), warm-up/compile seconds, and PSNR of its first image against ours in fp32 (same seed)
where that image is comparable (ours: same noise; diffusers draws its noise differently, so none).

Weights are random (no real checkpoint offline): speed and memory do not depend on their values.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ldm.checkpoint import split_state_dict
from ldm.config import load_config
from ldm.fast_path import FastPath, warm_up
from ldm.generation_request import GenerationRequest
from ldm.model import StableDiffusion
from ldm.parts import assemble
from ldm.pipeline import Pipeline
from ldm.random_weights import random_state_dict
from scripts.peers import diffusers_pipeline

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "v1-inference.yaml"
PROMPT = "a photograph of an astronaut riding a horse"
GIB = 1 << 30
T = TypeVar("T")


def failure(error: Exception) -> str:
    """A row's note for a configuration that raised."""
    return f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


@dataclass(frozen=True)
class GpuOptions:
    """What to run: the defaults are the issue's rows; `--config`/`--device` let a CPU smoke-test the script."""

    out: Path
    batches: tuple[int, ...] = (1, 4, 8)
    size: int = 512
    steps: int = 50
    scale: float = 7.5
    repeats: int = 3
    budget: float = 330.0
    seed: int = 0
    config: Path = CONFIG
    device: str = "cuda"


@dataclass
class Row:
    """One measured configuration at one batch size."""

    name: str
    batch: int
    seconds_per_image: float | None = None
    steps_per_second: float | None = None
    peak_vram_gib: float | None = None
    peak_reserved_gib: float | None = None
    warmup_seconds: float | None = None
    psnr_vs_fp32_db: float | None = None
    note: str = ""
    runs: list[float] = field(default_factory=list)


@dataclass
class Timing:
    """One generation: wall seconds in all, and the wall seconds between the end of step 1 and the last step."""

    total: float
    denoise: float
    steps: int
    images: np.ndarray | None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Marks (synchronised) the end of the first and of the last denoising step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first = self.last = 0.0

    def mark(self, step: int, total: int) -> None:
        if step in (1, total):
            synchronize(self.device)
            if step == 1:
                self.first = time.perf_counter()
            else:
                self.last = time.perf_counter()


class Bench:
    """The models and settings shared by every row; runs rows until the time budget is spent."""

    def __init__(self, options: GpuOptions) -> None:
        self.options = options
        self.device = torch.device(options.device)
        self.deadline = time.monotonic() + options.budget
        if self.device.type == "cuda":
            # The fast path turns cuDNN's per-shape algorithm search on for the whole process (ldm/fast_path.py). On
            # from the first row, every row runs with it, diffusers' and our eager ones too: rows differ only by what
            # they name, not by whether a fast-path row ran before them. Low-memory mode alone runs without it, as a
            # worker in that mode (which has no fast path) does.
            torch.backends.cudnn.benchmark = True
        self.machine = describe(self.device)
        print(self.machine, flush=True)
        self.config = load_config(options.config)
        started = time.perf_counter()
        self.state = random_state_dict(self.config, self.options.seed)
        self.parts = split_state_dict(self.state, self.config)
        print(f"random weights in {time.perf_counter() - started:.1f} s", flush=True)
        self.reference: np.ndarray | None = None

    def no_second_compile(self, headline: Row | None) -> str:
        """Why a row that compiles again is not run ("" when it is): batch 1's fast path failed (another compile
        would fail too, and cost its time), or the time left is shorter than batch 1's compile took."""
        if headline is None or headline.warmup_seconds is None:
            return "the fast path at batch 1 failed or did not run"
        if time.monotonic() + headline.warmup_seconds > self.deadline:
            return f"a compile takes about {headline.warmup_seconds:.0f} s, more than the time left"
        return ""

    def model(self, dtype: torch.dtype, low_memory: bool = False) -> StableDiffusion:
        return assemble(self.config, self.parts, self.device, dtype, low_memory=low_memory)

    def request(self, batch: int, steps: int | None = None) -> GenerationRequest:
        return GenerationRequest(
            prompt=PROMPT,
            height=self.options.size,
            width=self.options.size,
            steps=steps or self.options.steps,
            scale=self.options.scale,
            seed=self.options.seed,
            n_samples=batch,
        )

    def time_ours(self, pipeline: Pipeline, batch: int, steps: int | None = None) -> Timing:
        clock = StepClock(self.device)
        request = self.request(batch, steps)
        synchronize(self.device)
        start = time.perf_counter()
        generation = pipeline.generate_many(
            [request], max_batch_images=batch, callback=lambda p: clock.mark(p.step, p.total)
        )[0]
        total = time.perf_counter() - start
        return Timing(total, clock.last - clock.first, request.steps, generation.pixels)

    def time_diffusers(self, pipe: Any, batch: int, steps: int | None = None) -> Timing:
        clock = StepClock(self.device)
        steps = steps or self.options.steps

        def on_step(_pipe: Any, index: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            clock.mark(index + 1, steps)
            return kwargs

        synchronize(self.device)
        start = time.perf_counter()
        pipe(
            prompt=[PROMPT] * batch,
            height=self.options.size,
            width=self.options.size,
            num_inference_steps=steps,
            guidance_scale=self.options.scale,
            eta=0.0,
            generator=torch.Generator(self.device).manual_seed(self.options.seed),
            output_type="np",
            callback_on_step_end=on_step,
        )
        synchronize(self.device)
        return Timing(time.perf_counter() - start, clock.last - clock.first, steps, None)

    def measure(
        self, row: Row, run: Callable[[int | None], Timing], weights: int, setup: Callable[[], Any] | None = None
    ) -> Row:
        """Set up and warm up (timed together), then time `repeats` full generations; medians go in the row.

        Peak VRAM = `weights` (bytes the configuration keeps on the GPU, allocated before the row) + the most
        allocated on top of what was there before the row: what a process holding only this configuration needs,
        its CUDA context aside.
        """
        if time.monotonic() > self.deadline:
            row.note = "not measured: time budget spent"
            print(f"{row.name} b{row.batch}: {row.note}", flush=True)
            return row
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        reserved_before = torch.cuda.memory_reserved() if cuda else 0
        started = time.perf_counter()
        try:
            if setup is not None:
                setup()
            run(3)
            row.warmup_seconds = time.perf_counter() - started
            timings = [run(None) for _ in range(self.options.repeats)]
        except Exception as error:  # one broken configuration must not cost the rows after it
            traceback.print_exc()
            row.note = failure(error)
            print(json.dumps(asdict(row)), flush=True)
            return row
        row.runs = [t.total for t in timings]
        row.seconds_per_image = statistics.median(t.total for t in timings) / row.batch
        row.steps_per_second = statistics.median((t.steps - 1) / t.denoise for t in timings)
        if cuda:
            row.peak_vram_gib = (weights + torch.cuda.max_memory_allocated() - before) / GIB
            row.peak_reserved_gib = (weights + torch.cuda.max_memory_reserved() - reserved_before) / GIB
        images = timings[0].images
        if images is not None and self.reference is not None:
            row.psnr_vs_fp32_db = psnr(images[0], self.reference)
        print(json.dumps(asdict(row)), flush=True)
        return row


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of every parameter and buffer of `modules` that sit on a GPU."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


def model_bytes(model: StableDiffusion) -> int:
    return weight_bytes(model.unet, model.vae, model.text_encoder)


class FastRows:
    """One fast-path pipeline, built on its first row; each row's shape is warmed up (compiled, captured) in that
    row's timed set-up, so its warm-up seconds are what a worker's start pays per shape."""

    def __init__(self, bench: Bench, dtype: torch.dtype, fast_path: FastPath) -> None:
        self.bench, self.fast_path = bench, fast_path
        self.model = bench.model(dtype)
        self.pipeline: Pipeline | None = None

    def setup(self, batch: int) -> Callable[[], None]:
        def warm() -> None:
            side = self.bench.options.size
            shape = f"{side}x{side}x{batch}"
            fast_path = replace(self.fast_path, shapes=(shape,))
            if self.pipeline is None:
                self.pipeline = Pipeline(self.model, fast_path)
                ready = self.pipeline.fast_shapes
            else:
                fast = self.pipeline.fast
                ready = () if fast is None else warm_up(self.model, fast, fast_path)
            if self.pipeline.fast is not None and shape not in ready:  # None off CUDA: a smoke test runs eagerly
                # Timing it would put eager figures under the fast path's name; the log above says why it failed.
                raise RuntimeError(f"the fast path could not prepare {shape} (compile or capture failed: see the log)")

        return warm

    def run(self, batch: int) -> Callable[[int | None], Timing]:
        def timed(steps: int | None) -> Timing:
            assert self.pipeline is not None
            return self.bench.time_ours(self.pipeline, batch, steps)

        return timed

    def row(self, name: str, batch: int) -> Row:
        return self.bench.measure(Row(name, batch), self.run(batch), model_bytes(self.model), self.setup(batch))


def describe(device: torch.device) -> str:
    """The device, the software, and on CUDA the context's own memory (what every process pays before any tensor)."""
    import diffusers

    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    if device.type != "cuda":
        return f"{device} (smoke test: no GPU figures), {versions}"
    torch.empty(1, device=device)
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    return (
        f"{torch.cuda.get_device_name(device)} ({total / GIB:.0f} GiB), CUDA {torch.version.cuda}, {versions}; "
        f"CUDA context ≈ {context / GIB:.2f} GiB (not in the peak VRAM column)"
    )


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    mse = float(np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def run_gpu(options: GpuOptions) -> list[Row]:
    """Every row, written to `out/gpu.json` and `out/gpu.md` as they come (a run cut short keeps its rows)."""
    options.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(options)
    rows: list[Row] = []

    def keep(row: Row) -> None:
        rows.append(row)
        (options.out / "gpu.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        (options.out / "gpu.md").write_text(table(rows, bench))

    def ours(pipeline: Pipeline, batch: int) -> Callable[[int | None], Timing]:
        return lambda steps: bench.time_ours(pipeline, batch, steps)

    def built(name: str, batch: int, make: Callable[[], T]) -> T | None:
        """`make()`, or None with a failed row `name` kept: building one configuration (or diffusers' pipeline) must
        not cost the rows of the others."""
        try:
            return make()
        except Exception as error:
            traceback.print_exc()
            keep(Row(name, batch, note=failure(error)))
            return None

    first = options.batches[0]
    exact = built("ours fp32 eager", first, lambda: Pipeline(bench.model(torch.float32)))
    if exact is not None:
        reference = built("ours fp32 eager", first, lambda: bench.time_ours(exact, first).images)
        if reference is not None:  # else its failed row is kept: timing it again would fail again
            bench.reference = reference[0]
            keep(bench.measure(Row("ours fp32 eager", first), ours(exact, first), model_bytes(exact.model)))
        del exact

    eager = built("ours fp16 eager", first, lambda: Pipeline(bench.model(torch.float16)))
    pipe = None
    if eager is not None:
        pipe = built(
            "diffusers fp16 eager",
            first,
            lambda: diffusers_pipeline(eager.model, bench.state, options.config, bench.device),
        )

    def eager_rows(batch: int) -> None:
        if pipe is not None:
            peer_bytes = weight_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
            timed = functools.partial(bench.time_diffusers, pipe, batch)
            keep(bench.measure(Row("diffusers fp16 eager", batch), timed, peer_bytes))
        if eager is not None:
            keep(bench.measure(Row("ours fp16 eager", batch), ours(eager, batch), model_bytes(eager.model)))

    eager_rows(first)
    fast = built("ours fp16 fast path", first, lambda: FastRows(bench, torch.float16, FastPath()))
    headline = fast.row("ours fp16 fast path", first) if fast is not None else None
    if headline is not None:
        keep(headline)
    graphs = built("ours fp16 CUDA graphs, no compile", first,
                   lambda: FastRows(bench, torch.float16, FastPath(compile=False)))  # fmt: skip
    if graphs is not None:
        keep(graphs.row("ours fp16 CUDA graphs, no compile", first))
        del graphs
    low = built("ours fp16 low-memory mode", first,
                lambda: Pipeline(bench.model(torch.float16, low_memory=True)))  # fmt: skip
    if low is not None:
        with cudnn_search(False):  # a low-memory worker has no fast path, which is what turns the search on
            keep(bench.measure(Row("ours fp16 low-memory mode", first), ours(low, first), model_bytes(low.model)))
        del low
    for batch in options.batches[1:]:
        eager_rows(batch)

    def compiled(name: str, batch: int, rows_of: Callable[[], FastRows | None]) -> None:
        """A row that compiles again, when batch 1's compile worked and another fits in the time left."""
        why = bench.no_second_compile(headline)
        if why:
            keep(Row(name, batch, note=f"not measured: {why}"))
            return
        made = rows_of()
        if made is not None:
            keep(made.row(name, batch))

    for batch in options.batches[1:]:
        compiled("ours fp16 fast path", batch, lambda: fast)

    def bf16() -> FastRows | None:
        return built("ours bf16 fast path", first, lambda: FastRows(bench, torch.bfloat16, FastPath()))

    compiled("ours bf16 fast path", first, bf16)
    return rows


@contextlib.contextmanager
def cudnn_search(on: bool) -> Iterator[None]:
    """cuDNN's per-shape algorithm search set for a block, as it was after."""
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was


def table(rows: list[Row], bench: Bench) -> str:
    """Markdown: each row with its ratio to diffusers eager at the same batch."""
    lines = [
        bench.machine,
        "",
        f"{bench.options.size}×{bench.options.size}, {bench.options.steps} DDIM steps, scale "
        f"{bench.options.scale}; median of {bench.options.repeats} runs after a warm-up",
        "",
        "| row | batch | s/image | steps/s | × diffusers eager steps/s | peak VRAM over baseline (GiB) "
        "| peak reserved over baseline (GiB) | warm-up s | PSNR vs fp32 (dB) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    peer = {r.batch: r.steps_per_second for r in rows if r.name == "diffusers fp16 eager"}

    def cell(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for r in rows:
        base = peer.get(r.batch)
        ratio = None if not base or r.steps_per_second is None else r.steps_per_second / base
        lines.append(
            f"| {r.name} | {r.batch} | {cell(r.seconds_per_image, '.3f')} | {cell(r.steps_per_second, '.1f')} "
            f"| {cell(ratio, '.2f')} | {cell(r.peak_vram_gib, '.2f')} | {cell(r.peak_reserved_gib, '.2f')} "
            f"| {cell(r.warmup_seconds, '.1f')} "
            f"| {cell(r.psnr_vs_fp32_db, '.1f')} | {r.note} |"
        )
    return "\n".join(lines) + "\n"
