"""Render deploy/envoy.yaml for given ports and upstreams (tests, local runs).

deploy/envoy.yaml stays the one source of truth: this loads it, changes only the
listener port, the admin port and the cluster's endpoints (STATIC instead of
STRICT_DNS, one endpoint per upstream), the browser origins allowed by its CORS policy
(below), adds upstream TLS when asked (below), and keeps every other setting
(timeouts, health checks, retries, keepalive, the grpc_web and cors filters) as it is.

Python::

    from scripts.render_envoy import render   # or load this file by path
    config_yaml = render(listen_port=18080, admin_port=19901,
                         upstreams=[("127.0.0.1", 50061), ("127.0.0.1", 50062)])

CLI::

    python scripts/render_envoy.py --listen-port 18080 --admin-port 19901 \
        --upstream 127.0.0.1:50061 --upstream 127.0.0.1:50062 -o /tmp/envoy.yaml
    envoy --mode validate -c /tmp/envoy.yaml

Listener and admin bind to 127.0.0.1 unless ``listen_address``/``admin_address`` say
otherwise. Needs PyYAML (a dependency of transformers, so it is in .venv).

grpc-web from browser apps on other origins (CORS): deploy/envoy.yaml allows none;
``allowed_origins`` (exact origins, ``scheme://host[:port]``) and
``allowed_origin_regexes`` (RE2, matching the whole origin) list those allowed, as
the chart's ``envoy.grpcWeb.allowedOrigins``/``allowedOriginRegexes`` do::

    python scripts/render_envoy.py --listen-port 18080 --admin-port 19901 \
        --upstream 127.0.0.1:50061 --allow-origin http://localhost:5173 \
        --allow-origin-regex '^https://[a-z0-9-]+\\.example\\.com$' -o /tmp/envoy.yaml

Replicas serving TLS (``--tls-cert``/``--tls-key``; mTLS with ``--tls-client-ca``): an
:class:`UpstreamTls` adds the transport socket the chart adds with ``tls.enabled``
(scripts/check_deploy.sh checks the two agree). Its certificates are read through
file-based SDS, so the config is more than one file: :func:`write` puts them all in
one folder::

    from scripts.render_envoy import UpstreamTls, write
    config_path = write(workdir, 18080, 19901, [("127.0.0.1", 50061)],
                        upstream_tls=UpstreamTls(ca=Path("/certs/ca.crt"),
                                                 server_name="localhost",
                                                 client_cert=Path("/certs/envoy.crt"),
                                                 client_key=Path("/certs/envoy.key")))

    python scripts/render_envoy.py --listen-port 18080 --admin-port 19901 \
        --upstream 127.0.0.1:50061 --upstream-ca ca.crt --server-name localhost \
        --client-cert envoy.crt --client-key envoy.key -o /tmp/envoy/envoy.yaml

(``server_name``: SNI, and the DNS name the replicas' certificates must carry.)
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

SOURCE = Path(__file__).resolve().parent.parent / "deploy" / "envoy.yaml"
# Envoy's graceful stop (a preStop, or run before a SIGTERM): copied next to the config.
DRAIN_SCRIPT = SOURCE.parent / "envoy-drain.sh"
LISTENER = "grpc_ingress"
CLUSTER = "llm_stream"
VIRTUAL_HOST = "llm_stream"
CORS_FILTER = "envoy.filters.http.cors"
# A browser's Origin header: scheme://host[:port], nothing after it.
_ORIGIN = re.compile(r"^https?://[^/?#\s]+$")
CONFIG_FILE = "envoy.yaml"
# The file-based SDS resources, next to the config (the chart's ConfigMap keys).
SDS_UPSTREAM_CA = "sds-upstream-ca.yaml"
SDS_CLIENT_CERT = "sds-client-cert.yaml"
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_UPSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)


@dataclass(frozen=True)
class UpstreamTls:
    """Envoy to the replicas over TLS.

    ``ca``: PEM bundle of the CA that signed the replicas' certificates. ``server_name``:
    sent as SNI, and required as a DNS name (SAN) in the replica's certificate.
    ``client_cert``/``client_key``: Envoy's own certificate, for replicas that require
    one (mTLS). Each file's folder is watched: a Kubernetes Secret volume swaps in a
    rotated certificate by renaming its ``..data`` link there, and Envoy re-reads it.
    """

    ca: Path
    server_name: str
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        if not self.server_name:
            raise ValueError("upstream TLS needs a server name (SNI and the SAN to verify)")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        for path in (self.ca, self.client_cert, self.client_key):
            if path is not None and not path.is_absolute():
                raise ValueError(f"Envoy needs absolute paths: {path}")


def load_source(path: Path = SOURCE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return data


def _named(items: list[dict[str, Any]], name: str, what: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise ValueError(f"{SOURCE}: no {what} named {name!r}")


def _socket(address: str, port: int) -> dict[str, Any]:
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return {"socket_address": {"address": address, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def cors_policy(config: dict[str, Any]) -> dict[str, Any]:
    """The CorsPolicy of the listener's virtual host (the cors filter's per-route config)."""
    listener = _named(config["static_resources"]["listeners"], LISTENER, "listener")
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    host = _named(manager["route_config"]["virtual_hosts"], VIRTUAL_HOST, "virtual host")
    policy = host.get("typed_per_filter_config", {}).get(CORS_FILTER)
    if not isinstance(policy, dict):
        raise ValueError(f"{SOURCE}: virtual host {VIRTUAL_HOST!r} has no {CORS_FILTER} policy")
    return policy


def origin_matchers(
    allowed_origins: Sequence[str] = (), allowed_origin_regexes: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The CorsPolicy's ``allow_origin_string_match``: the exact origins, then the regexes
    (the chart's templates/envoy-configmap.yaml writes them in the same order)."""
    for origin in allowed_origins:
        if not _ORIGIN.match(origin):
            raise ValueError(f"an origin is scheme://host[:port] (no path), got {origin!r}")
    for regex in allowed_origin_regexes:
        if not regex:
            raise ValueError("an empty origin regex")
    matchers: list[dict[str, Any]] = [{"exact": o} for o in allowed_origins]
    matchers += [{"safe_regex": {"regex": r}} for r in allowed_origin_regexes]
    return matchers


