"""Plain request and event types shared by the protocol, engine and model layers."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings; temperature 0 means greedy."""

    max_tokens: int
    # Whether max_tokens came from the request (True) or the server default.
    max_tokens_explicit: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model_id: str
    prompt: str
    sampling: SamplingParams
    # None: use the chat template when the tokenizer has one.
    apply_chat_template: bool | None = None


class FinishReason(enum.Enum):
    END_OF_SEQUENCE = "end_of_sequence"
    STOP_SEQUENCE = "stop_sequence"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and exactly the text it adds (may be empty)."""

    index: int
    text: str
    token_id: int


@dataclass(frozen=True)
class StreamEnd:
    """Last event of a stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Completion:
    """A whole generation, as Predict and BatchPredict return it."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model_version: str = ""
    latency_ms: float = 0.0


@dataclass(eq=False)
class StopSignal:
    """Set by anyone (client gone, deadline, drain) to stop a running generation."""

    event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


# Hands one event to the consumer; False when the consumer is gone.
EmitFn = Callable[[TokenEvent], bool]


class GenerationBackend(Protocol):
    """What the engine needs from a loaded model (implemented in llm_stream.model).

    Both methods block and run on a worker thread, never on the event loop.
    """

    model_id: str
    version: str
    device: str

    def stream(self, request: GenerationRequest, stop: StopSignal, emit: EmitFn) -> StreamEnd:
        """Generate for one request, calling ``emit`` once per generated token."""
        ...

    def generate_batch(
        self, requests: Sequence[GenerationRequest], stop: StopSignal
    ) -> list[Completion | Exception]:
        """Generate for several requests as padded batches; one result per request."""
        ...
