"""Objects whose unpickling would run code: what a malicious `.ckpt` carries, for the tests that refuse one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class RunsCode:
    """Pickles as a call of os.system that creates `marker`: if the marker exists, the code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))
