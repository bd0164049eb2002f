"""Hostile input: whatever a client sends, the answer is OK or a documented client error.

Hypothesis generates PredictRequests with arbitrary strings (control characters,
bidi overrides, long ones), floats (NaN, infinities, subnormals), ints over each
field's whole range, feature maps and stop lists, and random or mangled bytes on the
wire. Every outcome must be OK or one of the client error codes the README
documents, never UNKNOWN or INTERNAL, with no Python internals in the message, and
the server must keep serving. A client's request_id is cleaned before it is logged
or echoed.

The server runs on its own thread and event loop, so that hypothesis's synchronous
tests can drive it through blocking channels; examples are derandomized, so a run
in CI is the same run as on a laptop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import operator
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_stream.engine.types import CHAT_ROLES, SamplingParams
from llm_stream.errors import QUOTE_LIMIT, ModelNotFoundError, quoted_input
from llm_stream.logging_setup import LOG_FORMAT, RequestContextFilter
from llm_stream.model.sampling import BatchSampler
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from llm_stream.protocol import servicer as servicer_module
from llm_stream.protocol.convert import (
    MAX_REQUEST_ID_LENGTH,
    REQUEST_ID_SCAN_LENGTH,
    clean_request_id,
    request_id_header,
    request_id_of,
)
from llm_stream.protocol.status import MAX_MESSAGE_LENGTH, bounded_message, status_for
from llm_stream.settings import Settings
from tests.conftest import prompt_request, running_server, tiny_settings
from tests.tiny_model import CHAT_TEMPLATE, build_tiny_model

MAX_TOKENS_CAP = 8
MAX_BATCH_SIZE = 3
TIMEOUT_S = 60
SERVICE_PATH = "/inference.v1.InferenceService/"

# The codes the README's "Error codes" table gives for a client's own mistakes (the
# server has no API keys here, so UNAUTHENTICATED cannot happen).
CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# What Python internals look like in a message: a trace, a class, a repr'd exception.
INTERNALS = re.compile(
    r"Traceback|<class|<module|File \"|\b\w*(Error|Exception)\b|_pb2|grpc\._cython"
)
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def examples(count: int) -> settings:
    """Hypothesis settings: ``count`` examples, the same ones on every run."""
    return settings(
        max_examples=count,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- a server on its own thread ---------------------------------------------------


class ServerThread:
    """A real server (``running_server``) on a thread with its own event loop."""

    def __init__(self, server_settings: Settings) -> None:
        self._settings = server_settings
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="hostile-server", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __enter__ or __exit__
            self._error = exc
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_server(self._settings) as running:
            self.port = running.server.port
            self._started.set()
            await self._stop.wait()

    def __enter__(self) -> str:
        self._thread.start()
        assert self._started.wait(180), "the server did not start within 180 s"
        if self._error is not None:
            raise RuntimeError("the server did not start") from self._error
        return f"127.0.0.1:{self.port}"

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the server thread did not stop"
        if self._error is not None:
            raise RuntimeError("the server failed") from self._error


@pytest.fixture(scope="module")
def target(
    tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    # A second model with a chat template, one that refuses some conversations.
    chat_dir = build_tiny_model(
        tmp_path_factory.mktemp("hostile") / "chat", chat_template=CHAT_TEMPLATE
    )
    server_settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        models=(f"tiny={tiny_model_dir}", f"chat={chat_dir}"),
        max_tokens_cap=MAX_TOKENS_CAP,
        default_max_tokens=4,
        max_batch_size=MAX_BATCH_SIZE,
        max_concurrent=4,
    )
    with ServerThread(server_settings) as address:
        yield address


@pytest.fixture(scope="module")
def channel(target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target) as opened:
        grpc.channel_ready_future(opened).result(timeout=30)
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


# -- what every outcome must satisfy ------------------------------------------------


def assert_client_error(code: grpc.StatusCode, details: str, *sent: str) -> None:
    """A documented client code, with a short message that shows no Python internals.

    ``sent`` are the strings the client sent: a marker that a message merely echoes
    back from them is the client's text, not a leak.
    """
    assert code in CLIENT_CODES, f"{code.name}: {details!r}"
    assert details, f"{code.name} without a message"
    assert len(details) <= MAX_MESSAGE_LENGTH, f"{len(details)} characters: {details[:200]!r}"
    for leak in INTERNALS.finditer(details):
        assert any(leak.group() in text for text in sent), f"{leak.group()!r} in {details!r}"


def assert_echoed_id(echoed: str, sent: str) -> None:
    """The id a response carries: the client's, cleaned, or a generated one."""
    assert echoed.isprintable()
    assert 0 < len(echoed) <= MAX_REQUEST_ID_LENGTH
    cleaned = clean_request_id(sent)
    if cleaned:
        assert echoed == cleaned
    else:
        assert GENERATED_ID.fullmatch(echoed), echoed


