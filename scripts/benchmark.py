"""Benchmarks: ours next to diffusers on the same weights, in one run, with ratios (docs/PERFORMANCE.md).

    python -m scripts.benchmark cpu [--quick] [--repeats N] [--only ROW] [--dtype bf16] [--profile]
                                   [--workdir DIR] [--keep]
    python -m scripts.benchmark serving [--requests N] [--clients N]
    python -m scripts.benchmark png [--size N] [--batches 1 4 8] [--repeats N]
    python -m scripts.benchmark gpu --out DIR [--batches 1 4 8] [--budget S]

`cpu`: full-size SD v1 with random weights on the CPU: loading, one UNet call, a VAE decode, a text encoding, and a
whole 256×256 image at 10 steps; also our UNet call with and without the host allocator setting. `serving`: the tiny
model in-process and through a real TorchServe. `png`: an answer's PNG encoding, ours against PIL's. `gpu`: the
512×512, 50-step rows on CUDA (`scripts/gpu_bench.sh` runs them in one go). Needs the `bench` extra (diffusers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.bench_cpu import SPEED_TOLERANCES, CpuOptions, run_cpu
from scripts.bench_gpu import CONFIG, GpuOptions, run_gpu
from scripts.bench_png import run_png
from scripts.bench_serving import run_serving


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sections = parser.add_subparsers(dest="section", required=True)
    cpu = sections.add_parser("cpu", help="full-size model on the CPU: loads, UNet, VAE, text, whole image")
    cpu.add_argument(
        "--repeats", type=int, help="timed runs per side of every row (default 5, whole image 3; with --quick 2)"
    )
    cpu.add_argument("--quick", action="store_true", help="2 repeats and no fp16 split")
    cpu.add_argument("--profile", action="store_true", help="also print the top operators of one call per side")
    cpu.add_argument("--workdir", type=Path, help="where to create the scratch folder (default: the system temp)")
    cpu.add_argument("--keep", action="store_true", help="keep the scratch folder and its ~10 GB of files")
    cpu.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    cpu.add_argument("--only", help="time only the speed rows whose name contains this, e.g. 'whole image'")
    cpu.add_argument(
        "--dtype",
        choices=sorted(SPEED_TOLERANCES),
        default="fp32",
        help="precision of both sides in the speed rows; bf16 times those rows alone (no load or allocator rows)",
    )
    serving = sections.add_parser("serving", help="tiny model: TorchServe's overhead, images/s at batchSize 1 and 4")
    serving.add_argument("--clients", type=int, default=8, help="concurrent clients of the throughput rows")
    serving.add_argument("--requests", type=int, default=12, help="requests per client in the throughput rows")
    serving.add_argument("--size", type=int, default=64, help="image side in pixels")
    serving.add_argument("--steps", type=int, default=10)
    serving.add_argument("--runs", type=int, default=15, help="alternating runs of the overhead row")
    png = sections.add_parser("png", help="PNG encoding of an answer's images: ours against PIL, one at a time")
    png.add_argument("--size", type=int, default=512, help="image side in pixels")
    png.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="images per answer")
    png.add_argument("--repeats", type=int, default=9, help="alternating timed runs per side")
    gpu = sections.add_parser("gpu", help="512×512 rows on CUDA: diffusers eager vs ours eager / fast path")
    gpu.add_argument("--out", type=Path, required=True, help="folder for gpu.md and gpu.json")
    gpu.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    gpu.add_argument("--size", type=int, default=512, help="image side in pixels")
    gpu.add_argument("--steps", type=int, default=50)
    gpu.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    gpu.add_argument("--budget", type=float, default=330.0, help="seconds after which remaining rows are skipped")
    gpu.add_argument("--seed", type=int, default=0)
    gpu.add_argument("--config", type=Path, default=CONFIG, help="model config (a tiny one smoke-tests the script)")
    gpu.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.section == "cpu" and args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.section == "cpu":
        run_cpu(
            CpuOptions(
                args.workdir, args.repeats, args.quick, args.profile, args.keep, args.seed, args.only, args.dtype
            )
        )
    elif args.section == "serving":
        run_serving(args.requests, args.clients, args.size, args.steps, args.runs)
    elif args.section == "png":
        run_png(args.size, args.batches, args.repeats)
    elif args.section == "gpu":
        options = GpuOptions(
            out=args.out,
            batches=tuple(args.batches),
            size=args.size,
            steps=args.steps,
            repeats=args.repeats,
            budget=args.budget,
            seed=args.seed,
            config=args.config,
            device=args.device,
        )
        rows = run_gpu(options)
        print((args.out / "gpu.md").read_text() if rows else "no rows")


if __name__ == "__main__":
    main()
