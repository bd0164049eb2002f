"""Health for the standard grpc.health.v1 service and the contract's own Check.

NOT_SERVING until the model is loaded and warmed up; NOT_SERVING again as soon
as draining starts, so balancers stop sending before the server stops.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

SERVICE_NAMES = ("", "inference.v1.InferenceService", "InferenceService")


class HealthState:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.serving = False
        self._shutting_down = False

    async def start(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def mark_serving(self) -> None:
        if not self._shutting_down:
            self.serving = True
            await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def mark_draining(self) -> None:
        """NOT_SERVING for good; later set() calls are ignored by the servicer."""
        self.serving = False
        self._shutting_down = True
        await self.servicer.enter_graceful_shutdown()

    def knows(self, service: str) -> bool:
        return service in SERVICE_NAMES

    async def _set_all(self, status: int) -> None:
        for name in SERVICE_NAMES:
            await self.servicer.set(name, status)
