"""protobuf messages <-> the shared request and the engine's results.

Only what is the contract's own is checked here (the prompt feature's shape, a
prompt and messages together); the values are checked by the front door, as for
the HTTP API.
"""

from __future__ import annotations

import uuid
from itertools import islice

from llm_stream.engine.types import (
    ChatTurn,
    Completion,
    FinishReason,
    StreamEnd,
    TokenEvent,
    ToolCall,
    ToolSpec,
)
from llm_stream.errors import InvalidRequestError
from llm_stream.front_door.request import RequestDraft
from llm_stream.proto.inference.v1 import inference_pb2 as pb

PROMPT_FEATURE = "prompt"
# A client's request_id is kept to this many printable characters (README, "Error codes").
MAX_REQUEST_ID_LENGTH = 128
# Only this many characters of a client's request_id are looked at, so that a huge id
# of characters that are all removed costs no more than a short one.
REQUEST_ID_SCAN_LENGTH = 8 * MAX_REQUEST_ID_LENGTH

FINISH_REASON_TO_PB = {
    FinishReason.END_OF_SEQUENCE: pb.FINISH_REASON_END_OF_SEQUENCE,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
# The contract's field names, for the shared checks' messages.
CONFIG_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "continue_final_message",
    "json_schema",
)
FIELD_NAMES = {name: f"config.{name}" for name in CONFIG_FIELDS}


def clean_request_id(raw: str) -> str:
    """A client's request_id, safe to log and echo; "" when nothing of it is left.

    Every character ``str.isprintable`` refuses is removed: ASCII and C1 controls
    (newlines, carriage returns, terminal escapes), format characters such as the
    bidi controls U+202A-U+202E and U+2066-U+2069 or zero-width ones, separators
    other than the ASCII space (U+2028 LINE SEPARATOR among them), surrogates,
    private-use and unassigned code points. Then surrounding spaces go and the rest
    is cut to MAX_REQUEST_ID_LENGTH characters. Only the first REQUEST_ID_SCAN_LENGTH
    characters of ``raw`` are read.
    """
    kept = "".join(filter(str.isprintable, islice(raw, REQUEST_ID_SCAN_LENGTH)))
    return kept.strip()[:MAX_REQUEST_ID_LENGTH].rstrip()


def request_id_from(raw: str) -> str:
    """A client's request id cleaned by :func:`clean_request_id`, else a new one."""
    return clean_request_id(raw) or uuid.uuid4().hex


def request_id_of(message: pb.PredictRequest) -> str:
    return request_id_from(message.request_id)


def draft_from_pb(message: pb.PredictRequest, request_id: str | None = None) -> RequestDraft:
    """A PredictRequest as the shared request (checked by ``front_door.request.validate``).

    Proto3 scalars cannot say "unset", so 0 means "left out" for max_tokens, top_p,
    top_k and repetition_penalty, and temperature 0 is greedy unless
    ``use_model_temperature`` asks for the model's temperature."""
    config = message.config
    messages = _conversation(message)
    return RequestDraft(
        request_id=request_id or request_id_of(message),
        model_id=message.model_id,
        prompt=None if messages else _prompt(message),
        messages=messages,
        max_tokens=config.max_tokens or None,
        temperature=(
            None if config.use_model_temperature and config.temperature == 0 else config.temperature
        ),
        top_p=config.top_p or None,
        top_k=config.top_k or None,
        repetition_penalty=config.repetition_penalty or None,
        seed=config.seed if config.HasField("seed") else None,
        stop=tuple(config.stop),
        apply_chat_template=(
            config.apply_chat_template if config.HasField("apply_chat_template") else None
        ),
        continue_final_message=config.continue_final_message,
        tools=tuple(
            ToolSpec(tool.name, tool.description, tool.parameters_json or EMPTY_PARAMETERS)
            for tool in message.tools
        ),
        tool_choice=_tool_choice(message.tool_choice),
        tool_name=message.tool_choice if _tool_choice(message.tool_choice) == "function" else "",
        parallel_tool_calls=(
            message.parallel_tool_calls if message.HasField("parallel_tool_calls") else True
        ),
        json_schema=config.json_schema or None,
        names=FIELD_NAMES,
    )


EMPTY_PARAMETERS = '{"type": "object", "properties": {}}'


def _tool_choice(choice: str) -> str:
    """The contract's tool_choice: a keyword, or a function's name."""
    if choice in ("", "auto"):
        return "auto"
    return choice if choice in ("none", "required") else "function"


def _conversation(message: pb.PredictRequest) -> tuple[ChatTurn, ...]:
    """The request's ``messages``; empty when it sends a prompt instead."""
    if not message.messages:
        return ()
    if PROMPT_FEATURE in message.features:
        raise InvalidRequestError(
            "the request has both messages and features['prompt']; send one or the other"
        )
    return tuple(
        ChatTurn(
            turn.role,
            turn.content,
            tuple(ToolCall(c.id, c.name, c.arguments_json or "{}") for c in turn.tool_calls),
            turn.tool_call_id,
            turn.name,
        )
        for turn in message.messages
    )


def _prompt(message: pb.PredictRequest) -> str:
    if PROMPT_FEATURE not in message.features:
        raise InvalidRequestError(
            "features['prompt'] is missing; send the prompt as features['prompt'].string_value, "
            "or a conversation as messages"
        )
    feature = message.features[PROMPT_FEATURE]
    kind = feature.WhichOneof("value")
    if kind != "string_value":
        raise InvalidRequestError(
            f"features['prompt'] must be a string_value, got {kind or 'no value'}"
        )
    if not feature.string_value:
        raise InvalidRequestError("features['prompt'] is empty; send some text")
    return feature.string_value


def usage_pb(prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_prompt_tokens=cached_prompt_tokens,
    )


def token_to_pb(event: TokenEvent) -> pb.PredictToken:
    return pb.PredictToken(token=event.text, token_index=event.index, token_id=event.token_id)


def stream_end_to_pb(end: StreamEnd) -> pb.PredictToken:
    return pb.PredictToken(
        is_final=True,
        token_index=end.completion_tokens,
        finish_reason=FINISH_REASON_TO_PB[end.finish_reason],
        usage=usage_pb(end.prompt_tokens, end.completion_tokens, end.cached_prompt_tokens),
    )


def completion_to_pb(request_id: str, completion: Completion) -> pb.PredictResponse:
    return pb.PredictResponse(
        request_id=request_id,
        predictions={
            "prompt_tokens": float(completion.prompt_tokens),
            "completion_tokens": float(completion.completion_tokens),
        },
        latency_ms=completion.latency_ms,
        model_version=completion.model_version,
        text=completion.text,
        finish_reason=FINISH_REASON_TO_PB[completion.finish_reason],
        usage=usage_pb(
            completion.prompt_tokens,
            completion.completion_tokens,
            completion.cached_prompt_tokens,
        ),
    )


def request_id_header(request_id: str) -> str:
    """``request_id`` as an x-request-id header value.

    gRPC ASCII metadata carries printable ASCII (0x20-0x7E) only, so every other
    character is escaped as \\xNN, \\uNNNN or \\UNNNNNNNN (its code point in hex), and
    a backslash is doubled so that the escaping stays unambiguous. Safe for any
    string, cleaned (:func:`clean_request_id`) or not.
    """
    return "".join(
        char if " " <= char <= "~" and char != "\\" else _escaped(char) for char in request_id
    )


def _escaped(char: str) -> str:
    if char == "\\":
        return "\\\\"
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
