"""``python -m llm_stream.healthcheck``: exit 0 only when the server reports SERVING.

Calls the standard ``grpc.health.v1.Health/Check`` (the same RPC Kubernetes' native
gRPC probes and Envoy's health checks use), for the container's HEALTHCHECK and for
scripts. Exit status: 0 SERVING; 1 anything else (NOT_SERVING while loading, warming
up or draining, an unknown service, unreachable, deadline exceeded), with a one-line
reason on stderr.

Each flag has an environment default read at run time:
``LLM_STREAM_HEALTHCHECK_ADDRESS``, else the server's own variables, so a container's
HEALTHCHECK follows them: ``localhost:$LLM_STREAM_HEALTH_PORT`` when that plaintext
health-only port is on (not 0; the gRPC port may then speak TLS, which this check does
not), else ``localhost:$LLM_STREAM_PORT`` when it is set, else ``localhost:50051``.
``LLM_STREAM_HEALTHCHECK_SERVICE``, ``LLM_STREAM_HEALTHCHECK_TIMEOUT``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("llm_stream.healthcheck")

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_SERVICE = "inference.v1.InferenceService"
DEFAULT_TIMEOUT_S = 3.0
ENV_ADDRESS = "LLM_STREAM_HEALTHCHECK_ADDRESS"
ENV_SERVICE = "LLM_STREAM_HEALTHCHECK_SERVICE"
ENV_TIMEOUT = "LLM_STREAM_HEALTHCHECK_TIMEOUT"
# The server's own variables (llm_stream.cli), read for the default address.
ENV_SERVER_PORT = "LLM_STREAM_PORT"
ENV_SERVER_HEALTH_PORT = "LLM_STREAM_HEALTH_PORT"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def default_address(environ: Mapping[str, str]) -> str:
    """The address to check when ``--address`` is not given (see the module's doc)."""
    if environ.get(ENV_ADDRESS):
        return environ[ENV_ADDRESS]
    health_port = environ.get(ENV_SERVER_HEALTH_PORT, "").strip()
    if health_port.isdigit() and int(health_port) > 0:
        return f"localhost:{health_port}"
    port = environ.get(ENV_SERVER_PORT, "").strip()
    return f"localhost:{port}" if port else DEFAULT_ADDRESS


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llm_stream.healthcheck",
        description="Exit 0 when grpc.health.v1.Health/Check answers SERVING, 1 otherwise.",
    )
    parser.add_argument(
        "--address",
        default=default_address(environ),
        help=f"host:port of the server, in plaintext (env {ENV_ADDRESS}; default "
        f"localhost:${ENV_SERVER_HEALTH_PORT} when the server's plaintext health port is "
        f"on, else localhost:${ENV_SERVER_PORT} when set, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--service",
        default=environ.get(ENV_SERVICE, DEFAULT_SERVICE),
        help="health service name; '' is the whole server "
        f"(env {ENV_SERVICE}; default {DEFAULT_SERVICE})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=environ.get(ENV_TIMEOUT, str(DEFAULT_TIMEOUT_S)),
        help=f"deadline in seconds (env {ENV_TIMEOUT}; default {DEFAULT_TIMEOUT_S:g})",
    )
    return parser


def check(address: str, service: str, timeout: float) -> tuple[bool, str]:
    """One Health/Check; returns (serving, a one-line description)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=False,
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            return False, f"{address} service={service!r}: {name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    return serving, f"{address} service={service!r}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="healthcheck: %(message)s", stream=sys.stderr)
    try:
        args = build_parser(os.environ).parse_args(argv)
    except SystemExit as exc:  # bad flags: 1, not argparse's 2 (reserved by Docker HEALTHCHECK)
        return 0 if exc.code in (0, None) else 1
    serving, reason = check(args.address, args.service, float(args.timeout))
    if serving:
        log.debug("%s", reason)
        return 0
    log.error("%s", reason)
    return 1


if __name__ == "__main__":
    sys.exit(main())
