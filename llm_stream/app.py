"""Composition: settings in, a running server out.

Wires the pieces the transport packages only convert and serve: loads the
configured models, builds the engine (one continuous batch per model), health,
metrics, the gRPC server and the OpenAI-compatible HTTP server (uvicorn on the
same event loop, over the same engine and access control), and runs their life:
the ports open at once with health NOT_SERVING; models load on a worker thread
and warm up; only then does health turn SERVING. Draining flips health first,
refuses new requests (gRPC: UNAVAILABLE, HTTP: 503), and gives in-flight ones
the grace period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from llm_stream.access import AccessControl
from llm_stream.access.api_keys import ApiKeyStore
from llm_stream.engine.core import CoreStarter
from llm_stream.engine.engine import Engine, EngineState
from llm_stream.engine.scheduler import BatchLimits
from llm_stream.engine.types import ModelBackend
from llm_stream.front_door.admission import Admission
from llm_stream.front_door.request import RequestLimits
from llm_stream.http.app import HTTP_MAX_BODY_BYTES, OpenAIApi
from llm_stream.http.server import HttpServer
from llm_stream.http.tls import ReloadingSSLContext
from llm_stream.metrics import ServerMetrics
from llm_stream.protocol.guard import CallGate
from llm_stream.protocol.health import HealthState
from llm_stream.protocol.server import bind, build_grpc_server, build_health_server
from llm_stream.protocol.servicer import InferenceServicer
from llm_stream.settings import Settings
from llm_stream.tls_files import TLSConfigError, TLSFiles

log = logging.getLogger(__name__)

# How long HTTP responses get to close after the drain grace has stopped their generations.
HTTP_CANCEL_WAIT_S = 1.0

# Returns the loaded models, the default first: backends, or engine processes that
# loaded theirs. Runs on a worker thread.
ModelLoader = Callable[[Settings], Sequence[ModelBackend | CoreStarter]]


def uses_engine_process(settings: Settings) -> bool:
    if settings.engine_process != "auto":
        return settings.engine_process == "on"
    from llm_stream.model.device import resolve_device

    return resolve_device(settings.device).type == "cuda"


def load_configured_models(settings: Settings) -> list[ModelBackend | CoreStarter]:
    """The real loader: the registry from flags and file, each entry loaded (here, or in
    an engine process of its own: ``--engine-process``)."""
    # torch is imported only when loading
    from llm_stream.model.execution import ExecutionOptions
    from llm_stream.model.loader import load_backend
    from llm_stream.model.sources import build_registry_config

    registry = build_registry_config(settings.models, settings.models_file, settings.default_model)
    options = ExecutionOptions(
        max_rows=settings.max_concurrent,
        max_batch_tokens=settings.max_batch_tokens,
        cuda_graphs=settings.cuda_graphs,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_prefill_tokens=batch_limits(settings).max_prefill_tokens,
        prefix_cache=settings.prefix_cache,
        prefix_cache_tokens=settings.prefix_cache_tokens,
    )
    models: list[ModelBackend | CoreStarter]
    if uses_engine_process(settings):
        from llm_stream.engine.process import CoreSpec, start_engine_process

        models = [
            start_engine_process(
                CoreSpec(
                    spec,
                    settings.device,
                    settings.dtype,
                    settings.cache_dir,
                    options,
                    batch_limits(settings),
                    settings.log_level,
                )
            )
            for spec in registry.specs
        ]
    else:
        models = [
            load_backend(spec, settings.device, settings.dtype, settings.cache_dir, options)
            for spec in registry.specs
        ]
    models.sort(key=lambda b: b.model_id != registry.default_model_id)
    return models


def batch_limits(settings: Settings) -> BatchLimits:
    return BatchLimits(
        max_rows=settings.max_concurrent,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk,
    )


def load_api_keys(settings: Settings) -> ApiKeyStore | None:
    if settings.api_keys_file is None:
        return None
    try:
        return ApiKeyStore(settings.api_keys_file)
    except (OSError, UnicodeDecodeError) as exc:
        raise OSError(f"cannot read --api-keys-file {settings.api_keys_file}: {exc}") from exc


def tls_files(settings: Settings) -> TLSFiles | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return TLSFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)


class LLMStreamServer:
    """Raises OSError, saying what to fix, when a port, certificate or key file is unusable."""

    def __init__(self, settings: Settings, load_models: ModelLoader = load_configured_models):
        self.settings = settings
        self._load_models = load_models
        self.engine = Engine(batch_limits(settings))
        self.health = HealthState()
        self.metrics = ServerMetrics(self.engine, self.health)
        pushback_ms = round(settings.retry_pushback_s * 1000)
        self.access = AccessControl(load_api_keys(settings), settings.max_concurrent_per_key)
        # One admission for both faces: the same keys, caps and rejection log and metric.
        admission = Admission(self.access, on_rejected=self.metrics.rejected)
        limits = RequestLimits(settings.default_max_tokens, settings.max_tokens_cap)
        servicer = InferenceServicer(
            self.engine,
            self.health,
            limits,
            settings.max_batch_size,
            admission=admission,
            retry_pushback_ms=pushback_ms,
        )
        self.gate = CallGate(admission, pushback_ms)
        self._server = build_grpc_server(settings, servicer, self.health, self.gate)
        self._health_server = build_health_server(self.health) if settings.health_port else None
        self.openai = OpenAIApi(
            self.engine,
            self.health,
            admission,
            limits,
            retry_after_s=settings.retry_pushback_s,
            max_body_bytes=min(settings.max_message_bytes, HTTP_MAX_BODY_BYTES),
        )
        self._http: HttpServer | None = None
        self._https: ReloadingSSLContext | None = None
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.ready: asyncio.Task[None] | None = None
        # Set when a model's engine process dies: the server can no longer serve it.
        self.failed = asyncio.Event()
        self._lost: asyncio.Task[None] | None = None  # health turning, once a model is lost
        self.engine.lost_listeners.append(self._on_model_lost)

    def _bind(self) -> None:
        try:
            self.port = bind(self._server, self.settings.address, tls_files(self.settings))
        except TLSConfigError as exc:
            raise OSError(f"cannot serve TLS: {exc}") from exc
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.settings.address}: {exc}") from exc
        if self._health_server is not None:
            address = f"{self.settings.host}:{self.settings.health_port}"
            try:
                self.health_port = self._health_server.add_insecure_port(address)
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {address} (--health-port): {exc}") from exc
        if self.settings.http_port:
            address = f"{self.settings.host}:{self.settings.http_port}"
            files = tls_files(self.settings)
            try:
                # The HTTP port serves HTTPS (and mTLS) with the gRPC port's certificates.
                self._https = None if files is None else ReloadingSSLContext(files)
            except TLSConfigError as exc:
                raise OSError(f"cannot serve TLS on the HTTP port: {exc}") from exc
            self._http = HttpServer(
                self.openai.app,
                self.settings.host,
                self.settings.http_port,
                None if self._https is None else self._https.context,
            )
            try:
                self.http_port = self._http.bind()
            except OSError as exc:
                raise OSError(f"cannot listen on {address} (--http-port): {exc}") from exc

    async def start(self) -> int:
        """Bind and start serving health; load and warm up in the background."""
        self._bind()
        await self.health.start()
        if self.settings.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(
                    self.settings.host, self.settings.metrics_port
                )
            except OSError as exc:
                await self._server.stop(0)
                if self._http is not None:
                    await self._http.stop(0)
                raise OSError(
                    f"cannot serve metrics on port {self.settings.metrics_port}: {exc}"
                ) from exc
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        if self._http is not None:
            await self._http.start()
        if self._https is not None:
            self._https.start()
        log.info(
            "listening on %s:%d%s%s%s (health NOT_SERVING until warm-up)",
            self.settings.host,
            self.port,
            self._security_summary(),
            f"; health only on {self.health_port}" if self._health_server else "",
            f"; OpenAI-compatible HTTP API and chat page on {self.http_port}" if self._http else "",
        )
        self.ready = asyncio.create_task(self._load_and_warm_up(), name="load-and-warm-up")
        return self.port

    def _security_summary(self) -> str:
        settings = self.settings
        parts = []
        if settings.tls_cert is not None:
            parts.append("mTLS" if settings.tls_client_ca is not None else "TLS")
        else:
            parts.append("plaintext")
        if settings.api_keys_file is not None:
            parts.append(f"API keys from {settings.api_keys_file}")
        if settings.max_concurrent_per_key:
            parts.append(f"{settings.max_concurrent_per_key} generations per key")
        return " (" + ", ".join(parts) + ")"

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
            defaults = default.sampling_defaults
            log.info(
                "ready: serving on %s:%d model=%s version=%s device=%s %s, sampling defaults: "
                "%s (models: %s)",
                self.settings.host,
                self.port,
                default.model_id,
                default.version,
                default.device,
                default.execution,
                " ".join(f"{k}={v:g}" for k, v in defaults.items()) or "none",
                ", ".join(self.engine.backends),
            )
            if self._http is not None:
                host = self.settings.host
                shown = "localhost" if host in {"[::]", "::", "0.0.0.0", ""} else host
                log.info(
                    "chat page on http://%s:%d/ and the OpenAI-compatible API on http://%s:%d/v1",
                    shown,
                    self.http_port,
                    shown,
                    self.http_port,
                )

    def _on_model_lost(self, reason: str) -> None:
        log.critical("cannot serve any more: %s; stopping (health NOT_SERVING)", reason)
        self.engine.state = EngineState.DRAINING
        self._lost = asyncio.get_running_loop().create_task(self.health.mark_draining())
        self.failed.set()

    async def _drain_http(self, grace: float) -> None:
        """New HTTP requests get 503 (the engine is draining) while the port stays open
        and in-flight generations finish within the grace; then uvicorn stops."""
        if self._http is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.openai.active:
            log.info("draining: %d HTTP generations in flight", self.openai.active)
        if not await self.openai.wait_idle(grace):
            # Grace over: the generations end now, as "cancelled", so that each stream
            # still closes properly rather than being cut by uvicorn.
            log.info("drain grace over: stopping %d HTTP generations", self.openai.active)
            self.engine.stop_all()
            await self.openai.wait_idle(HTTP_CANCEL_WAIT_S)
        await self._http.stop(deadline - loop.time())

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
        await asyncio.gather(self._server.stop(grace), self._drain_http(grace))
        if self._https is not None:
            await self._https.stop()
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.engine.close()
        self.metrics.close()
        log.info("stopped")
