"""CPU rows of the benchmark: full-size SD v1 (random weights), ours next to diffusers on the same weights.

Prints comparable numbers, not pass/fail tests: a load table (time, peak resident memory) where every load runs in a
fresh subprocess so one load's high-water mark never hides another's, and a speed table — one UNet call, one VAE
decode, one text encoding, a whole 256×256 image at 10 steps — next to diffusers' `StableDiffusionPipeline` holding
the same weights (scripts/peers.py). Between them, what the CPU allocator setting every CPU `Pipeline` makes is
worth to our UNet call (scripts/bench_allocator.py). Weights are random (no real checkpoint offline); speed and
memory do not depend on their values, and every pair is checked to compute the same thing before it is timed. Linux
only (reads /proc/self/status). Run through `python -m scripts.benchmark cpu`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from ldm.checkpoint import read_state_dict
from ldm.config import load_config
from ldm.generation_request import GenerationRequest
from ldm.parts import DTYPES, load_checkpoint, load_split, write_split
from ldm.pipeline import Pipeline
from ldm.random_weights import random_state_dict, save_checkpoint
from scripts.bench_allocator import ALLOCATOR_CHILDREN, compare_allocators
from scripts.peers import call_arguments, diffusers_networks, diffusers_pipeline
from scripts.process_memory import proc_status, reset_peak_rss

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "v1-inference.yaml"
MIB = 1 << 20
# The issue's budget for loading split parts: peak resident memory over the baseline ≤ 1.3 × the parts' size.
SPLIT_RSS_BUDGET = 1.3
# Agreement needed before timing means anything: max |ours - diffusers| ≤ this × max(1, max |diffusers|).
TOLERANCE = 1e-4
UNET_BATCH, UNET_LATENT = 2, 32
VAE_LATENT = 32  # 256×256 pixels
IMAGE_STEPS = 10
# Timed runs per side: a network row, a whole-image row (ten times longer), either with --quick.
REPEATS, IMAGE_REPEATS, QUICK_REPEATS = 5, 3, 2
# Whole images, [0, 1] scale: ten steps of two float32 implementations with different operation orders.
IMAGE_TOLERANCE = 1e-3
# (network rows, whole image) per precision of the speed rows (`--dtype`). bf16 values are spaced up to 2^-7 of
# their size, and the two sides round at different points (our latents stay float32 between steps, diffusers' are
# bf16): a few of those units after 25 blocks, up to about 20 levels of 255 after ten steps (11 measured). A wrong
# network is off by O(1).
SPEED_TOLERANCES = {"fp32": (TOLERANCE, IMAGE_TOLERANCE), "bf16": (0.03, 0.08)}
PROMPT = "a photograph of an astronaut riding a horse"
PROFILE_ROWS = 12
# Sample fields the speed table prints, with what a row's label calls each; the last two only where UNets are clocked.
KINDS = {"wall": "wall", "cpu": "cpu", "unet": "in UNet calls", "outside_unet": "outside them"}


@dataclass(frozen=True)
class CpuOptions:
    """The `cpu` section's command line."""

    workdir: Path | None  # where the scratch folder goes (default: the system temp)
    repeats: int | None  # timed runs of every row; None: REPEATS, IMAGE_REPEATS for whole images (QUICK_REPEATS)
    quick: bool  # fewer repeats, no fp16 split
    profile: bool  # also print each row's top operators
    keep: bool  # keep the scratch folder
    seed: int  # of the random weights
    only: str | None  # time only the speed rows whose label contains this (any case); no load or allocator rows
    dtype: str = "fp32"  # both sides' precision in the speed rows; anything else times those rows alone

    @property
    def speed_rows_only(self) -> bool:
        return self.only is not None or self.dtype != "fp32"

    def row_repeats(self, whole_image: bool) -> int:
        if self.repeats is not None:
            return self.repeats
        if self.quick:
            return QUICK_REPEATS
        return IMAGE_REPEATS if whole_image else REPEATS


