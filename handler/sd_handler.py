"""TorchServe handler: validates each request, runs a batch through `ldm`, answers each with its own images.

preprocess → one `ApiRequest` or `RequestError` per request (a bad request never fails its neighbours);
inference → `Pipeline.generate_many` over the valid ones (same-shape images share UNet calls; each request again
alone if the batch runs out of GPU memory), streaming step lines to the requests that asked for a stream;
postprocess → PNG bytes, JSON, or a stream's last line per request, with status codes and headers set on the context.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.description import DescribeRequest, asks_description, describe
from handler.errors import RequestError
from handler.request import NDJSON, ApiRequest, check_chunks, check_defaults, parse_request, request_body
from handler.response import Answer, json_body, png_files
from handler.settings import HandlerSettings, check_against_model, parse_settings
from handler.streaming import ProgressStream, ndjson_line
from ldm.cpu_features import has_amx_bf16
from ldm.devices import release_cached_memory, worker_device
from ldm.generation_request import GenerationError, first_pass_share
from ldm.parts import load_split
from ldm.pipeline import Generation, Pipeline

logger = logging.getLogger(__name__)
# What runs out of memory without PyTorch's CUDA allocator noticing says so in a plain RuntimeError: cuBLAS and cuDNN
# (`CUBLAS_STATUS_ALLOC_FAILED`; cuBLAS also `CUBLAS_STATUS_NOT_INITIALIZED` when it cannot allocate its handle), the
# CUDA runtime (`CUDA error: out of memory`), and the CPU allocator of a CPU worker (`DefaultCPUAllocator: can't
# allocate memory`). Each leaves the process able to serve the next request.
OUT_OF_MEMORY = re.compile(
    r"out of memory|_ALLOC_FAILED|CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate|can't allocate memory",
    re.IGNORECASE,
)
HOST_MEMORY = "can't allocate memory"
# The answer to a request whose generation failed for the worker's reason, not its own.
GENERATION_FAILED = "generation failed; the server log has the details"
# The answer once the GPU has faulted (not memory: an illegal address, a device-side assert), which leaves the
# process's CUDA context unusable for good: the worker ends itself RESTART_AFTER_S later for TorchServe to start a
# fresh one, time enough for this batch's answers to reach TorchServe.
DEVICE_FAILED = "the GPU failed; this worker restarts: retry in a minute"
RESTART_AFTER_S = 2.0
# HTTP reason phrase of each status we answer with, also the `Reason` dimension of FailedRequests.
REASONS = {
    400: "Bad Request",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


Outcome = RequestError | Answer | DescribeRequest


def _header(context: Any, idx: int, name: str) -> str | None:
    """A request header, whatever case the client and TorchServe gave its name."""
    headers = context.get_all_request_header(idx) or {}
    return next((v for k, v in headers.items() if isinstance(v, str) and k.lower() == name), None)


class StableDiffusionHandler(BaseHandler):
    """Stable Diffusion v1 txt2img and img2img over TorchServe's inference API."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = HandlerSettings()
        self.pipeline: Pipeline | None = None
        self.model_name = ""
        # Set when the GPU faults: every request is then answered DEVICE_FAILED until the process ends.
        self.device_failed = False
        # The streams of the batch in hand: set by inference, read by postprocess.
        self.progress = ProgressStream(None, set(), 0, {})

    def initialize(self, context: Any) -> None:
        """Read the handler settings once, load the split parts onto this worker's device."""
        started = time.perf_counter()
        self.context = context
        self.model_name = context.model_name
        self.settings = parse_settings(getattr(context, "model_yaml_config", None))
        gpu_id = context.system_properties.get("gpu_id")
        device = worker_device(gpu_id)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dtype = self.settings.dtype(device)
        model_dir = Path(context.system_properties["model_dir"])
        model = load_split(model_dir, device, dtype, self.settings.low_memory)
        check_against_model(self.settings, model.config.timesteps)
        check_defaults(self.settings, model)
        self.pipeline = Pipeline(
            model,
            self.settings.fast_path,
            model_dir / self.settings.lora_dir,
            model_dir / self.settings.embeddings_dir,
        )
        self.initialized = True
        vae = model.vae_file
        logger.info(
            "loaded %s (model hash %s%s) on %s as %s%s in %.1f s",
            model_dir,
            model.model_hash,
            f", VAE {vae.name} {vae.short_hash}" if vae else "",
            device,
            dtype,
            ", low-memory mode" if self.settings.low_memory else "",
            time.perf_counter() - started,
        )
        if device.type == "cpu" and dtype == torch.float32 and has_amx_bf16():
            logger.info(
                "this CPU has AMX: `precision: bf16` in model-config.yaml makes images about twice as fast, within "
                "bf16's rounding of these float32 ones (docs/PERFORMANCE.md)"
            )

    def preprocess(self, data: list[dict[str, Any]]) -> list[ApiRequest | RequestError | DescribeRequest]:
        """Each request's body validated on its own (or read as a request for the description)."""
        assert self.pipeline is not None, "initialize() loads the model first"
        tokenizer = self.pipeline.model.text_encoder.tokenizer
        vocabulary = self.pipeline.embeddings.vocabulary()
        parsed: list[ApiRequest | RequestError | DescribeRequest] = []
        for idx, row in enumerate(data):
            try:
                body = request_body(row)
                if asks_description(body):
                    parsed.append(DescribeRequest())
                    continue
                request = parse_request(
                    body,
                    self.settings,
                    _header(self.context, idx, "accept"),
                    self.pipeline.factor,
                    self.pipeline.model.config.timesteps,
                )
                check_chunks(request.generation, tokenizer, self.settings, vocabulary)
                self.pipeline.check(request.generation)  # clip_skip and LoRA files: a 400 now, not in the batch
                parsed.append(request)
            except GenerationError as error:
                parsed.append(RequestError(error.field, str(error)))
            except RequestError as error:
                parsed.append(error)
            except Exception:
                # A request our validation failed on is a bug to fix, but it must not fail the batch beside it.
                logger.exception("request %d of the batch could not be validated", idx)
                parsed.append(RequestError("body", "the server failed to read this request; its log says why", 500))
        return parsed

    def inference(
        self, data: list[ApiRequest | RequestError | DescribeRequest], *args: Any, **kwargs: Any
    ) -> list[Outcome]:
        """Generate every valid request of the batch together; errors pass through in place, and a failure is its
        request's answer (`_generate`), never raised: once a stream has started its status is sent, so a failure
        after that can only be its last line.
        """
        assert self.pipeline is not None, "initialize() loads the model first"
        valid = [(idx, item) for idx, item in enumerate(data) if isinstance(item, ApiRequest)]
        streamed = {idx for idx, item in valid if item.stream}
        # Only a streamed request's lines carry it.
        shares = {
            idx: first_pass_share(item.generation, self.pipeline.factor)
            for idx, item in valid
            if idx in streamed and item.generation.hires
        }
        self.progress = ProgressStream(self.context, streamed, self.settings.preview_every, shares)
        if not valid:
            return list(data)
        started = time.perf_counter()
        outcomes = self._generate(valid)
        results = [outcomes[idx] if isinstance(item, ApiRequest) else item for idx, item in enumerate(data)]
        generated = [r.generation for r in results if isinstance(r, Answer)]
        seconds = time.perf_counter() - started
        logger.info(
            "batch of %d requests: %d images in %.2f s", len(data), sum(len(g.seeds) for g in generated), seconds
        )
        if generated:
            self._record_speed(generated, seconds)
        return results

    def _generate(self, valid: list[tuple[int, ApiRequest]]) -> dict[int, Outcome]:
        """Each valid request's outcome, by batch position: all from one shared generation, or, when that fails
        (memory, a rule only the pipeline checks, a fault of the worker's), each request again alone; a request that
        fails alone gets its own error: a 400, a 507, or a 500 whose traceback is in the log. Once the GPU has
        faulted, every request is a 503 and nothing more is tried (`_worker_failure`); when the first request tried
        alone meets the batch's very fault (its type and message), the fault is taken for one every request meets,
        and the rest are answered its 500 untried, rather than made to fail once each.

        Why alone: a batch packs several requests' images into each UNet call, so it can run out of memory where
        none of its requests would, and one request's error (or one that meets a bug) must not become its
        neighbours'. Never raised to TorchServe, whose answer to a raise is a 503 "Prediction failed" for the whole
        batch, neighbours' 400s included, that clients read as a busy server. A stream retried alone starts its step
        lines over; its final line is the same.
        """
        device = self.pipeline.model.device
        if self.device_failed:
            return {idx: RequestError("", DEVICE_FAILED, 503) for idx, _ in valid}
        try:
            return self._generate_together(valid)
        except Exception as error:
            failure = _failure(error, device) or self._worker_failure(error, f"a batch of {len(valid)} requests")
            fault = (type(error), str(error)) if failure.status == 500 else None
            if len(valid) == 1:
                return {valid[0][0]: failure}
            if not self.device_failed:
                logger.warning("%s on a batch of %d requests; generating each alone", failure.message, len(valid))
        outcomes: dict[int, Outcome] = {}
        every_request_meets_it = False
        for tried, (idx, item) in enumerate(valid):
            if self.device_failed:
                outcomes[idx] = RequestError("", DEVICE_FAILED, 503)
            elif every_request_meets_it:
                outcomes[idx] = RequestError("", GENERATION_FAILED, 500)
            else:
                try:
                    outcomes.update(self._generate_together([(idx, item)]))
                except Exception as error:
                    # Met by this request alone: the others keep the images they got.
                    outcomes[idx] = _failure(error, device) or self._worker_failure(error, f"request {idx} alone")
                    every_request_meets_it = tried == 0 and fault == (type(error), str(error))
        return outcomes

    def _worker_failure(self, error: Exception, what: str) -> RequestError:
        """The answer to a generation that failed for the worker's reason, not its request's: a 500, its traceback in
        the log; or, when the GPU faulted, DEVICE_FAILED, and the worker's end scheduled."""
        logger.exception("generation failed for %s", what)
        if isinstance(error, torch.AcceleratorError) and not self.device_failed:
            self.device_failed = True
            logger.error(
                "the GPU faulted: this worker ends in %.0f s for TorchServe to start a fresh one", RESTART_AFTER_S
            )
            _exit_soon()
        return RequestError("", DEVICE_FAILED, 503) if self.device_failed else RequestError("", GENERATION_FAILED, 500)

    def _generate_together(self, valid: list[tuple[int, ApiRequest]]) -> dict[int, Outcome]:
        assert self.pipeline is not None
        generations = self.pipeline.generate_many(
            [item.generation for _, item in valid],
            self.settings.max_batch_images,
            self.progress.following([idx for idx, _ in valid]),
        )
        return {idx: Answer(item, generation) for (idx, item), generation in zip(valid, generations, strict=True)}

    def postprocess(self, data: list[Outcome]) -> list[bytes | str]:
        """PNG bytes (with X-Seed), JSON, or a stream's last line (the same JSON) per request; errors as JSON with
        their status, or as a stream's last line once the stream has started."""
        assert self.pipeline is not None
        generations = [outcome.generation for outcome in data if isinstance(outcome, Answer)]
        try:
            files = iter(png_files(generations, self.pipeline.model))
        except Exception as error:
            # The images are made, but not their PNGs (a batch of large ones may meet the host's memory): every
            # answer that wanted them fails alike, its stream's included, as generation's failures do.
            failure = _failure(error, self.pipeline.model.device)
            if failure is None:
                logger.exception("the PNGs of a batch of %d requests failed", len(generations))
                failure = RequestError("", GENERATION_FAILED, 500)
            data = [failure if isinstance(outcome, Answer) else outcome for outcome in data]
            files = iter(())
        responses: list[bytes | str] = []
        for idx, outcome in enumerate(data):
            if isinstance(outcome, DescribeRequest):
                self.context.set_response_content_type(idx, "application/json")
                responses.append(json.dumps(describe(self.pipeline, self.settings)))
                continue
            if isinstance(outcome, RequestError):
                self._count("FailedRequests", 1, reason=REASONS[outcome.status])
                if idx in self.progress.started:
                    # The stream's 200 is out: the line carries the status the answer would have had.
                    responses.append(ndjson_line({**outcome.body(), "status": outcome.status}))
                    continue
                self.context.set_response_status(outcome.status, REASONS[outcome.status], idx)
                self.context.set_response_content_type(idx, "application/json")
                responses.append(json.dumps(outcome.body()))
                continue
            generation, pngs = outcome.generation, next(files)
            self.context.set_response_header(idx, "X-Seed", str(generation.seeds[0]))
            self.context.set_response_header(idx, "X-Seeds", ",".join(str(s) for s in generation.seeds))
            if generation.request.variation:
                subseeds = ",".join(str(s) for s in generation.request.subseeds)
                self.context.set_response_header(idx, "X-Subseeds", subseeds)
            if outcome.request.want_png:
                self.context.set_response_content_type(idx, "image/png")
                responses.append(pngs[0])
            elif outcome.request.stream:
                self.context.set_response_content_type(idx, NDJSON)
                responses.append(json_body(generation, pngs) + "\n")
            else:
                self.context.set_response_content_type(idx, "application/json")
                responses.append(json_body(generation, pngs))
        return responses

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes | str]:
        """The three steps, and their time as a `Server-Timing` header on every answer of the batch: a client that
        subtracts it from its own wall time sees what HTTP and TorchServe's queue and plumbing cost it."""
        started = time.perf_counter()
        self.context = context
        if len(data) == 1 and not data[0] and _header(context, 0, "describe") == "True":
            # The management API's `GET /models/NAME?customized=true`: sent to one worker alone, without a body. An
            # inference request with that header (TorchServe passes a client's headers on) is generated as any other.
            assert self.pipeline is not None
            return [json.dumps(describe(self.pipeline, self.settings))]
        responses = self.postprocess(self.inference(self.preprocess(data)))
        timing = f'handler;dur={(time.perf_counter() - started) * 1000:.1f};desc="batch of {len(data)}"'
        for idx in range(len(data)):
            context.set_response_header(idx, "Server-Timing", timing)
        return responses

    def _count(self, name: str, value: float, unit: str = "count", reason: str | None = None) -> None:
        dimensions = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
        if reason is not None:
            dimensions.append(Dimension("Reason", reason))
        self.context.metrics.add_metric(name, value, unit, None, dimensions, MetricTypes.COUNTER)

    def _gauge(self, name: str, value: float, unit: str) -> None:
        dimensions = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
        self.context.metrics.add_metric(name, value, unit, None, dimensions, MetricTypes.GAUGE)

    def _record_speed(self, generations: list[Generation], seconds: float) -> None:
        images = sum(len(g.seeds) for g in generations)
        steps = sum(len(g.seeds) * g.request.total_steps for g in generations)
        self._count("ImagesGenerated", images)
        self._gauge("SecondsPerImage", seconds / images, "s")
        # TorchServe parses "name.unit:value": a unit must be a plain word.
        self._gauge("UNetStepsPerSecond", steps / seconds, "count")


def _exit_soon() -> None:
    """End this worker process RESTART_AFTER_S from now (TorchServe then starts a fresh one)."""
    timer = threading.Timer(RESTART_AFTER_S, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


def _failure(error: Exception, device: torch.device) -> RequestError | None:
    """The answer to a request whose generation failed this way: a 400 naming the field, or a 507 for memory; None
    for any other error, the worker's, not the request's."""
    if isinstance(error, GenerationError):
        return RequestError(error.field, str(error))
    if not isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) and not (
        isinstance(error, RuntimeError) and OUT_OF_MEMORY.search(str(error))
    ):
        return None
    # Python's own MemoryError: an allocation outside torch (numpy's, PIL's) that the host could not make.
    where = "host" if isinstance(error, MemoryError) or HOST_MEMORY in str(error) else "GPU"
    release_cached_memory(device)
    logger.error("out of %s memory: %s", where, error)
    return RequestError("", f"out of {where} memory; retry, or ask for fewer or smaller images", 507)
