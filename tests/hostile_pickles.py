"""Objects and pickles whose unpickling would run code: what a malicious `.ckpt` carries, for the tests that refuse
one; and torch files malformed past torch's own checks, for the tests that must read them as unreadable."""

from __future__ import annotations

import os
import pickle
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


class ClaimsMemory:
    """Pickles as a call of torch.UntypedStorage for a terabyte: a file of a few bytes that would allocate one."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch.UntypedStorage, (2**40,))


class _SaysWhenLoaded(torch.nn.Module):
    """A TorchScript module whose `__setstate__`, compiled into its archive, prints `words` when it is loaded: code
    of the file's own, which `torch.jit.load` runs (TorchScript can as well write files, with `torch.from_file`)."""

    def __init__(self, words: str) -> None:
        super().__init__()
        self.words = words

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.words, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.words, self.training = state
        print(self.words)


def write_torchscript_archive(path: Path, words: str) -> Path:
    """A TorchScript archive that prints `words` when loaded (`torch.load` hands such a zip to `torch.jit.load`)."""
    torch.jit.save(torch.jit.script(_SaysWhenLoaded(words)), str(path))
    return path


class _SavesWithTorch:
    """Pickles as a call of torch.save that writes `marker` (see `torch_save_call`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch.save, ("pwned", str(self.marker)))


def torch_save_call(marker: Path) -> bytes:
    """A pickle that calls torch.save to write `marker`, naming the function as torch exports it, `torch.save` (where
    torch's pickler writes `torch.serialization.save`; a hostile file may name any global it likes): a file of the
    pickle's choosing written, if it runs."""
    pickled = pickle.dumps(_SavesWithTorch(marker), protocol=2)
    assert pickled.count(b"ctorch.serialization\nsave\n") == 1
    return pickled.replace(b"ctorch.serialization\nsave\n", b"ctorch\nsave\n")


# A pickle that calls an allowed constructor with an argument it refuses, OrderedDict(1): a TypeError, as a damaged
# or crafted file makes a reader raise.
REFUSED_ARGUMENT = b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R."
# A pickle that names a storage by a 2-tuple: torch's reader fails with a ValueError (not an error of its own).
SHORT_STORAGE = b"\x80\x02(X\x07\x00\x00\x00storageK\x01K\x02tQ."


def write_torch_file_with_pickle(path: Path, pickled: bytes) -> Path:
    """A torch zip archive (as torch.save writes one, its zip checks passed) whose pickle is `pickled`."""
    torch.save({"x": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {item.filename: archive.read(item) for item in archive.infolist()}
    members[next(name for name in members if name.endswith("/data.pkl"))] = pickled
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_malformed_torch_file(path: Path) -> Path:
    """A torch zip archive whose pickle names a storage by a 2-tuple: torch's reader fails with a ValueError (not an
    error of its own), as for a download cut or damaged in a way its zip checks miss."""
    return write_torch_file_with_pickle(path, SHORT_STORAGE)