@dataclass(frozen=True)
class LoadResult:
    """One load, measured by a fresh child process (bytes)."""

    label: str
    seconds: float
    baseline_rss: int
    peak_rss: int
    peak_rss_used: int
    file_rss_used: int
    source_bytes: int

    @property
    def delta(self) -> int:
        """Memory the load itself added: the child's high-water mark while loading minus its RSS after imports."""
        return self.peak_rss - self.baseline_rss

    @property
    def delta_used(self) -> int:
        """The same once every weight was read: loaders that map files lazily only pay here."""
        return self.peak_rss_used - self.baseline_rss

    def per_disk_byte(self, delta: int) -> float:
        """Resident bytes per byte on disk; ≈1 is one copy of the weights, ≈2 two copies resident at once."""
        return delta / self.source_bytes


@dataclass(frozen=True)
class Sample:
    """One timed call: wall seconds, process CPU seconds summed over all threads, and wall seconds inside the UNet's
    calls (None where the row does not clock them)."""

    wall: float
    cpu: float
    unet: float | None = None

    @property
    def outside_unet(self) -> float | None:
        return None if self.unet is None else self.wall - self.unet


class CallClock:
    """Wall seconds spent inside a module's forward calls: splits a whole image into its UNet calls and the rest, so
    a whole-image difference can be placed in the network or around it."""

    def __init__(self, module: nn.Module | None) -> None:
        self.seconds = 0.0
        self.started = 0.0
        self.hooks = (
            []
            if module is None
            else [module.register_forward_pre_hook(self.start), module.register_forward_hook(self.stop)]
        )

    def start(self, *_: Any) -> None:
        self.started = time.perf_counter()

    def stop(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self.started

    def take(self) -> float | None:
        """The seconds clocked since the last take (None without a module)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds if self.hooks else None

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def touch(modules: list[nn.Module]) -> None:
    """Read every weight once, as a first inference would: lazily mapped weights only become resident then."""
    with torch.inference_mode():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.sum()


def load(kind: str, path: Path) -> list[nn.Module]:
    """The networks one load kind makes: ours from split parts or the `.ckpt`, or diffusers' conversion of it."""
    if kind == "diffusers":
        return list(diffusers_networks(read_state_dict(path), CONFIG))
    model = load_split(path) if kind == "split" else load_checkpoint(path, CONFIG)
    return [model.unet, model.vae, model.text_encoder]


def child_load(kind: str, path: Path) -> None:
    """Body of the load subprocess: load once, print the measurements as one JSON line on stdout."""
    reset_peak_rss()
    baseline, file_baseline = proc_status("VmRSS"), proc_status("RssFile")
    start = time.perf_counter()
    modules = load(kind, path)
    seconds = time.perf_counter() - start
    at_load = proc_status("VmHWM")
    touch(modules)
    report = {
        "seconds": seconds,
        "baseline": baseline,
        "peak": at_load,
        "peak_used": proc_status("VmHWM"),
        "file_used": proc_status("RssFile") - file_baseline,
    }
    print(json.dumps(report))


def measure_load(label: str, kind: str, path: Path, cache_home: Path | None = None) -> LoadResult:
    """Run one load in a fresh interpreter, so its peak RSS is its own and not a leftover of earlier work here;
    `cache_home` is the child's XDG_CACHE_HOME, where it finds (or not) the model hash of a `.ckpt`."""
    command = [sys.executable, "-m", "scripts.bench_cpu", kind, str(path)]
    env = {**os.environ, **({"XDG_CACHE_HOME": str(cache_home)} if cache_home else {})}
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO, env=env)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return LoadResult(
        label=label,
        seconds=report["seconds"],
        baseline_rss=report["baseline"],
        peak_rss=report["peak"],
        peak_rss_used=report["peak_used"],
        file_rss_used=report["file_used"],
        source_bytes=sum(f.stat().st_size for f in files),
    )


def make_checkpoint(workdir: Path, seed: int) -> Path:
    """Write the random full-size model as an original `.ckpt`; its 4 GB state dict dies with this call, so nothing
    measured later shares memory with it."""
    ckpt = workdir / "sd-v1-random.ckpt"
    save_checkpoint(random_state_dict(load_config(CONFIG), seed), ckpt)
    return ckpt


