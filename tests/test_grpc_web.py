"""grpc-web through the real Envoy (deploy/envoy.yaml's grpc_web and cors filters).

The client is clients/grpc-web/stream.mjs: @connectrpc/connect with
@connectrpc/connect-node's grpc-web transport (the protocol a browser app speaks
through @connectrpc/connect-web) and the code protoc-gen-es generated from the proto,
run by Node over HTTP/1.1 as a browser without TLS does. The replica's decode steps are
slowed down (tests/wrapped_backend.py), so tokens visibly arrive one by one and a
cancel lands mid-generation. Node and the client's packages (npm ci,
scripts/install_web_client.sh, run by scripts/install_tools.sh) are required: without
them these tests fail, never skip.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llm_stream.engine.types import FinishReason
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import RunningServer, prompt_request, running_server, tiny_settings
from tests.envoy_proxy import REPO, EnvoyProxy, envoy_in_front
from tests.wrapped_backend import slow_models

pytestmark = pytest.mark.deploy

CLIENT_DIR = REPO / "clients" / "grpc-web"
STREAM_SCRIPT = CLIENT_DIR / "stream.mjs"
# Seconds per decode step: 20 tokens take about a second, tokens are 50 ms apart.
STEP_DELAY = 0.05
ALLOWED_ORIGIN = "https://chat.example.test"
ALLOWED_ORIGIN_REGEX = r"^http://localhost(:[0-9]+)?$"
PROMPT = "Hello world"


def node_command() -> list[str]:
    """``node stream.mjs``, or a failure that says how to install what is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: install Node.js 20+ and npm, then scripts/install_tools.sh")
    installed = CLIENT_DIR / "node_modules" / "@connectrpc" / "connect-node" / "package.json"
    if not installed.exists():
        pytest.fail(
            f"{CLIENT_DIR}/node_modules is missing: run scripts/install_tools.sh "
            "(it runs scripts/install_web_client.sh, npm ci from the lockfile)"
        )
    return [node, str(STREAM_SCRIPT)]


@dataclass
class WebStack:
    replica: RunningServer
    envoy: EnvoyProxy


