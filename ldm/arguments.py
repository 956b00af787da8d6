"""argparse types the command lines share: a bad number is a usage error (exit 2) that names it, never a traceback
later from whatever the number was handed to (requests' timeouts, a thread pool's size).

Here, not in `scripts/`, because `python scripts/client.py` imports only installed packages; and torch-free, as
`ldm/__init__.py` is, so the client still needs only `requests`."""

from __future__ import annotations

import argparse
import math


def seconds(text: str) -> float:
    """A duration: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return value


def at_least_one(text: str) -> int:
    """A count of something there must be one of at least."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value