def print_loads(results: list[LoadResult]) -> None:
    """The load table, plus the issue's memory budget verdict for the fp32 split (the only like-for-like row)."""
    print(
        "\nRSS in MiB, each load in a fresh process; Δ = peak - RSS after imports; 'used': after reading every "
        "weight once;\nfile = of that, pages of mapped files (weights left on the file mapping, not copied)"
    )
    header = ("load", "s", "disk", "base", "peak", "Δ", "Δ/disk", "peak used", "Δ used", "Δ used/disk", "file")
    widths = (32, 6, 7, 6, 7, 7, 8, 11, 8, 13, 7)
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    for r in results:
        cells = (
            f"{r.seconds:.2f}",
            f"{r.source_bytes / MIB:.0f}",
            f"{r.baseline_rss / MIB:.0f}",
            f"{r.peak_rss / MIB:.0f}",
            f"{r.delta / MIB:.0f}",
            f"{r.per_disk_byte(r.delta):.2f}",
            f"{r.peak_rss_used / MIB:.0f}",
            f"{r.delta_used / MIB:.0f}",
            f"{r.per_disk_byte(r.delta_used):.2f}",
            f"{r.file_rss_used / MIB:.0f}",
        )
        print(f"{r.label:<{widths[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths[1:], strict=True)))
    split = results[0]
    for when, delta in (("while loading", split.delta), ("after first use", split.delta_used)):
        ratio = split.per_disk_byte(delta)
        verdict = "holds" if ratio <= SPLIT_RSS_BUDGET else "DOES NOT hold"
        print(f"budget Δ ≤ {SPLIT_RSS_BUDGET} × parts' size, {split.label}, {when}: {ratio:.2f} → {verdict}")
    if any("fp16" in r.label for r in results):
        print("(fp16 parts loaded as fp32 need ≥ 2 × their size by construction: the budget applies to fp32 parts)")


def check_agreement(ours: torch.Tensor, theirs: torch.Tensor, what: str, tolerance: float = TOLERANCE) -> None:
    """Print how far apart the two outputs are; stop the benchmark if they differ, since timing them would be moot."""
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    ok = diff <= tolerance * max(1.0, scale)
    print(
        f"{what:<32} max |ours - diffusers| = {diff:.2e}  (max |diffusers| = {scale:.2f})  "
        f"{'agree' if ok else 'DISAGREE'}"
    )
    if not ok:
        raise SystemExit(f"{what}: outputs disagree beyond {tolerance} relative; the timings would compare nothing")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot: minus our own, it shows whether the timings had company.

    Summed by name, not `sum(cpu_times())`: Linux counts guest time inside user time already.
    """
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def time_pair(pair: Pair) -> dict[str, list[Sample]]:
    """`pair.repeats` timed calls of each side, alternating ABBA so machine noise and any run-order effect hit both
    alike, clocking each side's UNet calls where the pair names the UNets. Callers warm both up first."""
    samples: dict[str, list[Sample]] = {"ours": [], "diffusers": []}
    unets = pair.unets or (None, None)
    sides = [("ours", pair.ours, CallClock(unets[0])), ("diffusers", pair.theirs, CallClock(unets[1]))]
    try:
        with torch.inference_mode():
            for i in range(pair.repeats):
                for name, fn, clock in sides if i % 2 == 0 else reversed(sides):
                    wall, cpu = time.perf_counter(), time.process_time()
                    fn()
                    samples[name].append(Sample(time.perf_counter() - wall, time.process_time() - cpu, clock.take()))
    finally:
        for _, _, clock in sides:
            clock.close()
    return samples


def print_timings(rows: dict[str, dict[str, list[Sample]]]) -> None:
    """The speed table: medians of wall and process CPU time (and of the wall time inside and outside the UNet's calls
    where clocked), the ratio, and max/min of each side as a noise gauge."""
    print(
        f"\nmedian of n runs after a warm-up, alternating; {torch.get_num_threads()} torch threads; "
        "cpu = process CPU time over all threads;\nspread = max/min of the runs (ours, diffusers): well above 1 "
        "means other load on the machine;\npaired = ours/diffusers of each run and its neighbour, median (min-max): "
        "a range that spans 1 is a tie"
    )
    print(f"{'row':<50}{'n':>3}{'ours (s)':>10}{'diffusers (s)':>15}{'ours/diffusers':>16}{'spread':>13}{'paired':>19}")
    for label, samples in rows.items():
        n = len(samples["ours"])
        clocked = samples["ours"][0].unet is not None
        for kind in list(KINDS)[: 4 if clocked else 2]:
            times = {side: [getattr(s, kind) for s in runs] for side, runs in samples.items()}
            mine, theirs = (statistics.median(times[side]) for side in ("ours", "diffusers"))
            spread = "/".join(f"{max(t) / min(t):.2f}" for t in times.values())
            # time_pair runs each repeat's two calls back to back, so run i of each side were neighbours in time.
            ratios = [a / b for a, b in zip(times["ours"], times["diffusers"], strict=True)]
            paired = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            print(
                f"{f'{label} ({KINDS[kind]})':<50}{n:>3}{mine:>10.3f}{theirs:>15.3f}{mine / theirs:>16.2f}{spread:>13}"
                f"{paired:>19}"
            )


def profile_pair(label: str, ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
    """Top operators by self CPU time for one call of each side: where a slower side loses its time."""
    for side, fn in (("ours", ours), ("diffusers", theirs)):
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n--- profile: {label}, {side}")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS, max_name_column_width=40)
        )


@dataclass(frozen=True)
class Pair:
    """One row: our call, diffusers' call, how to compare their outputs, how many timed runs."""

    ours: Callable[[], Any]
    theirs: Callable[[], Any]
    outputs: Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]]
    tolerance: float
    repeats: int
    unets: tuple[nn.Module, nn.Module] | None = None  # (ours, diffusers') to clock inside each run


