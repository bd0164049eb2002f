"""``inference.v1.InferenceService``: translates protobuf to engine calls and back.

Requests are checked by the front door shared with the HTTP API; every failure
leaves through ``_abort``, which logs and counts it (``Admission.rejected``) and
maps it with the one error table: client mistakes get their code and a message
saying what to fix, and nothing unexpected leaks a stack trace to the client.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import NoReturn

import grpc

from llm_stream.engine.engine import Engine
from llm_stream.engine.types import (
    Completion,
    FinishReason,
    GenerationRequest,
    StreamEnd,
    TokenEvent,
)
from llm_stream.errors import InvalidRequestError, LLMStreamError, quoted_input
from llm_stream.front_door.admission import Admission
from llm_stream.front_door.request import RequestLimits, ValidRequest, blame_schema, validate
from llm_stream.front_door.tools import (
    ToolReading,
    finish_with_calls,
    read_tool_calls,
    tool_reading,
)
from llm_stream.logging_setup import key_id_var, request_id_var
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from llm_stream.protocol.convert import (
    FINISH_REASON_TO_PB,
    completion_to_pb,
    draft_from_pb,
    request_id_header,
    request_id_of,
    stream_end_to_pb,
    token_to_pb,
)
from llm_stream.protocol.health import HealthState
from llm_stream.protocol.status import abort_with, status_for

log = logging.getLogger(__name__)


def _with_tool_calls(
    reply: pb.PredictResponse | pb.PredictToken, reading: ToolReading, text: str
) -> None:
    """Adds the calls the model made, if any, to a response or a stream's final message."""
    content, calls = read_tool_calls(reading, text)
    if not calls:
        return
    reply.tool_calls.extend(
        pb.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments) for call in calls
    )
    reply.content = content
    if finish_with_calls(_finish_reason(reply.finish_reason), True):
        reply.finish_reason = pb.FINISH_REASON_TOOL_CALLS


def _finish_reason(value: int) -> FinishReason:
    return next(reason for reason, code in FINISH_REASON_TO_PB.items() if code == value)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        engine: Engine,
        health: HealthState,
        limits: RequestLimits,
        max_batch_size: int,
        *,
        admission: Admission,
        retry_pushback_ms: int = 500,
    ) -> None:
        self._admission = admission
        self._pushback_ms = retry_pushback_ms
        self._engine = engine
        self._health = health
        self._limits = limits
        self._max_batch_size = max_batch_size

    async def _abort(
        self, context: grpc.aio.ServicerContext, exc: Exception, request_id: str
    ) -> NoReturn:
        self._admission.rejected(exc, request_id)
        code, message = status_for(exc, request_id)
        await abort_with(context, code, message, self._pushback_ms)

    def _request(self, message: pb.PredictRequest, request_id: str) -> ValidRequest:
        """The request checked, labelled with the caller's key id (set by the guard)."""
        valid = validate(draft_from_pb(message, request_id), self._limits)
        generation = dataclasses.replace(valid.generation, client=key_id_var.get())
        return dataclasses.replace(valid, generation=generation)

    def _reading(self, valid: ValidRequest) -> ToolReading:
        self._engine.check_accepting()  # UNAVAILABLE while warming up, before the model is known
        backend = self._engine.backend_for(valid.generation.model_id)
        return tool_reading(valid, backend.model_id, backend.tool_format)

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        request_id = request_id_of(request)
        request_id_var.set(request_id)
        valid: ValidRequest | None = None
        try:
            valid = self._request(request, request_id)
            reading = self._reading(valid)
            completion = await self._engine.complete(valid.generation)
            if reading.header:
                # Sent with the answer, not before: a call turned away before any header
                # is one that gRPC clients may retry transparently.
                await context.send_initial_metadata((reading.header,))
            response = completion_to_pb(request_id, completion)
            _with_tool_calls(response, reading, completion.text)
            return response
        except Exception as exc:
            await self._abort(context, blame_schema(exc, valid), request_id)

    async def StreamPredict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictToken]:
        request_id = request_id_of(request)
        request_id_var.set(request_id)
        valid: ValidRequest | None = None
        try:
            valid = self._request(request, request_id)
            reading = self._reading(valid)
            headers = [("x-request-id", request_id_header(request_id))]
            if reading.header:
                headers.append(reading.header)
            headers_sent = False
            pieces: list[str] = []
            async with aclosing(self._engine.stream(valid.generation)) as events:
                async for event in events:
                    if not headers_sent:
                        # Headers go with the first token, not before admission: a call
                        # turned away before any header is one gRPC clients may retry.
                        await context.send_initial_metadata(tuple(headers))
                        headers_sent = True
                    if isinstance(event, TokenEvent):
                        if reading.format:
                            pieces.append(event.text)
                        yield token_to_pb(event)
                    else:
                        yield self._final(event, reading, "".join(pieces))
        except Exception as exc:
            await self._abort(context, blame_schema(exc, valid), request_id)

    @staticmethod
    def _final(end: StreamEnd, reading: ToolReading, text: str) -> pb.PredictToken:
        final = stream_end_to_pb(end)
        _with_tool_calls(final, reading, text)
        return final

    async def BatchPredict(
        self, request: pb.BatchPredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchPredictResponse:
        # The call's own id, for its log lines and an internal error's message.
        batch_id = f"batch-{uuid.uuid4().hex}"
        request_id_var.set(batch_id)
        try:
            count = len(request.requests)
            if count > self._max_batch_size:
                raise InvalidRequestError(
                    f"BatchPredict got {count} requests; this server takes at most "
                    f"{self._max_batch_size} per call: split the batch"
                )
            self._engine.check_accepting()  # the whole call, not each item, while warming up
            items: list[GenerationRequest | Exception] = []
            valids: list[ValidRequest | None] = []
            readings: list[ToolReading | None] = []
            ids: list[str] = []
            for message in request.requests:
                ids.append(request_id_of(message))
                try:
                    valid = self._request(message, ids[-1])
                    readings.append(self._reading(valid))
                    items.append(valid.generation)
                    valids.append(valid)
                except LLMStreamError as exc:
                    items.append(exc)
                    readings.append(None)
                    valids.append(None)
            results = await self._engine.batch(items)
            results = [
                result if isinstance(result, Completion) else blame_schema(result, valid)
                for result, valid in zip(results, valids, strict=True)
            ]
            return pb.BatchPredictResponse(
                results=[
                    self._batch_result(*item) for item in zip(ids, results, readings, strict=True)
                ]
            )
        except Exception as exc:
            await self._abort(context, exc, batch_id)

    @staticmethod
    def _batch_result(
        request_id: str, result: Completion | Exception, reading: ToolReading | None
    ) -> pb.BatchPredictResult:
        if isinstance(result, Completion):
            response = completion_to_pb(request_id, result)
            if reading is not None:
                _with_tool_calls(response, reading, result.text)
            return pb.BatchPredictResult(response=response)
        code, message = status_for(result, request_id)
        if not isinstance(result, LLMStreamError):
            log.error("batch item %s failed", request_id, exc_info=result)
        return pb.BatchPredictResult(error=pb.Error(code=code.value[0], message=message))

    async def Check(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        if not self._health.knows(request.service):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service {quoted_input(request.service)}; use '', "
                "'inference.v1.InferenceService' or 'InferenceService'",
            )
        status = (
            pb.HealthCheckResponse.SERVING
            if self._health.serving
            else pb.HealthCheckResponse.NOT_SERVING
        )
        return pb.HealthCheckResponse(status=status)
