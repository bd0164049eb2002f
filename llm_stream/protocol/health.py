"""Health for the standard grpc.health.v1 service and the contract's own Check.

NOT_SERVING until the model is loaded and warmed up; NOT_SERVING again as soon
as draining starts, so balancers stop sending before the server stops.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

SERVICE_NAMES = ("", "inference.v1.InferenceService", "InferenceService")


class _WatchEnded(Exception):
    """Raised inside a Watch once it has sent the final NOT_SERVING."""


class _EndAfterShutdownNotice:
    """Wraps a Watch's context: the write that tells the client NOT_SERVING
    during shutdown is the last, then the stream ends."""

    def __init__(self, context: grpc.aio.ServicerContext, servicer: DrainingHealthServicer):
        self._context = context
        self._servicer = servicer

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(response)
        if (
            self._servicer.shutting_down
            and response.status == health_pb2.HealthCheckResponse.NOT_SERVING
        ):
            raise _WatchEnded

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class DrainingHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc's aio health servicer, whose Watch streams end at shutdown.

    A Watch never ends on its own, and ``server.stop(grace)`` waits for every
    open RPC: without this, one watching client would hold every drain for its
    whole grace period.
    """

    shutting_down = False

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            await super().Watch(request, _EndAfterShutdownNotice(context, self))
        except _WatchEnded:
            return

    async def shut_down(self) -> None:
        self.shutting_down = True
        await self.enter_graceful_shutdown()


class HealthState:
    def __init__(self) -> None:
        self.servicer = DrainingHealthServicer()
        self.serving = False

    async def start(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def mark_serving(self) -> None:
        if not self.servicer.shutting_down:
            self.serving = True
            await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def mark_draining(self) -> None:
        """NOT_SERVING for good; later set() calls are ignored by the servicer."""
        self.serving = False
        await self.servicer.shut_down()

    def knows(self, service: str) -> bool:
        return service in SERVICE_NAMES

    async def _set_all(self, status: int) -> None:
        for name in SERVICE_NAMES:
            await self.servicer.set(name, status)
