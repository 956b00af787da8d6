"""Benchmark the full-size SD v1 model on the CPU: loading (split parts vs `.ckpt`) and ours vs diffusers' networks.

Prints comparable numbers, not pass/fail tests: a load table (time, peak resident memory) where every load runs in
a fresh subprocess so one load's high-water mark never hides another's, and a speed table of one UNet call and one
VAE decode next to diffusers' `UNet2DConditionModel`/`AutoencoderKL` holding the same weights, converted by
diffusers' own single-file helpers. Weights are random (no real checkpoint offline); speed and memory do not depend
on their values, and the numerical check before timing makes sure both sides compute the same function.
Linux only (reads /proc/self/status). Needs the `bench` extra (diffusers, psutil).

    .venv/bin/python scripts/bench_model.py [--repeats N] [--quick] [--profile] [--workdir DIR] [--keep] [--seed S]
"""

from __future__ import annotations

import argparse
import json
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
from omegaconf import OmegaConf
from torch import nn

from ldm.checkpoint import read_state_dict
from ldm.config import load_config
from ldm.parts import load_checkpoint, load_split, write_split
from ldm.random_weights import random_state_dict, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "v1-inference.yaml"
MIB = 1 << 20
# The issue's budget for loading split parts: peak resident memory over the baseline ≤ 1.3 × the parts' size.
SPLIT_RSS_BUDGET = 1.3
# Agreement needed before timing means anything: max |ours - diffusers| ≤ this × max(1, max |diffusers|).
TOLERANCE = 1e-4
UNET_BATCH, UNET_LATENT = 2, 32
VAE_LATENT = 32  # 256×256 pixels
PROFILE_ROWS = 12


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
    """One timed call: wall seconds, and process CPU seconds summed over all threads."""

    wall: float
    cpu: float


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes.

    VmHWM rather than ru_maxrss for the peak: Linux carries ru_maxrss across execve, so a child this (by then
    multi-GB) process spawns would report the parent's peak as its own; VmHWM belongs to the new address space.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS, so the peak measured next is the load's, not the imports' (clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def touch(modules: list[nn.Module]) -> None:
    """Read every weight once, as a first inference would: lazily mapped weights only become resident then."""
    with torch.inference_mode():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.sum()


def child_load(kind: str, path: Path) -> None:
    """Body of the load subprocess: load once, print the measurements as one JSON line on stdout."""
    reset_peak_rss()
    baseline, file_baseline = proc_status("VmRSS"), proc_status("RssFile")
    start = time.perf_counter()
    model = load_split(path) if kind == "split" else load_checkpoint(path, CONFIG)
    seconds = time.perf_counter() - start
    at_load = proc_status("VmHWM")
    touch([model.unet, model.vae, model.text_encoder])
    report = {
        "seconds": seconds,
        "baseline": baseline,
        "peak": at_load,
        "peak_used": proc_status("VmHWM"),
        "file_used": proc_status("RssFile") - file_baseline,
    }
    print(json.dumps(report))


def measure_load(label: str, kind: str, path: Path) -> LoadResult:
    """Run one load in a fresh interpreter, so its peak RSS is its own and not a leftover of earlier work here."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child-load", kind, str(path)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
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
    if len(results) > 2:
        print("(fp16 parts loaded as fp32 need ≥ 2 × their size by construction: the budget applies to fp32 parts)")


def diffusers_models(ckpt: Path) -> tuple[nn.Module, nn.Module]:
    """diffusers' UNet and VAE on the `.ckpt`'s weights, via diffusers' own single-file conversion, loaded strictly.

    Imported here, not at the top: diffusers is a bench-only dependency, and the load children must not pay for it.
    The weights stay on the checkpoint's file mapping, as ours stay on the parts' (both loaders map lazily).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from diffusers.models.attention_processor import AttnProcessor2_0

    original_config = OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=True)
    checkpoint = read_state_dict(ckpt)
    unet_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    vae_config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    for module, weights in (
        (unet, convert_ldm_unet_checkpoint(checkpoint, unet_config)),
        (vae, convert_ldm_vae_checkpoint(checkpoint, vae_config)),
    ):
        module.load_state_dict(weights, strict=True, assign=True)
        left_on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        assert not left_on_meta, f"{type(module).__name__}: not loaded: {left_on_meta[:5]}"
        processors = {type(p).__name__ for p in module.attn_processors.values()}
        assert processors == {AttnProcessor2_0.__name__}, f"{type(module).__name__} attention: {processors}"
        module.eval().requires_grad_(False)
    return unet, vae


