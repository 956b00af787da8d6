"""The original app's request fields that our API names differently or has no use for, as `/imagine` reads them.

Why: the original app bound the JSON body onto optimizedSD's `Arguments` (every option of its command line) and
ignored keys it did not know, so its clients may send any of those fields, and must keep working unchanged:
- `ddim_eta` is our `eta`.
- `unet_bs`, `turbo`, `precision`, `device`, `n_rows`, `outdir`, `skip_grid`, `skip_save` and `fixed_code` shaped how
  the original ran on its GPU, its files or its grid, not the images this server answers with: accepted and dropped.
- `C`, `f` and `format` may only restate what this server does (4 latent channels, 8× downsampling, PNG answers),
  and `from_file` (prompts read from a file on the server) may only be empty.
TorchServe's own API stays strict, where an unknown field is an error: these names are the front's alone.
"""

from __future__ import annotations

import json
from typing import Any

from front.errors import FrontError, shown

RENAMED = {"ddim_eta": "eta"}
# `from_file` only when empty (a file's name is refused).
DROPPED = ("unet_bs", "turbo", "precision", "device", "n_rows", "outdir", "skip_grid", "skip_save", "fixed_code",
           "from_file")  # fmt: skip
# Each with what it must equal, and why.
FIXED: dict[str, tuple[Any, str]] = {
    "C": (4, "the model's latent channels"),
    "f": (8, "the VAE's downsampling factor"),
    "format": ("png", "answers are PNGs"),
}


def translate(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with the original app's names replaced by ours and its no-op fields dropped; raises FrontError for a
    value this server cannot honour."""
    ours: dict[str, Any] = {}
    for name, value in fields.items():
        if name in RENAMED:
            if RENAMED[name] in fields:
                raise FrontError(400, f"{name} and {RENAMED[name]} are the same setting: give one of them", name)
            ours[RENAMED[name]] = value
        elif name in FIXED:
            wanted, why = FIXED[name]
            if value != wanted or isinstance(value, bool):
                raise FrontError(400, f"{name} must be {json.dumps(wanted)} ({why}), got {shown(value)}", name)
        elif name == "from_file" and value:
            message = "from_file must be empty: this server reads no prompt files; send the prompt itself"
            raise FrontError(400, message, name)
        elif name not in DROPPED:
            ours[name] = value
    return ours