def upstream_tls_resources(
    tls: UpstreamTls, sds_dir: Path
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The cluster's ``transport_socket``, and the SDS files (name -> content) it reads.

    ``sds_dir`` is the folder the SDS files will be in when Envoy runs.
    """
    if not sds_dir.is_absolute():
        raise ValueError(f"Envoy needs absolute paths: {sds_dir}")
    common: dict[str, Any] = {
        # gRPC needs HTTP/2; say so in the handshake as gRPC clients do.
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "validation_context_sds_secret_config": {
            "name": "upstream_ca",
            "sds_config": {"path_config_source": {"path": str(sds_dir / SDS_UPSTREAM_CA)}},
        },
    }
    files: dict[str, dict[str, Any]] = {
        SDS_UPSTREAM_CA: {
            "resources": [
                {
                    "@type": _SECRET_TYPE,
                    "name": "upstream_ca",
                    "validation_context": {
                        "trusted_ca": {"filename": str(tls.ca)},
                        "watched_directory": {"path": str(tls.ca.parent)},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": tls.server_name}}
                        ],
                    },
                }
            ]
        }
    }
    if tls.client_cert is not None and tls.client_key is not None:
        common["tls_certificate_sds_secret_configs"] = [
            {
                "name": "client_cert",
                "sds_config": {"path_config_source": {"path": str(sds_dir / SDS_CLIENT_CERT)}},
            }
        ]
        files[SDS_CLIENT_CERT] = {
            "resources": [
                {
                    "@type": _SECRET_TYPE,
                    "name": "client_cert",
                    "tls_certificate": {
                        "certificate_chain": {"filename": str(tls.client_cert)},
                        "private_key": {"filename": str(tls.client_key)},
                        "watched_directory": {"path": str(tls.client_cert.parent)},
                    },
                }
            ]
        }
    socket = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _UPSTREAM_TLS_TYPE,
            "sni": tls.server_name,
            "common_tls_context": common,
        },
    }
    return socket, files


def render_config(
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[tuple[str, int]],
    *,
    listen_address: str = "127.0.0.1",
    admin_address: str = "127.0.0.1",
    source: dict[str, Any] | None = None,
    upstream_tls: UpstreamTls | None = None,
    sds_dir: Path | None = None,
    allowed_origins: Sequence[str] = (),
    allowed_origin_regexes: Sequence[str] = (),
) -> dict[str, Any]:
    """The config as a dict (see :func:`render`); with ``upstream_tls`` the SDS files
    it reads are expected in ``sds_dir`` (see :func:`render_files`)."""
    if not upstreams:
        raise ValueError("at least one upstream is needed")
    config = copy.deepcopy(source if source is not None else load_source())
    config["admin"]["address"] = _socket(admin_address, admin_port)
    cors_policy(config)["allow_origin_string_match"] = origin_matchers(
        allowed_origins, allowed_origin_regexes
    )
    resources = config["static_resources"]
    _named(resources["listeners"], LISTENER, "listener")["address"] = _socket(
        listen_address, listen_port
    )
    cluster = _named(resources["clusters"], CLUSTER, "cluster")
    # STATIC needs IP addresses; host names (e.g. "localhost") keep STRICT_DNS.
    cluster["type"] = "STATIC" if all(_is_ip(host) for host, _ in upstreams) else "STRICT_DNS"
    if cluster["type"] == "STATIC":
        cluster.pop("dns_lookup_family", None)
    if upstream_tls is not None:
        if sds_dir is None:
            raise ValueError("upstream TLS needs sds_dir, the folder of its SDS files")
        cluster["transport_socket"] = upstream_tls_resources(upstream_tls, sds_dir)[0]
    cluster["load_assignment"] = {
        "cluster_name": CLUSTER,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": _socket(host, port)}} for host, port in upstreams
                ]
            }
        ],
    }
    return config


def _yaml(data: dict[str, Any]) -> str:
    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def render_files(
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[tuple[str, int]],
    *,
    sds_dir: Path,
    listen_address: str = "127.0.0.1",
    admin_address: str = "127.0.0.1",
    upstream_tls: UpstreamTls | None = None,
    allowed_origins: Sequence[str] = (),
    allowed_origin_regexes: Sequence[str] = (),
) -> dict[str, str]:
    """Every file of the config, by name: ``envoy.yaml``, ``envoy-drain.sh`` (as is) and,
    with ``upstream_tls``, the SDS files, which Envoy will find in ``sds_dir``."""
    header = (
        f"# Rendered by scripts/render_envoy.py from {SOURCE.parent.name}/{SOURCE.name}; "
        "do not edit.\n"
    )
    config = render_config(
        listen_port,
        admin_port,
        upstreams,
        listen_address=listen_address,
        admin_address=admin_address,
        upstream_tls=upstream_tls,
        sds_dir=sds_dir,
        allowed_origins=allowed_origins,
        allowed_origin_regexes=allowed_origin_regexes,
    )
    files = {CONFIG_FILE: header + _yaml(config), DRAIN_SCRIPT.name: DRAIN_SCRIPT.read_text()}
    if upstream_tls is not None:
        for name, content in upstream_tls_resources(upstream_tls, sds_dir)[1].items():
            files[name] = header + _yaml(content)
    return files


def write(
    folder: Path,
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[tuple[str, int]],
    *,
    listen_address: str = "127.0.0.1",
    admin_address: str = "127.0.0.1",
    upstream_tls: UpstreamTls | None = None,
    allowed_origins: Sequence[str] = (),
    allowed_origin_regexes: Sequence[str] = (),
) -> Path:
    """Write the config's files into ``folder`` (an absolute path); returns envoy.yaml's path."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    files = render_files(
        listen_port,
        admin_port,
        upstreams,
        sds_dir=folder,
        listen_address=listen_address,
        admin_address=admin_address,
        upstream_tls=upstream_tls,
        allowed_origins=allowed_origins,
        allowed_origin_regexes=allowed_origin_regexes,
    )
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder / CONFIG_FILE