def check_agreement(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Print how far apart the two outputs are; stop the benchmark if they differ, since timing them would be moot."""
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    ok = diff <= TOLERANCE * max(1.0, scale)
    print(
        f"{what:<26} max |ours - diffusers| = {diff:.2e}  (max |diffusers| = {scale:.2f})  "
        f"{'agree' if ok else 'DISAGREE'}"
    )
    if not ok:
        raise SystemExit(f"{what}: outputs disagree beyond {TOLERANCE} relative; the timings would compare nothing")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot: minus our own, it shows whether the timings had company.

    Summed by name, not `sum(cpu_times())`: Linux counts guest time inside user time already.
    """
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def time_pair(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int) -> dict[str, list[Sample]]:
    """`repeats` timed calls of each side, alternating ABBA so machine noise and any run-order effect hit both
    alike. Callers warm both up first."""
    samples: dict[str, list[Sample]] = {"ours": [], "diffusers": []}
    sides = [("ours", ours), ("diffusers", theirs)]
    with torch.inference_mode():
        for i in range(repeats):
            for name, fn in sides if i % 2 == 0 else reversed(sides):
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                samples[name].append(Sample(time.perf_counter() - wall, time.process_time() - cpu))
    return samples


def print_timings(rows: dict[str, dict[str, list[Sample]]], repeats: int) -> None:
    """The speed table: medians of wall and process CPU time, the ratio, and max/min of each side as a noise gauge."""
    print(
        f"\nmedian of {repeats} runs after a warm-up, alternating; {torch.get_num_threads()} torch threads; "
        "cpu = process CPU time over all threads;\nspread = max/min of the runs (ours, diffusers): well above 1 "
        "means other load on the machine"
    )
    print(f"{'row':<36}{'ours (s)':>10}{'diffusers (s)':>15}{'ours/diffusers':>16}{'spread':>13}")
    for label, samples in rows.items():
        for kind in ("wall", "cpu"):
            times = {side: [getattr(s, kind) for s in runs] for side, runs in samples.items()}
            mine, theirs = (statistics.median(times[side]) for side in ("ours", "diffusers"))
            spread = "/".join(f"{max(t) / min(t):.2f}" for t in times.values())
            print(f"{f'{label} ({kind})':<36}{mine:>10.3f}{theirs:>15.3f}{mine / theirs:>16.2f}{spread:>13}")


def profile_pair(label: str, ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
    """Top operators by self CPU time for one call of each side: where a slower side loses its time."""
    for side, fn in (("ours", ours), ("diffusers", theirs)):
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n--- profile: {label}, {side}")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS, max_name_column_width=40)
        )


def compare_networks(split_fp32: Path, ckpt: Path, repeats: int, profile: bool) -> None:
    """Check ours and diffusers' agree on the same input (which also warms both up), then time them alternately."""
    ours = load_split(split_fp32)
    unet, vae = diffusers_models(ckpt)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(UNET_BATCH, 4, UNET_LATENT, UNET_LATENT, generator=generator)
    t = torch.randint(0, ours.config.timesteps, (UNET_BATCH,), generator=generator)
    context = torch.randn(UNET_BATCH, 77, ours.config.unet.context_dim, generator=generator)
    latent = torch.randn(1, 4, VAE_LATENT, VAE_LATENT, generator=generator)
    pairs = {
        f"UNet call b{UNET_BATCH} {UNET_LATENT}×{UNET_LATENT} latent": (
            lambda: ours.unet(x, t, context),
            lambda: unet(x, t, encoder_hidden_states=context, return_dict=False)[0],
        ),
        f"VAE decode b1 {VAE_LATENT * 8}×{VAE_LATENT * 8}": (
            lambda: ours.vae.decode(latent),
            lambda: vae.decode(latent, return_dict=False)[0],
        ),
    }
    print()
    with torch.inference_mode():
        for label, (mine, theirs) in pairs.items():
            check_agreement(mine(), theirs(), label)
    busy, own, wall = machine_busy_seconds(), time.process_time(), time.perf_counter()
    rows = {label: time_pair(mine, theirs, repeats) for label, (mine, theirs) in pairs.items()}
    others = (machine_busy_seconds() - busy) - (time.process_time() - own)
    share = others / ((time.perf_counter() - wall) * psutil.cpu_count())
    print_timings(rows, repeats)
    print(
        f"other processes kept {share:.0%} of the CPUs busy while this timed (above a few %, rerun on a quiet machine)"
    )
    if profile:
        for label, (mine, theirs) in pairs.items():
            profile_pair(label, mine, theirs)


def run(workdir: Path, repeats: int, quick: bool, profile: bool, seed: int) -> None:
    """The whole benchmark inside `workdir`: build files, measure loads in children, then compare the networks."""
    import diffusers

    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM; workdir {workdir}"
    )
    start = time.perf_counter()
    ckpt = make_checkpoint(workdir, seed)
    splits = {dtype: workdir / f"split-{dtype}" for dtype in (["fp32"] if quick else ["fp32", "fp16"])}
    for dtype, folder in splits.items():
        write_split(ckpt, CONFIG, folder, dtype=dtype)
    print(
        f"wrote {ckpt.name} and split parts {', '.join(splits)} in {time.perf_counter() - start:.1f} s "
        "(all in the page cache now: the loads below are warm-cache loads)"
    )
    loads = [measure_load(f"load_split {dtype} parts → fp32", "split", folder) for dtype, folder in splits.items()]
    loads.append(measure_load("load_checkpoint .ckpt → fp32", "ckpt", ckpt))
    print_loads(loads)
    compare_networks(splits["fp32"], ckpt, repeats, profile)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; `--child-load` is internal (the script runs itself to measure each load in isolation)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, help="timed runs per side and row (default 5, with --quick 2)")
    parser.add_argument("--quick", action="store_true", help="2 repeats and no fp16 split (~1 min instead of ~2)")
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one call per side")
    parser.add_argument("--workdir", type=Path, help="where to create the scratch folder (default: the system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and its ~10 GB of files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--child-load", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.child_load:
        kind, path = args.child_load
        child_load(kind, Path(path))
        return
    parent = (args.workdir or Path(tempfile.gettempdir())).resolve()
    if parent.is_relative_to(REPO):
        raise SystemExit(f"--workdir {parent} is inside the repository; the benchmark writes ~10 GB there")
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_model_", dir=parent))
    started = time.perf_counter()
    try:
        run(workdir, args.repeats, args.quick, args.profile, args.seed)
    finally:
        if args.keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
