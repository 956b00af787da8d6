"""Figures the load and fault tests measure (throughput, latency, memory growth, seconds to recover), kept where a
person can read them after a run: test-artifacts/reliability.json, and printed (`pytest -s` shows them as they come).
docs/RELIABILITY.md quotes them."""

from __future__ import annotations

import json

from scripts.server import ROOT

ARTIFACT = ROOT / "test-artifacts" / "reliability.json"


def record(test: str, **figures: float | int | str) -> None:
    """Keep `figures` under `test`, replacing that test's figures of an earlier run and keeping the others'."""
    ARTIFACT.parent.mkdir(exist_ok=True)
    kept = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else {}
    kept[test] = {name: round(value, 3) if isinstance(value, float) else value for name, value in figures.items()}
    ARTIFACT.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
    print(f"{test}: {kept[test]}")
