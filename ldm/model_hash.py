"""The SHA-256 of a checkpoint file ("model hash" in every image's PNG metadata), remembered between runs.

Hashing a 4 GB `.ckpt` takes seconds (most of a 5–6 s load on the benchmark machine), and the command lines load
the original file on every run. The digest is kept in a small JSON file in the user's cache folder, keyed by the
file's resolved path and valid while its inode, size and modification time (ns) are unchanged, as make trusts
timestamps. A cache that cannot be read or written (read-only home, another user's file) only costs the hash again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_NAME = Path("sd-torchserve") / "sha256.json"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (a 4 GB checkpoint never sits in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_file() -> Path:
    """`$XDG_CACHE_HOME/sd-torchserve/sha256.json`, or under `~/.cache` (the XDG default)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / CACHE_NAME


def _read_cache(cache: Path) -> dict[str, dict[str, int | str]]:
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(cache: Path, entries: dict[str, dict[str, int | str]]) -> None:
    """Replace the file whole, so a reader never sees half of it; two writers at once lose an entry, not the file."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    except OSError as error:
        logger.info("model hash not cached (%s): the next load hashes the file again", error)
        return
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1)
        os.replace(temporary, cache)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        logger.info("model hash not cached (%s): the next load hashes the file again", error)


def checkpoint_sha256(path: str | Path) -> str:
    """`file_sha256(path)`, from the cache while the file is the one it was hashed at: same inode (not replaced),
    size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = cache_file()
    entries = _read_cache(cache)
    entry = entries.get(str(path))
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and isinstance(entry.get("sha256"), str):
        return str(entry["sha256"])
    digest = file_sha256(path)
    entries = {name: known for name, known in entries.items() if Path(name).exists()}  # forget deleted files
    entries[str(path)] = {**stamp, "sha256": digest}
    _write_cache(cache, entries)
    return digest