def same(ours: Any, theirs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return ours, theirs


def pairs(split_fp32: Path, ckpt: Path, options: CpuOptions) -> dict[str, Pair]:
    """Every speed row: ours and diffusers on the same weights and inputs."""
    dtype = DTYPES[options.dtype]
    tolerance, image_tolerance = SPEED_TOLERANCES[options.dtype]
    ours = load_split(split_fp32, dtype=dtype)
    pipe = diffusers_pipeline(ours, read_state_dict(ckpt), CONFIG, torch.device("cpu"))
    pipeline = Pipeline(ours)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(UNET_BATCH, 4, UNET_LATENT, UNET_LATENT, generator=generator).to(dtype)
    t = torch.randint(0, ours.config.timesteps, (UNET_BATCH,), generator=generator)
    context = torch.randn(UNET_BATCH, 77, ours.config.unet.context_dim, generator=generator).to(dtype)
    latent = torch.randn(1, 4, VAE_LATENT, VAE_LATENT, generator=generator).to(dtype)
    side = VAE_LATENT * 8
    request = GenerationRequest(PROMPT, height=side, width=side, steps=IMAGE_STEPS, scale=7.5, seed=0)

    def their_image() -> Any:
        return pipe(**call_arguments(request), eta=0.0).images

    return {
        f"UNet call b{UNET_BATCH} {UNET_LATENT}×{UNET_LATENT} latent": Pair(
            lambda: ours.unet(x, t, context),
            lambda: pipe.unet(x, t, encoder_hidden_states=context, return_dict=False)[0],
            same,
            tolerance,
            options.row_repeats(whole_image=False),
        ),
        f"VAE decode b1 {side}×{side}": Pair(
            lambda: ours.vae.decode(latent),
            lambda: pipe.vae.decode(latent, return_dict=False)[0],
            same,
            tolerance,
            options.row_repeats(whole_image=False),
        ),
        "text encoding, prompt + empty": Pair(
            lambda: pipeline.prompts.embed([PROMPT, ""]),
            lambda: torch.cat(pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True, "")),
            same,
            tolerance,
            options.row_repeats(whole_image=False),
        ),
        # Both draw the starting noise from a CPU generator seeded alike, and run the same DDIM: same image.
        f"whole image {side}×{side}, {IMAGE_STEPS} steps": Pair(
            lambda: pipeline.generate(request).pixels,
            their_image,
            lambda mine, theirs: (torch.from_numpy(mine / 255.0), torch.from_numpy(theirs)),
            image_tolerance,
            options.row_repeats(whole_image=True),
            (ours.unet, pipe.unet),
        ),
    }


