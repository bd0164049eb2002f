"""A limit on generations running at once, with a bounded wait queue.

Past both limits a request is refused at once (OverloadedError ->
RESOURCE_EXHAUSTED) instead of waiting without bound.
"""

from __future__ import annotations

import asyncio

from llm_stream.errors import OverloadedError


class Slot:
    """A held generation slot; release exactly once, whenever the model work ends."""

    def __init__(self, owner: AdmissionController) -> None:
        self._owner = owner
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release()


class AdmissionController:
    def __init__(self, max_active: int, max_waiting: int) -> None:
        self._max_active = max_active
        self._max_waiting = max_waiting
        self._semaphore = asyncio.Semaphore(max_active)
        self.active = 0
        self.waiting = 0

    async def acquire(self) -> Slot:
        if self._semaphore.locked():
            if self.waiting >= self._max_waiting:
                raise OverloadedError(
                    f"server busy: {self.active} generations running and {self.waiting} "
                    "waiting (the configured limits); retry later with backoff"
                )
            self.waiting += 1
            try:
                await self._semaphore.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._semaphore.acquire()
        self.active += 1
        return Slot(self)

    def _release(self) -> None:
        self.active -= 1
        self._semaphore.release()
