"""The front's HTTP API: `POST /imagine` as the original app answered it, the progress stream, the page, health.

Why FastAPI on uvicorn: async end to end (httpx upstream), so a few processes hold many slow generations; request
and answer forms are declared once and published as OpenAPI. Its `/docs` normally pulls Swagger UI from a CDN and
would be blank offline; `fastapi-offline` ships Swagger UI 5 and ReDoc in its wheel and serves them from here.
(`swagger-ui-bundle` on PyPI was the other candidate: its Swagger UI 4.15 cannot read the OpenAPI 3.1 FastAPI writes.)

Answers:
- Every generation is asked of TorchServe as a progress stream, watched or not (`InferenceApi.generated`): its step
  lines keep TorchServe from giving up on the worker, and the front on TorchServe, while a long generation runs.
- `Accept: image/png`: the request goes to TorchServe whole, and its one PNG is answered with its `X-Seed`; a
  request for several images is a 400 that says to ask for JSON: a PNG holds one image, and silently dropping all
  but the first would lose images the user waits for.
- `Accept: application/json` (and anything else but ndjson): the JSON array of base64 PNGs, one TorchServe request
  per iteration (front/imagine.py), with `X-Seed` and `X-Seeds`.
- `POST /imagine/stream`, `"stream": true` or `Accept: application/x-ndjson`: TorchServe's progress stream, line by
  line as it arrives, iterations one after another, then one final line with every image.
- Errors are `{"error", "field"}` JSON with the handler's status; an error once a stream has begun is its last line.
- `GET /imagine/description`: the worker's description (handler/description.py), from the front's copy: the page
  starts its form from its defaults.
- `POST /sdapi/v1/txt2img`, `/sdapi/v1/img2img`: AUTOMATIC1111's API (front/a1111.py), one TorchServe request per
  batch as `/imagine` splits them, each followed as a progress stream for its `/sdapi/v1/progress` and
  `/sdapi/v1/interrupt` (front/a1111_progress.py); its listings and options from the worker's description, of which
  the front keeps a copy (front/description.py); `POST /sdapi/v1/png-info` reads an image's infotext back
  (front/png_info.py).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.requests import ClientDisconnect

from front import a1111, a1111_progress, png_info, schema
from front import a1111_options as a1111_opts
from front.description import Description
from front.errors import FrontError
from front.imagine import BROKEN_ANSWER, Plan, Results, plan_fields, plan_request, seed_headers
from front.settings import FrontSettings
from front.upstream import JSON, NDJSON, PNG, InferenceApi

STATIC = Path(__file__).parent / "static"
VERSION = "0.1.0"
# What A1111's answers say in `info.version` (its own say "v1.10.1").
A1111_VERSION = f"sd-torchserve-{VERSION}"
# Content types TorchServe decodes as form fields, and so refuses (415): the front refuses them the same way.
FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
# The page loads nothing but its own files and the images it is given as data: URLs, so a prompt that slips into
# markup could still run nothing.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _line(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def _relay(api: InferenceApi, plan: Plan, first: httpx.Response) -> AsyncIterator[bytes]:
    """The progress stream of every iteration: step lines as they come (numbered across iterations), then one
    final line gathering the images; an error line, or a failure of TorchServe, ends it."""
    results = Results()
    response = first
    try:
        for iteration in range(plan.iterations):
            if iteration:
                response = await api.open(plan.iteration(results.next(plan)), NDJSON, patient=True)
                if response.status_code != 200:
                    raise await api.refusal(response)
            async for message in api.progress(response):
                if "images" in message:
                    results.add(message, plan)
                    continue
                image_index = message.get("image_index", 0) + len(results.images)
                numbered = {"image_index": image_index, "iteration": iteration, "n_iter": plan.iterations}
                yield _line({**message, **numbered})
            await response.aclose()
        yield await run_in_threadpool(_line, results.answer(plan))  # every image in one line: in a thread
    except FrontError as error:
        yield _line({**error.body(), "status": error.status})
    finally:
        await response.aclose()


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with TorchServe's 413 as soon as it passes `limit` bytes rather than read whole,
    and with its 415 when it is a form (what `curl -d` and HTML forms send)."""
    if request.headers.get("content-type", "").lower().startswith(FORMS):
        raise FrontError(415, "send the request as a JSON object with Content-Type: application/json", "body")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise FrontError(413, f"the body must be at most {limit} bytes", "body")
    except ClientDisconnect:
        # An upload given up half-way (a large init image): nobody reads the answer, and it is no server fault.
        raise FrontError(400, "the client closed its connection before the body ended", "body") from None
    return bytes(body)


