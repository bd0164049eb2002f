"""Plain request and event types shared by the protocol, engine and model layers."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol


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
    # Sampling fields the request left unset (names of the fields above), which the
    # model's own defaults fill when it is prepared (:func:`with_model_defaults`).
    unset: frozenset[str] = frozenset()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def with_model_defaults(sampling: SamplingParams, defaults: Mapping[str, float]) -> SamplingParams:
    """``sampling`` with the fields it left unset taken from ``defaults`` (a model's
    generation config), the rest as sent."""
    filled: dict[str, Any] = {
        name: defaults[name]
        for name in SAMPLING_DEFAULT_FIELDS
        if name in sampling.unset and name in defaults
    }
    if "top_k" in filled:
        filled["top_k"] = int(filled["top_k"])
    return replace(sampling, unset=frozenset(), **filled) if filled or sampling.unset else sampling


CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call (an OpenAI ``tools`` entry)."""

    name: str
    description: str = ""
    # The JSON schema of the arguments object, as JSON text.
    parameters: str = '{"type": "object", "properties": {}}'


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: which function, with which arguments (a JSON object's text)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class JsonConstraint:
    """Guided decoding: every token is chosen so that the output is JSON; an object
    matching ``schema`` (JSON Schema as JSON text), or any JSON object when it is ""."""

    schema: str = ""


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation; ``role`` is one of CHAT_ROLES."""

    role: str
    content: str
    # An assistant turn's tool calls.
    tool_calls: tuple[ToolCall, ...] = ()
    # A tool turn: the id of the call it answers, and the function's name if known.
    tool_call_id: str = ""
    name: str = ""


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
    # The last message is an assistant turn to carry on, rendered open (prefill).
    continue_final_message: bool = False
    # Functions the model may call, rendered by the chat template where it takes tools.
    tools: tuple[ToolSpec, ...] = ()
    # Guided decoding: the output must be JSON (matching a schema); None: free text.
    constraint: JsonConstraint | None = None


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
    # Prompt tokens whose KV came from the prefix cache (not computed again).
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """A whole generation, as Predict and BatchPredict return it."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model_version: str = ""
    latency_ms: float = 0.0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class PreparedRequest:
    """A request tokenized and checked against the model, ready to be admitted."""

    request: GenerationRequest
    prompt_ids: tuple[int, ...]
    # max_tokens, clamped to the room the model's context leaves.
    max_new_tokens: int
    # Token ids that end generation (the model's end-of-sequence ids): the scheduler
    # frees a row on them without waiting for its text.
    stop_token_ids: frozenset[int] = frozenset()
    # Guided decoding: request.constraint compiled by the model layer (opaque here; it
    # never leaves the process that prepared it). None: free text.
    grammar: Any = None

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


@dataclass(frozen=True)
class StepPlan:
    """One step of the batch, as the scheduler decides it; the runner carries it out.

    In this order: the rows of ``remove`` leave; if ``decode``, every row in the
    decode batch gets one token; then the ``prefill`` chunks are fed, and a chunk
    that completes its prompt samples the sequence's first token and joins the
    decode batch, decoding from the next step on.
    """

    step: int
    remove: tuple[int, ...] = ()
    decode: bool = False
    prefill: tuple[PrefillChunk, ...] = ()
    # Decoding rows past their first tokens: streams whose steady pace this step's
    # prompt work should not stall (0 at a cold start, where all are new).
    established: int = 0

    @property
    def computes(self) -> bool:
        return self.decode or bool(self.prefill)


@dataclass(frozen=True)
class StepTokens:
    """What one step produced: plain values, safe to hand to any thread."""

    step: int
    # (key, token id): first tokens of completed prompts and decoded tokens, in row order.
    tokens: tuple[tuple[int, int], ...] = ()
    # Prefill chunks that failed, by key; their rows never joined, the batch is intact.
    failed: tuple[tuple[int, BaseException], ...] = ()


class BatchLostError(Exception):
    """The runner lost its decode batch (and has reset it): every row in it has to fail."""


class CacheBudget(Protocol):
    """What the KV cache layout can hold; the scheduler admits by it (no torch here)."""

    @property
    def max_sequence_tokens(self) -> int:
        """The largest prompt + max_tokens one sequence may have, even alone."""
        ...

    @property
    def limit_hint(self) -> str:
        """The setting that bounds it, for error messages (e.g. ``--max-batch-tokens``)."""
        ...

    def admits(self, costs: Sequence[int], candidate: int) -> bool:
        """Whether a sequence of ``candidate`` tokens fits beside rows of ``costs``."""
        ...


class StepRunner(Protocol):
    """The model's side of the batch, driven by the scheduler on its own thread.

    Rows are named by the scheduler's sequence keys. ``launch`` starts a step and
    may return before the device has finished it; ``collect`` waits for the oldest
    launched step and returns its tokens. A runner with ``pipeline_depth`` 1 lets
    the scheduler launch step N+1 before collecting step N, so the host prepares
    the next step while the device computes this one.
    """

    pipeline_depth: int
    budget: CacheBudget

    def reuse_prefix(self, key: int, prepared: PreparedRequest) -> int:
        """``key`` is admitted: how many of its first prompt tokens the runner already
        holds the KV of (its prefix cache), so its prefill starts there. Always fewer
        than the prompt's length (the last prompt token gives the first token's logits)."""
        ...

    def launch(self, plan: StepPlan) -> None:
        """Start ``plan``; raises when the decode batch itself is lost."""
        ...

    def collect(self) -> StepTokens:
        """The tokens of the oldest launched, uncollected step (waits for them)."""
        ...

    def reset(self) -> None:
        """Drop every row and every step in flight (after a failure)."""
        ...


class ModelInfo(Protocol):
    """What the faces and the ready line say about a served model."""

    @property
    def model_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def execution(self) -> str:
        """How the model executes (attention, KV cache, CUDA graphs, engine process)."""
        ...

    @property
    def sampling_defaults(self) -> Mapping[str, float]:
        """The model's own sampling defaults that fill a request's unset fields."""
        ...

    @property
    def tool_format(self) -> str | None:
        """How the model writes tool calls, read from its chat template ("hermes",
        "llama3_json", "mistral"...); None when its template takes no tools."""
        ...


class ModelBackend(ModelInfo, Protocol):
    """What the engine needs from a loaded model (implemented in llm_stream.model).

    ``prepare`` and ``text_assembler`` are quick and run on a preparation thread;
    the runner's steps run on the model's scheduler thread; neither on the event loop.
    """

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and check; InvalidRequestError when the request cannot be served."""
        ...

    def text_assembler(self, prepared: PreparedRequest) -> TextAssembler: ...

    def new_runner(self) -> StepRunner: ...
