"""A CPU pipeline keeps freed activations in the process instead of faulting them back in every step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.reference import TINY_CONFIG, TINY_SAFETENSORS

# A fresh interpreter (the allocator setting is process-wide): optionally build a CPU Pipeline, then count the page
# faults of making and dropping a 256 MiB buffer, as a UNet step makes and drops its activations.
PROBE = """
import json, resource, sys
import torch
if sys.argv[1] == "pipeline":
    from ldm.parts import load_checkpoint
    from ldm.pipeline import Pipeline
    Pipeline(load_checkpoint(sys.argv[2], sys.argv[3]))
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(1 << 26).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
PAGES = (1 << 28) // 4096  # 65,536 pages of 4 KiB in the buffer


def faults(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(TINY_SAFETENSORS), str(TINY_CONFIG)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc page-fault counts")
def test_cpu_pipeline_stops_refaulting_freed_buffers() -> None:
    # Without a pipeline, glibc maps every 256 MiB buffer afresh: each round faults in all of its pages.
    assert all(n >= PAGES for n in faults("plain"))
    # With one, the first round still faults the buffer in; the next rounds reuse it.
    first, *again = faults("pipeline")
    assert first >= PAGES
    assert all(n < PAGES // 100 for n in again), again
