"""Assembles the grpc.aio server and runs its life: start, load, warm up, drain.

The port opens at once with health NOT_SERVING; models load on a worker thread
and warm up; only then does health turn SERVING. Draining flips health first,
refuses new RPCs, and gives in-flight ones the grace period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llm_stream.engine.engine import Engine, EngineLimits, EngineState
from llm_stream.engine.types import GenerationBackend
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from llm_stream.protocol.convert import RequestLimits
from llm_stream.protocol.health import HealthState
from llm_stream.protocol.metrics import ServerMetrics
from llm_stream.protocol.servicer import InferenceServicer
from llm_stream.settings import Settings

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name

# Returns the loaded backends, the default first. Runs on a worker thread.
ModelLoader = Callable[[Settings], Sequence[GenerationBackend]]


def load_configured_models(settings: Settings) -> list[GenerationBackend]:
    """The real loader: the registry from flags and file, each entry loaded."""
    from llm_stream.model.loader import load_backend  # torch stays out of this layer's imports
    from llm_stream.model.sources import build_registry_config

    registry = build_registry_config(settings.models, settings.models_file, settings.default_model)
    backends = [
        load_backend(spec, settings.device, settings.dtype, settings.cache_dir)
        for spec in registry.specs
    ]
    backends.sort(key=lambda b: b.model_id != registry.default_model_id)
    return list(backends)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Server pings keep long, quiet streams alive through proxies and NATs.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A client ping sooner than this after the last data frame is a strike
        # (grpc's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS) ...
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(settings.min_ping_interval_s * 1000),
        ),
        # ... and this many strikes earn GOAWAY too_many_pings. The default 0 never
        # sends it: a client with eager keepalive is answered, not disconnected.
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
        # Fail loudly when the port is taken instead of sharing it.
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s > 0:
        # Periodic GOAWAY makes clients reconnect and re-resolve dns:/// names, so
        # client-side round_robin learns about new replicas; streams may finish.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                int(settings.max_connection_age_grace_s * 1000),
            ),
        ]
    return options


class LLMStreamServer:
    def __init__(self, settings: Settings, load_models: ModelLoader = load_configured_models):
        self.settings = settings
        self._load_models = load_models
        self.engine = Engine(
            EngineLimits(settings.max_concurrent, settings.max_queue, settings.stream_buffer)
        )
        self.health = HealthState()
        self.metrics = ServerMetrics(self.engine, self.health)
        compression = grpc.Compression.Gzip if settings.compression == "gzip" else None
        self._server = grpc.aio.server(options=server_options(settings), compression=compression)
        pb_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(
                self.engine,
                self.health,
                RequestLimits(settings.default_max_tokens, settings.max_tokens_cap),
                settings.max_batch_size,
                on_rejected=self.metrics.rejected,
            ),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
        self.port = 0
        self.metrics_port = 0
        self.ready: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and start serving health; load and warm up in the background."""
        try:
            self.port = self._server.add_insecure_port(self.settings.address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.settings.address}: {exc}") from exc
        await self.health.start()
        if self.settings.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(
                    self.settings.host, self.settings.metrics_port
                )
            except OSError as exc:
                await self._server.stop(0)
                raise OSError(
                    f"cannot serve metrics on port {self.settings.metrics_port}: {exc}"
                ) from exc
        await self._server.start()
        log.info(
            "listening on %s:%d (health NOT_SERVING until warm-up)", self.settings.host, self.port
        )
        self.ready = asyncio.create_task(self._load_and_warm_up(), name="load-and-warm-up")
        return self.port

    async def _load_and_warm_up(self) -> None:
        loop = asyncio.get_running_loop()
        backends = await loop.run_in_executor(None, self._load_models, self.settings)
        for index, backend in enumerate(backends):
            self.engine.add_backend(backend, default=index == 0)
        await self.engine.warm_up(self.settings.warmup_tokens)
        if self.engine.state is EngineState.STARTING:
            self.engine.state = EngineState.READY
            await self.health.mark_serving()
            default = self.engine.backend_for("")
            log.info(
                "ready: serving on %s:%d model=%s version=%s device=%s (models: %s)",
                self.settings.host,
                self.port,
                default.model_id,
                default.version,
                default.device,
                ", ".join(self.engine.backends),
            )

    async def drain(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace."""
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        self.engine.state = EngineState.DRAINING
        await self.health.mark_draining()
        if self.ready is not None and not self.ready.done():
            self.ready.cancel()
        log.info("draining: %d requests in flight, grace %.1f s", self.engine.in_flight, grace)
        # stop() refuses new RPCs, waits up to grace for running ones, then cancels them;
        # cancelled handlers set their stop signals, which ends their generations.
        await self._server.stop(grace)
        self.engine.close()
        self.metrics.close()
        log.info("stopped")
