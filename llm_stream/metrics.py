"""Prometheus metrics on a separate HTTP port (``--metrics-port``; 0 turns it off).

What an autoscaler and an operator need from an LLM server: generations running
and waiting (scale on these, not CPU), tokens produced, why generations ended,
time to first token, prompt tokens reused from the prefix cache against those
computed, and rejected requests by status code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from llm_stream.engine.engine import Engine, FinishedGeneration, StepTiming
from llm_stream.protocol.health import HealthState

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5)
_BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)


class ServerMetrics:
    def __init__(self, engine: Engine, health: HealthState) -> None:
        self.registry = CollectorRegistry()
        self._gauge(
            "llm_stream_generations_running",
            "Sequences in the batch right now, over all models: the batch size "
            "(at most --max-concurrent per model).",
            lambda: engine.active,
        )
        self._gauge(
            "llm_stream_generations_waiting",
            "Requests queued for a batch row: the queue depth.",
            lambda: engine.waiting,
        )
        self._gauge(
            "llm_stream_requests_in_flight",
            "Running plus waiting generations: the per-pod load to autoscale on.",
            lambda: engine.in_flight,
        )
        self._gauge(
            "llm_stream_ready",
            "1 while health reports SERVING (warmed up, not draining).",
            lambda: 1 if health.serving else 0,
        )
        self._generations = Counter(
            "llm_stream_generations",
            "Generations finished, by model and finish reason ('error' for failures).",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self._tokens = Counter(
            "llm_stream_generated_tokens",
            "Tokens generated, by model.",
            ["model"],
            registry=self.registry,
        )
        self._prompt_tokens = Counter(
            "llm_stream_prompt_tokens",
            "Prompt tokens of generations that got their first token, by model and source: "
            "'cached' (the prefix cache held their KV: hits), 'computed' (prefilled: misses).",
            ["model", "source"],
            registry=self.registry,
        )
        self._first_token = Histogram(
            "llm_stream_time_to_first_token_seconds",
            "From a request's admission to its first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._inter_token = Histogram(
            "llm_stream_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence (one batch step, mostly).",
            ["model"],
            buckets=_INTER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self._batch_rows = Histogram(
            "llm_stream_batch_rows",
            "Sequences in the batch at each scheduler step that produced tokens.",
            ["model"],
            buckets=_BATCH_ROW_BUCKETS,
            registry=self.registry,
        )
        self._duration = Histogram(
            "llm_stream_generation_duration_seconds",
            "Wall time of a generation from admission to its last token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._rejected = Counter(
            "llm_stream_rejected_requests",
            "Requests that ended with an error status, by gRPC code.",
            ["code"],
            registry=self.registry,
        )
        engine.finish_listeners.append(self.observe)
        engine.timing_listeners.append(self.observe_step)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from the server at scrape time."""
        Gauge(name, text, registry=self.registry).set_function(read)

    def observe(self, record: FinishedGeneration) -> None:
        reason = record.finish_reason.value if record.finish_reason else "error"
        self._generations.labels(record.model_id, reason).inc()
        self._tokens.labels(record.model_id).inc(record.completion_tokens)
        self._duration.labels(record.model_id).observe(record.duration_s)
        if record.first_token_s is not None:  # its prompt was fed whole
            cached = record.cached_prompt_tokens
            self._prompt_tokens.labels(record.model_id, "cached").inc(cached)
            self._prompt_tokens.labels(record.model_id, "computed").inc(
                record.prompt_tokens - cached
            )

    def observe_step(self, timing: StepTiming) -> None:
        self._batch_rows.labels(timing.model_id).observe(timing.batch_rows)
        first_token = self._first_token.labels(timing.model_id)
        for seconds in timing.first_token_s:
            first_token.observe(seconds)
        inter_token = self._inter_token.labels(timing.model_id)
        for seconds in timing.inter_token_s:
            inter_token.observe(seconds)

    def rejected(self, code_name: str) -> None:
        self._rejected.labels(code_name).inc()

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        address = host.strip("[]") or "::"
        self._http, self._thread = start_http_server(port, addr=address, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
