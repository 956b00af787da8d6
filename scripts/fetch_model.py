"""Download a model archive, check its SHA-256 and unpack it into the model store. The Kubernetes init container.

    python -m scripts.fetch_model --url https://example.com/sd.mar --sha256 HEX --store /home/model-server/model-store \
        --name sd

The archive is unpacked into `STORE/NAME/` (the layout `build_mar.py --archive-format no-archive` writes), so
TorchServe reads the weights straight from there instead of unpacking gigabytes into its temp folder at every
start, and a `model-config.yaml` mounted over `STORE/NAME/model-config.yaml` takes effect.
Nothing is kept unless its checksum matches. A store that already holds this checksum's archive (an init container
run again in the same pod) is left as it is. The URL may carry credentials (a pre-signed URL): it can then be read
from a file (`--url-file`, a mounted Secret) and is never printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

CHUNK = 8 * 1024 * 1024
SCHEMES = ("https", "http", "file")
STAMP = ".sha256"


class FetchError(Exception):
    """The archive could not be fetched, or is not the one expected."""


def download(url: str, out: Path, timeout: float) -> str:
    """Stream `url` into `out`; returns the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(out, "wb") as sink:
        while chunk := response.read(CHUNK):
            digest.update(chunk)
            sink.write(chunk)
    return digest.hexdigest()


def unpack(archive: Path, target: Path) -> None:
    """Unpack a .mar (a zip) into `target`, replacing what was there; refuses anything without a manifest."""
    staging = target.with_name(f".{target.name}.unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as mar:
            if "MAR-INF/MANIFEST.json" not in mar.namelist():
                raise FetchError("the archive has no MAR-INF/MANIFEST.json: not a model archive")
            # zipfile drops absolute paths and '..' parts, so nothing lands outside `staging`.
            mar.extractall(staging)
    except zipfile.BadZipFile as error:
        raise FetchError(f"the archive is not a zip file: {error}") from None
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def fetch(url: str, sha256: str, store: Path, name: str, timeout: float = 60.0) -> bool:
    """Make `store/name` the unpacked archive at `url`; returns False when it already was."""
    target = store / name
    if (target / STAMP).is_file() and (target / STAMP).read_text().strip() == sha256:
        return False
    store.mkdir(parents=True, exist_ok=True)
    part = store / f".{name}.mar.part"
    try:
        # The reason, never the URL: a pre-signed URL is a credential.
        try:
            actual = download(url, part, timeout)
        except urllib.error.HTTPError as error:
            error.close()
            raise FetchError(f"download failed: HTTP {error.code} {error.reason}") from None
        except OSError as error:
            raise FetchError(f"download failed: {getattr(error, 'reason', error)}") from None
        if actual != sha256:
            raise FetchError(f"checksum mismatch: expected sha256 {sha256}, got {actual}")
        unpack(part, target)
        (target / STAMP).write_text(sha256 + "\n")
    finally:
        part.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", default=os.environ.get("MODEL_URL"), help="archive URL [MODEL_URL]")
    source.add_argument("--url-file", type=Path, help="a file holding the URL, e.g. a mounted Secret's key")
    parser.add_argument("--sha256", default=os.environ.get("MODEL_SHA256"), help="its SHA-256, hex [MODEL_SHA256]")
    parser.add_argument("--store", type=Path, required=True, help="the model store")
    parser.add_argument("--name", required=True, help="model name: the folder under the store")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    args = parser.parse_args(argv)
    if args.url_file is not None:
        try:
            args.url = args.url_file.read_text().strip()
        except OSError as error:
            parser.error(f"--url-file: {error}")
    if not args.url or urllib.parse.urlsplit(args.url).scheme not in SCHEMES:
        parser.error(f"--url (or MODEL_URL) must be an {', '.join(SCHEMES)} URL")
    sha256 = (args.sha256 or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        parser.error("--sha256 (or MODEL_SHA256) must be 64 hex digits")
    try:
        fetched = fetch(args.url, sha256, args.store, args.name, args.timeout)
    except FetchError as error:
        print(f"fetch_model: {error}", file=sys.stderr)
        return 1
    state = "unpacked" if fetched else "already holds"
    print(f"fetch_model: {args.store / args.name} {state} the archive with sha256 {sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
