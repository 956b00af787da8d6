"""The one error type of the front: a status and the body the handler answers its own errors with.

Raised wherever the front refuses a request or TorchServe fails it, and turned into `{"error", "field"}` JSON in one
place (front/app.py), or into a stream's last line once a progress stream has begun.
"""

from __future__ import annotations


class FrontError(Exception):
    """A request the front refuses, or an answer it cannot give: a status and the handler's error body."""

    def __init__(self, status: int, error: str, field: str = "") -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field

    def body(self) -> dict[str, str]:
        return {"error": self.error, "field": self.field}
