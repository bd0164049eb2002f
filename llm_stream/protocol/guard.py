"""The gate in front of every InferenceService RPC.

The service is registered here rather than through the generated helper, so that
each call passes, in order:

1. decoding that never raises: bytes that are not the expected message become
   INVALID_ARGUMENT naming that message, instead of grpc's UNKNOWN with a Python
   class name;
2. the API key check (with ``--api-keys-file``): UNAUTHENTICATED saying how to
   authenticate;
3. the per-key cap on generations held (``--max-concurrent-per-key``):
   RESOURCE_EXHAUSTED with a retry pushback, while other keys are still served;
4. a last net: anything unexpected that escapes the servicer is INTERNAL with a
   request id, logged with its trace, never shown to the client.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from llm_stream.errors import InvalidRequestError, LLMStreamError
from llm_stream.front_door.admission import Admission
from llm_stream.logging_setup import request_id_var
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.protocol.status import abort_with, status_for

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]


@dataclass(frozen=True)
class Undecodable:
    """What the lenient deserializer returns for bytes that do not parse."""

    type_name: str


def lenient_deserializer(message_class: type[Message]) -> Callable[[bytes], Any]:
    type_name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, or a string field that is not UTF-8
            return Undecodable(type_name)

    return parse


def generations_held(request: Message) -> int:
    """How many generations a request holds while it runs (what the per-key cap counts)."""
    if isinstance(request, pb.BatchPredictRequest):
        return len(request.requests)
    if isinstance(request, pb.PredictRequest):
        return 1
    return 0


class CallGate:
    """Decoding, authentication and the per-key cap, in front of every call of the service."""

    def __init__(self, admission: Admission, pushback_ms: int = 500) -> None:
        self.admission = admission
        self._pushback_ms = pushback_ms

    async def _reject(self, context: grpc.aio.ServicerContext, exc: LLMStreamError) -> NoReturn:
        # The peer, so that repeated refusals (a key being guessed) can be traced.
        self.admission.rejected(exc, "", context.peer())
        code, message = status_for(exc, "")
        await abort_with(context, code, message, self._pushback_ms)

    async def reject_undecodable(
        self, request: Undecodable, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await self._reject(
            context,
            InvalidRequestError(
                f"the request is not a valid {request.type_name} (malformed protobuf, or a "
                f"string field that is not UTF-8); send a {request.type_name} message"
            ),
        )

    async def admit(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[str, int]:
        """The caller's key id and the generations it now holds; aborts the call if refused.

        The key comes first: a caller without one learns nothing about its request."""
        units = 0 if isinstance(request, Undecodable) else generations_held(request)
        try:
            authorization = dict(context.invocation_metadata() or ()).get("authorization")
            key = self.admission.authenticate(None if authorization is None else str(authorization))
            if isinstance(request, Undecodable):
                await self.reject_undecodable(request, context)
            self.admission.hold(key, units)
        except LLMStreamError as exc:
            await self._reject(context, exc)
        return key, units

    def release(self, key: str, units: int) -> None:
        self.admission.release(key, units)


async def _internal(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    request_id = request_id_var.get()
    if request_id == "-":
        request_id = uuid.uuid4().hex
    log.error("request %s failed", request_id, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error while serving request {request_id}; the server log has the details",
    )
    raise AssertionError("context.abort returned")  # pragma: no cover


UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message | None]]
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Message]]


@asynccontextmanager
async def _guarded(
    gate: CallGate, request: Any, context: grpc.aio.ServicerContext
) -> AsyncIterator[None]:
    """Admission, then the call; what it holds is released however it ends, and an
    unexpected exception becomes INTERNAL with a request id."""
    admitted: tuple[str, int] | None = None
    try:
        admitted = await gate.admit(request, context)
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await _internal(context, exc)
    finally:
        if admitted is not None:
            gate.release(*admitted)


def _guard_unary(gate: CallGate, behaviour: UnaryBehaviour) -> UnaryBehaviour:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Message | None:
        async with _guarded(gate, request, context):
            return await behaviour(request, context)
        raise AssertionError("unreachable: _guarded re-raises or aborts")  # pragma: no cover

    return call


def _guard_stream(gate: CallGate, behaviour: StreamBehaviour) -> StreamBehaviour:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        async with (
            _guarded(gate, request, context),
            aclosing(behaviour(request, context)) as replies,  # type: ignore[type-var]
        ):
            async for reply in replies:
                yield reply

    return call


BidiBehaviour = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Message]]


def _guard_bidi(gate: CallGate, behaviour: BidiBehaviour) -> BidiBehaviour:
    """A stream of requests (reflection's): each is checked as it arrives."""

    async def call(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await gate.reject_undecodable(request, context)
                yield request

        async with (
            _guarded(gate, None, context),
            aclosing(behaviour(checked(), context)) as replies,  # type: ignore[type-var]
        ):
            async for reply in replies:
                yield reply

    return call


def guarded_service_handler(
    servicer: object,
    gate: CallGate,
    service: ServiceDescriptor = SERVICE,
    messages: ModuleType = pb,
) -> grpc.GenericRpcHandler:
    """``service``'s methods on ``servicer`` (message classes from ``messages``),
    each behind ``gate``. A server-streaming method may be an async generator, or a
    coroutine that writes with ``context.write`` (as grpc's health servicer does);
    a bidirectional one (reflection's) gets each request checked as it arrives."""
    handlers = {}
    for method in service.methods:
        request_class = getattr(messages, method.input_type.name)
        response_class = getattr(messages, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        wrapped: Any
        if method.client_streaming:
            assert method.server_streaming, f"{method.full_name}: client streaming only"
            wrapped, make = _guard_bidi(gate, behaviour), grpc.stream_stream_rpc_method_handler
        elif method.server_streaming and inspect.isasyncgenfunction(behaviour):
            wrapped, make = _guard_stream(gate, behaviour), grpc.unary_stream_rpc_method_handler
        elif method.server_streaming:
            wrapped, make = _guard_unary(gate, behaviour), grpc.unary_stream_rpc_method_handler
        else:
            wrapped, make = _guard_unary(gate, behaviour), grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            wrapped,
            request_deserializer=lenient_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
