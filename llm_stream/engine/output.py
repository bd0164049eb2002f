"""Text for the token ids of one model's batch, made on a thread of its own.

The scheduler thread hands each step's token ids over as values
(:class:`~llm_stream.engine.scheduler.StepOutput`) and goes on stepping; this
stage turns them into text events with each stream's
:class:`~llm_stream.engine.types.TextAssembler` (detokenisation, stop
sequences), ends streams whose text is complete, asks the scheduler to free the
rows of streams that matched a stop sequence, and publishes each step's events
to the event loop in one call. So the step thread of a GPU model does device
work only, and the event loop only routes ready-made events to their streams.
A CPU model's step thread makes the text itself, between forwards
(:meth:`OutputStage.publish_now`): there the device is the CPU, and a second
busy thread only takes cores from the forward.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llm_stream.engine.scheduler import StepOutput
from llm_stream.engine.sequence import Sequence
from llm_stream.engine.types import (
    FinishReason,
    PreparedRequest,
    StreamEnd,
    TextAssembler,
    TokenEvent,
)
from llm_stream.logging_setup import request_id_var

log = logging.getLogger(__name__)

Event = TokenEvent | StreamEnd | BaseException


@dataclass(frozen=True)
class FinishedGeneration:
    """What a sequence did, recorded when its stream ends (for logs, metrics, tests)."""

    request_id: str
    model_id: str
    finish_reason: FinishReason | None
    completion_tokens: int
    duration_s: float
    error: str | None = None
    prompt_tokens: int = 0
    # Prompt tokens whose KV came from the prefix cache.
    cached_prompt_tokens: int = 0
    # Seconds from submission to the first token (None when there was none).
    first_token_s: float | None = None
    # Scheduler steps between the cancel and the freed row (None when not cancelled).
    steps_after_cancel: int | None = None


@dataclass(eq=False)
class StreamState:
    """One generation as the text side sees it."""

    sequence: Sequence
    assembler: TextAssembler
    first_token_s: float | None = None
    # Its last event (a StreamEnd or an error) has been published.
    ended: bool = False

    @property
    def prepared(self) -> PreparedRequest:
        return self.sequence.prepared


@dataclass
class PublishedStep:
    """One step's events, ready for the event loop."""

    model_id: str
    # Sequences in the batch and waiting, and steps run, when the step was published.
    batch_rows: int
    waiting: int = 0
    steps: int = 0
    events: list[tuple[int, list[Event]]] = field(default_factory=list)
    # Keys the scheduler is done with (their last output was in this step).
    forgotten: list[int] = field(default_factory=list)
    finished: list[FinishedGeneration] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    inter_token_s: list[float] = field(default_factory=list)