@pytest.fixture(scope="module")
async def stack(
    tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[WebStack]:
    node_command()  # fail first, before starting anything, when Node is not set up
    settings = tiny_settings(tiny_model_dir, cache_dir, max_concurrent=4)
    async with (
        running_server(settings, load_models=slow_models(STEP_DELAY)) as replica,
        envoy_in_front(
            [replica],
            tmp_path_factory.mktemp("grpc-web"),
            allowed_origins=[ALLOWED_ORIGIN],
            allowed_origin_regexes=[ALLOWED_ORIGIN_REGEX],
        ) as envoy,
    ):
        await envoy.wait_health(replica.server.port, healthy=True)
        yield WebStack(replica, envoy)


@dataclass
class Run:
    returncode: int
    # (the client's JSON line, when it reached this process: time.monotonic())
    lines: list[tuple[dict[str, Any], float]]
    stderr: str

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [line for line, _ in self.lines if line["type"] == kind]


async def stream(envoy: EnvoyProxy, *args: str, timeout: float = 30) -> Run:
    """Run stream.mjs against Envoy, reading its lines as they come."""
    process = await asyncio.create_subprocess_exec(
        *node_command(),
        envoy.url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    lines = []
    try:
        async with asyncio.timeout(timeout):
            while raw := await process.stdout.readline():
                lines.append((json.loads(raw), time.monotonic()))
            stderr = (await process.stderr.read()).decode()
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return Run(returncode, lines, stderr)


@pytest.mark.parametrize("http_version", ["1.1", "2"])
async def test_tokens_arrive_one_by_one_and_equal_predict(
    stack: WebStack, http_version: str
) -> None:
    max_tokens = 24
    run, direct = await asyncio.gather(
        stream(
            stack.envoy,
            PROMPT,
            "--max-tokens",
            str(max_tokens),
            "--http-version",
            http_version,
            "--request-id",
            f"web-{http_version}",
        ),
        stack.replica.stub.Predict(
            prompt_request(PROMPT, max_tokens=max_tokens, temperature=0), timeout=30
        ),
    )
    assert run.returncode == 0, run.stderr
    kinds = [line["type"] for line, _ in run.lines]
    assert kinds == ["token"] * (len(kinds) - 1) + ["final"], kinds
    tokens = run.of_type("token")
    final = run.of_type("final")[0]
    # The same greedy generation as a direct gRPC Predict on the replica.
    assert "".join(t["token"] for t in tokens) == direct.text
    assert final["usage"]["completion_tokens"] == direct.usage.completion_tokens
    assert final["finish_reason"] == pb.FinishReason.Name(direct.finish_reason)
    assert [t["index"] for t in tokens] == list(range(len(tokens))) == list(range(final["tokens"]))
    # Incremental: the messages were stamped as they arrived, over about one decode
    # step each, and reached this process as they came (not in one piece at the end).
    assert len(tokens) >= 10
    stamps = [line["t"] for line, _ in run.lines]
    assert stamps == sorted(stamps)
    expected_s = (len(tokens) - 1) * STEP_DELAY
    assert (final["t"] - tokens[0]["t"]) / 1000 > 0.5 * expected_s
    arrivals = [arrived for _, arrived in run.lines]
    assert arrivals[-1] - arrivals[0] > 0.5 * expected_s


async def test_cancel_stops_the_generation_on_the_server(stack: WebStack) -> None:
    """An aborted grpc-web call (a Stop button) cancels the model's work behind Envoy."""
    max_tokens = 2000  # 100 s of decoding if the cancel did not reach the server
    run = await stream(
        stack.envoy,
        PROMPT,
        "--max-tokens",
        str(max_tokens),
        "--cancel-after",
        "3",
        "--request-id",
        "web-cancel",
    )
    assert run.returncode == 0, run.stderr
    assert [line["type"] for line, _ in run.lines] == ["token"] * 3 + ["cancelled"]
    engine = stack.replica.server.engine
    record = await engine.wait_finished("web-cancel", timeout=15)
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.steps_after_cancel is not None and record.steps_after_cancel <= 1
    # The cancel crossed Envoy within a few decode steps of the client's abort.
    assert 3 <= record.completion_tokens < 3 + 20 < max_tokens
    response = await stack.replica.stub.Predict(prompt_request("again", max_tokens=3), timeout=30)
    assert response.usage.completion_tokens > 0


async def test_grpc_error_is_the_exit_status(stack: WebStack) -> None:
    run = await stream(stack.envoy, PROMPT, "--max-tokens", "100000")  # over the server's cap
    assert run.returncode == 3, run.stderr  # INVALID_ARGUMENT
    (error,) = run.of_type("error")
    assert error["code_name"] == "INVALID_ARGUMENT" and "max_tokens" in error["message"]
    assert "INVALID_ARGUMENT" in run.stderr


def http_request(
    envoy: EnvoyProxy, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTP/1.1 request to Envoy's listener, as a browser sends it."""
    connection = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def preflight(envoy: EnvoyProxy, origin: str) -> tuple[int, http.client.HTTPMessage]:
    status, headers, _ = http_request(
        envoy,
        "OPTIONS",
        "/inference.v1.InferenceService/StreamPredict",
        {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-grpc-web,x-user-agent,authorization",
        },
    )
    return status, headers


def grpc_web_check(envoy: EnvoyProxy, origin: str) -> tuple[http.client.HTTPMessage, bytes]:
    """A unary grpc-web call (Check), framed by hand as a browser's client frames it."""
    message = pb.HealthCheckRequest(service="inference.v1.InferenceService").SerializeToString()
    status, headers, body = http_request(
        envoy,
        "POST",
        "/inference.v1.InferenceService/Check",
        {
            "Origin": origin,
            "Content-Type": "application/grpc-web+proto",
            "X-Grpc-Web": "1",
            "Accept": "application/grpc-web+proto",
        },
        b"\x00" + struct.pack(">I", len(message)) + message,
    )
    assert status == 200
    return headers, body


def grpc_web_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, offset = [], 0
    while offset < len(body):
        flags, length = struct.unpack_from(">BI", body, offset)
        frames.append((flags, body[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    return frames


async def test_cors_allows_only_the_configured_origins(stack: WebStack) -> None:
    envoy = stack.envoy
    upstream_before = (await asyncio.to_thread(envoy.stats)).get("upstream_rq_total", 0)
    for origin in (ALLOWED_ORIGIN, "http://localhost:5173"):
        status, headers = await asyncio.to_thread(preflight, envoy, origin)
        assert status == 200, dict(headers)
        assert headers["access-control-allow-origin"] == origin
        assert "POST" in headers["access-control-allow-methods"]
        allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
        assert {"content-type", "x-grpc-web", "x-user-agent", "authorization"} <= allowed
        assert headers["access-control-max-age"] == "600"
        assert "access-control-allow-credentials" not in headers
    # Any other origin: Envoy's answer lacks Access-Control-Allow-Origin, so the browser
    # refuses to send the call.
    for origin in ("https://evil.example.test", "https://chat.example.test.evil.test"):
        status, headers = await asyncio.to_thread(preflight, envoy, origin)
        assert status == 200, dict(headers)
        assert "access-control-allow-origin" not in headers, origin
    # Preflights are Envoy's to answer: none reached the replica (its health checks do
    # not count in upstream_rq_total).
    assert (await asyncio.to_thread(envoy.stats)).get("upstream_rq_total", 0) == upstream_before

    # The call itself: gRPC to the replica, grpc-web back with the trailers in the
    # body, and the CORS headers a browser needs to let the page read it.
    headers, body = await asyncio.to_thread(grpc_web_check, envoy, ALLOWED_ORIGIN)
    assert headers["content-type"].startswith("application/grpc-web")
    assert headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = {h.strip() for h in headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message"} <= exposed
    (data_flags, data), (trailer_flags, trailers) = grpc_web_frames(body)
    assert (data_flags, trailer_flags) == (0x00, 0x80)
    assert pb.HealthCheckResponse.FromString(data).status == pb.HealthCheckResponse.SERVING
    assert "grpc-status:0" in trailers.decode().replace(" ", "").lower()
    headers, _ = await asyncio.to_thread(grpc_web_check, envoy, "https://evil.example.test")
    assert "access-control-allow-origin" not in headers
