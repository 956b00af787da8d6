"""A1111's `GET /sdapi/v1/progress`: how far the front's A1111 requests in flight have come.

Why: A1111's clients show a progress bar and a preview by polling it while their txt2img or img2img request runs.
The front asks TorchServe for a progress stream for each A1111 request (front/a1111.py's answer is its last line)
and keeps the last step line of each; A1111 runs one job at a time, so it reports the oldest request in flight, and
how many there are as its job count. Per front process: a front of several processes answers each client from the
one that holds its connection.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from front.errors import FrontError
from front.upstream import NDJSON, InferenceApi


@dataclass
class Job:
    """One A1111 request in flight: `ours` is what TorchServe was sent."""

    ours: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    stamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    fraction: float = 0.0
    step: int = 0
    steps: int = 0
    preview: str | None = None

    def advance(self, line: dict[str, Any]) -> None:
        """A step line of the stream: how far its images are, never going back (a request split over UNet
        batches restarts its steps in each); a hires fix's two passes share the bar by what their steps cost."""
        images = self.ours.get("n_samples", 1) * self.ours.get("n_iter", 1)
        step, total = line["step"], line.get("total") or 1
        done = (line.get("image_index", 0) + line.get("image_count", 1) * step / total) / images
        if "hr_scale" in self.ours:
            steps = self.ours["ddim_steps"]
            second = (self.ours.get("hr_steps") or steps) * self.ours["hr_scale"] ** 2
            first = steps / (steps + second)
            done = first + (1 - first) * done if line.get("hires") else first * done
        self.fraction = max(self.fraction, min(done, 1.0))
        self.step, self.steps = step, total
        self.preview = line.get("preview", self.preview)


class Jobs:
    """The front's A1111 requests in flight, oldest first."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()

    @asynccontextmanager
    async def running(self, ours: dict[str, Any]) -> AsyncIterator[Job]:
        key, job = next(self._ids), Job(ours)
        self._jobs[key] = job
        try:
            yield job
        finally:
            del self._jobs[key]

    def progress(self, with_image: bool) -> dict[str, Any]:
        """A1111's progress answer for the oldest job (zeros when none runs); its preview a base64 JPEG."""
        job = next(iter(self._jobs.values()), None)
        fraction = 0.0 if job is None else job.fraction
        elapsed = 0.0 if job is None else time.monotonic() - job.started
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
            "state": {
                "skipped": False,
                "interrupted": False,
                "job": "" if job is None else "scripts_api",
                "job_count": len(self._jobs),
                "job_timestamp": "0" if job is None else job.stamp,
                "job_no": 0,
                "sampling_step": 0 if job is None else job.step,
                "sampling_steps": 0 if job is None else job.steps,
            },
            "current_image": job.preview if job is not None and with_image else None,
            "textinfo": None,
        }


async def followed(api: InferenceApi, body: bytes, job: Job) -> dict[str, Any]:
    """TorchServe's answer to `body`, asked for as a progress stream whose step lines advance `job`; a failure after
    the stream began is its error line, with the status the answer would have had."""
    response = await api.open(body, NDJSON)
    try:
        if response.status_code != 200:
            raise await api.refusal(response)
        async for line in api.lines(response):
            if "step" in line:
                job.advance(line)
            elif "images" in line:
                return line
            else:
                raise FrontError(line.get("status", 500), line.get("error", "generation failed"), line.get("field", ""))
        raise FrontError(502, "TorchServe ended the progress stream without the images")
    finally:
        await response.aclose()
