"""Progress of streamed requests, sent as TorchServe intermediate responses: one JSON line per denoising step.

TorchServe 0.12 turns each intermediate response of a request into one HTTP chunk; the first one also sends the
status line and headers (so the content type must be set before it), and the handler's ordinary return value
becomes the stream's last chunk. An intermediate response names the batch positions it is for, so requests of the
same batch that did not ask for a stream still get one plain response at the end.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ts.handler_utils.utils import send_intermediate_predict_response

from handler.request import NDJSON
from ldm.pipeline import Progress
from ldm.preview import preview_jpeg


def ndjson_line(value: dict[str, Any]) -> str:
    """One line of the stream: a JSON object, then a newline (the JSON itself never holds a raw newline)."""
    return json.dumps(value) + "\n"


class ProgressStream:
    """Sends a step line to each streamed request whose images are in the UNet batch that just stepped.

    `streamed` are the positions in TorchServe's batch that asked for a stream; `first_pass_shares`, those that run a
    hires fix's second pass, with their first pass's share of the work (`first_pass_share`). Their lines say both
    from the first step on: a client gives each pass its room on the bar, and only the server knows whether a hires
    fix asked for runs, and what a step of each sampler costs. `started` collects those that have been sent
    something: their status and headers are out, so from then on even an error can only be one more line.
    """

    def __init__(
        self, context: Any, streamed: set[int], preview_every: int, first_pass_shares: dict[int, float]
    ) -> None:
        self.context = context
        self.streamed = streamed
        self.first_pass_shares = first_pass_shares
        self.preview_every = preview_every
        self.started: set[int] = set()
        for idx in streamed:
            context.set_response_content_type(idx, NDJSON)

    def wants_preview(self, step: int, total: int) -> bool:
        return self.preview_every > 0 and (step % self.preview_every == 0 or step == total)

    def following(self, positions: Sequence[int]) -> Callable[[Progress], None]:
        """The progress callback of one pipeline call, whose request i is at batch position `positions[i]`."""
        return lambda progress: self._send(progress, positions)

    def _send(self, progress: Progress, positions: Sequence[int]) -> None:
        lines: dict[int, str] = {}
        # How many of each request's images this UNet batch holds: with `image_index`, what a client needs to weigh
        # the steps of a request split over several batches (each restarts its steps).
        counts = Counter(request_index for request_index, _ in progress.images)
        for request_index, row in progress.first_rows().items():
            idx = positions[request_index]
            if idx not in self.streamed:
                continue
            line: dict[str, Any] = {
                "step": progress.step,
                "total": progress.total,
                "image_index": progress.images[row][1],
                "image_count": counts[request_index],
                "passes": 2 if idx in self.first_pass_shares else 1,
            }
            if idx in self.first_pass_shares:
                line["first_pass_share"] = self.first_pass_shares[idx]
            if progress.hires:
                line["hires"] = True  # the hires fix's second pass, whose steps count from 1 again
            if self.wants_preview(progress.step, progress.total):
                line["preview"] = base64.b64encode(preview_jpeg(progress.latents[row])).decode("ascii")
            lines[idx] = ndjson_line(line)
        if not lines:
            return
        request_ids = {idx: self.context.get_request_id(idx) for idx in lines}
        send_intermediate_predict_response(lines, request_ids, "Intermediate Prediction success", 200, self.context)
        self.started.update(lines)