def compare_networks(split_fp32: Path, ckpt: Path, options: CpuOptions) -> None:
    """Check ours and diffusers' agree on the same input (which also warms both up), then time them alternately."""
    every = pairs(split_fp32, ckpt, options)
    rows = {label: pair for label, pair in every.items() if (options.only or "").lower() in label.lower()}
    if not rows:
        raise SystemExit(f"--only {options.only!r} matches no row of: {', '.join(every)}")
    print()
    with torch.inference_mode():
        for label, pair in rows.items():
            check_agreement(*pair.outputs(pair.ours(), pair.theirs()), label, pair.tolerance)
    busy, own, wall = machine_busy_seconds(), time.process_time(), time.perf_counter()
    timings = {label: time_pair(pair) for label, pair in rows.items()}
    others = (machine_busy_seconds() - busy) - (time.process_time() - own)
    share = others / ((time.perf_counter() - wall) * psutil.cpu_count())
    print_timings(timings)
    print(
        f"other processes kept {share:.0%} of the CPUs busy while this timed (above a few %, rerun on a quiet machine)"
    )
    if options.profile:
        for label, pair in rows.items():
            profile_pair(label, pair.ours, pair.theirs)


def run(workdir: Path, options: CpuOptions) -> None:
    """The whole benchmark inside `workdir`: build files, measure loads and the allocator in children, then compare
    the networks."""
    import diffusers

    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM; workdir {workdir}"
    )
    start = time.perf_counter()
    # The model hashes of this run's files are cached here, not in the user's cache (write_split fills it).
    os.environ["XDG_CACHE_HOME"] = str(workdir / "cache")
    ckpt = make_checkpoint(workdir, options.seed)
    dtypes = ["fp32"] if options.quick or options.speed_rows_only else ["fp32", "fp16"]
    splits = {dtype: workdir / f"split-{dtype}" for dtype in dtypes}
    for dtype, folder in splits.items():
        write_split(ckpt, CONFIG, folder, dtype=dtype)
    print(
        f"wrote {ckpt.name} and split parts {', '.join(splits)} in {time.perf_counter() - start:.1f} s "
        "(all in the page cache now: the loads below are warm-cache loads)"
    )
    if not options.speed_rows_only:
        loads = [measure_load(f"load_split {dtype} parts → fp32", "split", path) for dtype, path in splits.items()]
        loads.append(measure_load(".ckpt → fp32, hash not cached", "ckpt", ckpt, workdir / "empty-cache"))
        loads.append(measure_load(".ckpt → fp32, hash cached", "ckpt", ckpt))
        loads.append(measure_load("diffusers .ckpt → UNet+VAE fp32", "diffusers", ckpt))
        print_loads(loads)
        children = QUICK_REPEATS if options.quick else ALLOCATOR_CHILDREN
        # The UNet row's size, and 512×512 (SD v1's own), where the activations are four times larger.
        compare_allocators(splits["fp32"], UNET_BATCH, (UNET_LATENT, 2 * UNET_LATENT), children)
    compare_networks(splits["fp32"], ckpt, options)


def run_cpu(options: CpuOptions) -> None:
    """The CPU section in a scratch folder (~10 GB of files), removed afterwards unless `keep`."""
    parent = (options.workdir or Path(tempfile.gettempdir())).resolve()
    if parent.is_relative_to(REPO):
        raise SystemExit(f"--workdir {parent} is inside the repository; the benchmark writes ~10 GB there")
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_cpu_", dir=parent))
    started = time.perf_counter()
    try:
        run(workdir, options)
    finally:
        if options.keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    # A load child (measure_load): `python -m scripts.bench_cpu KIND PATH`.
    child_load(sys.argv[1], Path(sys.argv[2]))
