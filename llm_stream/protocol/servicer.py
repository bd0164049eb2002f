"""``inference.v1.InferenceService``: translates protobuf to engine calls and back.

Every failure leaves through :func:`_abort`, which maps it with the one status
table; client mistakes get their code and a message saying what to fix, and
nothing unexpected leaks a stack trace to the client.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import NoReturn

import grpc

from llm_stream.engine.engine import Engine
from llm_stream.engine.types import Completion, GenerationRequest, TokenEvent
from llm_stream.errors import InvalidRequestError, LLMStreamError, quoted_input
from llm_stream.logging_setup import key_id_var, request_id_var
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from llm_stream.protocol.convert import (
    RequestLimits,
    completion_to_pb,
    request_id_header,
    request_id_of,
    stream_end_to_pb,
    to_generation_request,
    token_to_pb,
)
from llm_stream.protocol.health import HealthState
from llm_stream.protocol.status import abort_with, status_for

log = logging.getLogger(__name__)


async def _abort(
    context: grpc.aio.ServicerContext,
    exc: Exception,
    request_id: str,
    on_rejected: Callable[[str], None],
    pushback_ms: int,
) -> NoReturn:
    code, message = status_for(exc, request_id)
    on_rejected(code.name)
    if isinstance(exc, LLMStreamError):
        log.info("request rejected: %s %s", code.name, message)
    else:
        # The id the client was given, spelled out for whoever greps the log for it.
        log.error("request %s failed", request_id, exc_info=exc)
    await abort_with(context, code, message, pushback_ms)


def _from_client(request: GenerationRequest) -> GenerationRequest:
    """The request labelled with the caller's key id (set by the guard), for the log."""
    return dataclasses.replace(request, client=key_id_var.get())


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        engine: Engine,
        health: HealthState,
        limits: RequestLimits,
        max_batch_size: int,
        *,
        on_rejected: Callable[[str], None] = lambda _code: None,
        retry_pushback_ms: int = 500,
    ) -> None:
        self._on_rejected = on_rejected
        self._pushback_ms = retry_pushback_ms
        self._engine = engine
        self._health = health
        self._limits = limits
        self._max_batch_size = max_batch_size

    def _request(self, message: pb.PredictRequest, request_id: str) -> GenerationRequest:
        request_id_var.set(request_id)
        return _from_client(to_generation_request(message, self._limits, request_id))

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        request_id = request_id_of(request)
        try:
            generation = self._request(request, request_id)
            completion = await self._engine.complete(generation)
            return completion_to_pb(request_id, completion)
        except Exception as exc:
            await _abort(context, exc, request_id, self._on_rejected, self._pushback_ms)

    async def StreamPredict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictToken]:
        request_id = request_id_of(request)
        try:
            generation = self._request(request, request_id)
            headers_sent = False
            async with aclosing(self._engine.stream(generation)) as events:
                async for event in events:
                    if not headers_sent:
                        # Headers go with the first token, not before admission: a call
                        # turned away before any header is one gRPC clients may retry.
                        await context.send_initial_metadata(
                            (("x-request-id", request_id_header(request_id)),)
                        )
                        headers_sent = True
                    if isinstance(event, TokenEvent):
                        yield token_to_pb(event)
                    else:
                        yield stream_end_to_pb(event)
        except Exception as exc:
            await _abort(context, exc, request_id, self._on_rejected, self._pushback_ms)

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
            items: list[GenerationRequest | Exception] = []
            ids: list[str] = []
            for message in request.requests:
                ids.append(request_id_of(message))
                try:
                    items.append(
                        _from_client(to_generation_request(message, self._limits, ids[-1]))
                    )
                except LLMStreamError as exc:
                    items.append(exc)
            results = await self._engine.batch(items)
            return pb.BatchPredictResponse(
                results=[self._batch_result(i, r) for i, r in zip(ids, results, strict=True)]
            )
        except Exception as exc:
            await _abort(context, exc, batch_id, self._on_rejected, self._pushback_ms)

    @staticmethod
    def _batch_result(request_id: str, result: Completion | Exception) -> pb.BatchPredictResult:
        if isinstance(result, Completion):
            return pb.BatchPredictResult(response=completion_to_pb(request_id, result))
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
