"""The engine: requests in, async streams of token events out, one batch per model.

A request is prepared first (chat template, tokenizer, context check) on its
model core's small thread pool, so a bad request fails before it holds
anything. It then becomes a :class:`Sequence` in its model's :class:`Scheduler`,
whose thread runs the continuous batch, and a stream in the model's
:class:`OutputStage`, whose thread turns each step's token ids into text. That
stage hands each step's events to the event loop in one call; they land in the
stream's own queue, which never blocks the batch: a slow reader's events wait
there (a stream holds at most ``max_tokens`` small events), and its row goes on
decoding. Leaving the stream for any reason (cancel, disconnect, deadline,
drain) cancels the sequence, and its row is freed before the next decode step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable
from collections.abc import Sequence as Items
from contextlib import aclosing
from dataclasses import dataclass, field
from enum import Enum

from llm_stream.engine.core import CoreStarter, LocalCore, ModelCore
from llm_stream.engine.output import Event, FinishedGeneration, PublishedStep
from llm_stream.engine.scheduler import BatchLimits
from llm_stream.engine.sequence import new_key
from llm_stream.engine.types import (
    Completion,
    GenerationRequest,
    ModelBackend,
    ModelInfo,
    SamplingParams,
    StreamEnd,
    TokenEvent,
)
from llm_stream.errors import ModelNotFoundError, UnavailableError, quoted_input

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineState", "FinishedGeneration", "StepTiming"]


class EngineState(Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True)
class StepTiming:
    """Latencies observed in one scheduler step of one model (for metrics)."""

    model_id: str
    batch_rows: int
    first_token_s: list[float] = field(default_factory=list)
    inter_token_s: list[float] = field(default_factory=list)


@dataclass(eq=False)
class _Model:
    info: ModelInfo
    core: ModelCore


@dataclass(eq=False)
class _Stream:
    """A submitted generation, as the event loop holds it."""

    model: _Model
    key: int
    outbox: asyncio.Queue[list[Event]]


class Engine:
    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._models: dict[str, _Model] = {}
        self._outboxes: dict[int, asyncio.Queue[list[Event]]] = {}
        self.default_model_id = ""
        self.state = EngineState.STARTING
        self.finished: collections.deque[FinishedGeneration] = collections.deque(maxlen=1000)
        self._finish_waiters: dict[str, list[asyncio.Future[FinishedGeneration]]] = {}
        # Called on the event loop: with each FinishedGeneration, and with each step's timings.
        self.finish_listeners: list[Callable[[FinishedGeneration], None]] = []
        self.timing_listeners: list[Callable[[StepTiming], None]] = []
        # Called on the event loop when a model's core dies (its process exited).
        self.lost_listeners: list[Callable[[str], None]] = []

    # -- registry ------------------------------------------------------------

    def add_backend(self, backend: ModelBackend | CoreStarter, default: bool = False) -> None:
        """Serve this model: its core starts now (in this process for a loaded backend).

        Call on the event loop.
        """
        loop = asyncio.get_running_loop()

        def publish(step: PublishedStep) -> None:
            try:
                loop.call_soon_threadsafe(self._on_published, step)
            except RuntimeError:  # the loop is gone (shutdown): keep the records only
                self.finished.extend(step.finished)

        core: ModelCore

        def lost(reason: str) -> None:
            loop.call_soon_threadsafe(self._on_core_lost, reason)

        if isinstance(backend, CoreStarter):
            core = backend.start_core(publish, lost)
        else:
            core = LocalCore(backend, self.limits, publish)
        model_id = core.info.model_id
        self._models[model_id] = _Model(core.info, core)
        if default or not self.default_model_id:
            self.default_model_id = model_id

    @property
    def backends(self) -> dict[str, ModelInfo]:
        return {model_id: m.info for model_id, m in self._models.items()}

    def backend_for(self, model_id: str) -> ModelInfo:
        return self._model(model_id).info

    def _model(self, model_id: str) -> _Model:
        model = self._models.get(model_id or self.default_model_id)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none loaded yet"
            raise ModelNotFoundError(
                f"unknown model_id {quoted_input(model_id)}; this server serves: {known}"
            )
        return model

    @property
    def active(self) -> int:
        """Sequences in a batch (prefilling or decoding), over all models."""
        return sum(m.core.running for m in self._models.values())

    @property
    def waiting(self) -> int:
        """Sequences queued for a batch row."""
        return sum(m.core.waiting for m in self._models.values())

    @property
    def in_flight(self) -> int:
        return self.active + self.waiting

    @property
    def steps(self) -> int:
        """Scheduler steps run so far, over all models."""
        return sum(m.core.steps for m in self._models.values())

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
        (stream,) = await self._admit(self._model(request.model_id), [request])
        if isinstance(stream, Exception):
            raise stream
        # Closed with this generator, so that leaving early cancels at once.
        async with aclosing(self._events(stream)) as events:
            async for event in events:
                yield event

    async def complete(self, request: GenerationRequest) -> Completion:
        self.check_accepting()
        return await self._complete(request)

    async def batch(
        self, items: Items[GenerationRequest | Exception]
    ) -> list[Completion | Exception]:
        """Every item a sequence of the same batch; an item's own error stays its result.

        Items are admitted together so they share their prefill; if the server
        cannot take them all, none runs (RESOURCE_EXHAUSTED).
        """
        self.check_accepting()
        started = time.monotonic()
        results: list[Completion | Exception] = []
        groups: dict[str, tuple[_Model, list[tuple[int, GenerationRequest]]]] = {}
        for index, item in enumerate(items):
            results.append(UnavailableError("not run"))  # replaced below
            if isinstance(item, Exception):
                results[index] = item
                continue
            try:
                model = self._model(item.model_id)
            except ModelNotFoundError as exc:
                results[index] = exc
                continue
            groups.setdefault(model.info.model_id, (model, []))[1].append((index, item))
        runs: list[tuple[int, asyncio.Task[Completion]]] = []
        admitted: list[_Stream] = []
        try:
            for model, group in groups.values():
                streams = await self._admit(model, [item for _, item in group])
                for (index, _), stream in zip(group, streams, strict=True):
                    if isinstance(stream, Exception):
                        results[index] = stream
                        continue
                    admitted.append(stream)
                    runs.append((index, asyncio.create_task(self._collect(stream))))
            for index, run in runs:
                try:
                    results[index] = await run
                except Exception as exc:
                    results[index] = exc
        except BaseException:  # refused for overload, or the client left: none goes on
            for _, run in runs:
                run.cancel()
            for stream in admitted:
                stream.model.core.cancel(stream.key)
                self._outboxes.pop(stream.key, None)  # a task cancelled unstarted
            raise
        latency_ms = (time.monotonic() - started) * 1000
        for index, result in enumerate(results):
            if isinstance(result, Completion):
                results[index] = dataclasses.replace(result, latency_ms=latency_ms)
        return results

    async def warm_up(self, tokens: int) -> None:
        """One short generation per model, through the same path requests take."""
        for model_id in self._models:
            request = GenerationRequest(
                request_id=f"warmup-{model_id}",
                model_id=model_id,
                prompt="Hello",
                sampling=SamplingParams(max_tokens=tokens),
            )
            started = time.monotonic()
            completion = await self._complete(request)
            log.info(
                "warm-up of %s generated %d tokens in %.2f s",
                model_id,
                completion.completion_tokens,
                time.monotonic() - started,
            )

    # -- the path every request takes -----------------------------------------

    async def _complete(self, request: GenerationRequest) -> Completion:
        (stream,) = await self._admit(self._model(request.model_id), [request])
        if isinstance(stream, Exception):
            raise stream
        return await self._collect(stream)

    async def _admit(
        self, model: _Model, requests: Items[GenerationRequest]
    ) -> list[_Stream | Exception]:
        """Prepare and queue ``requests`` together; each gets its stream or its own error.

        Outboxes exist before the core can publish to them.
        """
        streams = [_Stream(model, new_key(), asyncio.Queue()) for _ in requests]
        for stream in streams:
            self._outboxes[stream.key] = stream.outbox
        try:
            admitted = await model.core.admit(
                [(stream.key, request) for stream, request in zip(streams, requests, strict=True)]
            )
        except BaseException:
            for stream in streams:
                self._outboxes.pop(stream.key, None)
            raise
        results: list[_Stream | Exception] = []
        for stream, error in zip(streams, admitted, strict=True):
            if error is not None:
                self._outboxes.pop(stream.key, None)
                results.append(error)
            else:
                results.append(stream)
        return results

    async def _events(self, stream: _Stream) -> AsyncGenerator[TokenEvent | StreamEnd, None]:
        ended = False
        try:
            while not ended:
                for event in await stream.outbox.get():
                    if isinstance(event, BaseException):
                        ended = True
                        raise event
                    yield event
                    if isinstance(event, StreamEnd):
                        ended = True
                        break
        finally:
            if not ended:
                stream.model.core.cancel(stream.key)
            self._outboxes.pop(stream.key, None)

    async def _collect(self, stream: _Stream) -> Completion:
        started = time.monotonic()
        parts: list[str] = []
        end: StreamEnd | None = None
        async with aclosing(self._events(stream)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                else:
                    end = event
        assert end is not None  # _events always ends with a StreamEnd or raises
        return Completion(
            text="".join(parts),
            finish_reason=end.finish_reason,
            prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
            cached_prompt_tokens=end.cached_prompt_tokens,
            model_version=stream.model.info.version,
            latency_ms=(time.monotonic() - started) * 1000,
        )

    # -- output threads -> event loop ----------------------------------------

    def _on_published(self, step: PublishedStep) -> None:
        for key, events in step.events:
            outbox = self._outboxes.get(key)
            if outbox is not None:
                outbox.put_nowait(events)
        for record in step.finished:
            self._on_finished(record)
        timing = StepTiming(step.model_id, step.batch_rows, step.first_token_s, step.inter_token_s)
        for listener in self.timing_listeners:
            listener(timing)

    def _on_core_lost(self, reason: str) -> None:
        for listener in self.lost_listeners:
            listener(reason)

    def _on_finished(self, record: FinishedGeneration) -> None:
        self.finished.append(record)
        for listener in self.finish_listeners:
            listener(record)
        for waiter in self._finish_waiters.pop(record.request_id, []):
            if not waiter.done():
                waiter.set_result(record)

    async def wait_finished(self, request_id: str, timeout: float) -> FinishedGeneration:
        """Wait until the stream of ``request_id`` has ended (tests and drain)."""
        for record in self.finished:
            if record.request_id == request_id:
                return record
        waiter: asyncio.Future[FinishedGeneration] = asyncio.get_running_loop().create_future()
        self._finish_waiters.setdefault(request_id, []).append(waiter)
        return await asyncio.wait_for(waiter, timeout)

    # -- lifecycle -----------------------------------------------------------

    def stop_all(self) -> None:
        """Cancel every sequence, waiting or running (drain grace has expired)."""
        for model in self._models.values():
            model.core.cancel_all()

    async def close(self, timeout_s: float = 60.0) -> None:
        """Cancel everything and wait for each model's core to stop."""
        for model in self._models.values():
            await model.core.close(timeout_s)
