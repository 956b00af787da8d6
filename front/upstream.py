"""TorchServe's inference API as the front uses it: one async HTTP client, answers opened as streams.

Why httpx: it is async (a generation holds its connection for minutes; a thread per waiting user would not scale)
and streams both ways, so a PNG or a progress stream is relayed as its bytes arrive, never buffered whole. Every
transport failure becomes a `FrontError` with a message a user can act on: TorchServe not accepting connections is
a 503, no answer within the timeout a 504, a broken answer a 502.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from front.errors import FrontError
from front.settings import FrontSettings

JSON = "application/json"
PNG = "image/png"
NDJSON = "application/x-ndjson"


class InferenceApi:
    """The client of one TorchServe model's predictions endpoint."""

    def __init__(self, settings: FrontSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        timeout = httpx.Timeout(settings.timeout, connect=settings.connect_timeout)
        self.client = httpx.AsyncClient(timeout=timeout, transport=transport)

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

    async def open(self, body: bytes, accept: str) -> httpx.Response:
        """POST a request body; the answer with its status and headers read, its body still to be streamed.
        The caller closes it."""
        headers = {"Content-Type": JSON, "Accept": accept}
        request = self.client.build_request("POST", self.settings.predictions_url, content=body, headers=headers)
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as error:
            raise self._failure(error) from None

    async def chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The answer's bytes as they arrive; the answer is closed when they end or the client goes away."""
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as error:
            raise self._failure(error) from None
        finally:
            await response.aclose()

    async def lines(self, response: httpx.Response) -> AsyncIterator[dict]:
        """The answer's JSON lines as they arrive (a plain JSON answer is one line)."""
        try:
            async for line in response.aiter_lines():
                if line.strip():
                    yield json.loads(line)
        except httpx.HTTPError as error:
            raise self._failure(error) from None
        except ValueError:
            raise FrontError(502, f"TorchServe at {self.settings.inference_url} sent a line that is not JSON") from None

    async def read_json(self, response: httpx.Response) -> dict:
        """The whole answer as JSON."""
        try:
            return json.loads(await response.aread())
        except httpx.HTTPError as error:
            raise self._failure(error) from None
        except ValueError:
            raise FrontError(502, f"TorchServe at {self.settings.inference_url} answered with no JSON") from None

    async def answer_json(self, body: bytes) -> dict:
        """POST a request body for a JSON answer: the answer, or the refusal raised."""
        response = await self.open(body, JSON)
        try:
            if response.status_code != 200:
                raise await self.refusal(response)
            return await self.read_json(response)
        finally:
            await response.aclose()

    async def refusal(self, response: httpx.Response) -> FrontError:
        """The error of an answer that is not 200. The handler's `{"error", "field"}` is kept as it is; TorchServe's
        own `{"message"}` (no worker, queue full) keeps its status, but a model TorchServe does not serve is the
        front's misconfiguration, not the client's: 503."""
        try:
            body = json.loads(await response.aread())
        except (ValueError, httpx.HTTPError):
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return FrontError(response.status_code, body["error"], str(body.get("field", "")))
        message = body.get("message") if isinstance(body, dict) else None
        message = str(message or response.reason_phrase)
        if response.status_code == 404:
            return FrontError(
                503, f"TorchServe at {self.settings.inference_url} does not serve the model '{self.settings.model}' "
                f"({message}); set SD_MODEL_NAME"
            )  # fmt: skip
        return FrontError(response.status_code, f"TorchServe: {message}")

    async def ping(self) -> tuple[bool, str]:
        """Whether TorchServe answers its health check, and what it said."""
        try:
            response = await self.client.get(f"{self.settings.inference_url.rstrip('/')}/ping")
        except httpx.HTTPError as error:
            return False, self._failure(error).error
        try:
            body = response.json()
        except ValueError:
            body = None
        status = body.get("status") if isinstance(body, dict) else None
        return response.status_code == 200, str(status or response.text.strip())
