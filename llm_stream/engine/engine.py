"""The engine: requests in, async streams of token events out, one batch per model.

A request is prepared first (chat template, tokenizer, context check) on a
small thread pool, so a bad request fails before it holds anything. It then
becomes a :class:`Sequence` in its model's :class:`Scheduler`, whose thread runs
the continuous batch. The scheduler hands each step's events to the event loop
in one call; they land in the stream's own queue, which never blocks the batch:
a slow reader's events wait there (a stream holds at most ``max_tokens`` small
events), and its row goes on decoding. Leaving the stream for any reason
(cancel, disconnect, deadline, drain) cancels the sequence, and its row is freed
before the next decode step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from collections.abc import Sequence as Items
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from enum import Enum

from llm_stream.engine.scheduler import BatchLimits, Scheduler, StepOutput
from llm_stream.engine.sequence import Sequence
from llm_stream.engine.types import (
    Completion,
    FinishReason,
    GenerationRequest,
    ModelBackend,
    SamplingParams,
    StreamEnd,
    TokenEvent,
)
from llm_stream.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    UnavailableError,
    quoted_input,
)

log = logging.getLogger(__name__)


class EngineState(Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True)
class FinishedGeneration:
    """What a sequence did, recorded when it leaves the batch (for logs, metrics, tests)."""

    request_id: str
    model_id: str
    finish_reason: FinishReason | None
    completion_tokens: int
    duration_s: float
    error: str | None = None
    # Seconds from submission to the first token (None when there was none).
    first_token_s: float | None = None
    # Scheduler steps between the cancel and the freed row (None when not cancelled).
    steps_after_cancel: int | None = None


@dataclass(frozen=True)
class StepTiming:
    """Latencies observed in one scheduler step of one model (for metrics)."""

    model_id: str
    batch_rows: int
    first_token_s: list[float] = field(default_factory=list)
    inter_token_s: list[float] = field(default_factory=list)


@dataclass(eq=False)
class _Model:
    backend: ModelBackend
    scheduler: Scheduler
    thread: threading.Thread


class Engine:
    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="llm-stream-prepare")
        self._models: dict[str, _Model] = {}
        self._outboxes: dict[int, asyncio.Queue[StepOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.default_model_id = ""
        self.state = EngineState.STARTING
        self.finished: collections.deque[FinishedGeneration] = collections.deque(maxlen=1000)
        self._finish_waiters: dict[str, list[asyncio.Future[FinishedGeneration]]] = {}
        # Called on the event loop: with each FinishedGeneration, and with each step's timings.
        self.finish_listeners: list[Callable[[FinishedGeneration], None]] = []
        self.timing_listeners: list[Callable[[StepTiming], None]] = []

    # -- registry ------------------------------------------------------------

    def add_backend(self, backend: ModelBackend, default: bool = False) -> None:
        """Serve this model: its scheduler thread starts now. Call on the event loop."""
        self._loop = asyncio.get_running_loop()
        model_id = backend.model_id

        def deliver(outputs: list[StepOutput]) -> None:
            self._deliver_threadsafe(model_id, outputs)

        scheduler = Scheduler(backend.new_runner(), self.limits, deliver)
        thread = threading.Thread(
            target=scheduler.run, name=f"llm-stream-batch-{model_id}", daemon=True
        )
        self._models[model_id] = _Model(backend, scheduler, thread)
        thread.start()
        if default or not self.default_model_id:
            self.default_model_id = model_id

    @property
    def backends(self) -> dict[str, ModelBackend]:
        return {model_id: m.backend for model_id, m in self._models.items()}

    def backend_for(self, model_id: str) -> ModelBackend:
        return self._model(model_id).backend

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
        return sum(m.scheduler.running for m in self._models.values())

    @property
    def waiting(self) -> int:
        """Sequences queued for a batch row."""
        return sum(m.scheduler.waiting for m in self._models.values())

    @property
    def in_flight(self) -> int:
        return self.active + self.waiting

    @property
    def steps(self) -> int:
        """Scheduler steps run so far, over all models."""
        return sum(m.scheduler.steps for m in self._models.values())

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
        model, sequence = await self._prepare(request)
        (outbox,) = self._submit(model, sequence)
        # Closed with this generator, so that leaving early cancels at once.
        async with aclosing(self._events(model, sequence, outbox)) as events:
            async for event in events:
                yield event

    async def complete(self, request: GenerationRequest) -> Completion:
        self.check_accepting()
        return await self._complete(request)

    async def batch(
        self, items: Items[GenerationRequest | Exception]
    ) -> list[Completion | Exception]:
        """Every item a sequence of the same batch; an item's own error stays its result.

        Items are prepared, then submitted together so they share their prefill;
        if the server cannot take them all, none runs (RESOURCE_EXHAUSTED).
        """
        self.check_accepting()
        started = time.monotonic()
        prepared = await asyncio.gather(
            *(self._prepare(item) for item in items if not isinstance(item, Exception)),
            return_exceptions=True,
        )
        results: list[Completion | Exception] = []
        accepted: dict[int, tuple[_Model, Sequence]] = {}
        outcomes = iter(prepared)
        for item in items:
            outcome = item if isinstance(item, Exception) else next(outcomes)
            if not isinstance(outcome, BaseException):
                try:  # an item that could never fit is that item's error, not the call's
                    outcome[0].scheduler.check_budget(outcome[1])
                except InvalidRequestError as exc:
                    outcome = exc
            if isinstance(outcome, BaseException):
                results.append(_as_exception(outcome))
            else:
                accepted[len(results)] = outcome
                results.append(UnavailableError("not run"))  # replaced below
        runs: list[tuple[int, asyncio.Task[Completion]]] = []
        submitted: list[tuple[_Model, Sequence]] = []
        try:
            for model, group in _by_model(accepted).items():
                outboxes = self._submit(model, *(sequence for _, sequence in group))
                submitted += [(model, sequence) for _, sequence in group]
                for (index, sequence), outbox in zip(group, outboxes, strict=True):
                    run = asyncio.create_task(self._collect(model, sequence, outbox))
                    runs.append((index, run))
            for index, run in runs:
                try:
                    results[index] = await run
                except Exception as exc:
                    results[index] = exc
        except BaseException:  # refused for overload, or the client left: none goes on
            for _, run in runs:
                run.cancel()
            for model, sequence in submitted:
                model.scheduler.cancel(sequence)
                self._outboxes.pop(sequence.key, None)  # a task cancelled unstarted leaves it
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
        model, sequence = await self._prepare(request)
        (outbox,) = self._submit(model, sequence)
        return await self._collect(model, sequence, outbox)

    async def _prepare(self, request: GenerationRequest) -> tuple[_Model, Sequence]:
        model = self._model(request.model_id)
        backend = model.backend

        def prepare() -> Sequence:
            prepared = backend.prepare(request)
            return Sequence(prepared, backend.text_assembler(prepared))

        loop = asyncio.get_running_loop()
        return model, await loop.run_in_executor(self._prepare_pool, prepare)

    def _submit(self, model: _Model, *sequences: Sequence) -> list[asyncio.Queue[StepOutput]]:
        outboxes: list[asyncio.Queue[StepOutput]] = []
        for sequence in sequences:
            outboxes.append(asyncio.Queue())
            self._outboxes[sequence.key] = outboxes[-1]
        try:
            model.scheduler.submit(*sequences)
        except BaseException:
            for sequence in sequences:
                del self._outboxes[sequence.key]
            raise
        return outboxes

    async def _events(
        self, model: _Model, sequence: Sequence, outbox: asyncio.Queue[StepOutput]
    ) -> AsyncGenerator[TokenEvent | StreamEnd, None]:
        ended = False
        try:
            while not ended:
                output = await outbox.get()
                for event in output.events:
                    yield event
                if output.finished:
                    ended = True
                    if sequence.error is not None:
                        raise sequence.error
                    yield sequence.end_event()
        finally:
            if not ended:
                model.scheduler.cancel(sequence)
            self._outboxes.pop(sequence.key, None)

    async def _collect(
        self, model: _Model, sequence: Sequence, outbox: asyncio.Queue[StepOutput]
    ) -> Completion:
        started = time.monotonic()
        parts: list[str] = []
        end: StreamEnd | None = None
        async with aclosing(self._events(model, sequence, outbox)) as events:
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
            model_version=model.backend.version,
            latency_ms=(time.monotonic() - started) * 1000,
        )

    # -- scheduler thread -> event loop ----------------------------------------

    def _deliver_threadsafe(self, model_id: str, outputs: list[StepOutput]) -> None:
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("no loop")
            loop.call_soon_threadsafe(self._on_outputs, model_id, outputs)
        except RuntimeError:  # the loop is gone (shutdown): keep the records only
            for output in outputs:
                if output.finished:
                    self.finished.append(self._record(model_id, output.sequence))

    def _on_outputs(self, model_id: str, outputs: list[StepOutput]) -> None:
        timing = StepTiming(model_id, self._models[model_id].scheduler.running)
        for output in outputs:
            if output.first_token_s is not None:
                timing.first_token_s.append(output.first_token_s)
            timing.inter_token_s.extend(output.inter_token_s)
            outbox = self._outboxes.get(output.sequence.key)
            if outbox is not None:
                outbox.put_nowait(output)
            if output.finished:
                self._on_finished(self._record(model_id, output.sequence))
        for listener in self.timing_listeners:
            listener(timing)

    def _record(self, model_id: str, sequence: Sequence) -> FinishedGeneration:
        now = time.monotonic()
        steps_after_cancel = None
        if sequence.cancel_step is not None and sequence.freed_step is not None:
            steps_after_cancel = sequence.freed_step - sequence.cancel_step
        record = FinishedGeneration(
            request_id=sequence.request_id,
            model_id=model_id,
            finish_reason=sequence.finish_reason,
            completion_tokens=sequence.assembler.count,
            duration_s=now - sequence.submitted_at,
            error=None if sequence.error is None else repr(sequence.error),
            first_token_s=(
                None
                if sequence.first_token_at is None
                else sequence.first_token_at - sequence.submitted_at
            ),
            steps_after_cancel=steps_after_cancel,
        )
        log.info(
            "generation %s ended: reason=%s tokens=%d in %.2f s (%.1f tokens/s, first after %s)"
            "%s%s",
            record.request_id,
            record.finish_reason.value if record.finish_reason else "error",
            record.completion_tokens,
            record.duration_s,
            record.completion_tokens / record.duration_s if record.duration_s > 0 else 0.0,
            "-" if record.first_token_s is None else f"{record.first_token_s * 1000:.0f} ms",
            f" error={record.error}" if record.error else "",
            f" client={sequence.prepared.request.client}"
            if sequence.prepared.request.client
            else "",
        )
        return record

    def _on_finished(self, record: FinishedGeneration) -> None:
        self.finished.append(record)
        for listener in self.finish_listeners:
            listener(record)
        for waiter in self._finish_waiters.pop(record.request_id, []):
            if not waiter.done():
                waiter.set_result(record)

    async def wait_finished(self, request_id: str, timeout: float) -> FinishedGeneration:
        """Wait until the sequence of ``request_id`` has left its batch (tests and drain)."""
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
            model.scheduler.cancel_all()

    async def close(self, timeout_s: float = 60.0) -> None:
        """Cancel everything and wait for each scheduler thread to finish its step.

        A thread left inside a torch call when the interpreter exits aborts the
        process, so the threads are joined (off the event loop) before it does.
        """
        for model in self._models.values():
            model.scheduler.close()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        loop = asyncio.get_running_loop()
        for model in self._models.values():
            await loop.run_in_executor(None, model.thread.join, timeout_s)
            if model.thread.is_alive():
                log.warning(
                    "the batch of %s did not stop within %.0f s", model.backend.model_id, timeout_s
                )


def _as_exception(outcome: BaseException) -> Exception:
    if isinstance(outcome, Exception):
        return outcome
    raise outcome  # CancelledError and friends are not an item's result


def _by_model(
    accepted: dict[int, tuple[_Model, Sequence]],
) -> dict[_Model, list[tuple[int, Sequence]]]:
    """Accepted items grouped by model, each with its place in the answer."""
    groups: dict[_Model, list[tuple[int, Sequence]]] = {}
    for index, (model, sequence) in accepted.items():
        groups.setdefault(model, []).append((index, sequence))
    return groups
