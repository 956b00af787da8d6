"""A pickle module for `torch.load` that never imports or calls anything but tensor and plain-data constructors.

Why not `torch.load(weights_only=True)`: released SD v1 `.ckpt` files (PyTorch Lightning 1.x) carry training
metadata beside `state_dict`, keyed by the class object `ModelCheckpoint`, and torch's weights-only loader refuses
the whole file for that one reference. Here a *reference* to any other global becomes an inert `GlobalReference`
(the module is never imported), so such metadata loads as data; a *call* of one — the way a malicious pickle runs
code — raises `UnsafeCheckpointError` before anything runs.
"""

from __future__ import annotations

import _codecs
import collections
import pickle
import struct
import sys
import tarfile
import types
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy
import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint would import or call code that is not a tensor or plain-data constructor."""


class MalformedCheckpointError(pickle.UnpicklingError):
    """A torch file whose archive or pickle torch cannot make sense of: torch then raises whatever its reader trips
    on (a ValueError, an AssertionError, a KeyError...), which the callers of `torch_load` read as this one error."""


def _numpy_scalar_constructors() -> dict[tuple[str, str], Any]:
    # numpy moved `multiarray` from `numpy.core` to `numpy._core` in 2.0; pickles name whichever wrote them.
    constructors: dict[tuple[str, str], Any] = {("numpy", "dtype"): numpy.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        constructors[(module, "scalar")] = numpy._core.multiarray.scalar  # type: ignore[attr-defined]
    return constructors


class GlobalReference:
    """Stands for a global the pickle names but we refuse to import; usable as data, never callable."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __repr__(self) -> str:
        return f"<not imported: {self.module}.{self.name}>"

    def __hash__(self) -> int:
        return hash((self.module, self.name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GlobalReference) and (other.module, other.name) == (self.module, self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(
            f"refusing to load: the checkpoint would call {self.module}.{self.name}, which is not a tensor or "
            "plain-data constructor (a pickle that runs code when loaded)"
        )


class _UntypedStorageReference(GlobalReference):
    """Stands for `torch.UntypedStorage` where a checkpoint names it (float8 and torch's other newer types are saved
    with one): torch's reader asks a storage's type for its elements' dtype, bytes for an untyped one, and nothing
    else. Not the class itself: a pickle could call that, and `UntypedStorage(2**40)` from a file of a few bytes
    would claim a terabyte."""

    dtype = torch.uint8


UNTYPED_STORAGE = _UntypedStorageReference("torch.storage", "UntypedStorage")


# Everything a checkpoint may really call: tensor rebuilders, ordered dicts, dtypes, sizes, and the constructors of
# numpy scalars and bytes that Lightning metadata contains. Each takes plain data and returns plain data.
ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    # How torch saves float8 and its other newer types: an untyped storage (`UNTYPED_STORAGE`), and the dtype given
    # to the rebuilder.
    ("torch._utils", "_rebuild_tensor_v3"): torch._utils._rebuild_tensor_v3,
    ("torch.storage", "UntypedStorage"): UNTYPED_STORAGE,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): _codecs.encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # The same in a protocol 2 pickle (torch.save's default), which names them by Python 2's module.
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    # The original textual-inversion code saved an embedding's vectors in one (as A1111 reads them): made empty and
    # then given its pickled attributes, which are parameters and plain data; its methods never run.
    ("torch.nn.modules.container", "ParameterDict"): torch.nn.ParameterDict,
    **_numpy_scalar_constructors(),
}


class _Call:
    """One load's stand-in for an allowed Python function: it calls the function, and what a pickle may set on it
    (BUILD's slot state calls setattr) is its own, not the function's defaults, which are the process's."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)


def _for_one_load(found: Any) -> Any:
    """An allowed global as one load gets it. A pickle can set attributes on what it names (BUILD's slot state calls
    setattr): on a Python function (its defaults) or the untyped storage's stand-in they would last, and one hostile
    file would change how every later one is read. Those are handed over fresh: a function behind its own `_Call`,
    the stand-in anew. The others refuse: builtins and types written in C take no new attributes, and the one Python
    class allowed (ParameterDict, an nn.Module) has a `__setstate__`, which BUILD calls instead."""
    if isinstance(found, types.FunctionType):
        return _Call(found)
    if isinstance(found, _UntypedStorageReference):
        return _UntypedStorageReference(found.module, found.name)
    return found


# The record only TorchScript archives hold (torch.serialization tells them apart by it too).
TORCHSCRIPT_RECORD = "constants.pkl"


class Unpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals and torch dtypes; anything else becomes a GlobalReference."""

    # The last global the pickle named and did not get: a failure is then read as its wanting what it was refused.
    refused: GlobalReference | None = None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return _for_one_load(ALLOWED[(module, name)])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        self.refused = GlobalReference(module, name)
        return self.refused

    def load(self) -> Any:
        try:
            return super().load()
        except UnsafeCheckpointError:
            raise
        except pickle.UnpicklingError as error:
            if self.refused is not None and "class argument must be a type" in str(error):
                # NEWOBJ on a GlobalReference: the pickle wanted to build an object of a class we did not import
                # (training metadata such as hyper-parameters, in a file whose weights may be fine).
                raise UnsafeCheckpointError(
                    f"refusing to load: the checkpoint would build an object of {self.refused.module}."
                    f"{self.refused.name}, which is not a tensor or plain data (save its state_dict alone to use it)"
                ) from error
            raise MalformedCheckpointError(f"not a pickle torch can read: {error}") from error


def load(file: BinaryIO, **kwargs: Any) -> Any:
    """Module-level `load`, as `torch.load` expects of a pickle module."""
    return Unpickler(file, **kwargs).load()


def torch_load(path: str) -> Any:
    """Load a torch checkpoint with this restricted unpickler: a zip one memory-mapped (no second copy of the
    weights), one of torch's older format (`_use_new_zipfile_serialization=False`, as some 2022 embeddings and
    LoRAs were saved), which torch cannot map, read whole.

    Refused before torch sees them: a TorchScript archive, which `torch.load` hands to `torch.jit.load` whatever the
    pickle module, and which then runs the code it holds (its `__setstate__`); and torch's oldest, tar format,
    whose storages this unpickler does not rebuild.
    """
    try:
        mapped = zipfile.is_zipfile(path)
        if mapped:
            with zipfile.ZipFile(path) as archive:
                if any(name.rsplit("/", 1)[-1] == TORCHSCRIPT_RECORD for name in archive.namelist()):
                    raise UnsafeCheckpointError("refusing to load: a TorchScript archive, which runs its own code")
        elif tarfile.is_tarfile(path):
            raise MalformedCheckpointError("torch's oldest (tar) format, which is not read: save it with torch.save")
        return torch.load(
            path, map_location="cpu", pickle_module=sys.modules[__name__], weights_only=False, mmap=mapped
        )
    except (
        ValueError, KeyError, IndexError, TypeError, AssertionError, OverflowError, zipfile.BadZipFile, struct.error
    ) as error:  # fmt: skip
        # What torch's reader trips on in a malformed file (a length past any size: OverflowError); its own errors,
        # RuntimeError and EOFError, pass as they are; so do a MemoryError (a real one loading a real checkpoint
        # is not the file's fault) and an AttributeError (a bug of ours is not the file's): a reader of small
        # files (ldm/embeddings.py) takes those as the file's.
        raise MalformedCheckpointError(f"{type(error).__name__}: {error}") from error
