"""An asyncio client for ``inference.v1.InferenceService`` that frontends import.

One channel is reused for every call; requests are gzip-compressed; calls wait
for the server to be reachable and are retried by the channel's service config
on UNAVAILABLE and on RESOURCE_EXHAUSTED (after the pause the server asks for
with ``grpc-retry-pushback-ms``, so a burst is absorbed); a stream only until
its first token, as gRPC retries do. Several targets or a ``dns:///`` name are
balanced per request with round_robin. TLS, mTLS and an API key are options.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
# What gRPC's UNAVAILABLE details say when the TLS handshake, not the network, failed.
HANDSHAKE_FAILURE_SIGNS = ("handshake", "ssl", "certificate", "tsi_")
INFERENCE_SERVICE = "inference.v1.InferenceService"

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": INFERENCE_SERVICE}],
            "waitForReady": True,
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "3s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }
    ],
}
# Fail fast: round_robin only; every failure reaches the caller as the server sent it.
FAIL_FAST_SERVICE_CONFIG = {"loadBalancingConfig": SERVICE_CONFIG["loadBalancingConfig"]}
# How many times ``stream(resume=True)`` carries on a cut stream.
RESUMES = 3


def channel_target(targets: str | Sequence[str]) -> str:
    """One gRPC target for one or several ``host:port`` addresses.

    Several addresses become an ``ipv4:``/``ipv6:`` list that round_robin spreads
    requests over; ``dns:///name:port`` balances over every address of the name.
    """
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    targets = [t.strip() for t in targets]
    if not targets:
        raise ValueError("no target given")
    if len(targets) == 1:
        return targets[0]
    families, addresses = set(), []
    for target in targets:
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target {target!r} must be host:port")
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"several targets must be IP addresses (got {target!r}); "
                "for host names use one dns:///name:port target"
            ) from None
        families.add(ip.version)
        addresses.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(families) > 1:
        raise ValueError("several targets must all be IPv4 or all IPv6")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(addresses)


# A conversation: messages as {"role": ..., "content": ...} mappings (the shape chat
# frontends already hold) or ChatMessage protos; roles system, user, assistant.
Conversation = Sequence[Mapping[str, str] | pb.ChatMessage]


def chat_messages(conversation: Conversation) -> list[pb.ChatMessage]:
    return [
        m if isinstance(m, pb.ChatMessage) else pb.ChatMessage(role=m["role"], content=m["content"])
        for m in conversation
    ]


def make_request(
    prompt: str | Conversation,
    *,
    model_id: str = "",
    request_id: str = "",
    temperature: float = 0.0,
    max_tokens: int = 0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    repetition_penalty: float = 0.0,
    apply_chat_template: bool | None = None,
    use_model_temperature: bool = False,
    continue_final_message: bool = False,
    json_schema: str = "",
    tools: Iterable[pb.Tool] = (),
    tool_choice: str = "",
) -> pb.PredictRequest:
    """A request; sampling fields left at 0 take the model's defaults (see the README),
    and ``use_model_temperature`` samples at the model's temperature when ``temperature``
    is 0. ``json_schema`` (a JSON Schema's text) asks for JSON matching it; ``tools``
    are functions the model may call (``tool_choice``: "auto", "none", "required" or
    a function's name); the response's ``tool_calls`` holds its calls."""
    config = pb.InferenceConfig(
        temperature=temperature,
        max_tokens=max_tokens,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop),
        repetition_penalty=repetition_penalty,
        use_model_temperature=use_model_temperature,
        continue_final_message=continue_final_message,
        json_schema=json_schema,
    )
    if seed is not None:
        config.seed = seed
    if apply_chat_template is not None:
        config.apply_chat_template = apply_chat_template
    request = pb.PredictRequest(
        model_id=model_id,
        request_id=request_id,
        config=config,
        tools=list(tools),
        tool_choice=tool_choice,
    )
    if isinstance(prompt, str):
        request.features["prompt"].string_value = prompt
    else:
        request.messages.extend(chat_messages(prompt))
    return request


def continuation(
    prompt: str | Conversation, text: str, tokens: int, options: Mapping[str, Any]
) -> tuple[str | Conversation, dict[str, Any]]:
    """(prompt, options) of the request that carries on a stream cut after ``tokens``
    token messages whose text was ``text``: the conversation with ``text`` as an open
    assistant turn (``continue_final_message``), or for a raw prompt (no chat template)
    the prompt followed by ``text``; an explicit ``max_tokens`` less what came. Nothing
    came: the same request again."""
    options = dict(options)
    if not tokens:
        return prompt, options
    if options.get("max_tokens"):
        options["max_tokens"] = max(1, int(options["max_tokens"]) - tokens)
    if isinstance(prompt, str) and options.get("apply_chat_template") is False:
        return prompt + text, options
    turns: list[Mapping[str, str] | pb.ChatMessage] = (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    )
    if options.get("continue_final_message"):  # already carrying an assistant turn on
        last = chat_messages(turns[-1:])[0]
        turns[-1] = {"role": "assistant", "content": last.content + text}
    else:
        turns.append({"role": "assistant", "content": text})
    options["continue_final_message"] = True
    return turns, options


def reset_as_unavailable(exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """A call its transport reset, reported as UNAVAILABLE; any other error as it is.

    When a replica dies mid-stream, a proxy in front of it (Envoy) can only reset the
    stream it has begun, and gRPC reports a reset as INTERNAL ("Received RST_STREAM
    with error code 2"): to a client, "a server bug, do not retry". It is not one: the
    server never finished, and the same request can be sent again (see the README's
    "A replica that dies mid-stream"). A server's own INTERNAL carries a status and
    its message, never a reset, so nothing else is changed.
    """
    details = exc.details() or ""
    if exc.code() is not grpc.StatusCode.INTERNAL or "RST_STREAM" not in details:
        return exc
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        exc.initial_metadata(),
        exc.trailing_metadata(),
        details=f"the call was reset before it ended (its server, or a proxy's upstream, "
        f"went away); it can be sent again: {details}",
        debug_error_string=exc.debug_error_string(),
    )


def _checked_key(api_key: str) -> str:
    """The key without the newline a file or Secret often ends with; gRPC metadata
    takes printable ASCII only, so anything else is a clear error here."""
    key = api_key.strip()
    if not key or not key.isascii() or not key.isprintable():
        raise ValueError("the API key must be printable ASCII (check for stray characters)")
    return key


def _pem(source: bytes | str | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def channel_credentials(
    ca_cert: bytes | str | Path | None = None,
    client_cert: bytes | str | Path | None = None,
    client_key: bytes | str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: the server checked against ``ca_cert`` (default: the system's
    roots); with ``client_cert`` and ``client_key``, this client's certificate (mTLS)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together: give both, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca_cert),
        private_key=_pem(client_key),
        certificate_chain=_pem(client_cert),
    )


class InferenceClient:
    """``async with InferenceClient("host:50051") as client: ...``

    ``tls=True`` (implied by ``ca_cert`` or a client certificate) speaks TLS;
    ``api_key`` is sent as ``authorization: Bearer <key>`` on every inference call.
    ``retry=False`` fails fast: no waiting for the server to be reachable and no
    retries, so each UNAVAILABLE or RESOURCE_EXHAUSTED reaches the caller as sent
    (load tests count them so).
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        compression: grpc.Compression = grpc.Compression.Gzip,
        max_message_bytes: int = 100 * 1024 * 1024,
        keepalive_time_s: float = 30.0,
        tls: bool = False,
        ca_cert: bytes | str | Path | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        api_key: str | None = None,
        retry: bool = True,
    ) -> None:
        options: list[tuple[str, Any]] = [
            (
                "grpc.service_config",
                json.dumps(SERVICE_CONFIG if retry else FAIL_FAST_SERVICE_CONFIG),
            ),
            ("grpc.enable_retries", int(retry)),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Pings no more often than the server's minimum interval (10 s by default).
            ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self.target = channel_target(target)
        if tls or ca_cert is not None or client_cert is not None or client_key is not None:
            self.channel = grpc.aio.secure_channel(
                self.target,
                channel_credentials(ca_cert, client_cert, client_key),
                options=options,
                compression=compression,
            )
        else:
            self.channel = grpc.aio.insecure_channel(
                self.target, options=options, compression=compression
            )
        # Sent as call metadata rather than call credentials, which gRPC refuses to
        # send over plaintext: a local server with keys and no TLS works too.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {_checked_key(api_key)}"),) if api_key else ()
        )
        self._stub = pb_grpc.InferenceServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 120.0, service: str = INFERENCE_SERVICE) -> None:
        """Wait until health reports SERVING (the model is loaded and warmed up).

        A server that is still starting is waited for; one whose TLS handshake fails
        (wrong CA, no client certificate, plaintext against TLS) will not get better,
        so that raises ConnectionError at once, with gRPC's reason."""
        request = health_pb2.HealthCheckRequest(service=service)
        waiting = asyncio.create_task(self._until_serving(request, timeout))
        prober = asyncio.create_task(self._handshake_failure(request))
        try:
            done, _ = await asyncio.wait({waiting, prober}, return_when=asyncio.FIRST_COMPLETED)
            if waiting in done:
                waiting.result()
                return
            raise prober.result()
        finally:
            for task in (waiting, prober):
                task.cancel()
            await asyncio.gather(waiting, prober, return_exceptions=True)

    async def _until_serving(self, request: health_pb2.HealthCheckRequest, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            watch = self._health.Watch(
                request, timeout=max(0.0, deadline - loop.time()), wait_for_ready=True
            )
            try:
                async for response in watch:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(
                        f"{self.target} did not report SERVING within {timeout:g} s"
                    ) from None
                # A proxy in front (Envoy) answers "no healthy upstream" until one of
                # its replicas is ready: that is still starting, so watch again.
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.25)
                continue
            finally:
                watch.cancel()
            raise ConnectionError(f"{self.target} ended the health watch: it is shutting down")

    async def _handshake_failure(self, request: health_pb2.HealthCheckRequest) -> ConnectionError:
        """Once a second, an immediate Check, until the connection's set-up fails in a way
        waiting will not fix: a failed TLS handshake, or a connection the server keeps
        closing as soon as it opens (TLS against plaintext or the reverse, or mTLS
        without a client certificate). A refused connection is a server still starting."""
        closed_in_a_row = 0
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._health.Check(request, timeout=5)
                closed_in_a_row = 0
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    continue
                if any(sign in details.lower() for sign in HANDSHAKE_FAILURE_SIGNS):
                    return ConnectionError(f"cannot reach {self.target} over TLS: {details}")
                closed_in_a_row = closed_in_a_row + 1 if "socket closed" in details.lower() else 0
                if closed_in_a_row >= 2:
                    return ConnectionError(
                        f"{self.target} closes every connection as it opens: a TLS mismatch? "
                        "(--tls or --ca-cert for a TLS server, --client-cert/--client-key when "
                        f"it requires client certificates): {details}"
                    )

    async def predict(
        self, prompt: str | Conversation, *, timeout: float | None = None, **options: Any
    ) -> pb.PredictResponse:
        """One completion of a prompt, or of a conversation (the assistant's next turn)."""
        try:
            response: pb.PredictResponse = await self._stub.Predict(
                make_request(prompt, **options), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise reset_as_unavailable(exc) from None
        return response

    async def stream(
        self,
        prompt: str | Conversation,
        *,
        timeout: float | None = None,
        resume: bool | int = False,
        **options: Any,
    ) -> AsyncIterator[pb.PredictToken]:
        """Token messages as they arrive; the last has ``is_final`` set. ``prompt`` is a
        string, or a conversation whose next assistant turn is generated.

        ``resume=True`` (or a number of resumes; True is 3): a stream cut UNAVAILABLE
        after some tokens (its replica died, a proxy reset it) is carried on by a new
        request that continues the text so far as an open assistant turn, usually on
        another replica; the caller sees one stream, token_index counting on and the
        final usage counting every token. The continuation is the model's reading of
        the text so far, not the lost stream's exact next tokens (see the README).
        ``timeout`` bounds the whole stream, resumes included."""
        resumes = RESUMES if resume is True else int(resume)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        request_prompt, request_options = prompt, options
        text, received = "", 0  # every token message so far, all attempts together
        while True:
            before = received  # this attempt's token_index 0 is the answer's ``before``
            call = self._stub.StreamPredict(
                make_request(request_prompt, **request_options),
                timeout=None if deadline is None else deadline - loop.time(),
                metadata=self._metadata,
            )
            try:
                async for token in call:
                    if before:  # a resumed stream: indexes and usage cover the whole answer
                        token.token_index += before
                        if token.is_final:
                            token.usage.completion_tokens += before
                    if not token.is_final:
                        text += token.token
                        received += 1
                    yield token
                return
            except grpc.aio.AioRpcError as exc:
                error = reset_as_unavailable(exc)
                if error.code() is not grpc.StatusCode.UNAVAILABLE or resumes <= 0:
                    raise error from None
                resumes -= 1
                request_prompt, request_options = continuation(prompt, text, received, options)
            finally:
                call.cancel()  # leaving early tells the server to stop generating

    async def batch(
        self, requests: Sequence[pb.PredictRequest], *, timeout: float | None = None
    ) -> pb.BatchPredictResponse:
        try:
            response: pb.BatchPredictResponse = await self._stub.BatchPredict(
                pb.BatchPredictRequest(requests=list(requests)),
                timeout=timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise reset_as_unavailable(exc) from None
        return response

    async def check(self, service: str = INFERENCE_SERVICE) -> int:
        response = await self._stub.Check(
            pb.HealthCheckRequest(service=service), metadata=self._metadata
        )
        return int(response.status)
