"""Objects whose unpickling would run code: what a malicious `.ckpt` carries, for the tests that refuse one; and a
torch file that is malformed past torch's own checks, for the tests that must read it as unreadable."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch


class RunsCode:
    """Pickles as a call of os.system that creates `marker`: if the marker exists, the code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def write_malformed_torch_file(path: Path) -> Path:
    """A torch zip archive whose pickle names a storage by a 2-tuple: torch's reader fails with a ValueError (not an
    error of its own), as for a download cut or damaged in a way its zip checks miss."""
    torch.save({"x": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {item.filename: archive.read(item) for item in archive.infolist()}
    pickled = next(name for name in members if name.endswith("/data.pkl"))
    members[pickled] = b"\x80\x02(X\x07\x00\x00\x00storageK\x01K\x02tQ."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path
