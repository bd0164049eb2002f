"""Chaos on loopback: rollouts and crashes under load, wired as the Helm chart wires them.

Real processes, nothing mocked:

- ``--replicas`` servers (``python -m llm_stream.serve --model t=random:tiny``), each on
  a fixed loopback port, like a pod's IP that survives a container restart;
- ``--envoys`` Envoy instances rendered from deploy/envoy.yaml (scripts/render_envoy.py:
  the replicas as STATIC endpoints) and started as the chart starts them
  (``--drain-strategy immediate --drain-time-s``);
- in front of them, in this process, a TCP relay standing in for the Kubernetes
  Service (kube-proxy): each new client connection goes to one of the Envoys that are
  ready, picked at random; a connection keeps its Envoy for its whole life; an Envoy
  taken out of the Service gets no new connections but keeps those it has;
- the load, through the relay with the project's client (``InferenceClient``, its
  default retry settings, no ``resume``): ``--streams`` loops each sending
  StreamPredict of ``--stream-tokens`` tokens back to back, and ``--unary`` loops
  sending short Predicts.

Each scenario starts the load, waits ``--lead-in`` seconds so that streams are mid-way,
makes its event, waits until the system is whole again and ``--settle`` seconds more,
stops starting calls and waits for those in flight. Then one table row:

- ``rolling replicas``: each replica in turn gets SIGTERM (the server drains: health
  NOT_SERVING, in-flight calls finish), exits, is started again on its port and waits
  until every Envoy's health check has it healthy (what a rollout waits for);
- ``rolling envoys``: the chart's way, per instance: a new Envoy starts and joins the
  Service when its port accepts (the chart's tcpSocket readiness probe); the old one
  leaves the Service, runs its preStop (deploy/envoy-drain.sh: graceful drain, wait
  for active requests) and then gets SIGTERM;
- ``SIGKILL replica``: the replica with the most calls in flight is killed; after
  ``--restart-after`` seconds (the kubelet) it is started again on its port;
- ``SIGKILL envoy``: the Envoy with the most requests active (the one the client's
  connection goes through) is killed; ``--restart-after`` seconds later it leaves
  the Service (the kubelet saw the container die) and is started again on its ports,
  rejoining when its port accepts;
- ``frozen replica``: the replica with the most calls in flight is stopped (SIGSTOP)
  for ``--freeze`` seconds, then continued.

Columns: streams started, whole (their final message came, token_index and usage
coherent), cut after some tokens (how many tokens, which status), failed before their
first token, unary calls ok and failed, how long the slowest cut stream took to learn
it after the event, and after how long new calls found a healthy path: the start of the
last call, counted from the event, that failed or waited more than ``--slow`` seconds
for its first token (0: none did).

Checks (the exit status is 1 when one fails), the targets of the project's deployment:

- both rolling restarts: no stream cut, none failed, no unary call failed;
- a SIGKILL: every cut stream ended UNAVAILABLE within 2 s of the kill; no unary call
  and no stream without a token failed (retries and Envoy's retries cover them);
- the frozen replica: new calls find a healthy path within 10 s; every stream cut
  ended UNAVAILABLE within Envoy's upstream keepalive (interval, +15 % jitter, +
  timeout, read from deploy/envoy.yaml) of the freeze; no unary call failed;
- every scenario: at least one stream was in flight at its event, no stream ended
  without its final message or incoherent, and every replica that got SIGTERM exited 0.

``--soak SECONDS`` runs instead one long load and, every ``--restart-every`` seconds,
a rolling restart, of the replicas and of the Envoys in turn; its checks: nothing cut,
failed, lost or incoherent, and no process whose RSS grew more than
``--max-rss-growth-mib`` from its first reading after ``--restart-every`` seconds of
load (or its start, for this process) to its last.

    .venv/bin/python scripts/chaos.py                     # 3 replicas, 2 Envoys, 30 s freeze
    .venv/bin/python scripts/chaos.py --quick             # the CI version, under 2 minutes
    .venv/bin/python scripts/chaos.py --soak 600 --restart-every 60

Needs Envoy (scripts/install_tools.sh puts it in .tools/bin) and the embedded default
model's tokenizer (``random:tiny`` weights are random). Logs of every process go to
``--workdir`` (a temporary folder by default, kept when a check fails). The report, a
markdown table and the checks, goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml

from llm_stream.client import InferenceClient
from llm_stream.proto.inference.v1 import inference_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
ENVOY = REPO / ".tools" / "bin" / "envoy"
DRAIN_SCRIPT = REPO / "deploy" / "envoy-drain.sh"
MODEL = "t=random:tiny"  # 2 layers, random weights: fast enough for many streams
ACTIVE_STAT = "^http\\.grpc_ingress\\.downstream_rq_active$"
KILL_LEARN_S = 2.0  # a SIGKILLed process's streams must end within this
FROZEN_PATH_S = 10.0  # new calls must find a healthy path within this of a freeze
KEEPALIVE_JITTER = 0.15  # Envoy jitters its HTTP/2 keepalive interval by up to this

log = logging.getLogger("chaos")


sys.path.insert(0, str(REPO / "scripts"))  # its neighbours, when imported by path
import envoy_admin  # noqa: E402
import render_envoy  # noqa: E402


def keepalive_bound_s() -> float:
    """How long after a replica froze Envoy's keepalive must have closed its connection."""
    config = yaml.safe_load((REPO / "deploy" / "envoy.yaml").read_text())
    (cluster,) = (c for c in config["static_resources"]["clusters"] if c["name"] == "llm_stream")
    options = cluster["typed_extension_protocol_options"]
    http2 = next(iter(options.values()))["explicit_http_config"]["http2_protocol_options"]
    keepalive = http2["connection_keepalive"]
    interval, timeout = (float(keepalive[k].removesuffix("s")) for k in ("interval", "timeout"))
    return interval * (1 + KEEPALIVE_JITTER) + timeout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def port_accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class Process:
    """One child process that can be started again with the same command and ports;
    its output is appended to one log file over all its lives."""

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name, self.command, self.log_path = name, command, log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.rss: list[tuple[int, float]] = []  # (pid, MiB) readings over all its lives
        self.warm_from_start = False  # RSS growth counts from its first reading

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.log_path.open("a") as out:
            self.popen = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=env
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        assert self.popen is not None
        popen = self.popen
        return await asyncio.to_thread(popen.wait, timeout)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
            self.popen.wait(timeout=30)

    def sample_rss(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            mib = rss_mib(self.popen.pid)
            if mib is not None:
                self.rss.append((self.popen.pid, mib))


class Replica(Process):
    def __init__(self, port: int, workdir: Path, args: argparse.Namespace) -> None:
        command = [
            sys.executable, "-m", "llm_stream.serve", "--host", "127.0.0.1",
            "--port", str(port), "--http-port", "0", "--model", args.model,
            "--max-tokens-cap", str(max(args.stream_tokens, 16)),
        ]  # fmt: skip
        if args.cache_dir is not None:
            command += ["--cache-dir", str(args.cache_dir)]
        super().__init__(f"replica :{port}", command, workdir / f"replica-{port}.log")
        self.port = port
        self.exit_codes: list[int] = []

    async def wait_serving(self, timeout: float = 120.0) -> None:
        async with InferenceClient(f"127.0.0.1:{self.port}") as client:
            await client.wait_ready(timeout=timeout)


class Envoy(Process):
    def __init__(self, workdir: Path, upstream_ports: Sequence[int], drain_s: int) -> None:
        self.port, self.admin_port = free_port(), free_port()
        folder = workdir / f"envoy-{self.port}"
        config = render_envoy.write(
            folder, self.port, self.admin_port, [("127.0.0.1", p) for p in upstream_ports]
        )
        command = [
            str(ENVOY), "-c", str(config), "--log-level", "warn", "--disable-hot-restart",
            "--drain-strategy", "immediate", "--drain-time-s", str(drain_s),
        ]  # fmt: skip
        super().__init__(f"envoy :{self.port}", command, workdir / f"envoy-{self.port}.log")

    def health_flags(self) -> dict[int, str]:
        """Envoy's verdict on each replica, by port."""
        return envoy_admin.host_values(self.admin_port, "health_flags")

    def requests_active(self) -> int:
        """Requests in flight through its listener."""
        return sum(envoy_admin.stat_values(self.admin_port, ACTIVE_STAT).values())

    async def wait_accepting(self, timeout: float = 30.0) -> None:
        """The chart's readiness probe: the listener's port accepts a connection."""
        async with asyncio.timeout(timeout):
            while True:
                if await port_accepts(self.port):
                    return
                await asyncio.sleep(0.1)

    async def wait_healthy(self, ports: Sequence[int], timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(OSError):
                    flags = await asyncio.to_thread(self.health_flags)
                    if all(flags.get(p) == "healthy" for p in ports):
                        return
                await asyncio.sleep(0.2)

    async def pre_stop(self, sleep_s: float, wait_s: float) -> None:
        """The chart's preStop hook: deploy/envoy-drain.sh against this instance."""
        env = {**os.environ, "ENVOY_ADMIN_PORT": str(self.admin_port)}
        drain = await asyncio.create_subprocess_exec(
            "bash", str(DRAIN_SCRIPT), str(sleep_s), str(wait_s),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await drain.communicate()
        with self.log_path.open("a") as out:
            out.write(stderr.decode())


class ServiceRelay:
    """The Kubernetes Service in front of the Envoy pods, at L4: a new connection goes
    to a random ready Envoy and stays with it; leaving the Service stops new
    connections only. A connection whose Envoy dies or refuses is cut (reset)."""

    def __init__(self) -> None:
        self.ready: list[int] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._rng = random.Random(7)
        self._open: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def add(self, port: int) -> None:
        if port not in self.ready:
            self.ready.append(port)

    def remove(self, port: int) -> None:
        with contextlib.suppress(ValueError):
            self.ready.remove(port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.ready:
            writer.transport.abort()
            return
        port = self._rng.choice(self.ready)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await asyncio.gather(
                self._copy(reader, up_writer, writer), self._copy(up_reader, writer, up_writer)
            )
        finally:
            self._open -= {writer, up_writer}
            self._pipes.discard(task)

    @staticmethod
    async def _copy(
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        source_writer: asyncio.StreamWriter,
    ) -> None:
        """Bytes one way; when the source ends, the other side is closed: gracefully
        after an orderly end, with a reset after a reset."""
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            sink.transport.abort()
            source_writer.transport.abort()
            return
        with contextlib.suppress(OSError):
            sink.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await asyncio.gather(*self._pipes, return_exceptions=True)


@dataclasses.dataclass
class Call:
    kind: str  # "stream" or "unary"
    started: float
    first: float | None = None  # first token message (or the unary response)
    ended: float = 0.0
    tokens: int = 0
    code: str = ""  # the status of a failed call, "" when it succeeded
    problem: str = ""  # a stream that ended OK but lost or incoherent

    @property
    def ok(self) -> bool:
        return not self.code and not self.problem


def stream_problem(tokens: list[pb.PredictToken], max_tokens: int) -> str:
    """What is wrong with a stream that ended OK: lost or incoherent; "" when whole."""
    if not tokens or not tokens[-1].is_final:
        return "lost: ended OK without its final message"
    final, body = tokens[-1], tokens[:-1]
    if [t.token_index for t in body] != list(range(len(body))):
        return "incoherent: token_index not 0..n-1"
    if final.token_index != len(body) or final.usage.completion_tokens != len(body):
        return "incoherent: final token_index or usage disagrees with the tokens sent"
    if final.finish_reason == pb.FINISH_REASON_LENGTH and len(body) != max_tokens:
        return f"incoherent: length after {len(body)} of {max_tokens} tokens"
    if len(body) > max_tokens:
        return f"incoherent: {len(body)} tokens, more than {max_tokens}"
    return ""


class Load:
    """Stream and unary loops through the relay, recording every call."""

    def __init__(self, client: InferenceClient, args: argparse.Namespace) -> None:
        self.client, self.args = client, args
        self.calls: list[Call] = []
        self._running = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._running = True
        self._tasks = [asyncio.create_task(self._streams()) for _ in range(self.args.streams)]
        self._tasks += [asyncio.create_task(self._unary()) for _ in range(self.args.unary)]

    async def stop(self) -> list[Call]:
        """No new calls; wait for those in flight; the calls since start."""
        self._running = False
        await asyncio.gather(*self._tasks)
        calls, self.calls = self.calls, []
        return calls

    def in_flight(self, kind: str) -> int:
        return sum(1 for c in self.calls if c.kind == kind and not c.ended)

    async def _streams(self) -> None:
        max_tokens = self.args.stream_tokens
        while self._running:
            call = Call("stream", time.monotonic())
            self.calls.append(call)
            tokens: list[pb.PredictToken] = []
            try:
                async for token in self.client.stream("Hello", max_tokens=max_tokens, timeout=300):
                    if call.first is None:
                        call.first = time.monotonic()
                    tokens.append(token)
                    call.tokens += not token.is_final
                call.problem = stream_problem(tokens, max_tokens)
            except grpc.aio.AioRpcError as error:
                call.code = error.code().name
            call.ended = time.monotonic()

    async def _unary(self) -> None:
        while self._running:
            call = Call("unary", time.monotonic())
            self.calls.append(call)
            try:
                await self.client.predict("Hello", max_tokens=8, timeout=60)
                call.first = time.monotonic()
            except grpc.aio.AioRpcError as error:
                call.code = error.code().name
            call.ended = time.monotonic()
            await asyncio.sleep(0.05)


@dataclasses.dataclass
class Row:
    scenario: str
    event_at: float  # monotonic seconds; the event's first signal
    calls: list[Call]
    in_flight_at_event: int
    slow_s: float

    @property
    def streams(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "stream"]

    @property
    def unary(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "unary"]

    @property
    def whole(self) -> list[Call]:
        return [c for c in self.streams if c.ok]

    @property
    def cut(self) -> list[Call]:
        return [c for c in self.streams if c.code and c.tokens]

    @property
    def failed_before_token(self) -> list[Call]:
        return [c for c in self.streams if c.code and not c.tokens]

    @property
    def broken(self) -> list[Call]:
        return [c for c in self.streams if c.problem]

    @property
    def unary_failed(self) -> list[Call]:
        return [c for c in self.unary if c.code]

    @property
    def learn_s(self) -> float | None:
        """The slowest cut stream: seconds from the event to its error."""
        times = [c.ended - self.event_at for c in self.cut]
        return max(times) if times else None

    @property
    def healthy_path_s(self) -> float:
        """The start, after the event, of the last new call that failed or was slow."""
        bad = [
            c.started - self.event_at
            for c in self.calls
            if c.started >= self.event_at
            and (c.code or c.first is None or c.first - c.started > self.slow_s)
        ]
        return max(bad, default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "streams": len(self.streams),
            "whole": len(self.whole),
            "cut": len(self.cut),
            "cut_tokens": sorted(c.tokens for c in self.cut),
            "cut_codes": sorted({c.code for c in self.cut}),
            "failed_before_token": len(self.failed_before_token),
            "lost_or_incoherent": [c.problem for c in self.broken],
            "unary_ok": len(self.unary) - len(self.unary_failed),
            "unary_failed": len(self.unary_failed),
            "unary_codes": sorted({c.code for c in self.unary_failed}),
            "in_flight_at_event": self.in_flight_at_event,
            "learn_s": self.learn_s,
            "healthy_path_s": self.healthy_path_s,
        }


def cut_text(row: Row) -> str:
    if not row.cut:
        return "0"
    tokens = sorted(c.tokens for c in row.cut)
    codes = ", ".join(sorted({c.code for c in row.cut}))
    return f"{len(row.cut)} ({codes}; after {tokens[0]}-{tokens[-1]} tokens)"


def table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| scenario | streams started | whole | cut | failed before a token "
        "| unary ok | unary failed | cut learnt in | healthy path after |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        learn = "-" if row.learn_s is None else f"{row.learn_s:.2f} s"
        failed = len(row.unary_failed)
        codes = ", ".join(sorted({c.code for c in row.unary_failed}))
        lines.append(
            f"| {row.scenario} | {len(row.streams)} | {len(row.whole)} | {cut_text(row)} "
            f"| {len(row.failed_before_token)} | {len(row.unary) - failed} "
            f"| {failed}{f' ({codes})' if codes else ''} | {learn} "
            f"| {row.healthy_path_s:.1f} s |"
        )
    return lines


class Cluster:
    """The replicas, the Envoys and the relay; what each scenario does to them."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.replicas = [Replica(free_port(), workdir, args) for _ in range(args.replicas)]
        self.envoys: list[Envoy] = []
        self.retired: list[Process] = []  # Envoys replaced by a rollout (their RSS counts)
        self.relay = ServiceRelay()

    @property
    def replica_ports(self) -> list[int]:
        return [r.port for r in self.replicas]

    def new_envoy(self) -> Envoy:
        envoy = Envoy(self.workdir, self.replica_ports, self.args.envoy_drain_s)
        envoy.start()
        return envoy

    async def start(self) -> None:
        if not ENVOY.exists():
            raise SystemExit(f"{ENVOY} is missing: run scripts/install_tools.sh")
        for replica in self.replicas:
            replica.start()
        self.envoys = [self.new_envoy() for _ in range(self.args.envoys)]
        await self.relay.start()
        await asyncio.gather(*(r.wait_serving() for r in self.replicas))
        for envoy in self.envoys:
            await envoy.wait_accepting()
            await envoy.wait_healthy(self.replica_ports)
            self.relay.add(envoy.port)

    async def whole_again(self) -> None:
        """Every replica serving and healthy in every Envoy, every Envoy in the Service."""
        await asyncio.gather(*(r.wait_serving() for r in self.replicas))
        for envoy in self.envoys:
            await envoy.wait_healthy(self.replica_ports)
            assert envoy.port in self.relay.ready, f"{envoy.name} is not in the Service"

    def all_processes(self) -> list[Process]:
        return [*self.replicas, *self.envoys, *self.retired]

    def close(self) -> None:
        for process in self.all_processes():
            process.stop()

    # The events. Each returns the monotonic time of its first signal.

    async def restart_replica(self, replica: Replica) -> None:
        replica.start()
        await replica.wait_serving()
        for envoy in self.envoys:
            await envoy.wait_healthy([replica.port])

    async def rolling_replicas(self, load: Load) -> float:
        event_at = time.monotonic()
        for replica in self.replicas:
            log.info("SIGTERM %s", replica.name)
            replica.signal(signal.SIGTERM)
            replica.exit_codes.append(await replica.wait_exit(timeout=120))
            await self.restart_replica(replica)
        return event_at

    async def rolling_envoys(self, load: Load) -> float:
        event_at = time.monotonic()
        for index, old in enumerate(list(self.envoys)):
            new = self.new_envoy()
            await new.wait_accepting()
            await new.wait_healthy(self.replica_ports)
            self.relay.add(new.port)
            log.info("%s joined; %s leaves the Service and drains", new.name, old.name)
            self.relay.remove(old.port)
            await old.pre_stop(self.args.envoy_prestop_sleep_s, self.args.envoy_drain_s)
            old.signal(signal.SIGTERM)
            await old.wait_exit(timeout=30)
            self.envoys[index] = new
            self.retired.append(old)
        return event_at

    def busiest_replica(self) -> Replica:
        """The replica with the most calls in flight, by Envoy's gauge."""

        active = [envoy_admin.host_values(e.admin_port, "rq_active") for e in self.envoys]
        return max(self.replicas, key=lambda r: sum(int(a.get(r.port, 0)) for a in active))

    async def kill_replica(self, load: Load) -> float:
        replica = await asyncio.to_thread(self.busiest_replica)
        log.info("SIGKILL %s", replica.name)
        replica.signal(signal.SIGKILL)
        event_at = time.monotonic()
        await replica.wait_exit(timeout=30)
        await asyncio.sleep(self.args.restart_after)
        await self.restart_replica(replica)
        return event_at

    def busiest_envoy(self) -> Envoy:
        """The Envoy with the most requests in flight (the one the client is on)."""
        return max(self.envoys, key=Envoy.requests_active)

    async def kill_envoy(self, load: Load) -> float:
        envoy = await asyncio.to_thread(self.busiest_envoy)
        log.info("SIGKILL %s", envoy.name)
        envoy.signal(signal.SIGKILL)
        event_at = time.monotonic()
        await envoy.wait_exit(timeout=30)
        await asyncio.sleep(self.args.restart_after)
        self.relay.remove(envoy.port)
        envoy.start()
        await envoy.wait_accepting()
        self.relay.add(envoy.port)
        await envoy.wait_healthy(self.replica_ports)
        return event_at

    async def freeze_replica(self, load: Load) -> float:
        replica = await asyncio.to_thread(self.busiest_replica)
        log.info("SIGSTOP %s for %.0f s", replica.name, self.args.freeze)
        replica.signal(signal.SIGSTOP)
        event_at = time.monotonic()
        await asyncio.sleep(self.args.freeze)
        replica.signal(signal.SIGCONT)
        for envoy in self.envoys:
            await envoy.wait_healthy([replica.port])
        return event_at


Event = Callable[["Cluster", Load], Awaitable[float]]
SCENARIOS: dict[str, Event] = {
    "rolling replicas": Cluster.rolling_replicas,
    "rolling envoys": Cluster.rolling_envoys,
    "SIGKILL replica": Cluster.kill_replica,
    "SIGKILL envoy": Cluster.kill_envoy,
    "frozen replica": Cluster.freeze_replica,
}


async def run_scenario(name: str, cluster: Cluster, load: Load) -> Row:
    args = cluster.args
    log.info("scenario: %s", name)
    load.start()
    await asyncio.sleep(args.lead_in)
    in_flight = load.in_flight("stream")
    event_at = await SCENARIOS[name](cluster, load)
    await cluster.whole_again()
    await asyncio.sleep(args.settle)
    calls = await load.stop()
    return Row(name, event_at, calls, in_flight, args.slow)


def checks(rows: Sequence[Row], cluster: Cluster) -> list[tuple[bool, str]]:
    keepalive = keepalive_bound_s()
    results: list[tuple[bool, str]] = []
    for row in rows:
        name = row.scenario
        results.append((row.in_flight_at_event > 0, f"{name}: streams in flight at the event"))
        results.append((not row.broken, f"{name}: no stream lost or incoherent"))
        results.append((not row.failed_before_token, f"{name}: no stream failed before a token"))
        results.append((not row.unary_failed, f"{name}: no unary call failed"))
        codes = {c.code for c in row.cut}
        if name.startswith("rolling"):
            results.append((not row.cut, f"{name}: no stream cut"))
        elif name.startswith("SIGKILL"):
            results.append((codes <= {"UNAVAILABLE"}, f"{name}: cut streams end UNAVAILABLE"))
            learn = row.learn_s or 0.0
            results.append(
                (learn <= KILL_LEARN_S, f"{name}: cut streams learn it within {KILL_LEARN_S} s")
            )
        else:
            results.append((codes <= {"UNAVAILABLE"}, f"{name}: cut streams end UNAVAILABLE"))
            learn = row.learn_s or 0.0
            results.append(
                (
                    learn <= keepalive,
                    f"{name}: in-flight streams end within the keepalive ({keepalive:.1f} s)",
                )
            )
            results.append(
                (
                    row.healthy_path_s <= FROZEN_PATH_S,
                    f"{name}: new calls find a healthy path within {FROZEN_PATH_S:.0f} s",
                )
            )
    results.append(exit_check(cluster))
    return results


def exit_check(cluster: Cluster) -> tuple[bool, str]:
    statuses = [status for r in cluster.replicas for status in r.exit_codes]
    return all(s == 0 for s in statuses), f"replicas exit 0 on SIGTERM ({statuses})"


def report(rows: Sequence[Row], results: Sequence[tuple[bool, str]], title: str) -> bool:
    lines = [f"## {title}", "", *table(rows), ""]
    lines += [f"- [{'x' if passed else ' '}] {text}" for passed, text in results]
    sys.stdout.write("\n".join(lines) + "\n")
    return all(passed for passed, _ in results)


async def watch_rss(cluster: Cluster, period_s: float = 5.0) -> None:
    own = Process("chaos (client and relay)", [], Path(os.devnull))
    own.warm_from_start = True
    cluster.retired.append(own)
    while True:
        for process in cluster.all_processes():
            process.sample_rss()
        own.rss.append((os.getpid(), rss_mib(os.getpid()) or 0.0))
        await asyncio.sleep(period_s)


def rss_checks(cluster: Cluster, args: argparse.Namespace) -> list[tuple[bool, str]]:
    """Per process life: growth from the first reading after the warm-up to the last."""
    skip = max(1, int(args.restart_every / 5))
    results = []
    for process in cluster.all_processes():
        lives: dict[int, list[float]] = {}
        for pid, mib in process.rss:
            lives.setdefault(pid, []).append(mib)
        for pid, readings in lives.items():
            if process.warm_from_start and len(readings) > 1:
                first = readings[0]
            elif len(readings) > skip:
                first = readings[skip]
            else:
                continue
            growth = readings[-1] - first
            results.append(
                (
                    growth <= args.max_rss_growth_mib,
                    f"RSS of {process.name} (pid {pid}): {first:.0f} -> {readings[-1]:.0f} MiB "
                    f"(peak {max(readings):.0f})",
                )
            )
    return results


async def soak(args: argparse.Namespace, cluster: Cluster, load: Load) -> bool:
    watcher = asyncio.create_task(watch_rss(cluster))
    load.start()
    started = time.monotonic()
    restarts, rounds = ["rolling replicas", "rolling envoys"], 0
    while (rounds + 1) * args.restart_every < args.soak:  # one every restart_every s
        await asyncio.sleep(
            max(0.0, started + (rounds + 1) * args.restart_every - time.monotonic())
        )
        name = restarts[rounds % 2]
        log.info("soak %.0f s: %s", time.monotonic() - started, name)
        await SCENARIOS[name](cluster, load)
        await cluster.whole_again()
        rounds += 1
    await asyncio.sleep(max(0.0, args.soak - (time.monotonic() - started)))
    calls = await load.stop()
    watcher.cancel()
    row = Row(f"soak {args.soak:.0f} s, {rounds} rolling restarts", started, calls, 1, args.slow)
    results = [
        (not row.cut, "soak: no stream cut"),
        (not row.failed_before_token, "soak: no stream failed"),
        (not row.broken, "soak: no stream lost or incoherent"),
        (not row.unary_failed, "soak: no unary call failed"),
        (rounds > 0, "soak: at least one rolling restart"),
        *rss_checks(cluster, args),
    ]
    results.append(exit_check(cluster))
    if args.json:
        args.json.write_text(json.dumps({"rows": [row.as_dict()], "checks": results}, indent=1))
    return report([row], results, "soak through Envoy")


async def chaos(args: argparse.Namespace, workdir: Path) -> bool:
    cluster = Cluster(args, workdir)
    try:
        log.info("starting %d replicas and %d Envoys in %s", args.replicas, args.envoys, workdir)
        await cluster.start()
        async with InferenceClient(f"127.0.0.1:{cluster.relay.port}") as client:
            await client.wait_ready(timeout=60)
            load = Load(client, args)
            if args.soak:
                return await soak(args, cluster, load)
            rows = [await run_scenario(name, cluster, load) for name in args.scenario]
        results = checks(rows, cluster)
        if args.json:
            payload = {"rows": [r.as_dict() for r in rows], "checks": results}
            args.json.write_text(json.dumps(payload, indent=1))
        title = (
            f"chaos: {args.replicas} replicas, {args.envoys} Envoys, {args.streams} streams "
            f"of {args.stream_tokens} tokens, {args.unary} unary loops"
        )
        return report(rows, results, title)
    finally:
        cluster.close()
        await cluster.relay.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default=MODEL, help="the replicas' --model (NAME=SOURCE)")
    parser.add_argument("--cache-dir", type=Path, help="the replicas' --cache-dir")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--envoys", type=int, default=2)
    parser.add_argument("--streams", type=int, default=12, help="concurrent stream loops")
    parser.add_argument("--stream-tokens", type=int, default=800, help="max_tokens of a stream")
    parser.add_argument("--unary", type=int, default=4, help="concurrent unary loops")
    parser.add_argument("--freeze", type=float, default=30.0, help="seconds a replica is stopped")
    parser.add_argument("--lead-in", type=float, default=3.0, help="load before each event (s)")
    parser.add_argument("--settle", type=float, default=3.0, help="load after recovery (s)")
    parser.add_argument("--restart-after", type=float, default=1.0, help="kubelet's restart (s)")
    parser.add_argument("--slow", type=float, default=2.0, help="a first token later is slow (s)")
    parser.add_argument("--envoy-prestop-sleep-s", type=float, default=1.0)
    parser.add_argument("--envoy-drain-s", type=int, default=120)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only these (repeatable); default: all, in the order above",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the CI version: 2 replicas, 6 streams of 300 tokens, 2 unary loops, "
        "a 24 s freeze, 1.5 s lead-in and settle",
    )
    parser.add_argument("--soak", type=float, default=0.0, help="soak for this many seconds")
    parser.add_argument("--restart-every", type=float, default=60.0)
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    parser.add_argument("--workdir", type=Path, help="logs and configs (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows and checks here")
    args = parser.parse_args(argv)
    if args.quick:
        args.replicas, args.streams, args.stream_tokens, args.unary = 2, 6, 300, 2
        args.freeze, args.lead_in, args.settle = 24.0, 1.5, 1.5
    args.scenario = args.scenario or list(SCENARIOS)
    if args.replicas < 2 or args.envoys < 2:
        parser.error("--replicas and --envoys must be at least 2 (one stays up)")
    return args


@contextlib.contextmanager
def working_folder(requested: Path | None) -> Iterator[tuple[Path, Callable[[bool], None]]]:
    """The folder for logs and configs; a temporary one is removed after a passing run."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested, lambda passed: None
        return
    folder = Path(tempfile.mkdtemp(prefix="llm-stream-chaos-"))
    verdict: list[bool] = []
    yield folder, verdict.append
    if verdict and verdict[0]:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        log.warning("logs kept in %s", folder)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s chaos: %(message)s")
    with working_folder(args.workdir) as (workdir, keep):
        passed = asyncio.run(chaos(args, workdir))
        keep(passed)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
