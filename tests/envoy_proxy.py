"""A real Envoy (deploy/envoy.yaml, rendered by scripts/render_envoy.py) on loopback,
in front of real replicas: shared by tests/test_envoy.py and tests/test_grpc_web.py.

Needs the Envoy binary from scripts/install_tools.sh; without it a test fails (never
skips), so CI cannot pass while silently not testing Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, free_port

REPO = Path(__file__).resolve().parent.parent
ENVOY = REPO / ".tools" / "bin" / "envoy"


@functools.cache
def script_module(name: str) -> ModuleType:
    """scripts/<name>.py, loaded by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def render_module() -> ModuleType:
    return script_module("render_envoy")


class EnvoyProxy:
    """Envoy started on free ports; ``tls``: a render_envoy.UpstreamTls; ``allowed_origins``
    and ``allowed_origin_regexes``: its CORS policy's origins (grpc-web from browsers)."""

    def __init__(
        self,
        upstreams: Sequence[RunningServer],
        workdir: Path,
        tls: Any = None,
        *,
        allowed_origins: Sequence[str] = (),
        allowed_origin_regexes: Sequence[str] = (),
    ) -> None:
        if not ENVOY.exists():
            pytest.fail(f"{ENVOY} is missing: run scripts/install_tools.sh")
        self.port, self.admin_port = free_port(), free_port()
        self.upstream_ports = [u.server.port for u in upstreams]
        config = render_module().write(
            workdir / "envoy",
            self.port,
            self.admin_port,
            [("127.0.0.1", p) for p in self.upstream_ports],
            upstream_tls=tls,
            allowed_origins=allowed_origins,
            allowed_origin_regexes=allowed_origin_regexes,
        )
        self.log = workdir / "envoy.log"
        self._process = subprocess.Popen(
            [str(ENVOY), "-c", str(config), "--log-level", "warn", "--disable-hot-restart"],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    @property
    def url(self) -> str:
        """The listener's base URL (grpc-web and CORS preflights)."""
        return f"http://127.0.0.1:{self.port}"

    def health_flags(self) -> dict[int, str]:
        flags: dict[int, str] = script_module("envoy_admin").host_values(
            self.admin_port, "health_flags"
        )
        return flags

    def stats(self) -> dict[str, int]:
        """The llm_stream cluster's counters and gauges, without the cluster prefix."""
        values = script_module("envoy_admin").stat_values(
            self.admin_port, "^cluster\\.llm_stream\\."
        )
        return {name.removeprefix("cluster.llm_stream."): value for name, value in values.items()}

    async def wait_stat(self, name: str, at_least: int = 1, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(OSError):
                    value = (await asyncio.to_thread(self.stats)).get(name, 0)
                    if value >= at_least:
                        return value
                await asyncio.sleep(0.1)

    async def wait_health(self, port: int, healthy: bool, timeout: float = 30.0) -> None:
        """Wait for Envoy's own active health check to reach a verdict on one replica."""
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(OSError):
                    flag = (await asyncio.to_thread(self.health_flags)).get(port)
                    if flag is not None and (flag == "healthy") == healthy:
                        return
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        await self.channel.close()
        self._process.terminate()
        self._process.wait(timeout=10)


@contextlib.asynccontextmanager
async def envoy_in_front(
    upstreams: Sequence[RunningServer],
    workdir: Path,
    tls: Any = None,
    *,
    allowed_origins: Sequence[str] = (),
    allowed_origin_regexes: Sequence[str] = (),
) -> AsyncIterator[EnvoyProxy]:
    """An :class:`EnvoyProxy` for the block, closed after it."""
    proxy = EnvoyProxy(
        upstreams,
        workdir,
        tls,
        allowed_origins=allowed_origins,
        allowed_origin_regexes=allowed_origin_regexes,
    )
    try:
        yield proxy
    finally:
        await proxy.close()