def texts_of(message: Message) -> tuple[str, ...]:
    """Every string a message carries, map keys included (for ``assert_client_error``)."""
    found: list[str] = []
    for _field, value in message.ListFields():
        if isinstance(value, str | Message):
            items: list[Any] = [value]
        elif hasattr(value, "items"):  # a map
            items = [part for pair in value.items() for part in pair]
        elif isinstance(value, int | float | bytes):
            items = []
        else:  # a repeated field
            items = list(value)
        for item in items:
            if isinstance(item, str):
                found.append(item)
            elif isinstance(item, Message):
                found.extend(texts_of(item))
    return tuple(found)


def check_predict(stub: pb_grpc.InferenceServiceStub, request: pb.PredictRequest) -> str:
    """Predict ``request`` and check the outcome; returns the code's name."""
    try:
        response = stub.Predict(request, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        assert_client_error(error.code(), error.details() or "", *texts_of(request))
        return str(error.code().name)
    assert_echoed_id(response.request_id, request.request_id)
    assert 0 < response.usage.completion_tokens <= MAX_TOKENS_CAP
    assert response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return "OK"


def check_stream(stub: pb_grpc.InferenceServiceStub, request: pb.PredictRequest) -> str:
    """StreamPredict ``request`` and check the outcome; returns the code's name."""
    call = stub.StreamPredict(request, timeout=TIMEOUT_S)
    try:
        replies = list(call)
    except grpc.RpcError as error:
        assert_client_error(error.code(), error.details() or "", *texts_of(request))
        return str(error.code().name)
    assert replies, "an OK stream without messages"
    assert replies[-1].is_final
    assert not any(reply.is_final for reply in replies[:-1])
    header = dict(call.initial_metadata())["x-request-id"]
    assert isinstance(header, str)
    assert re.fullmatch(r"[ -~]+", header), header
    cleaned = clean_request_id(request.request_id)
    if cleaned:
        assert header == request_id_header(cleaned)
    else:
        assert GENERATED_ID.fullmatch(header), header
    return "OK"


def check_batch(stub: pb_grpc.InferenceServiceStub, batch: pb.BatchPredictRequest) -> list[str]:
    """BatchPredict ``batch`` and check the outcome; returns the call's code's name, or
    with an OK call, each item's ("item OK", "item INVALID_ARGUMENT", ...)."""
    try:
        response = stub.BatchPredict(batch, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        assert_client_error(error.code(), error.details() or "", *texts_of(batch))
        return [str(error.code().name)]
    assert len(batch.requests) <= MAX_BATCH_SIZE
    assert len(response.results) == len(batch.requests)
    outcomes = []
    for request, result in zip(batch.requests, response.results, strict=True):
        if result.HasField("error"):
            code = CODE_BY_NUMBER[result.error.code]
            assert_client_error(code, result.error.message, *texts_of(request))
            outcomes.append(f"item {code.name}")
        else:
            assert_echoed_id(result.response.request_id, request.request_id)
            assert 0 < result.response.usage.completion_tokens <= MAX_TOKENS_CAP
            outcomes.append("item OK")
    return outcomes


def assert_still_serving(stub: pb_grpc.InferenceServiceStub) -> None:
    response = stub.Predict(prompt_request("Hello world", max_tokens=2), timeout=TIMEOUT_S)
    assert response.usage.completion_tokens == 2
    health = stub.Check(pb.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert health.status == pb.HealthCheckResponse.SERVING


# -- strategies ----------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
# Doubles: protobuf rounds them to the float32 fields (1e300 becomes inf, 5e-324 zero).
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, 1.0, 1.5, -1.0, 1e-45, -1e-45, 3.4e38, 2.0**-149]),
)
NASTY = [
    "",
    " ",
    "prompt",
    "tiny",
    "\x00",
    "\n",
    "\r\n",
    "\nFAKE LOG LINE",
    "\x1b[31mred\x1b[0m",
    "\x7f\x85\x9b",
    "\u202eevil\u202c",
    "\u2066\u2067\u2068\u2069",
    "\u200b\ufeff\u2028\u2029",
    "\U0001f600\U0001f3fd",
    "ß日本語",
    "%s%n%x{}{0}",
    "'\"\\",
    "\ue000\U000f0000",
    "\ufffd",
]


