"""The scripts README runs as files (`python scripts/client.py ...`) start as files: Python then puts `scripts/`, not
the project, on the path, so they may import only installed packages (`ldm`, `front`), never `scripts.*`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.server import ROOT

AS_FILES = ["client.py", "load_test.py", "build_mar.py", "split_checkpoint.py", "txt2img.py", "img2img.py",
            "make_tiny_checkpoint.py", "fetch_model.py"]  # fmt: skip


@pytest.mark.parametrize("script", AS_FILES)
def test_the_script_starts_as_a_file_from_anywhere(script: str, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: ")
