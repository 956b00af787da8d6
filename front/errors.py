"""The one error type of the front: a status and the body the handler answers its own errors with.

Raised wherever the front refuses a request or TorchServe fails it, and turned into `{"error", "field"}` JSON in one
place (front/app.py), or into a stream's last line once a progress stream has begun.
"""

from __future__ import annotations

import json
from typing import Any

# How much of a value an error message quotes.
SHOWN_CHARS = 40


class FrontError(Exception):
    """A request the front refuses, or an answer it cannot give: a status and the handler's error body."""

    def __init__(self, status: int, error: str, field: str = "") -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field

    def body(self) -> dict[str, str]:
        return {"error": self.error, "field": self.field}


def shown(value: Any) -> str:
    """A request's value as an error message quotes it: JSON, cut after SHOWN_CHARS characters, and an array or
    object by its kind alone, as the handler quotes one: the answer must not echo megabytes of a value sent where a
    name or number belongs, nor write out again a value nested as deep as the parser allows."""
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = json.dumps(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"
