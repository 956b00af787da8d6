"""A1111's `GET /sdapi/v1/progress`: how far the front's A1111 requests in flight have come; `POST
/sdapi/v1/interrupt`: stop the oldest after its batch in flight.

Why: A1111's clients show a progress bar and a preview by polling it while their txt2img or img2img request runs.
The front asks TorchServe for a progress stream for each batch of an A1111 request (front/a1111.py's answer is
gathered from their last lines) and keeps the last step line; A1111 runs one job at a time, so the front reports
the oldest request in flight, its batches (and a hires fix's passes) as A1111's job count. Per front process: a
front of several processes answers each client from the one that holds its connection.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from front.imagine import is_integer, is_number

# A running job's least progress, as A1111 floors it: its ETA is then large at the start, not 0.
LEAST = 0.01


@dataclass
class Job:
    """One A1111 request in flight: `ours` is the whole request for `mode` (txt2img or img2img), sent to TorchServe
    as `requests` requests of equal size (one per batch, `n_iter`, when the front splits it), `request` the one
    running."""

    ours: dict[str, Any]
    mode: str = "txt2img"
    requests: int = 1
    request: int = 0
    started: float = field(default_factory=time.monotonic)
    stamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    fraction: float = 0.0
    step: int = 0
    steps: int = 0
    iteration: int = 0
    # Whether the step lines are a hires fix's second pass (A1111 counts each pass as a job).
    second_pass: bool = False
    # The passes per batch the step lines say TorchServe runs (None before the first, or from a worker older than
    # the field): a hires fix asked for may run none (an upscale to the size the image has).
    said_passes: int | None = None
    preview: str | None = None
    # Set by A1111's interrupt: no further batch is sent.
    interrupted: bool = False

    def advance(self, line: dict[str, Any]) -> None:
        """A step line of the running request's stream: how far its images are, never going back (a request split
        over UNet batches restarts its steps in each); a hires fix's two passes share the bar by what their steps
        cost, as the lines say (`first_pass_share`)."""
        if "passes" in line:
            self.said_passes = line["passes"]
        elif line.get("hires"):
            self.said_passes = 2  # a worker older than `passes`: its second pass says so, and the request's guess holds
        n_samples = self.ours.get("n_samples", 1)
        images = n_samples * self.ours.get("n_iter", 1) // self.requests
        step, total, index = line["step"], line.get("total") or 1, line.get("image_index", 0)
        done = (index + line.get("image_count", 1) * step / total) / images
        if self.passes == 2:
            first = line.get("first_pass_share") or self._first_pass_share
            done = first + (1 - first) * done if line.get("hires") else first * done
        self.fraction = max(self.fraction, min((self.request + done) / self.requests, 1.0))
        self.step, self.steps = step, total
        self.iteration = (self.request * images + index) // n_samples
        self.second_pass = bool(line.get("hires"))
        self.preview = line.get("preview", self.preview)

    @property
    def _first_pass_share(self) -> float:
        """A worker older than `first_pass_share`: the first pass's steps over both passes', a second-pass step
        counted as its pixels over the first pass's (read once TorchServe runs the request, so once its values are
        valid)."""
        x, y = self.ours.get("hr_resize_x", 0), self.ours.get("hr_resize_y", 0)
        if not x and not y:
            area = self.ours["hr_scale"] ** 2
        else:
            width, height = self.ours["W"], self.ours["H"]
            area = x * y / (width * height) if x and y else (x / width if x else y / height) ** 2
        steps = self.ours["ddim_steps"]
        return steps / (steps + (self.ours.get("hr_steps") or steps) * area)

    @property
    def passes(self) -> int:
        """Sampling passes per batch, as the step lines say, or before the first as the request asks: two with a hires
        fix (a scale of 1 runs no second pass, nor do resize sides of 0; a value that is not a number is TorchServe's
        to refuse, while the progress is polled)."""
        if self.said_passes is not None:
            return self.said_passes
        offs = {"hr_scale": 1, "hr_resize_x": 0, "hr_resize_y": 0}
        asked = ((self.ours.get(name, off), off) for name, off in offs.items())
        return 2 if any(is_number(value) and value > off for value, off in asked) else 1

    @property
    def jobs(self) -> tuple[int, int]:
        """A1111's job count and the running job's number: a job per pass of each batch, as A1111 counts them."""
        n_iter = self.ours.get("n_iter", 1)
        batches = n_iter if is_integer(n_iter) else 1
        return batches * self.passes, self.iteration * self.passes + self.second_pass


class Jobs:
    """The front's A1111 requests in flight, oldest first."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()

    @asynccontextmanager
    async def running(self, ours: dict[str, Any], mode: str, requests: int = 1) -> AsyncIterator[Job]:
        """A job listed for as long as the block runs, however it ends."""
        key, job = next(self._ids), Job(ours, mode, requests)
        self._jobs[key] = job
        try:
            yield job
        finally:
            del self._jobs[key]

    def interrupt(self) -> None:
        """A1111's interrupt, of the one job it runs: the oldest here. Its batch in flight still finishes (a
        TorchServe request cannot be stopped part way); no later one is sent."""
        job = next(iter(self._jobs.values()), None)
        if job is not None:
            job.interrupted = True

    def progress(self, with_image: bool) -> dict[str, Any]:
        """A1111's progress answer for the oldest job (zeros when none runs): its batches (`n_iter`, each two with a
        hires fix) as A1111's job count and the one running as its job number; its preview a base64 JPEG."""
        job = next(iter(self._jobs.values()), None)
        if job is None:
            state = {"job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                     "sampling_steps": 0}  # fmt: skip
            return {"progress": 0.0, "eta_relative": 0.0, "state": {"skipped": False, "interrupted": False, **state},
                    "current_image": None, "textinfo": None}  # fmt: skip
        fraction = max(job.fraction, LEAST)
        elapsed = time.monotonic() - job.started
        job_count, job_no = job.jobs
        state = {"job": f"scripts_{job.mode}", "job_count": job_count, "job_timestamp": job.stamp, "job_no": job_no,
                 "sampling_step": job.step, "sampling_steps": job.steps}  # fmt: skip
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed,
            "state": {"skipped": False, "interrupted": job.interrupted, **state},
            "current_image": job.preview if with_image else None,
            "textinfo": None,
        }
