"""Render deploy/envoy.yaml for given ports and upstreams (tests, local runs).

deploy/envoy.yaml stays the one source of truth: this loads it, changes only the
listener port, the admin port and the cluster's endpoints (STATIC instead of
STRICT_DNS, one endpoint per upstream), and keeps every other setting (timeouts,
health checks, retries, keepalive) as it is.

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
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

SOURCE = Path(__file__).resolve().parent.parent / "deploy" / "envoy.yaml"
LISTENER = "grpc_ingress"
CLUSTER = "llm_stream"


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


def render_config(
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[tuple[str, int]],
    *,
    listen_address: str = "127.0.0.1",
    admin_address: str = "127.0.0.1",
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config as a dict (see :func:`render`)."""
    if not upstreams:
        raise ValueError("at least one upstream is needed")
    config = copy.deepcopy(source if source is not None else load_source())
    config["admin"]["address"] = _socket(admin_address, admin_port)
    resources = config["static_resources"]
    _named(resources["listeners"], LISTENER, "listener")["address"] = _socket(
        listen_address, listen_port
    )
    cluster = _named(resources["clusters"], CLUSTER, "cluster")
    # STATIC needs IP addresses; host names (e.g. "localhost") keep STRICT_DNS.
    cluster["type"] = "STATIC" if all(_is_ip(host) for host, _ in upstreams) else "STRICT_DNS"
    if cluster["type"] == "STATIC":
        cluster.pop("dns_lookup_family", None)
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


def render(
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[tuple[str, int]],
    *,
    listen_address: str = "127.0.0.1",
    admin_address: str = "127.0.0.1",
) -> str:
    """deploy/envoy.yaml as YAML text, listening on ``listen_port``, balancing over ``upstreams``.

    ``upstreams`` are (host, port) pairs; with IP addresses the cluster is STATIC.
    """
    config = render_config(
        listen_port,
        admin_port,
        upstreams,
        listen_address=listen_address,
        admin_address=admin_address,
    )
    header = (
        f"# Rendered by scripts/render_envoy.py from {SOURCE.parent.name}/{SOURCE.name}; "
        "do not edit.\n"
    )
    return header + str(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


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
    args = parser.parse_args(argv)
    try:
        text = render(
            args.listen_port,
            args.admin_port,
            args.upstream,
            listen_address=args.listen_address,
            admin_address=args.admin_address,
        )
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"render_envoy: {exc}\n")
        return 1
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
