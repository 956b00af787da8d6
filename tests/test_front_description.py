"""The front's copy of the worker's description (front/description.py): one request for concurrent first callers,
the copy at once afterwards, a fresher one fetched in the background once it is old, failures kept apart."""

from __future__ import annotations

import asyncio
import logging

import pytest

from front.description import Description
from front.errors import FrontError


class Worker:
    """Answers the description `{"version": n}`, n counting its answers, after `release` is set; fails while
    `failing`."""

    def __init__(self) -> None:
        self.asked = 0
        self.cancelled = 0
        self.failing = False
        self.release = asyncio.Event()
        self.release.set()

    async def fetch(self) -> dict[str, int]:
        self.asked += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.failing:
            raise FrontError(503, "TorchServe is not reachable")
        return {"version": self.asked}


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


async def _settle() -> None:
    """Let the background fetch run to its end."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _refreshing(worker: Worker) -> Description:
    """A description whose copy (version 1) is old, with the background refresh it started held by `worker`."""
    clock = Clock()
    description = Description(worker.fetch, max_age=10, clock=clock)
    await description.get()
    clock.now += 10
    worker.release.clear()
    await description.get()
    await asyncio.sleep(0)
    return description


def test_first_callers_share_one_request_then_the_copy_answers_until_it_is_old() -> None:
    async def scenario() -> None:
        worker, clock = Worker(), Clock()
        description = Description(worker.fetch, max_age=10, clock=clock)
        worker.release.clear()
        first = [asyncio.create_task(description.get()) for _ in range(3)]
        await asyncio.sleep(0)
        worker.release.set()
        assert [await task for task in first] == [{"version": 1}] * 3 and worker.asked == 1
        clock.now += 9.9
        assert await description.get() == {"version": 1} and worker.asked == 1
        # Old: the copy at once, a fresh one asked for in the background, answered from the next call on.
        clock.now += 0.1
        worker.release.clear()
        assert await description.get() == {"version": 1}
        await asyncio.sleep(0)
        assert await description.get() == {"version": 1}
        await asyncio.sleep(0)
        assert worker.asked == 2  # one refresh in flight, not two
        worker.release.set()
        await _settle()
        assert await description.get() == {"version": 2} and worker.asked == 2

    asyncio.run(scenario())


def test_a_refresh_waits_out_a_fetch_in_flight_then_asks_again() -> None:
    """The fetch in flight may have asked before the files a client just added: the refresh is a later one."""

    async def scenario() -> None:
        worker = Worker()
        description = await _refreshing(worker)
        refreshing = asyncio.create_task(description.refresh())
        await asyncio.sleep(0)
        assert worker.asked == 2
        worker.release.set()
        assert await refreshing == {"version": 3} and await description.get() == {"version": 3}

    asyncio.run(scenario())


def test_a_failed_first_request_is_each_waiters_error_and_the_next_call_asks_again() -> None:
    async def scenario() -> None:
        worker = Worker()
        description = Description(worker.fetch, max_age=10, clock=Clock())
        worker.failing = True
        for _ in range(2):
            with pytest.raises(FrontError, match="not reachable"):
                await description.get()
        worker.failing = False
        assert await description.get() == {"version": 3}

    asyncio.run(scenario())


def test_a_failed_refresh_keeps_the_copy_is_logged_and_is_tried_again_once_old(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        worker, clock = Worker(), Clock()
        description = Description(worker.fetch, max_age=10, clock=clock)
        assert await description.get() == {"version": 1}
        clock.now += 10
        worker.failing = True
        assert await description.get() == {"version": 1}
        await _settle()
        assert await description.get() == {"version": 1}  # failed just now: not asked again at once
        await _settle()
        assert worker.asked == 2
        clock.now += 10
        assert await description.get() == {"version": 1}
        await _settle()
        assert worker.asked == 3
        worker.failing = False
        clock.now += 10
        assert await description.get() == {"version": 1}
        await _settle()
        assert await description.get() == {"version": 4}

    with caplog.at_level(logging.WARNING, logger="front.description"):
        asyncio.run(scenario())
    assert caplog.messages == ["the worker's description could not be refreshed: TorchServe is not reachable"] * 2


def test_closing_cancels_the_request_in_flight_and_waits_for_it() -> None:
    async def scenario() -> int:
        worker = Worker()
        await (await _refreshing(worker)).aclose()
        return worker.cancelled

    assert asyncio.run(scenario()) == 1


@pytest.mark.parametrize("call", ["get", "refresh"])
def test_a_caller_gone_away_leaves_the_request_to_the_others(call: str) -> None:
    """A client that disconnects cancels its own wait, not the one request other callers (and the copy) wait for."""

    async def scenario() -> tuple[int, int]:
        worker = Worker()
        description = Description(worker.fetch, max_age=10, clock=Clock())
        worker.release.clear()
        gone = asyncio.create_task(getattr(description, call)())
        staying = asyncio.create_task(description.get())
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        worker.release.set()
        assert await staying == {"version": 1} and description.latest == {"version": 1}
        return worker.asked, worker.cancelled

    assert asyncio.run(scenario()) == (1, 0)
