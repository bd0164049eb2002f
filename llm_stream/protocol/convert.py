"""protobuf messages <-> engine types, with the request checks that need no model.

Proto3 scalars cannot say "unset", so 0 means "use the default" for max_tokens,
top_p, top_k and repetition_penalty (the model's generation_config.json default,
filled when the model prepares the request), and temperature 0 means greedy
unless ``use_model_temperature`` asks for the model's temperature.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from itertools import islice

from llm_stream.engine.types import (
    CHAT_ROLES,
    ChatTurn,
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StreamEnd,
    TokenEvent,
)
from llm_stream.errors import InvalidRequestError, quoted_input
from llm_stream.proto.inference.v1 import inference_pb2 as pb

PROMPT_FEATURE = "prompt"
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
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


@dataclass(frozen=True)
class RequestLimits:
    default_max_tokens: int = 256
    max_tokens_cap: int = 2048


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


def to_generation_request(
    message: pb.PredictRequest, limits: RequestLimits, request_id: str | None = None
) -> GenerationRequest:
    config = message.config
    messages = _conversation(message)
    return GenerationRequest(
        request_id=request_id or request_id_of(message),
        model_id=message.model_id,
        prompt="" if messages else _prompt(message),
        messages=messages,
        sampling=_sampling(config, limits),
        apply_chat_template=(
            config.apply_chat_template if config.HasField("apply_chat_template") else None
        ),
        continue_final_message=_continues(config, messages),
    )


def _continues(config: pb.InferenceConfig, messages: tuple[ChatTurn, ...]) -> bool:
    if not config.continue_final_message:
        return False
    if not messages or messages[-1].role != "assistant":
        raise InvalidRequestError(
            "config.continue_final_message carries on the conversation's last message, which "
            "must be an assistant message; end messages with one, or leave the flag unset"
        )
    return True


def _conversation(message: pb.PredictRequest) -> tuple[ChatTurn, ...]:
    """The request's ``messages``, checked; empty when it sends a prompt instead."""
    if not message.messages:
        return ()
    if PROMPT_FEATURE in message.features:
        raise InvalidRequestError(
            "the request has both messages and features['prompt']; send one or the other"
        )
    turns = []
    for index, turn in enumerate(message.messages):
        if turn.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{index}].role must be {', '.join(CHAT_ROLES[:-1])} or "
                f"{CHAT_ROLES[-1]}, got {quoted_input(turn.role, 40)}"
            )
        turns.append(ChatTurn(turn.role, turn.content))
    if not any(turn.content for turn in turns):
        raise InvalidRequestError("the conversation is empty: every message's content is empty")
    return tuple(turns)


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


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise InvalidRequestError(f"config.{name} must be a finite number, got {value}")
    return value


def _sampling(config: pb.InferenceConfig, limits: RequestLimits) -> SamplingParams:
    temperature = _finite("temperature", config.temperature)
    if temperature < 0:
        raise InvalidRequestError(
            f"config.temperature must be >= 0 (0 is greedy), got {temperature:g}"
        )
    if config.max_tokens < 0:
        raise InvalidRequestError(
            f"config.max_tokens must be >= 0 (0 is the server default), got {config.max_tokens}"
        )
    if config.max_tokens > limits.max_tokens_cap:
        raise InvalidRequestError(
            f"config.max_tokens {config.max_tokens} is above this server's cap of "
            f"{limits.max_tokens_cap}; ask for at most {limits.max_tokens_cap}"
        )
    top_p = _finite("top_p", config.top_p)
    if top_p < 0 or top_p > 1:
        raise InvalidRequestError(f"config.top_p must be in (0, 1] (0 means unset), got {top_p:g}")
    if config.top_k < 0:
        raise InvalidRequestError(f"config.top_k must be >= 0 (0 disables), got {config.top_k}")
    penalty = _finite("repetition_penalty", config.repetition_penalty)
    if penalty < 0:
        raise InvalidRequestError(
            f"config.repetition_penalty must be > 0 (0 means unset), got {penalty:g}"
        )
    stops = tuple(config.stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(
            f"config.stop has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES} are allowed"
        )
    for stop in stops:
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidRequestError(
                f"each config.stop sequence must be 1 to {MAX_STOP_LENGTH} characters long"
            )
    model_temperature = config.use_model_temperature and temperature == 0
    unset = {
        name
        for name, left_out in (
            ("temperature", model_temperature),
            ("top_p", top_p == 0),
            ("top_k", config.top_k == 0),
            ("repetition_penalty", penalty == 0),
        )
        if left_out
    }
    return SamplingParams(
        max_tokens=config.max_tokens or limits.default_max_tokens,
        max_tokens_explicit=config.max_tokens > 0,
        temperature=1.0 if model_temperature else temperature,
        top_p=top_p or 1.0,
        top_k=config.top_k,
        seed=config.seed if config.HasField("seed") else None,
        repetition_penalty=penalty or 1.0,
        stop=stops,
        unset=frozenset(unset),
    )


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