class OutputStage:
    def __init__(
        self,
        model_id: str,
        publish: Callable[[PublishedStep], None],
        release: Callable[[Sequence], None],
        counters: Callable[[], tuple[int, int, int]],
    ) -> None:
        """``counters``: the scheduler's (running, waiting, steps), read at each publish."""
        self.model_id = model_id
        self._publish = publish
        self._release = release
        self._counters = counters
        self._streams: dict[int, StreamState] = {}
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[list[StepOutput] | None] = queue.SimpleQueue()

    # -- any thread --------------------------------------------------------------

    def register(self, state: StreamState) -> None:
        """Before its sequence is submitted: the stream whose outputs will arrive."""
        with self._lock:
            self._streams[state.sequence.key] = state

    def forget(self, key: int) -> None:
        """A stream whose sequence was never submitted."""
        with self._lock:
            self._streams.pop(key, None)

    def put(self, outputs: list[StepOutput]) -> None:
        """The scheduler's hand-over: queued, never blocks it."""
        self._inbox.put(outputs)

    def publish_now(self, outputs: list[StepOutput]) -> None:
        """The hand-over of a runner that computes on the host (the CPU): text is made
        at once on the step thread, between two forwards, rather than on a thread
        of its own that would preempt the forward's OpenMP workers (15% fewer tokens
        a second at 8 streams on 2 cores). The text thread publishes through it too."""
        try:
            self._publish(self.process(outputs))
        except Exception:  # a bug here must not leave every stream hanging
            log.exception("publishing a step's outputs of %s failed", self.model_id)

    def close(self) -> None:
        """Let the thread end once everything queued before is published."""
        self._inbox.put(None)

    # -- the output thread ------------------------------------------------------------

    def run(self) -> None:
        while True:
            outputs = self._inbox.get()
            if outputs is None:
                return
            # Whatever else has queued up meanwhile goes out with it, in order.
            more: list[StepOutput] = []
            stop = False
            while not self._inbox.empty():
                extra = self._inbox.get()
                if extra is None:
                    stop = True
                    break
                more.extend(extra)
            self.publish_now(outputs + more)
            if stop:
                return

    def process(self, outputs: list[StepOutput]) -> PublishedStep:
        """Turn one step's token ids into stream events (any thread, one at a time)."""
        step = PublishedStep(self.model_id, *self._counters())
        for output in outputs:
            with self._lock:
                state = self._streams.get(output.key)
                if output.finished:  # the scheduler sends nothing more for it
                    self._streams.pop(output.key, None)
                    step.forgotten.append(output.key)
            if state is None:
                continue
            if output.first_token_s is not None:
                step.first_token_s.append(output.first_token_s)
                state.first_token_s = output.first_token_s
            step.inter_token_s.extend(output.inter_token_s)
            if state.ended:
                continue
            events = self._text_events(state, output, step)
            if events:
                step.events.append((output.key, events))
        return step

    def _text_events(
        self, state: StreamState, output: StepOutput, step: PublishedStep
    ) -> list[Event]:
        events: list[Event] = []
        assembler = state.assembler
        for token in output.token_ids:
            index = assembler.count
            try:
                text = assembler.add(token)
            except Exception as exc:  # this stream's text failed: it ends, the batch goes on
                log.exception(
                    "turning token %d into text failed for %s", token, state.sequence.request_id
                )
                events.append(exc)
                self._end(state, step, output, error=exc)
                return events
            events.append(TokenEvent(index=index, text=text, token_id=token))
            if assembler.done:
                assert assembler.finish_reason is not None
                events.append(self._stream_end(state, assembler.finish_reason))
                self._end(state, step, output, reason=assembler.finish_reason)
                return events
        if output.finished:
            if output.error is not None:
                events.append(output.error)
            else:
                reason = output.finish_reason or FinishReason.CANCELLED
                events.append(self._stream_end(state, reason))
            self._end(state, step, output, reason=output.finish_reason, error=output.error)
        return events

    def _stream_end(self, state: StreamState, reason: FinishReason) -> StreamEnd:
        return StreamEnd(
            reason,
            len(state.prepared.prompt_ids),
            state.assembler.count,
            state.sequence.cached_tokens,
        )

    def _end(
        self,
        state: StreamState,
        step: PublishedStep,
        output: StepOutput,
        *,
        reason: FinishReason | None = None,
        error: BaseException | None = None,
    ) -> None:
        state.ended = True
        if not output.finished:
            # Its text is complete before its row is (a stop sequence): free the row.
            self._release(state.sequence)
        if error is None and reason is None:
            reason = FinishReason.CANCELLED
        record = FinishedGeneration(
            request_id=state.sequence.request_id,
            model_id=self.model_id,
            finish_reason=reason if error is None else None,
            completion_tokens=state.assembler.count,
            duration_s=time.monotonic() - state.sequence.submitted_at,
            error=None if error is None else repr(error),
            prompt_tokens=len(state.prepared.prompt_ids),
            cached_prompt_tokens=state.sequence.cached_tokens,
            first_token_s=state.first_token_s,
            steps_after_cancel=output.steps_after_cancel,
        )
        step.finished.append(record)
        client = state.prepared.request.client
        # This runs on the engine's thread (or process): the request's id comes with it.
        context = request_id_var.set(record.request_id)
        try:
            self._log_end(record, client)
        finally:
            request_id_var.reset(context)

    @staticmethod
    def _log_end(record: FinishedGeneration, client: str) -> None:
        log.info(
            "generation %s ended: reason=%s prompt=%d (cached %d) tokens=%d in %.2f s "
            "(%.1f tokens/s, first after %s)%s%s",
            record.request_id,
            record.finish_reason.value if record.finish_reason else "error",
            record.prompt_tokens,
            record.cached_prompt_tokens,
            record.completion_tokens,
            record.duration_s,
            record.completion_tokens / record.duration_s if record.duration_s > 0 else 0.0,
            "-" if record.first_token_s is None else f"{record.first_token_s * 1000:.0f} ms",
            f" error={record.error}" if record.error else "",
            f" client={client}" if client else "",
        )