def texts(max_size: int = 2000) -> st.SearchStrategy[str]:
    """Any text (control characters included; surrogates cannot be sent), up to
    ``max_size`` characters, short ones most often."""
    return st.one_of(
        st.sampled_from(NASTY),
        st.text(max_size=min(max_size, 40)),
        st.text(max_size=max_size),
        st.builds(
            operator.mul,
            st.text(min_size=1, max_size=4),
            st.integers(1, max(1, max_size // 4)),
        ),
    )


FEATURE_VALUES = st.one_of(
    st.builds(pb.FeatureValue),
    st.builds(lambda value: pb.FeatureValue(float_value=value), FLOATS),
    st.builds(lambda value: pb.FeatureValue(string_value=value), texts()),
    st.builds(
        lambda values: pb.FeatureValue(float_array=pb.FloatArray(values=values)),
        st.lists(FLOATS, max_size=64),
    ),
)
PROMPTS = st.builds(
    lambda value: pb.FeatureValue(string_value=value), st.text(min_size=1) | texts()
)
CHAT_MESSAGES = st.lists(
    st.builds(
        pb.ChatMessage,
        role=st.sampled_from(CHAT_ROLES) | texts(60),
        content=texts(300),
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def configs(draw: st.DrawFn) -> pb.InferenceConfig:
    # Most examples keep every number in range, so that generation itself (with
    # hostile prompts, stops and seeds) gets exercised, not only the checks.
    sane = draw(st.sampled_from([True, False, True]))

    def number(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
        return draw(valid if sane else valid | hostile)

    config = pb.InferenceConfig(
        temperature=number(st.floats(0, 2), FLOATS),
        max_tokens=number(st.integers(0, MAX_TOKENS_CAP), INT32),
        top_p=number(st.floats(0, 1), FLOATS),
        top_k=number(st.integers(0, 50), INT32),
        repetition_penalty=number(st.floats(0, 2), FLOATS),
        stop=draw(
            st.lists(st.text(min_size=1, max_size=6), max_size=3)
            | st.lists(texts(300), max_size=20)
        ),
    )
    seed = draw(st.none() | UINT64)
    if seed is not None:
        config.seed = seed
    template = draw(st.none() | st.booleans())
    if template is not None:
        config.apply_chat_template = template
    return config


@st.composite
def predict_requests(draw: st.DrawFn) -> pb.PredictRequest:
    """A prompt, a conversation, or anything at all (both, neither, a float prompt)."""
    shape = draw(st.sampled_from(["prompt", "conversation", "anything", "prompt"]))
    request = pb.PredictRequest(
        model_id=draw(st.sampled_from(["", "tiny", "chat"]) | texts()),
        request_id=draw(texts()),
        config=draw(configs()),
    )
    extra = st.dictionaries(texts(40), FEATURE_VALUES, max_size=4)
    if shape != "prompt":
        request.messages.extend(draw(CHAT_MESSAGES | st.just([])))
    if shape == "conversation":
        extra = extra.map(lambda features: {k: v for k, v in features.items() if k != "prompt"})
    for key, value in draw(extra).items():
        request.features[key].CopyFrom(value)
    if shape != "conversation":
        prompt = draw(PROMPTS if shape == "prompt" else st.none() | PROMPTS | FEATURE_VALUES)
        if prompt is not None:
            request.features["prompt"].CopyFrom(prompt)
    return request


# -- 1. generated requests through the generated stub ------------------------------


def test_hostile_requests_get_ok_or_a_client_error(stub: pb_grpc.InferenceServiceStub) -> None:
    outcomes: collections.Counter[str] = collections.Counter()

    @examples(600)
    @given(request=predict_requests(), streaming=st.booleans())
    def check(request: pb.PredictRequest, streaming: bool) -> None:
        if streaming:
            outcomes["StreamPredict " + check_stream(stub, request)] += 1
        else:
            outcomes["Predict " + check_predict(stub, request)] += 1

    check()
    assert_still_serving(stub)
    # The examples reached generation, the request checks and the model lookup alike.
    # Counted over both RPCs, with floors far below what 600 examples give (the split
    # between the RPCs moves whenever hypothesis's example stream does).
    totals: collections.Counter[str] = collections.Counter()
    for outcome, count in outcomes.items():
        totals[outcome.split(" ", 1)[1]] += count
    assert totals["OK"] >= 5, outcomes
    assert totals["INVALID_ARGUMENT"] >= 20, outcomes
    assert totals["NOT_FOUND"] >= 2, outcomes
    assert outcomes["Predict OK"] + outcomes["Predict INVALID_ARGUMENT"] >= 1, outcomes
    assert outcomes["StreamPredict OK"] + outcomes["StreamPredict INVALID_ARGUMENT"] >= 1


def test_hostile_batches_get_ok_or_a_client_error(stub: pb_grpc.InferenceServiceStub) -> None:
    outcomes: collections.Counter[str] = collections.Counter()

    @examples(100)
    @given(requests=st.lists(predict_requests(), max_size=MAX_BATCH_SIZE + 1))
    def check(requests: list[pb.PredictRequest]) -> None:
        outcomes.update(check_batch(stub, pb.BatchPredictRequest(requests=requests)))

    check()
    assert_still_serving(stub)
    assert outcomes["item OK"] >= 5, outcomes
    assert outcomes["item INVALID_ARGUMENT"] >= 5, outcomes
    assert outcomes["INVALID_ARGUMENT"] >= 1, outcomes  # more items than the server takes


# -- 2. bytes on the wire -------------------------------------------------------------

REQUEST_TYPES: dict[str, type[Message]] = {
    "Predict": pb.PredictRequest,
    "StreamPredict": pb.PredictRequest,
    "BatchPredict": pb.BatchPredictRequest,
    "Check": pb.HealthCheckRequest,
}
REPLY_TYPES: dict[str, type[Message]] = {
    "Predict": pb.PredictResponse,
    "StreamPredict": pb.PredictToken,
    "BatchPredict": pb.BatchPredictResponse,
    "Check": pb.HealthCheckResponse,
}


def decodes(method: str, data: bytes) -> bool:
    try:
        REQUEST_TYPES[method].FromString(data)
    except Exception:  # DecodeError, on corrupt wire format and strings that are not UTF-8
        return False
    return True


def send_raw(channel: grpc.Channel, method: str, data: bytes) -> str:
    """Send ``data`` as the request of ``method``, unchanged; check what comes back.

    Returns the outcome: the code's name, after "decodes" or "undecodable"."""
    path = SERVICE_PATH + method
    replies: list[bytes]
    try:
        if method == "StreamPredict":
            replies = list(channel.unary_stream(path)(data, timeout=TIMEOUT_S))
        else:
            replies = [channel.unary_unary(path)(data, timeout=TIMEOUT_S)]
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        if decodes(method, data):
            assert_client_error(code, details, *texts_of(REQUEST_TYPES[method].FromString(data)))
        else:
            name = REQUEST_TYPES[method].DESCRIPTOR.full_name
            assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details!r}"
            assert name in details, details
            assert_client_error(code, details)
        return f"{'decodes' if decodes(method, data) else 'undecodable'} {code.name}"
    assert decodes(method, data), f"{method} answered OK to undecodable {data[:40]!r}"
    for reply in replies:
        REPLY_TYPES[method].FromString(reply)
    return "decodes OK"


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2); short payloads only."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def with_bytes(request: Message, placeholder: str, replacement: bytes) -> bytes:
    data = request.SerializeToString()
    assert data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), replacement)


def _prompted(prompt: str, **fields: Any) -> pb.PredictRequest:
    request = pb.PredictRequest(**fields)
    request.features["prompt"].string_value = prompt
    return request


NOT_UTF8 = b"\xff\xfe"
# A FloatArray whose packed floats are 3 bytes long: not a whole float.
ODD_FLOATS = field(3, field(1, b"prompt") + field(2, field(3, field(1, b"abc"))))

# (case, method, bytes, whether they decode)
HAND_PICKED: list[tuple[str, str, bytes, bool]] = [
    ("request_id not UTF-8", "Predict", field(2, NOT_UTF8), False),
    ("prompt not UTF-8", "Predict", with_bytes(_prompted("@@"), "@@", NOT_UTF8), False),
    ("prompt not UTF-8", "StreamPredict", with_bytes(_prompted("@@"), "@@", NOT_UTF8), False),
    (
        "stop not UTF-8",
        "StreamPredict",
        with_bytes(_prompted("hi", config=pb.InferenceConfig(stop=["@@"])), "@@", NOT_UTF8),
        False,
    ),
    (
        "message content not UTF-8",
        "Predict",
        with_bytes(
            pb.PredictRequest(messages=[pb.ChatMessage(role="user", content="@@")]),
            "@@",
            b"\xc3\x28",
        ),
        False,
    ),
    (
        "feature key not UTF-8",
        "Predict",
        with_bytes(_prompted("hi", features={"@@": pb.FeatureValue()}), "@@", b"\xed\xa0\x80"),
        False,
    ),
    (
        "batch item not UTF-8",
        "BatchPredict",
        with_bytes(pb.BatchPredictRequest(requests=[_prompted("@@")]), "@@", NOT_UTF8),
        False,
    ),
    ("service not UTF-8", "Check", field(1, NOT_UTF8), False),
    ("truncated tag", "Predict", b"\x0a", False),
    ("length past the end", "Predict", b"\x0a\x05ab", False),
    ("truncated varint", "Predict", field(4, b"\x10\xff"), False),
    ("truncated varint", "StreamPredict", b"\x22\x02\x10", False),
    ("eleven-byte varint", "Predict", field(4, b"\x10" + b"\xff" * 10 + b"\x01"), False),
    ("huge length", "Predict", b"\x1a\xff\xff\xff\xff\x0f", False),
    ("field number 0", "Predict", b"\x02\x00", False),
    ("field number 0", "Check", b"\x00\x00", False),
    ("unmatched end group", "Predict", b"\x0c", False),
    ("unended group", "BatchPredict", b"\x0b", False),
    ("groups nested 5000 deep", "Predict", b"\x0b" * 5000 + b"\x0c" * 5000, False),
    ("groups nested 5000 deep", "Check", b"\x0b" * 5000 + b"\x0c" * 5000, False),
    ("packed floats cut mid-float", "Predict", ODD_FLOATS, False),
    ("random junk", "BatchPredict", b"\xde\xad\xbe\xef" * 8, False),
    # These decode (unknown fields are kept, a wrong wire type makes a field unknown),
    # then fail or pass the request checks like any message.
    ("empty message", "Predict", b"", True),
    ("empty message", "StreamPredict", b"", True),
    ("empty message", "BatchPredict", b"", True),
    ("empty message", "Check", b"", True),
    ("model_id as fixed32", "Predict", b"\x0d\x01\x02\x03\x04", True),
    ("groups nested 50 deep", "Predict", b"\x0b" * 50 + b"\x0c" * 50, True),
    ("unknown field", "Check", b"\xf8\x01\x01", True),
    (
        "max_tokens -1 as a ten-byte varint",
        "Predict",
        _prompted("hi").SerializeToString() + field(4, b"\x10" + b"\xff" * 9 + b"\x01"),
        True,
    ),
    ("a valid request", "Predict", _prompted("hi").SerializeToString(), True),
    ("a valid request", "StreamPredict", _prompted("hi").SerializeToString(), True),
]


@pytest.mark.parametrize(
    ("method", "data", "valid"),
    [pytest.param(m, d, v, id=f"{m}-{case}") for case, m, d, v in HAND_PICKED],
)
def test_hand_picked_bytes(channel: grpc.Channel, method: str, data: bytes, valid: bool) -> None:
    assert decodes(method, data) is valid  # the case is what it says it is
    send_raw(channel, method, data)


def _spliced(base: bytes, at: int, junk: bytes, cut: int) -> bytes:
    at %= len(base) + 1
    return base[:at] + junk + base[at + cut :]


WIRE_BYTES = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=2048),
    # Valid requests with bytes inserted, overwritten or cut somewhere: they get past
    # the first tag, into nested messages, maps and strings.
    st.builds(
        _spliced,
        predict_requests().map(lambda request: request.SerializeToString()),
        st.integers(0, 2**16),
        st.binary(max_size=8),
        st.integers(0, 8),
    ),
)


