"""How many tokens a second the server's host side can stream, whatever the model.

Runs the real server (scheduler, output stage, event loop, gRPC) on the embedded
model's tokenizer, but with a simulated device: every decode step "computes"
for ``--step-ms`` with the interpreter lock released, as a GPU step does while
the scheduler waits for its tokens, and one step stays in flight as on a GPU.
Prefill costs one step. ``--streams`` StreamPredict calls of ``--tokens``
tokens each then stream from a client in another process; the report gives
tokens/s against the device's pace (streams / step), and the CPU time of the
server's threads per token: what decides whether the event loop and the step
loop can share one interpreter at a GPU's token rate.

    .venv/bin/python scripts/host_ceiling.py --streams 64 --step-ms 3.5 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

# Plain English, so that detokenisation does its usual work.
TEXT = (
    "The committee met on a rainy Tuesday to discuss the new library, which had been "
    "planned for years. Everyone agreed that the reading rooms should face the river, "
    "but nobody could decide how many computers the children's floor would need. "
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the server process ----------------------------------------------------------


class SimulatedDevice:
    """A StepRunner whose device takes ``step_s`` per step and never holds the GIL."""

    pipeline_depth = 1

    def __init__(self, budget: Any, step_s: float, tokens: Sequence[int]) -> None:
        self.budget = budget
        self._step_s = step_s
        self._tokens = list(tokens)
        self._rows: list[int] = []
        self._in_flight: collections.deque[tuple[float, Any]] = collections.deque()
        self._free_at = 0.0
        self._next = 0

    def _token(self) -> int:
        self._next = (self._next + 1) % len(self._tokens)
        return self._tokens[self._next]

    def launch(self, plan: Any) -> None:
        from llm_stream.engine.types import StepTokens

        self._rows = [key for key in self._rows if key not in plan.remove]
        out = [(key, self._token()) for key in self._rows] if plan.decode else []
        for chunk in plan.prefill:
            if chunk.completes_prompt:
                self._rows.append(chunk.key)
                out.append((chunk.key, self._token()))
        cost = self._step_s * (plan.decode + bool(plan.prefill))
        self._free_at = max(time.monotonic(), self._free_at) + cost
        self._in_flight.append((self._free_at, StepTokens(plan.step, tuple(out))))

    def collect(self) -> Any:
        ready, result = self._in_flight.popleft()
        delay = ready - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # releases the GIL, as a wait on a CUDA event does
        return result

    def reset(self) -> None:
        self._rows = []
        self._in_flight.clear()


def write_json(path: str, value: object) -> None:
    Path(path).write_text(json.dumps(value))


def serve(port: int, step_s: float, threads_file: str) -> None:
    import uvloop

    from llm_stream.app import LLMStreamServer, load_configured_models
    from llm_stream.settings import Settings

    class Backend:
        def __init__(self, inner: Any) -> None:
            self._inner = inner
            self.model_id, self.version = inner.model_id, inner.version
            self.device, self.execution = (
                "simulated",
                f"simulated device, {step_s * 1e3:g} ms a step",
            )
            ids = inner._tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
            self._runner = SimulatedDevice(inner.new_runner().budget, step_s, ids)

        def prepare(self, request: Any) -> Any:
            return self._inner.prepare(request)

        def text_assembler(self, prepared: Any) -> Any:
            return self._inner.text_assembler(prepared)

        def new_runner(self) -> SimulatedDevice:
            return self._runner

    def load(settings: Settings) -> list[Any]:
        return [Backend(b) for b in load_configured_models(settings)]

    async def main() -> None:
        settings = Settings(
            host="127.0.0.1", port=port, http_port=0, max_tokens_cap=100000, log_level="WARNING"
        )
        server = LLMStreamServer(settings, load_models=load)
        await server.start()
        assert server.ready is not None
        await server.ready
        names = {t.name: t.native_id for t in threading.enumerate()}
        names["main (event loop)"] = threading.main_thread().native_id
        write_json(threads_file, names)
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(main())


# -- the client ---------------------------------------------------------------------


async def measure(port: int, streams: int, tokens: int) -> tuple[int, float, list[float]]:
    import grpc

    from llm_stream.proto.inference.v1 import inference_pb2 as pb
    from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def one(n: int) -> list[float]:
            request = pb.PredictRequest(config=pb.InferenceConfig(max_tokens=n))
            request.features["prompt"].string_value = "Tell me about the library."
            return [
                time.perf_counter() async for m in stub.StreamPredict(request) if not m.is_final
            ]

        await one(4)
        started = time.perf_counter()
        arrivals = await asyncio.gather(*(one(tokens) for _ in range(streams)))
        seconds = time.perf_counter() - started
    gaps = [(b - a) * 1000 for times in arrivals for a, b in pairwise(times)]
    return sum(len(a) for a in arrivals), seconds, gaps


def thread_times(pid: int) -> dict[int, float]:
    import psutil

    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=3.5)
    args = parser.parse_args()
    port = free_port()
    threads_file = tempfile.mktemp(suffix=".json")
    context = multiprocessing.get_context("spawn")
    server = context.Process(target=serve, args=(port, args.step_ms / 1000, threads_file))
    server.start()
    try:
        while not os.path.exists(threads_file):
            if not server.is_alive():
                sys.exit("the server exited before it was ready")
            time.sleep(0.2)
        assert server.pid is not None
        names = {v: k for k, v in json.loads(Path(threads_file).read_text()).items()}
        before = thread_times(server.pid)
        count, seconds, gaps = asyncio.run(measure(port, args.streams, args.tokens))
        after = thread_times(server.pid)
    finally:
        server.terminate()
        server.join(10)
    pace = args.streams / (args.step_ms / 1000)
    out = sys.stdout.write
    out(
        f"{args.streams} streams x {args.tokens} tokens, simulated device {args.step_ms:g} ms "
        f"a step (its pace: {pace:,.0f} tokens/s), {os.cpu_count()} CPUs\n"
    )
    out(
        f"streamed {count:,} tokens in {seconds:.2f} s: {count / seconds:,.0f} tokens/s, "
        f"{count / seconds / pace:.2f}x the device's pace; ITL p50 "
        f"{statistics.median(gaps):.1f} ms, p95 {statistics.quantiles(gaps, n=20)[-1]:.1f} ms\n"
    )
    out("\n| server thread | CPU s | us per token | share of the run |\n|---|---:|---:|---:|\n")
    rows = sorted(
        ((after[t] - before.get(t, 0.0), names.get(t, f"thread {t}")) for t in after),
        reverse=True,
    )
    for cpu, name in rows:
        if cpu >= 0.01:
            out(f"| {name} | {cpu:.2f} | {cpu / count * 1e6:.1f} | {cpu / seconds:.0%} |\n")
    total = sum(cpu for cpu, _ in rows)
    out(f"| all | {total:.2f} | {total / count * 1e6:.1f} | {total / seconds:.0%} |\n")


if __name__ == "__main__":
    main()
