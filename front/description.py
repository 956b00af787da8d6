"""The worker's description (handler/description.py) as the front's A1111 listings and options read it: fetched
once, then answered from the front's copy at once, a fresh copy fetched in the background once it is `max_age` old.

Why: the description is an inference request, answered in its place in TorchServe's queue, so after every
generation queued before it. A1111's clients fetch several listings together when they open their settings, and
the page fetches two for its pickers; each would wait out those generations and add a request of its own to the
queue. What the description says changes when LoRA or embedding files are added or the model is replaced; a copy
one refresh old says it on the next call after that refresh. Only the very first call (or one after every fetch so
far has failed) waits for TorchServe, and concurrent first calls share one request. A failed refresh keeps the copy
and is tried again once the copy is `max_age` older. A1111's refresh endpoints (a client just added files) wait for
a fresh description.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

LOG = logging.getLogger(__name__)


class Description:
    """The front's copy of the description, and the fetch in flight if any."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[dict[str, Any]]],
        max_age: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._max_age = max_age
        self._clock = clock
        self._copy: dict[str, Any] | None = None
        self._fetched_at = 0.0
        self._fetching: asyncio.Task[dict[str, Any]] | None = None

    async def get(self) -> dict[str, Any]:
        """The copy (fetching a fresher one in the background when it is old), or without one the fetched
        description; a failed first fetch raises its error to each caller waiting for it."""
        if self._copy is None:
            return await asyncio.shield(self._start())
        if self._clock() - self._fetched_at >= self._max_age:
            self._start()
        return self._copy

    @property
    def latest(self) -> dict[str, Any] | None:
        """The copy as it is, None before the first fetch (for what may go without it)."""
        return self._copy

    async def refresh(self) -> dict[str, Any]:
        """A description fetched after this call began (A1111's refresh endpoints: files were just added), which
        the copy becomes; a fetch already in flight may have asked before them, so it is waited out first."""
        if self._fetching is not None and not self._fetching.done():
            await asyncio.gather(asyncio.shield(self._fetching), return_exceptions=True)
        return await asyncio.shield(self._start())

    def _start(self) -> asyncio.Task[dict[str, Any]]:
        """The fetch in flight, or a new one."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetched())
            self._fetching.add_done_callback(self._retrieved)
        return self._fetching

    async def _fetched(self) -> dict[str, Any]:
        described = await self._fetch()
        self._copy, self._fetched_at = described, self._clock()
        return described

    def _retrieved(self, task: asyncio.Task[dict[str, Any]]) -> None:
        """A failed background fetch keeps the copy, is logged (not left for the garbage collector to report), and
        is tried again `max_age` later rather than on every call while TorchServe fails."""
        if task.cancelled() or task.exception() is None or self._copy is None:
            return
        LOG.warning("the worker's description could not be refreshed: %s", task.exception())
        self._fetched_at = self._clock()

    async def aclose(self) -> None:
        """Cancel a fetch in flight and let it end (the front is stopping and closes its client next)."""
        if self._fetching is not None and not self._fetching.done():
            self._fetching.cancel()
            await asyncio.gather(self._fetching, return_exceptions=True)