def test_random_bytes_on_the_wire(channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)

    outcomes: collections.Counter[str] = collections.Counter()

    @examples(1000)
    @given(method=st.sampled_from(sorted(REQUEST_TYPES)), data=WIRE_BYTES)
    def check(method: str, data: bytes) -> None:
        outcomes[f"{method} {send_raw(channel, method, data)}"] += 1

    check()
    assert_still_serving(stub)
    for method in REQUEST_TYPES:
        assert outcomes[f"{method} undecodable INVALID_ARGUMENT"] >= 10, outcomes
    assert sum(n for outcome, n in outcomes.items() if " decodes " in outcome) >= 20, outcomes


# -- echoed client strings are bounded -------------------------------------------------

HUGE = 1024 * 1024


@pytest.mark.parametrize("rpc", ["Predict", "StreamPredict", "BatchPredict"])
def test_huge_model_id_is_not_found_with_a_short_message(
    stub: pb_grpc.InferenceServiceStub, rpc: str
) -> None:
    request = _prompted("hi", model_id="m\n" * (HUGE // 2))
    if rpc == "BatchPredict":
        (result,) = stub.BatchPredict(pb.BatchPredictRequest(requests=[request])).results
        code, details = CODE_BY_NUMBER[result.error.code], result.error.message
    else:
        with pytest.raises(grpc.RpcError) as raised:
            if rpc == "Predict":
                stub.Predict(request, timeout=TIMEOUT_S)
            else:
                list(stub.StreamPredict(request, timeout=TIMEOUT_S))
        code, details = raised.value.code(), raised.value.details() or ""
    assert code is grpc.StatusCode.NOT_FOUND, details
    assert details.startswith("unknown model_id 'm\\nm\\n"), details
    assert "\n" not in details
    assert len(details) <= MAX_MESSAGE_LENGTH
    # The echo is short, not the whole message cut: the useful part survives.
    assert details.endswith("this server serves: chat, tiny"), details


def test_huge_health_service_is_not_found_with_a_short_message(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Check(pb.HealthCheckRequest(service="s" * HUGE), timeout=TIMEOUT_S)
    details = raised.value.details() or ""
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND, details
    assert details.startswith("unknown service 'sss"), details
    assert len(details) <= MAX_MESSAGE_LENGTH
    assert details.endswith("'inference.v1.InferenceService' or 'InferenceService'"), details


def test_status_messages_are_bounded() -> None:
    short = "config.top_p must be in (0, 1], got 1.5"
    assert bounded_message(short) == short
    cut = bounded_message("x" * HUGE)
    assert len(cut) == MAX_MESSAGE_LENGTH
    assert cut.endswith("x...")
    code, message = status_for(ModelNotFoundError("unknown model_id " + "y" * HUGE), "id")
    assert code is grpc.StatusCode.NOT_FOUND
    assert len(message) == MAX_MESSAGE_LENGTH


@pytest.mark.parametrize(
    "leak",
    [
        'Traceback (most recent call last):\n  File "/app/x.py", line 1',
        "Exception calling application: boom",
        "ValueError: bad",
        "<class 'google.protobuf.message.DecodeError'>",
        "Error parsing message with type 'inference.v1.PredictRequest' (DecodeError)",
        "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff",
        "inference_pb2.PredictRequest",
    ],
)
def test_the_leak_check_catches_python_internals(leak: str) -> None:
    with pytest.raises(AssertionError):
        assert_client_error(grpc.StatusCode.INVALID_ARGUMENT, leak)
    assert_client_error(grpc.StatusCode.INVALID_ARGUMENT, leak, leak)  # the client's own text


def test_quoted_input_is_short_and_escaped() -> None:
    assert quoted_input("gpt-9") == "'gpt-9'"
    assert quoted_input("a\nb\x1b\u202e") == "'a\\nb\\x1b\\u202e'"
    long = quoted_input("x" * HUGE)
    assert long == f"'{'x' * QUOTE_LIMIT}'... ({HUGE} characters)"
    assert len(quoted_input("\U0001f600" * HUGE)) < 12 * QUOTE_LIMIT


# -- 3. request_id rules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("client-chosen-id", "client-chosen-id"),
        ("ok\nFAKE LOG LINE", "okFAKE LOG LINE"),
        ("a\rb\r\nc", "abc"),
        ("\x1b[31mred\x1b[0m", "[31mred[0m"),
        ("nul\x00del\x7fnel\x85csi\x9b", "nuldelnelcsi"),
        ("\u202eevil\u202c", "evil"),
        ("\u202a\u202b\u202d\u2066\u2067\u2068\u2069bidi", "bidi"),
        ("zero\u200bwidth\ufeff\u2060", "zerowidth"),
        ("line\u2028para\u2029", "linepara"),
        ("private\ue000\U000f0000unassigned\U000e0080", "privateunassigned"),
        ("no\tbreak\u00a0space\u3000", "nobreakspace"),
        ("  spaced out  ", "spaced out"),
        ("ß日本語-😀", "ß日本語-😀"),
        ("x" * 500, "x" * MAX_REQUEST_ID_LENGTH),
        ("\n" * 300 + "y" * 300, "y" * MAX_REQUEST_ID_LENGTH),
        ("", ""),
        ("\n\r\x1b\u202e", ""),
        ("   ", ""),
        ("\x00" * REQUEST_ID_SCAN_LENGTH + "late", ""),
    ],
)
def test_clean_request_id(sent: str, kept: str) -> None:
    assert clean_request_id(sent) == kept


@examples(300)
@given(st.text(max_size=REQUEST_ID_SCAN_LENGTH * 2))
def test_cleaned_request_ids_are_printable_and_bounded(sent: str) -> None:
    cleaned = clean_request_id(sent)
    assert cleaned.isprintable()
    assert len(cleaned) <= MAX_REQUEST_ID_LENGTH
    assert cleaned == cleaned.strip()
    assert set(cleaned) <= set(sent)
    header = request_id_header(cleaned)
    assert re.fullmatch(r"[ -~]*", header)


def test_empty_request_ids_are_generated() -> None:
    for sent in ("", "\n\x00\u202e", "\x1b" * 10_000 + "id"):
        first = request_id_of(pb.PredictRequest(request_id=sent))
        second = request_id_of(pb.PredictRequest(request_id=sent))
        assert GENERATED_ID.fullmatch(first)
        assert first != second


@pytest.mark.parametrize(
    ("request_id", "header"),
    [
        ("plain-id_42", "plain-id_42"),
        ("café", "caf\\xe9"),
        ("日本", "\\u65e5\\u672c"),
        ("😀", "\\U0001f600"),
        ("back\\slash", "back\\\\slash"),
        ("a\nb\x1b", "a\\x0ab\\x1b"),
        ("\u202e", "\\u202e"),
    ],
)
def test_request_id_header_is_printable_ascii(request_id: str, header: str) -> None:
    assert request_id_header(request_id) == header


HOSTILE_ID = "  abc\u202e\nFAKE LOG LINE \x1b[2J日本" + "z" * 200
CLEANED_ID = clean_request_id(HOSTILE_ID)


def test_cleaned_id_is_echoed_by_every_rpc(stub: pb_grpc.InferenceServiceStub) -> None:
    assert CLEANED_ID.startswith("abcFAKE LOG LINE [2J日本zz")
    assert len(CLEANED_ID) == MAX_REQUEST_ID_LENGTH
    request = _prompted("Hello", request_id=HOSTILE_ID, config=pb.InferenceConfig(max_tokens=2))

    assert stub.Predict(request, timeout=TIMEOUT_S).request_id == CLEANED_ID

    call = stub.StreamPredict(request, timeout=TIMEOUT_S)
    assert list(call)[-1].is_final
    assert dict(call.initial_metadata())["x-request-id"] == request_id_header(CLEANED_ID)
    assert "\\u65e5\\u672c" in request_id_header(CLEANED_ID)

    batch = stub.BatchPredict(pb.BatchPredictRequest(requests=[request, request]))
    assert [r.response.request_id for r in batch.results] == [CLEANED_ID, CLEANED_ID]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_no_log_injection_through_request_id_or_model_id(
    stub: pb_grpc.InferenceServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    # The server's own log format, with the request id of each line in brackets.
    caplog.handler.setFormatter(logging.Formatter(LOG_FORMAT))
    caplog.handler.addFilter(RequestContextFilter())
    caplog.set_level(logging.INFO, logger="llm_stream")
    injected = "ok\nFAKE LOG LINE\r\nFAKE AGAIN \u2028FAKE SEPARATOR"
    expected = clean_request_id(injected)
    assert expected == "okFAKE LOG LINEFAKE AGAIN FAKE SEPARATOR"

    request = _prompted("Hello", request_id=injected, config=pb.InferenceConfig(max_tokens=2))
    stub.Predict(request, timeout=TIMEOUT_S)
    list(stub.StreamPredict(request, timeout=TIMEOUT_S))
    bad_model = _prompted("Hello", request_id=injected, model_id="m\nFAKE MODEL LINE")
    with pytest.raises(grpc.RpcError):
        stub.Predict(bad_model, timeout=TIMEOUT_S)
    bad_role = pb.PredictRequest(
        request_id=injected, messages=[pb.ChatMessage(role="x\nFAKE ROLE LINE", content="hi")]
    )
    with pytest.raises(grpc.RpcError):
        stub.Predict(bad_role, timeout=TIMEOUT_S)

    # Both generations end with a log line naming the cleaned id (logged off the
    # caller's path, so wait for them), and both rejections are logged.
    def logged() -> bool:
        text = caplog.text
        ended = text.count(f"generation {expected} ended")
        return ended >= 2 and text.count("request rejected") >= 2

    _wait_for(logged)
    lines = caplog.text.splitlines()
    assert any(f"[{expected}]" in line for line in lines)
    # The end line is logged on the engine's thread, and still carries the request's id.
    ends = [line for line in lines if f"generation {expected} ended" in line]
    assert ends and all(f"[{expected}]" in line for line in ends), ends
    assert any("'m\\nFAKE MODEL LINE'" in line for line in lines)
    assert any("'x\\nFAKE ROLE LINE'" in line for line in lines)
    for line in lines:
        assert not line.startswith("FAKE"), line


# -- extreme sampling values ------------------------------------------------------------


@pytest.mark.parametrize("penalty", [2.0**-126, 2.0**-149, 1e-30, 3.4e38])
@pytest.mark.parametrize("temperature", [0.0, 2.0**-126, 1.0, 3.4e38])
def test_extreme_repetition_penalties_still_choose_a_token(
    penalty: float, temperature: float
) -> None:
    """Any positive float32 is a valid penalty; dividing logits by a tiny one overflows
    them to infinity, which once made softmax NaN and the draw index -1 (INTERNAL, and
    the whole batch of other clients' generations failed with it)."""
    vocab = 50
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 10
    sampler = BatchSampler(3, torch.device("cpu"))
    params = [
        SamplingParams(
            max_tokens=4,
            temperature=temperature,
            repetition_penalty=penalty,
            seed=7,
            top_p=top_p,
            top_k=top_k,
        )
        for top_p, top_k in [(1.0, 0), (0.5, 0), (1.0, 3)]
    ]
    sampler.place(0, params, [list(range(vocab))] * 3, vocab=vocab)
    for step in range(3):
        tokens = sampler.sample(logits, slice(0, 3), functools.partial(torch.full, (3,), 10 + step))
        sampler.record(tokens, slice(0, 3))
        assert all(0 <= token < vocab for token in tokens.tolist()), tokens


def test_a_tiny_repetition_penalty_over_the_wire(stub: pb_grpc.InferenceServiceStub) -> None:
    request = _prompted(
        "Hello world, hello world",
        config=pb.InferenceConfig(
            temperature=1.0, repetition_penalty=2.0**-126, max_tokens=MAX_TOKENS_CAP, seed=1
        ),
    )
    assert stub.Predict(request, timeout=TIMEOUT_S).usage.completion_tokens > 0
    assert list(stub.StreamPredict(request, timeout=TIMEOUT_S))[-1].is_final


def test_an_unexpected_error_names_the_cleaned_id(
    stub: pb_grpc.InferenceServiceStub,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server bug is INTERNAL naming the request id: the cleaned one, in the message
    and in the log line with the trace, even when the bug strikes before the request
    is converted."""

    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug while converting")

    monkeypatch.setattr(servicer_module, "draft_from_pb", bug)
    caplog.handler.setFormatter(logging.Formatter(LOG_FORMAT))
    caplog.handler.addFilter(RequestContextFilter())
    caplog.set_level(logging.INFO, logger="llm_stream")
    injected = "bug\nFAKE LOG LINE\u202e" + "q" * 500
    expected = clean_request_id(injected)
    request = _prompted("hi", request_id=injected)
    calls: list[Callable[[], object]] = [
        lambda: stub.Predict(request, timeout=TIMEOUT_S),
        lambda: list(stub.StreamPredict(request, timeout=TIMEOUT_S)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        details = raised.value.details() or ""
        assert raised.value.code() is grpc.StatusCode.INTERNAL, details[:300]
        message = f"internal error while serving request {expected}; the server log has the details"
        assert details == message, details[:300]
    _wait_for(lambda: caplog.text.count(f"request {expected} failed") >= 2)
    for line in caplog.text.splitlines():
        assert not line.startswith("FAKE"), line[:300]