def render(
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[tuple[str, int]],
    *,
    listen_address: str = "127.0.0.1",
    admin_address: str = "127.0.0.1",
    allowed_origins: Sequence[str] = (),
    allowed_origin_regexes: Sequence[str] = (),
) -> str:
    """deploy/envoy.yaml as YAML text, listening on ``listen_port``, balancing over ``upstreams``.

    ``upstreams`` are (host, port) pairs; with IP addresses the cluster is STATIC.
    (Plaintext upstreams; for TLS see :func:`write`.)
    """
    files = render_files(
        listen_port,
        admin_port,
        upstreams,
        sds_dir=Path("/"),
        listen_address=listen_address,
        admin_address=admin_address,
        allowed_origins=allowed_origins,
        allowed_origin_regexes=allowed_origin_regexes,
    )
    return files[CONFIG_FILE]


def parse_upstream(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--admin-port", type=int, required=True)
    parser.add_argument(
        "--upstream",
        type=parse_upstream,
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="a replica (repeatable)",
    )
    parser.add_argument("--listen-address", default="127.0.0.1")
    parser.add_argument("--admin-address", default="127.0.0.1")
    parser.add_argument("-o", "--output", type=Path, default=None, help="file; default stdout")
    cors = parser.add_argument_group(
        "grpc-web from browsers (CORS)", "origins allowed to call cross-origin; default none"
    )
    cors.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an exact origin, scheme://host[:port] (repeatable)",
    )
    cors.add_argument(
        "--allow-origin-regex",
        action="append",
        default=[],
        metavar="REGEX",
        help="an RE2 regex the whole origin must match (repeatable)",
    )
    tls = parser.add_argument_group(
        "upstream TLS", "replicas serving TLS; the SDS files are written next to --output"
    )
    tls.add_argument("--upstream-ca", type=Path, help="PEM CA that signed the replicas")
    tls.add_argument("--server-name", help="SNI, and the DNS name their certificates must have")
    tls.add_argument("--client-cert", type=Path, help="Envoy's PEM certificate (mTLS)")
    tls.add_argument("--client-key", type=Path, help="its PEM private key")
    tls.add_argument(
        "--sds-dir",
        type=Path,
        help="folder Envoy finds the SDS files in when it runs; default --output's folder",
    )
    args = parser.parse_args(argv)
    upstream_tls = None
    if args.upstream_ca is not None or args.server_name is not None:
        if args.upstream_ca is None or args.server_name is None or args.output is None:
            parser.error("upstream TLS needs --upstream-ca, --server-name and --output")
        try:
            upstream_tls = UpstreamTls(
                ca=args.upstream_ca.absolute(),
                server_name=args.server_name,
                client_cert=args.client_cert and args.client_cert.absolute(),
                client_key=args.client_key and args.client_key.absolute(),
            )
        except ValueError as exc:
            parser.error(str(exc))
    elif args.client_cert or args.client_key or args.sds_dir:
        parser.error("--client-cert, --client-key and --sds-dir need --upstream-ca")
    output_dir = args.output.absolute().parent if args.output is not None else Path.cwd()
    if args.output is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
    try:
        files = render_files(
            args.listen_port,
            args.admin_port,
            args.upstream,
            sds_dir=(args.sds_dir or output_dir).absolute(),
            listen_address=args.listen_address,
            admin_address=args.admin_address,
            upstream_tls=upstream_tls,
            allowed_origins=args.allow_origin,
            allowed_origin_regexes=args.allow_origin_regex,
        )
        if args.output is None:
            sys.stdout.write(files[CONFIG_FILE])
            return 0
        args.output.write_text(files.pop(CONFIG_FILE), encoding="utf-8")
        for name, text in files.items():
            (output_dir / name).write_text(text, encoding="utf-8")
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"render_envoy: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
