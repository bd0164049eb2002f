"""The grpc.aio server: its options, and the services it carries.

What the server serves is wired in :mod:`llm_stream.app`; this module only
knows gRPC.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from llm_stream.access import AccessControl
from llm_stream.front_door.admission import Admission
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.protocol.guard import CallGate, guarded_service_handler
from llm_stream.protocol.health import HealthState
from llm_stream.protocol.servicer import InferenceServicer
from llm_stream.protocol.tls import server_credentials
from llm_stream.settings import Settings
from llm_stream.tls_files import TLSFiles

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Server pings keep long, quiet streams alive through proxies and NATs.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A client ping sooner than this after the last data frame is a strike
        # (grpc's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS) ...
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(settings.min_ping_interval_s * 1000),
        ),
        # ... and this many strikes earn GOAWAY too_many_pings. The default 0 never
        # sends it: a client with eager keepalive is answered, not disconnected.
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
        # Fail loudly when the port is taken instead of sharing it.
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s > 0:
        # Periodic GOAWAY makes clients reconnect and re-resolve dns:/// names, so
        # client-side round_robin learns about new replicas; streams may finish.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                int(settings.max_connection_age_grace_s * 1000),
            ),
        ]
    return options


def build_grpc_server(
    settings: Settings,
    servicer: InferenceServicer,
    health_state: HealthState,
    gate: CallGate,
) -> grpc.aio.Server:
    """The inference service behind ``gate``, grpc.health.v1 and (if enabled)
    reflection, not yet bound."""
    compression = grpc.Compression.Gzip if settings.compression == "gzip" else None
    server = grpc.aio.server(options=server_options(settings), compression=compression)
    server.add_generic_rpc_handlers(
        (guarded_service_handler(servicer, gate), health_handler(health_state))
    )
    if settings.reflection:
        names = (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        server.add_generic_rpc_handlers(
            (
                guarded_service_handler(
                    reflection.aio.ReflectionServicer(names),
                    CallGate(Admission(AccessControl())),
                    REFLECTION_SERVICE,
                    reflection_pb2,
                ),
            )
        )
    return server


def health_handler(health_state: HealthState) -> grpc.GenericRpcHandler:
    """grpc.health.v1, open to all, with the same decoding and last-net as the service."""
    return guarded_service_handler(
        health_state.servicer, CallGate(Admission(AccessControl())), HEALTH_SERVICE, health_pb2
    )


def build_health_server(health_state: HealthState) -> grpc.aio.Server:
    """A server with nothing but grpc.health.v1, for a plaintext probe port beside TLS."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((health_handler(health_state),))
    return server


def bind(server: grpc.aio.Server, address: str, files: TLSFiles | None) -> int:
    """Bind ``address``, with TLS when given certificate files; returns the port."""
    if files is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, server_credentials(files)))
