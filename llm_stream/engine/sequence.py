"""One generation's state, from admission to its last token.

The scheduler thread owns everything here except ``cancel_requested``, which
any thread may set; the event loop reads the outcome only through the events
the scheduler hands it.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from llm_stream.engine.types import (
    FinishReason,
    PreparedRequest,
    StreamEnd,
    TextAssembler,
    TokenEvent,
)

_keys = itertools.count(1)


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prepared: PreparedRequest
    assembler: TextAssembler
    key: int = field(default_factory=lambda: next(_keys))
    phase: Phase = Phase.WAITING
    # Prompt tokens already in the model's cache.
    prefilled: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancel_requested: bool = False
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

    def accept(self, token_id: int, now: float) -> TokenEvent:
        """Account one generated token; the event carries exactly the text it adds."""
        index = self.assembler.count
        text = self.assembler.add(token_id)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        if self.assembler.done:
            self.finish(self.assembler.finish_reason)
        return TokenEvent(index=index, text=text, token_id=token_id)

    def finish(self, reason: FinishReason | None, error: BaseException | None = None) -> None:
        self.phase = Phase.FINISHED
        self.finish_reason = reason
        self.error = error

    def end_event(self) -> StreamEnd:
        assert self.finish_reason is not None
        return StreamEnd(self.finish_reason, self.prompt_length, self.assembler.count)
