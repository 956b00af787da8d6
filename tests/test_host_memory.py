"""A CPU pipeline keeps freed activations in the process instead of faulting them back in every step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.reference import TINY_CONFIG, TINY_SAFETENSORS

# A fresh interpreter (the allocator setting is process-wide): optionally build a CPU Pipeline, then count the page
# faults of making and dropping a buffer ROUNDS times, as UNet steps make and drop their activations.
PROBE = """
import json, resource, sys
import torch
BUFFER_BYTES = int(sys.argv[4])
if sys.argv[1] == "pipeline":
    from ldm.parts import load_checkpoint
    from ldm.pipeline import Pipeline
    Pipeline(load_checkpoint(sys.argv[2], sys.argv[3]))
faults = []
for _ in range(int(sys.argv[5])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BUFFER_BYTES // 4).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
# 48 MiB: above the 32 MiB up to which glibc's own threshold adapts (so without a pipeline every round maps it
# afresh), below the 64 MiB from which a pipeline still maps blocks.
BUFFER_BYTES = 48 << 20
PAGES = BUFFER_BYTES // 4096
ROUNDS = 6


def faults(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(TINY_SAFETENSORS), str(TINY_CONFIG), str(BUFFER_BYTES), str(ROUNDS)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc page-fault counts")
def test_cpu_pipeline_stops_refaulting_freed_buffers() -> None:
    # Without a pipeline, glibc maps every such buffer afresh: each round faults in all of its pages.
    assert all(n >= PAGES for n in faults("plain"))
    # With one, the first round faults the buffer in (most of it: memory the load freed and the heap kept may serve
    # a few MiB, 6 % once in a full suite run), and at most one more while the heap settles: torch asks for 64-byte-
    # aligned blocks, which glibc serves by asking a little more than the block it freed, so when a small allocation
    # has taken the sliver after that block the next one lands beyond it, once (in about a third of processes). From
    # then on freed blocks are reused.
    rounds = faults("pipeline")
    assert rounds[0] >= PAGES * 3 // 4, rounds
    assert sum(n >= PAGES // 100 for n in rounds[1:3]) <= 1, rounds
    assert all(n < PAGES // 100 for n in rounds[3:]), rounds
