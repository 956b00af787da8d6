"""TorchServe's inference API as the front uses it: one async HTTP client, answers opened as streams.

Why httpx: it is async (a generation holds its connection for minutes; a thread per waiting user would not scale)
and streams both ways, so a progress stream is relayed line by line as it arrives. Every
transport failure becomes a `FrontError` with a message a user can act on: TorchServe not accepting connections is
a 503, no answer within the timeout a 504, a broken answer a 502.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from front.errors import FrontError
from front.settings import FrontSettings

JSON = "application/json"
PNG = "image/png"
NDJSON = "application/x-ndjson"
# TorchServe's health check answers at once when it is up: a readiness probe (3 s in the chart) waits no longer.
PING_TIMEOUT = 3.0
# How long a later batch of a request TorchServe found busy (a 503: its queue full, or no worker READY) is offered
# again, the first after BUSY_FIRST_WAIT s, each wait twice the last: the earlier batches are made, and their client
# is waiting for all.
BUSY_PATIENCE = 120.0
BUSY_FIRST_WAIT = 1.0
# The `type` of TorchServe's 503 when it is busy. Its other 503, "Prediction failed" (a worker's error), is an
# InternalServerException: the same request sent again would fail again, beside other requests.
BUSY = "ServiceUnavailableException"


def line_failure(line: dict[str, Any]) -> FrontError:
    """A stream's error line as the error its answer would have been: the handler's (its `status`, message and
    field), or TorchServe's own (`code` and `message`: a worker that died), a 502 when its status is none a failure
    has."""
    status = line.get("status", line.get("code"))  # the handler's line says `status`, TorchServe's own `code`
    status = status if isinstance(status, int) and 400 <= status < 600 else 502
    message = line.get("error") or line.get("message") or "TorchServe's stream ended in an error it did not name"
    field = line.get("field")
    return FrontError(status, str(message), field if isinstance(field, str) else "")


class InferenceApi:
    """The client of one TorchServe model's predictions endpoint."""

    def __init__(self, settings: FrontSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        timeout = httpx.Timeout(settings.timeout, connect=settings.connect_timeout)
        # No cap on connections in flight: TorchServe's queue is the one that bounds the work, and answers 503 when
        # full; a cap here would hold requests back and report them as a TorchServe timeout.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)

    async def aclose(self) -> None:
        await self.client.aclose()

    def _failure(self, error: httpx.HTTPError) -> FrontError:
        where = self.settings.inference_url
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            return FrontError(
                503, f"TorchServe is not reachable at {where}: start it (scripts/serve.sh) or set SD_INFERENCE_URL"
            )
        if isinstance(error, httpx.TimeoutException):
            return FrontError(
                504, f"TorchServe at {where} sent nothing for {self.settings.timeout:g} s; raise SD_FRONT_TIMEOUT"
            )
        return FrontError(502, f"TorchServe at {where} broke off its answer: {error!r}")

    async def open(self, body: bytes, accept: str, patient: bool = False) -> httpx.Response:
        """POST a request body; the answer with its status and headers read, its body still to be streamed.
        The caller closes it. `patient` (a later batch of a request): TorchServe's busy 503 is offered again for up to
        BUSY_PATIENCE s before it is the answer, so that a queue full for a moment does not throw away the batches
        already made."""
        headers = {"Content-Type": JSON, "Accept": accept}
        deadline, wait = time.monotonic() + BUSY_PATIENCE, BUSY_FIRST_WAIT
        while True:
            request = self.client.build_request("POST", self.settings.predictions_url, content=body, headers=headers)
            try:
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as error:
                raise self._failure(error) from None
            if not patient or time.monotonic() + wait > deadline or not await self._busy(response):
                return response
            await response.aclose()
            await asyncio.sleep(wait)
            wait *= 2

    async def progress(self, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        """A progress stream's step lines as they arrive, then its last line, the one with the images. Its error line
        raises the error the answer would have been; a line that is not a JSON object, or an end without the images,
        a 502. Read to its end, so that the connection goes back to the pool."""
        finished = False
        try:
            async for text in response.aiter_lines():
                if finished or not text.strip():
                    continue
                line = json.loads(text)
                if not isinstance(line, dict):
                    raise FrontError(502, "TorchServe sent a progress line that is not a JSON object")
                if "step" not in line and "images" not in line:
                    raise line_failure(line)
                finished = "images" in line
                yield line
        except httpx.HTTPError as error:
            raise self._failure(error) from None
        except ValueError:
            raise FrontError(502, f"TorchServe at {self.settings.inference_url} sent a line that is not JSON") from None
        if not finished:
            raise FrontError(502, "TorchServe ended the progress stream without the images")

    async def answer_json(self, body: bytes, patient: bool = False) -> dict:
        """POST a request body for a JSON answer: the answer, or the refusal raised (`patient`: `open`'s); an answer
        TorchServe cuts short, or one that is not JSON, is the front's 502."""
        response = await self.open(body, JSON, patient)
        try:
            if response.status_code != 200:
                raise await self.refusal(response)
            return json.loads(await response.aread())
        except httpx.HTTPError as error:
            raise self._failure(error) from None
        except ValueError:
            raise FrontError(502, f"TorchServe at {self.settings.inference_url} answered with no JSON") from None
        finally:
            await response.aclose()

    async def generated(
        self, body: bytes, patient: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """POST a generation and return its answer, followed through its progress stream, each step line given to
        `on_step` (`patient`: `open`'s); a failure after the stream began is its error line, with the status the
        answer would have had. Why a stream when no one watches it: TorchServe gives up on a worker that sends it
        nothing for `responseTimeout` (it kills the worker, and every request of its batch with it), and the front
        gives up on TorchServe after its own timeout; each step line restarts both clocks."""
        response = await self.open(body, NDJSON, patient)
        try:
            if response.status_code != 200:
                raise await self.refusal(response)
            answer: dict[str, Any] = {}
            async for line in self.progress(response):
                if "images" in line:
                    answer = line
                elif on_step is not None:
                    on_step(line)
            return answer
        finally:
            await response.aclose()

    async def _error_body(self, response: httpx.Response) -> dict[str, Any]:
        """The JSON object of an answer that is not 200 (read whole; `{}` when it holds none)."""
        try:
            body = json.loads(await response.aread())
        except (ValueError, httpx.HTTPError):
            return {}
        return body if isinstance(body, dict) else {}

    async def _busy(self, response: httpx.Response) -> bool:
        """Whether an answer is a 503 worth waiting out: TorchServe's busy one (its queue full, or no worker READY), or
        the handler's own (`{"error"}`: a worker whose GPU failed, which TorchServe is about to replace)."""
        if response.status_code != 503:
            return False
        body = await self._error_body(response)
        return body.get("type") == BUSY or isinstance(body.get("error"), str)

    async def refusal(self, response: httpx.Response) -> FrontError:
        """The error of an answer that is not 200. The handler's `{"error", "field"}` is kept as it is; TorchServe's
        own `{"message"}` keeps its status, its busy 503 said in a client's words first (TorchServe's own tell an
        operator to add workers, which a queue full for a moment does not need); a model TorchServe does not serve
        is the front's misconfiguration, not the client's: 503."""
        body = await self._error_body(response)
        if isinstance(body.get("error"), str):
            return FrontError(response.status_code, body["error"], str(body.get("field", "")))
        message = str(body.get("message") or response.reason_phrase)
        if response.status_code == 404:
            return FrontError(
                503, f"TorchServe at {self.settings.inference_url} does not serve the model '{self.settings.model}' "
                f"({message}); set SD_MODEL_NAME"
            )  # fmt: skip
        if response.status_code == 503 and body.get("type") == BUSY:
            message = f"busy (its queue is full, or no worker is ready): retry in a few seconds. It said: {message}"
        return FrontError(response.status_code, f"TorchServe: {message}")

    async def ping(self) -> tuple[bool, str]:
        """Whether TorchServe answers its health check, and what it said."""
        try:
            response = await self.client.get(f"{self.settings.inference_url.rstrip('/')}/ping", timeout=PING_TIMEOUT)
        except httpx.TimeoutException:
            return False, f"TorchServe at {self.settings.inference_url} did not answer /ping within {PING_TIMEOUT:g} s"
        except httpx.HTTPError as error:
            return False, self._failure(error).error
        try:
            body = response.json()
        except ValueError:
            body = None
        status = body.get("status") if isinstance(body, dict) else None
        return response.status_code == 200, str(status or response.text.strip())
