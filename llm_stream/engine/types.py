"""Plain request and event types shared by the protocol, engine and model layers."""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
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


CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation; ``role`` is one of CHAT_ROLES."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a prompt, or (when ``messages`` is not empty) a conversation."""

    request_id: str
    model_id: str
    prompt: str
    sampling: SamplingParams
    # None: use the chat template when the tokenizer has one.
    apply_chat_template: bool | None = None
    # Who asked, for the log: an API key's id (never the key); "" without keys.
    client: str = ""
    # A conversation to render with the chat template instead of ``prompt``.
    messages: tuple[ChatTurn, ...] = ()


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


@dataclass(frozen=True)
class PreparedRequest:
    """A request tokenized and checked against the model, ready to be admitted."""

    request: GenerationRequest
    prompt_ids: tuple[int, ...]
    # max_tokens, clamped to the room the model's context leaves.
    max_new_tokens: int

    @property
    def token_cost(self) -> int:
        """The most cache positions this sequence can ever hold."""
        return len(self.prompt_ids) + self.max_new_tokens


class TextAssembler(Protocol):
    """Turns one sequence's generated ids into text deltas and knows when it is done."""

    count: int
    finish_reason: FinishReason | None

    @property
    def done(self) -> bool: ...

    def add(self, token_id: int) -> str: ...


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``[start, end)`` of one sequence, to be fed in this step."""

    key: int
    prepared: PreparedRequest
    start: int
    end: int

    @property
    def completes_prompt(self) -> bool:
        return self.end == len(self.prepared.prompt_ids)


class BatchLostError(Exception):
    """The runner lost its decode batch (and has reset it): every row in it has to fail."""


class StepRunner(Protocol):
    """The model's step primitives, driven by the scheduler on its own thread.

    Rows are named by the scheduler's sequence keys. A sequence whose prompt
    is complete joins the decode batch and gets its first token from
    ``prefill``; every later token comes from ``decode``.
    """

    def prefill(self, chunks: Sequence[PrefillChunk]) -> list[int | None]:
        """Feed these prompt chunks; per chunk, the first token once its prompt is complete.

        Raises BatchLostError when a failure damaged the decode batch itself.
        """
        ...

    def decode(self) -> list[tuple[int, int]]:
        """One step for every row of the decode batch: (key, next token) per row."""
        ...

    def remove(self, keys: Collection[int]) -> None:
        """Drop these rows (and their cache) from wherever they are."""
        ...

    def reset(self) -> None:
        """Drop every row (after a failed step)."""
        ...


class ModelBackend(Protocol):
    """What the engine needs from a loaded model (implemented in llm_stream.model).

    ``prepare`` and ``text_assembler`` are quick and run on a preparation thread;
    the runner's steps run on the model's scheduler thread; neither on the event loop.
    """

    model_id: str
    version: str
    device: str

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and check; InvalidRequestError when the request cannot be served."""
        ...

    def text_assembler(self, prepared: PreparedRequest) -> TextAssembler: ...

    def new_runner(self) -> StepRunner: ...
