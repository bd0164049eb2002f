"""Iteration-level ("continuous") batching for one model, in plain Python.

One scheduler per loaded model owns the running batch and runs on its own
thread. Each step it writes a :class:`~llm_stream.engine.types.StepPlan`:

1. rows whose stream was cancelled, whose text side is done (a stop sequence),
   or whose every token is already planned leave the batch;
2. waiting sequences are admitted while a row is free and the runner's cache
   budget (:class:`~llm_stream.engine.types.CacheBudget`) takes them; the
   runner says how much of each prompt its prefix cache holds, and that
   sequence's prefill starts after it;
3. every decoding row gets one more token;
4. prompt work is fed within a budget (``prefill_chunk`` tokens while as many
   rows decode as wait, more while more wait, never more than
   ``max_prefill_tokens``), so a burst of arrivals never freezes running streams
   for long; a longer prompt is split into chunks. A completed prompt's first
   token comes from this step; the sequence decodes from the next one on.

The runner carries a plan out, on a GPU without waiting for it: while the
device computes step N the scheduler plans and launches step N+1, then
collects step N's tokens (``StepRunner.pipeline_depth``). A row that ends on
an end-of-sequence token thus computes one token too many, which is dropped.
The depth is read after every launch: a runner drops it to 0 while its next
step needs this one's tokens on the host (a guided row's grammar mask).
Token ids go out as plain values, once per step; text is made elsewhere.

No torch here: the model's runner does the tensor work, so the scheduling rules
are unit-tested with a fake runner.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llm_stream.engine.sequence import Phase, Sequence
from llm_stream.engine.types import (
    FinishReason,
    PrefillChunk,
    StepPlan,
    StepRunner,
    StepTokens,
)
from llm_stream.errors import InvalidRequestError, OverloadedError, UnavailableError

log = logging.getLogger(__name__)

# Tokens after which a decoding row's steady pace is protected from prompt work.
_ESTABLISHED_TOKENS = 8


@dataclass(frozen=True)
class BatchLimits:
    # Sequences in the batch at once (prefilling or decoding).
    max_rows: int = 64
    # Sequences allowed to wait beyond the free rows; past it RESOURCE_EXHAUSTED.
    max_queue: int = 256
    # Prompt tokens fed per step while other rows decode.
    prefill_chunk: int = 64
    # Prompt tokens fed in one step at most, even with nobody decoding: bounds the
    # activation memory of a prefill (and a cold start's first step).
    max_prefill_tokens: int = 8192


@dataclass
class StepOutput:
    """What one sequence got from one step, as plain values."""

    key: int
    token_ids: list[int] = field(default_factory=list)
    # Seconds from submission to the first token, when this step produced it.
    first_token_s: float | None = None
    # Seconds since the sequence's previous token, for each later token of this step.
    inter_token_s: list[float] = field(default_factory=list)
    # Whether the sequence ended here, and how: a reason, or an error.
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    # Scheduler steps between a cancel and the freed row (None when not cancelled).
    steps_after_cancel: int | None = None


Deliver = Callable[[list[StepOutput]], None]


class Scheduler:
    def __init__(self, runner: StepRunner, limits: BatchLimits, deliver: Deliver) -> None:
        self._runner = runner
        self._budget = runner.budget
        self._limits = limits
        self._deliver = deliver
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        # Admitted sequences, until they have finished and hold no row.
        self._running: list[Sequence] = []
        self._by_key: dict[int, Sequence] = {}
        self._in_flight: collections.deque[StepPlan] = collections.deque()
        self._closed = False
        # Outputs gathered since the last hand-over.
        self._pending: dict[int, StepOutput] = {}
        self.steps = 0

    # -- any thread ------------------------------------------------------------

    @property
    def running(self) -> int:
        """Sequences in the batch (prefilling or decoding)."""
        return sum(not s.finished for s in self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, *sequences: Sequence) -> None:
        """Queue prepared sequences, all or none; refused at once when they cannot be served."""
        for sequence in sequences:
            self.check_budget(sequence)
        with self._cond:
            if self._closed:
                raise UnavailableError("this server is shutting down; retry on another replica")
            free_rows = max(0, self._limits.max_rows - self._rows_held())
            if len(self._waiting) + len(sequences) > self._limits.max_queue + free_rows:
                raise OverloadedError(
                    f"server busy: {self.running} sequences in the batch and "
                    f"{len(self._waiting)} waiting (the configured limits); "
                    "retry later with backoff"
                )
            self._waiting.extend(sequences)
            self._cond.notify()

    def check_budget(self, sequence: Sequence) -> None:
        """InvalidRequestError for a sequence that could never fit the batch, even alone."""
        cost = sequence.prepared.token_cost
        most = self._budget.max_sequence_tokens
        if cost > most:
            raise InvalidRequestError(
                f"prompt ({sequence.prompt_length} tokens) plus max_tokens "
                f"({sequence.prepared.max_new_tokens}) is {cost} tokens, more than the "
                f"{most} one sequence may hold on this server ({self._budget.limit_hint}); "
                "ask for fewer tokens or shorten the prompt"
            )

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence: a waiting one leaves now, a running one before the next step."""
        with self._cond:
            if sequence.finished or sequence.cancel_requested:
                return
            sequence.cancel_requested = True
            sequence.cancel_step = self.steps
            if sequence.phase is not Phase.WAITING:
                self._cond.notify()
                return
            self._waiting.remove(sequence)
            sequence.finish(FinishReason.CANCELLED)
            sequence.freed_step = self.steps
        # Called on the event loop's thread: handed over directly, not with a step's outputs.
        self._deliver(
            [StepOutput(sequence.key, finished=True, finish_reason=FinishReason.CANCELLED)]
        )

    def release(self, sequence: Sequence) -> None:
        """The text side is done with ``sequence`` (a stop sequence matched): free its row."""
        with self._cond:
            if sequence.finished:
                return
            sequence.release_requested = True
            self._cond.notify()

    def cancel_all(self) -> None:
        with self._cond:
            everyone = list(self._waiting) + [s for s in self._running if not s.finished]
        for sequence in everyone:
            self.cancel(sequence)

    def close(self) -> None:
        """Refuse new work, cancel everything, and let the thread end after its current step."""
        with self._cond:
            self._closed = True  # first, so that nothing is queued after the cancel below
            self._cond.notify()
        self.cancel_all()

    # -- the scheduler thread ------------------------------------------------

    def run(self) -> None:
        """The thread's body: step while there is work, sleep while there is none.

        A step that fails in an unexpected place ends the sequences in the batch
        (their clients get an error) and the loop goes on with a fresh batch: the
        thread never dies with streams left waiting on it.
        """
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._running or self._in_flight):
                    self._cond.wait()
                if self._closed and not self._running and not self._in_flight:
                    return
            try:
                self.step()
            except Exception as exc:
                log.exception(
                    "scheduler step failed; ending the %d sequences in the batch", self.running
                )
                self._lose_batch(exc)

    def step(self) -> None:
        """Plan and launch one step; collect the steps the runner need not keep in flight."""
        with self._cond:
            self.steps += 1
            plan = self._plan()
        if plan.computes or plan.remove:
            try:
                self._runner.launch(plan)
            except Exception as exc:
                log.exception("a step failed; ending the %d sequences in the batch", self.running)
                self._lose_batch(exc)
                return
            self._in_flight.append(plan)
        # Read after the launch: the rows it added may need their tokens collected now.
        depth = self._runner.pipeline_depth if plan.computes else 0
        while len(self._in_flight) > depth:
            self._collect()
        self._hand_over()

    def _collect(self) -> None:
        plan = self._in_flight.popleft()
        started = time.monotonic()
        try:
            result = self._runner.collect()
        except Exception as exc:
            log.exception("a step failed; ending the %d sequences in the batch", self.running)
            self._lose_batch(exc)
            return
        self._accept(result)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step %d: %d rows, %d waiting; %d tokens, prefill %d tokens of %d sequences; "
                "waited %.1f ms for the device",
                plan.step,
                self.running,
                self.waiting,
                len(result.tokens),
                sum(c.end - c.start for c in plan.prefill),
                len(plan.prefill),
                (time.monotonic() - started) * 1000,
            )

    def _accept(self, result: StepTokens) -> None:
        now = time.monotonic()
        for key, exc in result.failed:
            failed = self._by_key.get(key)
            if failed is not None and not failed.finished:
                log.error("prefill failed for %s: %r", failed.request_id, exc)
                self._fail([failed], exc)
        for key, token in result.tokens:
            sequence = self._by_key.get(key)
            if sequence is None or sequence.finished:
                continue  # computed while its end was not known yet: dropped
            output = self._output(sequence)
            previous = sequence.last_token_at
            sequence.accept(token, now)
            output.token_ids.append(token)
            if previous is None:
                output.first_token_s = now - sequence.submitted_at
            else:
                output.inter_token_s.append(now - previous)
            if sequence.finished:
                self._mark_finished(sequence)

    # -- planning (under the lock) ----------------------------------------------

    def _plan(self) -> StepPlan:
        remove = self._free_rows()
        self._admit()
        decoding = [s for s in self._running if s.holds_row and s.phase is Phase.DECODING]
        established = sum(s.scheduled >= _ESTABLISHED_TOKENS for s in decoding)
        for sequence in decoding:
            sequence.scheduled += 1
        chunks = self._plan_prefill(established)
        for chunk in chunks:
            sequence = self._by_key[chunk.key]
            sequence.prefilled = chunk.end
            if chunk.completes_prompt:
                sequence.phase = Phase.DECODING
                sequence.scheduled = 1
        return StepPlan(self.steps, tuple(remove), bool(decoding), tuple(chunks), established)

    def _free_rows(self) -> list[int]:
        """End cancelled and released sequences; free rows with nothing left to compute."""
        remove: list[int] = []
        for sequence in self._running:
            if not sequence.finished:
                if sequence.cancel_requested:
                    sequence.finish(FinishReason.CANCELLED)
                    self._mark_finished(sequence)
                elif sequence.release_requested:
                    sequence.finish(None)
                    self._mark_finished(sequence)
            done = sequence.finished or (
                sequence.phase is Phase.DECODING and sequence.fully_scheduled
            )
            if sequence.holds_row and done:
                remove.append(sequence.key)
                sequence.holds_row = False
                sequence.freed_step = self.steps
                if sequence.cancel_step is not None and sequence.finished:
                    self._output(sequence).steps_after_cancel = self.steps - sequence.cancel_step
        kept = []
        for sequence in self._running:
            if sequence.finished and not sequence.holds_row:
                self._by_key.pop(sequence.key, None)
            else:
                kept.append(sequence)
        self._running = kept
        return remove

    def _rows_held(self) -> int:
        return sum(s.holds_row for s in self._running)

    def _admit(self) -> None:
        """Oldest first, while a row is free and the runner's budget takes it."""
        costs = [s.prepared.token_cost for s in self._running if s.holds_row]
        while self._waiting and len(costs) < self._limits.max_rows:
            candidate = self._waiting[0]
            cost = candidate.prepared.token_cost
            if not self._budget.admits(costs, cost):
                break
            self._waiting.popleft()
            candidate.phase = Phase.PREFILLING
            candidate.holds_row = True
            self._running.append(candidate)
            self._by_key[candidate.key] = candidate
            costs.append(cost)
            cached = self._runner.reuse_prefix(candidate.key, candidate.prepared)
            candidate.cached_tokens = candidate.prefilled = min(cached, candidate.prompt_length - 1)

    def _plan_prefill(self, established: int) -> list[PrefillChunk]:
        """Prompt work for this step, within the prefill budget, oldest first.

        Prompt work stalls every decoding row for this step, and serves every
        sequence waiting for its first token; the budget weighs the two: at
        least ``prefill_chunk`` tokens, times how many sequences wait per
        established decoding one. A row counts as established once it has
        given ``_ESTABLISHED_TOKENS`` tokens: before that it belongs to the same
        wave of arrivals as those still waiting (a cold start whose requests
        reached the scheduler a few milliseconds apart). So a burst onto a busy
        batch is fed a chunk a step, and a cold start is fed at once (up to
        ``max_prefill_tokens``). A prompt that fits the budget is fed whole
        (with others, as one padded batch); a prompt longer than a chunk is
        split into chunks; a shorter one waits for a step with room for it.
        """
        prefilling = sum(s.phase is Phase.PREFILLING for s in self._running if s.holds_row)
        cap = self._limits.max_prefill_tokens
        budget = cap
        if established:
            budget = min(cap, self._limits.prefill_chunk * max(1, prefilling // established))
        chunks: list[PrefillChunk] = []
        for sequence in self._running:
            if sequence.phase is not Phase.PREFILLING or not sequence.holds_row:
                continue
            if budget <= 0:
                break
            remaining = sequence.prompt_length - sequence.prefilled
            if remaining <= budget:
                take = remaining
            elif sequence.prefilled or sequence.prompt_length > self._limits.prefill_chunk:
                take = budget  # only prompts longer than a chunk are split
            else:
                break  # a short prompt waits for a step with room for all of it
            chunks.append(
                PrefillChunk(
                    sequence.key, sequence.prepared, sequence.prefilled, sequence.prefilled + take
                )
            )
            budget -= take
        return chunks

    # -- outputs and failures ------------------------------------------------------

    def _output(self, sequence: Sequence) -> StepOutput:
        """This step's output of ``sequence``, created on first use."""
        output = self._pending.get(sequence.key)
        if output is None:
            output = self._pending[sequence.key] = StepOutput(sequence.key)
        return output

    def _mark_finished(self, sequence: Sequence) -> None:
        output = self._output(sequence)
        output.finished = True
        output.finish_reason = sequence.finish_reason
        output.error = sequence.error

    def _hand_over(self) -> None:
        """Send the outputs gathered since the last hand-over on, in one call."""
        outputs, self._pending = list(self._pending.values()), {}
        if outputs:
            self._deliver(outputs)

    def _fail(self, sequences: Iterable[Sequence], exc: BaseException) -> None:
        """End these sequences with ``exc``; the runner holds nothing of them any more."""
        for sequence in sequences:
            if not sequence.finished:
                sequence.finish(None, exc)
                self._mark_finished(sequence)
            if sequence.holds_row:
                sequence.holds_row = False
                sequence.freed_step = self.steps

    def _lose_batch(self, exc: BaseException) -> None:
        """The batch is gone: every admitted sequence fails, the runner starts afresh."""
        self._in_flight.clear()
        try:
            self._runner.reset()
        finally:
            with self._cond:
                self._fail(list(self._running), exc)
                self._running = []
                self._by_key.clear()
            self._hand_over()
