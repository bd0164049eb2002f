"""Read a local Envoy's admin interface (loopback only): what tests/envoy_proxy.py and
scripts/chaos.py ask of the Envoys they start."""

from __future__ import annotations

import urllib.request

CLUSTER = "llm_stream"


def admin_text(admin_port: int, path: str) -> str:
    """The body of ``GET path`` on the admin interface at 127.0.0.1:``admin_port``."""
    url = f"http://127.0.0.1:{admin_port}{path}"
    with urllib.request.urlopen(url, timeout=2) as response:  # loopback admin only
        text: str = response.read().decode()
    return text


def host_values(admin_port: int, name: str) -> dict[int, str]:
    """One per-host value of the llm_stream cluster (``health_flags``, ``rq_active``...),
    by the replica's port, from ``/clusters``."""
    values = {}
    for line in admin_text(admin_port, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == name:
            values[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return values


def stat_values(admin_port: int, regex: str) -> dict[str, int]:
    """The integer stats whose names match ``regex``, from ``/stats?filter=``."""
    values = {}
    for line in admin_text(admin_port, f"/stats?filter={regex}").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            values[name] = int(value)
    return values
