"""Iteration-level ("continuous") batching for one model, in plain Python.

One scheduler per loaded model owns the running batch and runs on its own
thread. Each step:

1. rows whose stream was cancelled (client gone, deadline, drain) are freed;
2. waiting sequences are admitted while a row and the token budget allow;
3. prompt work is fed within a budget (``prefill_chunk`` tokens while as many
   rows decode as wait, more while more wait), so a burst of arrivals never
   freezes running streams for long; a longer prompt is split into chunks.
   The first tokens this produces go to the event loop at once;
4. every decoding row gets one more token in a single batched decode, and
   these tokens go to the event loop in one hand-off;
5. finished rows leave.

No torch here: the model's :class:`~llm_stream.engine.types.StepRunner` does
the tensor work, so the scheduling rules are unit-tested with a fake runner.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llm_stream.engine.sequence import Phase, Sequence
from llm_stream.engine.types import (
    BatchLostError,
    FinishReason,
    PrefillChunk,
    StepRunner,
    TokenEvent,
)
from llm_stream.errors import InvalidRequestError, OverloadedError, UnavailableError

log = logging.getLogger(__name__)

# Tokens after which a decoding row's steady pace is protected from prompt work.
_ESTABLISHED_TOKENS = 8


@dataclass(frozen=True)
class BatchLimits:
    # Sequences in the batch at once (prefilling or decoding).
    max_rows: int = 64
    # Rows x the largest prompt + max_tokens among them: what the left-padded KV
    # cache can grow to, so admission by it bounds the cache.
    max_batch_tokens: int = 65536
    # Sequences allowed to wait beyond the free rows; past it RESOURCE_EXHAUSTED.
    max_queue: int = 256
    # Prompt tokens fed per step while other rows decode.
    prefill_chunk: int = 64


@dataclass
class StepOutput:
    """What one sequence got from one step: its new events, and whether it ended."""

    sequence: Sequence
    events: list[TokenEvent] = field(default_factory=list)
    # Seconds from submission to the first token, when this step produced it.
    first_token_s: float | None = None
    # Seconds since the sequence's previous token, for each later token of this step.
    inter_token_s: list[float] = field(default_factory=list)
    # Whether the sequence ended in this step. A snapshot taken when the step is
    # handed over: by the time the event loop reads it, the sequence may be steps ahead.
    finished: bool = False


Deliver = Callable[[list[StepOutput]], None]


class Scheduler:
    def __init__(self, runner: StepRunner, limits: BatchLimits, deliver: Deliver) -> None:
        self._runner = runner
        self._limits = limits
        self._deliver = deliver
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._closed = False
        # Outputs of the step under way, handed to the event loop twice a step.
        self._pending: dict[int, StepOutput] = {}
        self.steps = 0

    # -- any thread ------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

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
            free_rows = max(0, self._limits.max_rows - len(self._running))
            if len(self._waiting) + len(sequences) > self._limits.max_queue + free_rows:
                raise OverloadedError(
                    f"server busy: {len(self._running)} sequences in the batch and "
                    f"{len(self._waiting)} waiting (the configured limits); "
                    "retry later with backoff"
                )
            self._waiting.extend(sequences)
            self._cond.notify()

    def check_budget(self, sequence: Sequence) -> None:
        """InvalidRequestError for a sequence that could never fit the batch, even alone."""
        cost = sequence.prepared.token_cost
        if cost > self._limits.max_batch_tokens:
            raise InvalidRequestError(
                f"prompt ({sequence.prompt_length} tokens) plus max_tokens "
                f"({sequence.prepared.max_new_tokens}) is {cost} tokens, more than this "
                f"server's batch budget of {self._limits.max_batch_tokens} "
                "(--max-batch-tokens); ask for fewer tokens or shorten the prompt"
            )

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence: a waiting one leaves now, a running one before the next step."""
        with self._cond:
            if sequence.finished or sequence.cancel_requested:
                return
            sequence.cancel_requested = True
            sequence.cancel_step = self.steps
            if sequence.phase is Phase.WAITING:
                self._waiting.remove(sequence)
                sequence.finish(FinishReason.CANCELLED)
                sequence.freed_step = self.steps
            else:
                self._cond.notify()
                return
        # Called on the event loop's thread: handed over directly, not with a step's outputs.
        self._deliver([StepOutput(sequence, finished=True)])

    def cancel_all(self) -> None:
        with self._cond:
            everyone = list(self._waiting) + list(self._running)
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
                while not (self._closed or self._waiting or self._running):
                    self._cond.wait()
                if self._closed and not self._running:
                    return
            try:
                self.step()
            except Exception as exc:
                log.exception(
                    "scheduler step failed; ending the %d sequences in the batch", self.running
                )
                self._abandon_batch(exc)

    def _abandon_batch(self, exc: Exception) -> None:
        try:
            self._runner.reset()
        finally:
            self._fail({s.key for s in self._running}, exc, release=False)
            self._hand_over()

    def step(self) -> None:
        """One iteration: free cancelled rows, admit, prefill, decode; events out twice."""
        with self._cond:
            self.steps += 1
            cancelled = [s for s in self._running if s.cancel_requested]
            for sequence in cancelled:
                sequence.finish(FinishReason.CANCELLED)
                self._output(sequence)
        self._leave(cancelled)  # first, so that their rows are free for this step's admissions
        with self._cond:
            self._admit()
            chunks = self._plan_prefill()
        started = time.monotonic()
        self._prefill_phase(chunks)
        self._hand_over()  # first tokens go out now, not after this step's decode
        prefilled = time.monotonic()
        self._decode_phase()
        self._hand_over()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step %d: %d rows, %d waiting; prefill %d tokens of %d sequences in %.0f ms, "
                "decode in %.0f ms",
                self.steps,
                self.running,
                self.waiting,
                sum(c.end - c.start for c in chunks),
                len(chunks),
                (prefilled - started) * 1000,
                (time.monotonic() - prefilled) * 1000,
            )

    def _prefill_phase(self, chunks: list[PrefillChunk]) -> None:
        try:
            self._prefill(chunks)
        except BatchLostError as exc:  # the runner has dropped its decode batch
            log.exception("prefill broke the batch; ending its %d sequences", self.running)
            self._fail({s.key for s in self._running}, exc, release=False)
        except Exception as exc:  # a failed prefill fails its own sequences only
            log.exception("prefill failed; ending the %d sequences it fed", len(chunks))
            self._fail({c.key for c in chunks}, exc)
        self._leave([s for s in self._running if s.finished])

    def _decode_phase(self) -> None:
        try:
            if any(s.phase is Phase.DECODING for s in self._running):
                self._decode()
        except Exception as exc:  # a failed decode fails the batch, not the server
            log.exception("decode step failed; ending the %d sequences in the batch", self.running)
            self._runner.reset()
            self._fail({s.key for s in self._running}, exc, release=False)
        self._leave([s for s in self._running if s.finished])

    def _output(self, sequence: Sequence) -> StepOutput:
        """This step's output of ``sequence``, created on first use."""
        output = self._pending.get(sequence.key)
        if output is None:
            output = self._pending[sequence.key] = StepOutput(sequence)
        return output

    def _hand_over(self) -> None:
        """Send the outputs gathered since the last hand-over to the event loop."""
        outputs, self._pending = list(self._pending.values()), {}
        if not outputs:
            return
        for output in outputs:
            output.finished = output.sequence.finished
        self._deliver(outputs)

    def _admit(self) -> None:
        """Oldest first, while a row is free and the padded cache stays within budget."""
        limits = self._limits
        widest = max((s.prepared.token_cost for s in self._running), default=0)
        while self._waiting and len(self._running) < limits.max_rows:
            candidate = self._waiting[0]
            width = max(widest, candidate.prepared.token_cost)
            if (len(self._running) + 1) * width > limits.max_batch_tokens:
                break
            self._waiting.popleft()
            candidate.phase = Phase.PREFILLING
            self._running.append(candidate)
            widest = width

    def _plan_prefill(self) -> list[PrefillChunk]:
        """Prompt work for this step, within the prefill budget, oldest first.

        Prompt work stalls every decoding row for this step, and serves every
        sequence waiting for its first token; the budget weighs the two: at
        least ``prefill_chunk`` tokens, times how many sequences wait per
        established decoding one. A row counts as established once it has
        given ``_ESTABLISHED_TOKENS`` tokens: before that it belongs to the same
        wave of arrivals as those still waiting (a cold start whose requests
        reached the scheduler a few milliseconds apart). So a burst onto a busy
        batch is fed a chunk a step, and a cold start is fed at once. A prompt
        that fits the budget is fed whole (with others, as one padded batch); a
        prompt longer than a chunk is split into chunks; a shorter one waits
        for a step with room for it.
        """
        established = sum(
            s.phase is Phase.DECODING and s.assembler.count >= _ESTABLISHED_TOKENS
            for s in self._running
        )
        prefilling = sum(s.phase is Phase.PREFILLING for s in self._running)
        budget = None
        if established:
            budget = self._limits.prefill_chunk * max(1, prefilling // established)
        chunks: list[PrefillChunk] = []
        for sequence in self._running:
            if sequence.phase is not Phase.PREFILLING:
                continue
            remaining = sequence.prompt_length - sequence.prefilled
            if budget is not None and budget <= 0:
                break
            if budget is None or remaining <= budget:
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
            if budget is not None:
                budget -= take
        return chunks

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        if not chunks:
            return
        by_key = {s.key: s for s in self._running}
        first_tokens = self._runner.prefill(chunks)
        now = time.monotonic()
        for chunk, token in zip(chunks, first_tokens, strict=True):
            sequence = by_key[chunk.key]
            sequence.prefilled = chunk.end
            if token is not None:
                sequence.phase = Phase.DECODING
                self._emit(sequence, token, now)

    def _decode(self) -> None:
        by_key = {s.key: s for s in self._running}
        produced = self._runner.decode()
        now = time.monotonic()
        for key, token in produced:
            self._emit(by_key[key], token, now)

    def _emit(self, sequence: Sequence, token: int, now: float) -> None:
        output = self._output(sequence)
        previous = sequence.last_token_at
        try:
            output.events.append(sequence.accept(token, now))
        except Exception as exc:  # this sequence's text failed: it ends, the batch goes on
            log.exception("turning token %d into text failed for %s", token, sequence.request_id)
            sequence.finish(None, exc)
            return
        if previous is None:
            output.first_token_s = now - sequence.submitted_at
        else:
            output.inter_token_s.append(now - previous)

    def _leave(self, leaving: list[Sequence], *, release: bool = True) -> None:
        """Take sequences out of the batch (``release``: and their rows out of the runner)."""
        if not leaving:
            return
        gone = set(map(id, leaving))
        try:
            if release:
                self._runner.remove({s.key for s in leaving})
        finally:  # out of the batch whatever the runner says, so nothing waits on them
            with self._cond:
                self._running = [s for s in self._running if id(s) not in gone]
                for sequence in leaving:
                    sequence.freed_step = self.steps

    def _fail(self, keys: set[int], exc: Exception, *, release: bool = True) -> None:
        failed = [s for s in self._running if s.key in keys]
        for sequence in failed:
            if not sequence.finished:
                sequence.finish(None, exc)
            self._output(sequence)
        self._leave(failed, release=release)
