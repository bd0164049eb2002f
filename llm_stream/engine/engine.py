"""The per-request streaming engine.

Each generation runs ``generate`` on a worker thread of its own; token events
come back through a bounded channel. Leaving the stream for any reason (client
cancel, disconnect, deadline, drain) sets the request's stop signal, which the
model checks every decode step, so the model is freed, not merely the ``yield``s.
A generation slot is released when the worker actually ends, so admission
counts what the model is really doing.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from llm_stream.engine.admission import AdmissionController, Slot
from llm_stream.engine.channel import ThreadToLoopChannel
from llm_stream.engine.types import (
    Completion,
    FinishReason,
    GenerationBackend,
    GenerationRequest,
    SamplingParams,
    StopSignal,
    StreamEnd,
    TokenEvent,
)
from llm_stream.errors import LLMStreamError, ModelNotFoundError, UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")
StreamItem = TokenEvent | StreamEnd | Exception


class EngineState(Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True)
class EngineLimits:
    max_concurrent: int = 4
    max_queue: int = 32
    stream_buffer: int = 64


@dataclass(frozen=True)
class FinishedGeneration:
    """What a worker did, recorded when it ends (for logs and tests)."""

    request_id: str
    model_id: str
    finish_reason: FinishReason | None
    completion_tokens: int
    duration_s: float
    error: str | None = None
    # Seconds from the worker's start to its first token (None for batch items).
    first_token_s: float | None = None


class Engine:
    def __init__(self, limits: EngineLimits) -> None:
        self._limits = limits
        self._admission = AdmissionController(limits.max_concurrent, limits.max_queue)
        self._executor = ThreadPoolExecutor(
            max_workers=limits.max_concurrent + 1, thread_name_prefix="llm-stream-generate"
        )
        self._backends: dict[str, GenerationBackend] = {}
        self.default_model_id = ""
        self.state = EngineState.STARTING
        self._running: set[StopSignal] = set()
        self.finished: collections.deque[FinishedGeneration] = collections.deque(maxlen=1000)
        self._finish_waiters: dict[str, list[asyncio.Future[FinishedGeneration]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called on the event loop with each FinishedGeneration (e.g. metrics).
        self.finish_listeners: list[Callable[[FinishedGeneration], None]] = []

    # -- registry ------------------------------------------------------------

    def add_backend(self, backend: GenerationBackend, default: bool = False) -> None:
        self._backends[backend.model_id] = backend
        if default or not self.default_model_id:
            self.default_model_id = backend.model_id

    @property
    def backends(self) -> dict[str, GenerationBackend]:
        return dict(self._backends)

    def backend_for(self, model_id: str) -> GenerationBackend:
        key = model_id or self.default_model_id
        backend = self._backends.get(key)
        if backend is None:
            known = ", ".join(sorted(self._backends)) or "none loaded yet"
            raise ModelNotFoundError(f"unknown model_id {model_id!r}; this server serves: {known}")
        return backend

    @property
    def active(self) -> int:
        """Generations holding a slot (their worker is running)."""
        return self._admission.active

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return self._admission.waiting

    @property
    def in_flight(self) -> int:
        return self.active + self.waiting

    def check_accepting(self) -> None:
        if self.state is EngineState.STARTING:
            raise UnavailableError(
                "the model is still loading or warming up; retry when health reports SERVING"
            )
        if self.state is EngineState.DRAINING:
            raise UnavailableError("this server is shutting down; retry on another replica")

    # -- generation ----------------------------------------------------------

    async def stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[TokenEvent | StreamEnd, None]:
        """Token events, then one StreamEnd. Leaving early stops the model."""
        self.check_accepting()
        backend = self.backend_for(request.model_id)
        stop = StopSignal()
        channel: ThreadToLoopChannel[StreamItem] = ThreadToLoopChannel(
            asyncio.get_running_loop(), self._limits.stream_buffer
        )
        slot = await self._admission.acquire()
        self._start(slot, stop, self._stream_worker, backend, request, stop, channel)
        try:
            while True:
                item = await channel.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, StreamEnd):
                    return
        finally:
            stop.set()
            channel.close()

    async def complete(self, request: GenerationRequest) -> Completion:
        started = time.monotonic()
        parts: list[str] = []
        end: StreamEnd | None = None
        async with aclosing(self.stream(request)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                else:
                    end = event
        assert end is not None  # stream() always ends with a StreamEnd or raises
        return Completion(
            text="".join(parts),
            finish_reason=end.finish_reason,
            prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
            # stream() has checked readiness and resolved the model already.
            model_version=self.backend_for(request.model_id).version,
            latency_ms=(time.monotonic() - started) * 1000,
        )

    async def batch(
        self, items: Sequence[GenerationRequest | Exception]
    ) -> list[Completion | Exception]:
        """One padded batch per model; an item's own error stays that item's result."""
        self.check_accepting()
        started = time.monotonic()
        results: list[Completion | Exception] = list(
            item if isinstance(item, Exception) else UnavailableError("not run") for item in items
        )
        groups: dict[str, list[tuple[int, GenerationRequest]]] = {}
        for index, item in enumerate(items):
            if isinstance(item, Exception):
                continue
            try:
                backend = self.backend_for(item.model_id)
            except ModelNotFoundError as exc:
                results[index] = exc
                continue
            groups.setdefault(backend.model_id, []).append((index, item))
        runs = [
            asyncio.ensure_future(self._run_batch(model_id, group))
            for model_id, group in groups.items()
        ]
        try:
            outcomes = await asyncio.gather(*runs)
        except BaseException:
            for run in runs:  # one group refused (overload) or the client left: stop the rest
                run.cancel()
            raise
        latency_ms = (time.monotonic() - started) * 1000
        for group, group_results in zip(groups.values(), outcomes, strict=True):
            for (index, _), result in zip(group, group_results, strict=True):
                if isinstance(result, Completion):
                    results[index] = dataclasses.replace(result, latency_ms=latency_ms)
                else:
                    results[index] = result
        return results

    async def _run_batch(
        self, model_id: str, group: list[tuple[int, GenerationRequest]]
    ) -> list[Completion | Exception]:
        backend = self._backends[model_id]
        stop = StopSignal()
        slot = await self._admission.acquire()
        requests = [request for _, request in group]
        work = self._start(slot, stop, self._batch_worker, backend, requests, stop)
        try:
            return await asyncio.shield(work)
        finally:
            stop.set()

    async def warm_up(self, tokens: int) -> None:
        """One short generation per model, through the same path requests take."""
        loop = asyncio.get_running_loop()
        for backend in self._backends.values():
            request = GenerationRequest(
                request_id=f"warmup-{backend.model_id}",
                model_id=backend.model_id,
                prompt="Hello",
                sampling=SamplingParams(max_tokens=tokens),
            )
            started = time.monotonic()
            end = await loop.run_in_executor(
                self._executor, backend.stream, request, StopSignal(), lambda _event: True
            )
            log.info(
                "warm-up of %s generated %d tokens in %.2f s",
                backend.model_id,
                end.completion_tokens,
                time.monotonic() - started,
            )

    # -- workers -------------------------------------------------------------

    def _start(
        self, slot: Slot, stop: StopSignal, fn: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        loop = self._loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        self._running.add(stop)
        try:
            work = loop.run_in_executor(self._executor, context.run, fn, *args)
        except BaseException:
            self._running.discard(stop)
            slot.release()
            raise

        def done(_: asyncio.Future[T]) -> None:
            self._running.discard(stop)
            slot.release()

        work.add_done_callback(done)
        return work

    def _stream_worker(
        self,
        backend: GenerationBackend,
        request: GenerationRequest,
        stop: StopSignal,
        channel: ThreadToLoopChannel[StreamItem],
    ) -> None:
        started = time.monotonic()
        tokens = 0
        first_token_s: float | None = None

        def emit(event: TokenEvent) -> bool:
            nonlocal tokens, first_token_s
            tokens += 1
            if first_token_s is None:
                first_token_s = time.monotonic() - started
            return channel.put_blocking(event)

        try:
            end = backend.stream(request, stop, emit)
        except LLMStreamError as exc:
            self._record(request, None, tokens, started, error=str(exc))
            channel.put_blocking(exc)
            return
        except Exception as exc:
            log.exception("generation failed for request %s", request.request_id)
            self._record(request, None, tokens, started, error=repr(exc))
            channel.put_blocking(exc)
            return
        self._record(
            request, end.finish_reason, end.completion_tokens, started, first_token_s=first_token_s
        )
        channel.put_blocking(end)

    def _batch_worker(
        self, backend: GenerationBackend, requests: list[GenerationRequest], stop: StopSignal
    ) -> list[Completion | Exception]:
        started = time.monotonic()
        results = backend.generate_batch(requests, stop)
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, Completion):
                self._record(request, result.finish_reason, result.completion_tokens, started)
        return results

    def _record(
        self,
        request: GenerationRequest,
        reason: FinishReason | None,
        tokens: int,
        started: float,
        *,
        error: str | None = None,
        first_token_s: float | None = None,
    ) -> None:
        elapsed = time.monotonic() - started
        record = FinishedGeneration(
            request.request_id,
            request.model_id or self.default_model_id,
            reason,
            tokens,
            elapsed,
            error,
            first_token_s,
        )
        log.info(
            "generation ended: reason=%s tokens=%d in %.2f s (%.1f tokens/s)%s",
            reason.value if reason else "error",
            tokens,
            elapsed,
            tokens / elapsed if elapsed > 0 else 0.0,
            f" error={error}" if error else "",
        )
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("no loop")
            loop.call_soon_threadsafe(self._on_finished, record)
        except RuntimeError:  # the loop is gone (shutdown): keep the record only
            self.finished.append(record)

    def _on_finished(self, record: FinishedGeneration) -> None:
        self.finished.append(record)
        for listener in self.finish_listeners:
            listener(record)
        for waiter in self._finish_waiters.pop(record.request_id, []):
            if not waiter.done():
                waiter.set_result(record)

    async def wait_finished(self, request_id: str, timeout: float) -> FinishedGeneration:
        """Wait until the worker of ``request_id`` has ended (used by tests and drain)."""
        for record in self.finished:
            if record.request_id == request_id:
                return record
        waiter: asyncio.Future[FinishedGeneration] = asyncio.get_running_loop().create_future()
        self._finish_waiters.setdefault(request_id, []).append(waiter)
        return await asyncio.wait_for(waiter, timeout)

    # -- lifecycle -----------------------------------------------------------

    def stop_all(self) -> None:
        """Stop every running generation (drain grace has expired)."""
        for stop in list(self._running):
            stop.set()

    def close(self) -> None:
        self.stop_all()
        self._executor.shutdown(wait=False, cancel_futures=True)
