"""Hands events from a generation thread to the event loop, with backpressure.

The queue is bounded: when a client reads slower than the model writes, the
generation thread waits (holding its slot) instead of the server buffering
without limit. Closing the channel (the consumer left) releases a waiting
producer at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.05


class ThreadToLoopChannel(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self._closed = threading.Event()

    def put_blocking(self, item: T) -> bool:
        """Called on the worker thread; False once the consumer has closed the channel."""
        if self._closed.is_set():
            return False
        try:
            future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        except RuntimeError:  # the loop is closed: nobody will read
            return False
        while True:
            try:
                future.result(timeout=_POLL_S)
                return True
            except concurrent.futures.TimeoutError:
                if self._closed.is_set():
                    future.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False

    def close(self) -> None:
        """Called by the consumer when it stops reading."""
        self._closed.set()

    async def get(self) -> T:
        return await self._queue.get()
