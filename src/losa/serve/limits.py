"""Limits of ``losa serve``: a per-request deadline and the gate that admits one generation at a time.

CPU decoding already uses every core, so requests are generated one after another; the gate lets a
bounded number wait (``--max-queue``) and refuses the rest at once with 503. The deadline
(``--request-timeout``) counts from a request's arrival, waiting included.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from losa.serve.schema import RequestError, RequestTimeout


class Deadline:
    """The time a request must be answered by, counted from its creation.

    Args:
        seconds: the allowed time; None = no limit.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a limit."""
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        """Whether the time is up."""
        return self._end is not None and time.monotonic() >= self._end

    def timeout(self, doing: str) -> RequestTimeout:
        """The error for a request that ran out of time while ``doing`` something.

        Args:
            doing: what the request was doing, e.g. "generating".

        Returns:
            A :class:`RequestTimeout` (504) with a one-line message.
        """
        return RequestTimeout(f"the request took longer than the server's {self.seconds:g} s timeout while {doing}; "
                              "ask for fewer tokens or retry later")


class Gate:
    """One generation at a time; at most ``max_queue`` requests wait for it, more are refused.

    Args:
        max_queue: how many requests may wait while one generates (0 = none).
    """

    def __init__(self, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue {max_queue} must be at least 0")
        self.max_queue = max_queue
        self.waiting = 0  # requests blocked in ``slot`` right now
        self._turn = anyio.Semaphore(1)  # hands over directly to the next waiter on release

    @property
    def busy(self) -> bool:
        """Whether a request holds the model now."""
        return self._turn.value == 0

    @asynccontextmanager
    async def slot(self, deadline: Deadline) -> AsyncIterator[None]:
        """Hold the model for the body of the ``async with``.

        Args:
            deadline: the request's deadline; waiting past it gives up.

        Raises:
            RequestError: (503) at once when ``max_queue`` requests already wait.
            RequestTimeout: (504) when the deadline passes while waiting.
        """
        if self.busy and self.waiting >= self.max_queue:
            raise RequestError(f"the server is busy: {self.waiting} request(s) already wait for the model "
                               f"(limit {self.max_queue}); retry later", 503)
        self.waiting += 1
        try:
            with anyio.fail_after(deadline.remaining()):
                await self._turn.acquire()
        except TimeoutError:
            raise deadline.timeout("waiting for earlier requests") from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._turn.release()
