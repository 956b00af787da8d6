"""The GPU benchmark (`scripts/gpu_bench.sh` → `python -m scripts.benchmark gpu`) runs end to end on the CPU.

Why: it only ever runs on a borrowed GPU with minutes of budget, once. A script broken by a change elsewhere (a
renamed argument, a peer pipeline that no longer builds) would spend that budget on a traceback. Here every row runs
on the tiny model (the fast path is a no-op off CUDA, so those rows run eagerly) and must come back measured, with
each image of ours within its precision's rounding of fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts import bench_gpu
from scripts.bench_gpu import GpuOptions, Row, run_gpu
from tests.reference import TINY_CONFIG

# The bar for fp16 against fp32; bf16 keeps 3 fewer mantissa bits (measured 39 dB on this model).
MIN_PSNR_DB = {"fp16": 35.0, "bf16": 30.0}
EXPECTED_ROWS = [
    ("ours fp32 eager", 1),
    ("diffusers fp16 eager", 1),
    ("ours fp16 eager", 1),
    ("ours fp16 fast path", 1),
    ("ours fp16 CUDA graphs, no compile", 1),
    ("ours fp16 low-memory mode", 1),
    ("diffusers fp16 eager", 2),
    ("ours fp16 eager", 2),
    ("diffusers fp16 eager", 3),
    ("ours fp16 eager", 3),
    # The rows that compile again last: the cheap ones first, so that a run cut short keeps them.
    ("ours fp16 fast path", 2),
    ("ours fp16 fast path", 3),
    ("ours bf16 fast path", 1),
]


def test_every_row_runs_on_the_cpu(tmp_path: Path) -> None:
    options = GpuOptions(
        out=tmp_path, batches=(1, 2, 3), size=64, steps=3, repeats=1, config=TINY_CONFIG, device="cpu", budget=600
    )
    rows = run_gpu(options)
    assert [(r.name, r.batch) for r in rows] == EXPECTED_ROWS
    for row in rows:
        assert row.note == "", row
        assert row.seconds_per_image and row.seconds_per_image > 0
        assert row.steps_per_second and row.steps_per_second > 0
        assert row.peak_vram_gib is None and row.peak_reserved_gib is None  # no CUDA, no VRAM figure
        check_psnr(row)
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert [Row(**r) for r in written] == rows
    table = (tmp_path / "gpu.md").read_text().splitlines()
    assert "smoke test: no GPU figures" in table[0]
    body = table[table.index("|---|---|---|---|---|---|---|---|---|---|") + 1 :]
    assert [tuple(line.split(" | ")[:2]) for line in body] == [(f"| {n}", str(b)) for n, b in EXPECTED_ROWS]


def check_psnr(row: Row) -> None:
    """Ours against our fp32 image of the same seed; diffusers draws its noise differently, so it has none."""
    if row.name.startswith("diffusers"):
        assert row.psnr_vs_fp32_db is None
    elif "fp32" in row.name:
        assert row.psnr_vs_fp32_db == math.inf
    else:
        precision = row.name.split()[1]
        assert row.psnr_vs_fp32_db is not None and row.psnr_vs_fp32_db >= MIN_PSNR_DB[precision], row


def test_a_configuration_that_cannot_be_built_is_a_failed_row_and_the_others_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diffusers' pipeline failing to build (a version the run was never tried with) costs its rows alone."""

    def broken(*args: object) -> None:
        raise ImportError("cannot import name 'StableDiffusionPipeline'")

    monkeypatch.setattr(bench_gpu, "diffusers_pipeline", broken)
    options = GpuOptions(
        out=tmp_path, batches=(1,), size=64, steps=2, repeats=1, config=TINY_CONFIG, device="cpu", budget=600
    )
    rows = run_gpu(options)
    failed = [row for row in rows if row.note]
    assert [(row.name, row.note) for row in failed] == [
        ("diffusers fp16 eager", "failed: ImportError: cannot import name 'StableDiffusionPipeline'")
    ]
    measured = [(row.name, row.batch) for row in rows if not row.note]
    assert measured == [(name, 1) for name, batch in EXPECTED_ROWS if batch == 1 and "diffusers" not in name]
    assert all(row.steps_per_second for row in rows if not row.note)
    assert "| diffusers fp16 eager | 1 | — |" in (tmp_path / "gpu.md").read_text()


def test_a_row_that_compiles_again_is_skipped_when_it_cannot_fit_or_batch_1s_failed(tmp_path: Path) -> None:
    """The fast path at 4 and 8 and bf16 compile again, about as long as batch 1 took: not started when that runs
    past the budget (a row killed mid-compile would cost the run its last rows too), nor after batch 1's failed."""
    bench = bench_gpu.Bench(GpuOptions(out=tmp_path, config=TINY_CONFIG, device="cpu", budget=60))
    assert bench.no_second_compile(Row("ours fp16 fast path", 1, warmup_seconds=30)) == ""
    assert bench.no_second_compile(Row("ours fp16 fast path", 1, warmup_seconds=90)) == (
        "a compile takes about 90 s, more than the time left"
    )
    failed = Row("ours fp16 fast path", 1, note="failed: RuntimeError: the fast path could not prepare 512x512x1")
    assert bench.no_second_compile(failed) == bench.no_second_compile(None) != ""
