"""One generation's scheduling state, from admission to its last token.

The scheduler thread owns everything here except ``cancel_requested`` and
``release_requested``, which any thread may set. Text lives elsewhere (the
output stage): the scheduler counts token ids, never decodes them.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from llm_stream.engine.types import FinishReason, PreparedRequest

_keys = itertools.count(1)


def new_key() -> int:
    """A process-wide unique sequence key."""
    return next(_keys)


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prepared: PreparedRequest
    key: int = field(default_factory=new_key)
    phase: Phase = Phase.WAITING
    # Prompt tokens planned into the model (fed, or in a step in flight).
    prefilled: int = 0
    # Of those, the ones whose KV the runner's prefix cache held at admission.
    cached_tokens: int = 0
    # Tokens planned: received plus those of steps still in flight.
    scheduled: int = 0
    # Tokens received from the runner.
    generated: int = 0
    # Whether it holds a batch row: from admission until the row is freed (the
    # runner may hold a decode row or a half-fed prompt for it meanwhile).
    holds_row: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancel_requested: bool = False
    # The text side is done with it (a stop sequence matched, or its text failed).
    release_requested: bool = False
    # Scheduler step counts when the cancel arrived and when the row was freed.
    cancel_step: int | None = None
    freed_step: int | None = None
    finish_reason: FinishReason | None = None
    error: BaseException | None = None

    @property
    def request_id(self) -> str:
        return self.prepared.request.request_id

    @property
    def prompt_length(self) -> int:
        return len(self.prepared.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def fully_scheduled(self) -> bool:
        """Every token it may have is planned: its row has nothing left to compute."""
        return self.scheduled >= self.prepared.max_new_tokens

    def accept(self, token_id: int, now: float) -> None:
        """Count one generated token; ends the sequence at end-of-sequence or max_tokens."""
        self.generated += 1
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        if token_id in self.prepared.stop_token_ids:
            self.finish(FinishReason.END_OF_SEQUENCE)
        elif self.generated >= self.prepared.max_new_tokens:
            self.finish(FinishReason.LENGTH)

    def finish(self, reason: FinishReason | None, error: BaseException | None = None) -> None:
        self.phase = Phase.FINISHED
        self.finish_reason = reason
        self.error = error