def create_app(settings: FrontSettings, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The front for one TorchServe model; `transport` replaces the network (tests)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Made in the server's event loop: its pooled connections belong to that loop.
        app.state.api = InferenceApi(settings, transport)
        app.state.description = Description(lambda: app.state.api.answer_json(a1111_opts.DESCRIBE))
        try:
            yield
        finally:
            await app.state.description.aclose()
            await app.state.api.aclose()

    app = FastAPIOffline(
        title="Stable Diffusion front",
        summary="The original app's /imagine API and a browser UI, in front of TorchServe.",
        version=VERSION,
        lifespan=lifespan,
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    jobs = a1111_progress.Jobs()

    @app.exception_handler(FrontError)
    async def front_error(request: Request, error: FrontError) -> JSONResponse:
        # A1111's routes answer every error, the front's own too, as A1111's clients read one.
        if request.url.path.startswith(a1111.PREFIX):
            error = a1111.renamed(error)
        return JSONResponse(error.body(), status_code=error.status)

    async def png(request: Request, plan: Plan) -> Response:
        # The server's defaults as last described, without a request of their own: unknown until one is made.
        plan.check_one_image(defaults=(request.app.state.description.latest or {}).get("defaults"))
        results = Results()
        results.add(await request.app.state.api.generated(plan.whole()), plan)
        plan.check_one_image(len(results.images))  # defaults not yet described, or changed since
        try:
            image = base64.b64decode(results.images[0], validate=True)
        except (binascii.Error, TypeError):
            raise FrontError(502, BROKEN_ANSWER) from None
        return Response(image, media_type=PNG, headers=seed_headers(results))

    async def json_array(request: Request, plan: Plan) -> Response:
        results = Results()
        for iteration in range(plan.iterations):
            if iteration and await request.is_disconnected():
                break  # nobody is waiting for the rest
            sent = plan.iteration(results.next(plan) if iteration else None)
            results.add(await request.app.state.api.generated(sent, patient=iteration > 0), plan)
        # Rendered in a thread: 64 large PNGs take a tenth of a second, which every other call would wait.
        return await run_in_threadpool(JSONResponse, results.images, headers=seed_headers(results))

    async def stream(api: InferenceApi, plan: Plan) -> Response:
        # The first iteration is opened here, so that a request TorchServe refuses gets its plain 4xx JSON answer.
        first = await api.open(plan.iteration(), NDJSON)
        if first.status_code != 200:
            raise await api.refusal(first)
        headers = {"X-Seed": str(plan.seed)} if plan.seed is not None else {}
        return StreamingResponse(_relay(api, plan, first), media_type=NDJSON, headers=headers)

    @app.post(
        "/imagine",
        summary="Generate images (the original app's API)",
        response_class=Response,
        responses={**schema.IMAGINE_ANSWERS, **schema.errors()},
        openapi_extra=schema.request_body(),
    )
    async def imagine(request: Request) -> Response:
        plan = plan_request(await _body(request, settings.max_body_bytes), settings.max_images)
        accept = request.headers.get("accept", "").lower()
        api = request.app.state.api
        if plan.stream or NDJSON in accept:
            return await stream(api, plan)
        if PNG in accept and JSON not in accept:
            return await png(request, plan)
        return await json_array(request, plan)

    @app.post(
        "/imagine/stream",
        summary="Generate images with live progress",
        response_class=StreamingResponse,
        responses={**schema.STREAM_ANSWERS, **schema.errors()},
        openapi_extra=schema.request_body(),
    )
    async def imagine_stream(request: Request) -> Response:
        plan = plan_request(await _body(request, settings.max_body_bytes), settings.max_images, stream=True)
        return await stream(request.app.state.api, plan)

    async def a1111_call(request: Request, mode: a1111.Mode) -> JSONResponse:
        """One A1111 request as one TorchServe request per batch (`n_iter`, as `/imagine` splits it), each followed
        for `/sdapi/v1/progress`; once interrupted, the batches done are the answer."""
        # Converted as A1111's API converts it: what the answer echoes and reads (`send_images`) too.
        body = a1111.coerced(a1111.read(await _body(request, settings.max_body_bytes)))
        served = None
        if a1111_opts.needs_options(body):  # override_settings naming the model or a setting: judged by what is served
            served = a1111_opts.Served(await request.app.state.description.get(), settings.model)
        ours = a1111.translate(body, mode, served)
        plan = plan_fields(ours, a1111.encoded(ours), settings.max_images)
        ours = plan.fields or ours  # with the seeds the plan drew
        results = Results()
        async with jobs.running(ours, mode, plan.iterations) as job:
            for iteration in range(plan.iterations):
                if iteration and (job.interrupted or await request.is_disconnected()):
                    break  # the batches done are the answer; a client gone is waiting for none
                job.request = iteration
                sent = plan.iteration(results.next(plan) if iteration else None)
                results.add(await request.app.state.api.generated(sent, iteration > 0, job.advance), plan)
        # The answer's info names the VAE and the model's kind from the front's copy of the description, if any yet.
        served = a1111_opts.Served(request.app.state.description.latest or {}, settings.model)
        answer = results.answer(plan)
        # In a thread: reading each PNG's infotext and rendering the answer take a while for 64 large images.
        return await run_in_threadpool(lambda: JSONResponse(a1111.answer(body, ours, answer, served, A1111_VERSION)))

    @app.get("/imagine/description", summary="What the worker serves: its model, samplers, LoRAs, defaults, limits",
             responses=schema.errors())  # fmt: skip
    async def imagine_description(request: Request) -> JSONResponse:
        # The page starts its form from the defaults and keeps its boxes to the limits.
        return JSONResponse(await request.app.state.description.get())

    @app.post("/sdapi/v1/txt2img", summary="Generate images (AUTOMATIC1111's API)", responses=schema.errors())
    async def a1111_txt2img(request: Request) -> JSONResponse:
        return await a1111_call(request, "txt2img")

    @app.post("/sdapi/v1/img2img", summary="Generate images from an image (AUTOMATIC1111's API)",
              responses=schema.errors())  # fmt: skip
    async def a1111_img2img(request: Request) -> JSONResponse:
        return await a1111_call(request, "img2img")

    async def a1111_listing(request: Request) -> JSONResponse:
        described = await request.app.state.description.get()
        return JSONResponse(a1111_opts.listing(request.url.path.removeprefix(a1111.PREFIX), described, settings.model))

    for name in a1111_opts.LISTINGS:
        app.add_api_route(
            a1111.PREFIX + name, a1111_listing, methods=["GET"], summary=f"A1111's {name} (what the worker serves)"
        )

    async def a1111_none_here() -> JSONResponse:
        return JSONResponse([])

    for name in a1111_opts.NONE_HERE:
        app.add_api_route(a1111.PREFIX + name, a1111_none_here, methods=["GET"], summary=f"A1111's {name}: none here")

    async def a1111_refresh(request: Request) -> JSONResponse:
        await request.app.state.description.refresh()
        return JSONResponse(None)

    for name in a1111_opts.REFRESHES:
        app.add_api_route(
            a1111.PREFIX + name, a1111_refresh, methods=["POST"], summary=f"A1111's {name}: a fresh description"
        )

    @app.post("/sdapi/v1/interrupt", summary="Stop the oldest A1111 request after its batch in flight")
    async def a1111_interrupt() -> JSONResponse:
        jobs.interrupt()
        return JSONResponse({})

    @app.post("/sdapi/v1/png-info", summary="An image's infotext and its fields, as A1111 reads them")
    async def a1111_png_info(request: Request) -> JSONResponse:
        body = a1111.read(await _body(request, settings.max_body_bytes))
        # In a thread: inflating an upload's text chunks takes a while, and the event loop serves every other call.
        return JSONResponse(await run_in_threadpool(png_info.answer, body))

    @app.get("/sdapi/v1/cmd-flags", summary="A1111's command-line flags: none here (its clients' health check)")
    async def a1111_cmd_flags() -> JSONResponse:
        return JSONResponse({})

    @app.get("/sdapi/v1/scripts", summary="A1111's scripts: none here")
    async def a1111_scripts() -> JSONResponse:
        return JSONResponse({"txt2img": [], "img2img": []})

    @app.get("/sdapi/v1/schedulers", summary="A1111 1.9's schedulers, those done here")
    async def a1111_schedulers() -> JSONResponse:
        return JSONResponse(list(a1111.SCHEDULER_ITEMS))

    @app.get("/sdapi/v1/progress", summary="How far the A1111 requests in flight have come (A1111's API)")
    async def a1111_progress_answer(skip_current_image: bool = False) -> JSONResponse:
        return JSONResponse(jobs.progress(with_image=not skip_current_image))

    @app.post("/sdapi/v1/options", summary="A1111's options: naming the served model is all that may be set")
    async def a1111_options(request: Request) -> JSONResponse:
        body = a1111.read(await _body(request, settings.max_body_bytes))
        described = await request.app.state.description.get()
        a1111_opts.check_options(body, a1111_opts.Served(described, settings.model))
        return JSONResponse(None)

    @app.get("/healthz", summary="Whether TorchServe answers its health check")
    async def healthz(request: Request) -> JSONResponse:
        healthy, status = await request.app.state.api.ping()
        body = {"status": "ok" if healthy else "unavailable", "torchserve": status, "model": settings.model}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/livez", summary="Whether this front serves HTTP, whatever TorchServe does")
    async def livez() -> JSONResponse:
        # For a liveness probe: restarting the front cannot help while TorchServe is down (readiness says that).
        return JSONResponse({"status": "ok"})

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    return app
