"""The handler's one error type: a request that breaks a rule, with the field, the message and the HTTP status it is
answered with. Raised by the request's readers (its JSON, its images) and by a generation that fails for the
request's own reason, and answered in one place (`StableDiffusionHandler.postprocess`)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that breaks a rule: answered with `status` and `{"error": message, "field": field}`."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.message, "field": self.field}
