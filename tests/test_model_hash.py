"""The model hash is the file's SHA-256, hashed once per file version and then read from the user's cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ldm import model_hash
from ldm.model_hash import cache_file, checkpoint_sha256
from ldm.parts import load_checkpoint
from tests.reference import TINY_CONFIG


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cache-home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def never_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, reading a digest from the file fails the test: only the cache may answer."""

    def fail(path: str | Path) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(model_hash, "file_sha256", fail)


def test_second_hash_comes_from_the_cache(cache_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights v1" * 1000)
    expected = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert checkpoint_sha256(ckpt) == expected
    entry = json.loads((cache_home / "sd-torchserve" / "sha256.json").read_text())[str(ckpt.resolve())]
    assert entry["sha256"] == expected and entry["size"] == 10_000
    never_hash(monkeypatch)
    assert checkpoint_sha256(ckpt) == expected
    assert checkpoint_sha256(tmp_path / "." / "model.ckpt") == expected  # the same file by another spelling


@pytest.mark.parametrize("change", ["rewritten in place", "replaced by another file"])
def test_a_changed_file_is_hashed_again(cache_home: Path, tmp_path: Path, change: str) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"a" * 4096)
    checkpoint_sha256(ckpt)
    before = ckpt.stat()
    new = b"b" * 4096  # same size
    if change == "rewritten in place":
        ckpt.write_bytes(new)
        os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    else:
        other = tmp_path / "other.ckpt"
        other.write_bytes(new)
        os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: only the inode differs
        other.replace(ckpt)
    assert checkpoint_sha256(ckpt) == hashlib.sha256(new).hexdigest()


def test_a_broken_cache_is_rewritten(cache_home: Path, tmp_path: Path) -> None:
    cache = cache_file()
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x" * 100)
    assert checkpoint_sha256(ckpt) == hashlib.sha256(b"x" * 100).hexdigest()
    assert list(json.loads(cache.read_text())) == [str(ckpt.resolve())]
    assert [p.name for p in cache.parent.iterdir()] == ["sha256.json"]  # no temporary file left behind


def test_an_unwritable_cache_only_costs_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file-not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"y" * 100)
    for _ in range(2):
        assert checkpoint_sha256(ckpt) == hashlib.sha256(b"y" * 100).hexdigest()


def test_loading_a_checkpoint_again_does_not_hash_it(
    cache_home: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_checkpoint(tiny_ckpt, TINY_CONFIG).model_hash
    never_hash(monkeypatch)
    assert (
        load_checkpoint(tiny_ckpt, TINY_CONFIG).model_hash
        == first
        == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()[:10]
    )
