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
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench import free_port

# Plain English, so that detokenisation does its usual work.
TEXT = (
    "The committee met on a rainy Tuesday to discuss the new library, which had been "
    "planned for years. Everyone agreed that the reading rooms should face the river, "
    "but nobody could decide how many computers the children's floor would need. "
)


# -- the server process ----------------------------------------------------------


class SimulatedDevice:  # the StepRunner protocol
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


class SimulatedBackend:
    """The embedded model's tokenizer and preparation, with a simulated device."""

    def __init__(self, inner: Any, step_s: float) -> None:
        self._inner = inner
        self.model_id, self.version = inner.model_id, inner.version
        self.device = "simulated"
        self.execution = f"simulated device, {step_s * 1e3:g} ms a step"
        self.sampling_defaults, self.tool_format = inner.sampling_defaults, inner.tool_format
        ids = inner._tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
        self._runner = SimulatedDevice(inner.new_runner().budget, step_s, ids)

    def prepare(self, request: Any) -> Any:
        return self._inner.prepare(request)

    def text_assembler(self, prepared: Any) -> Any:
        return self._inner.text_assembler(prepared)

    def new_runner(self) -> SimulatedDevice:
        return self._runner


def simulated_in_child(spec: Any) -> SimulatedBackend:
    """The engine process's loader (module level, so that it pickles)."""
    from llm_stream.engine.process import load_model

    return SimulatedBackend(load_model(spec), float(os.environ["HOST_CEILING_STEP_S"]))


def serve(port: int, step_s: float, threads_file: str, engine_process: bool) -> None:
    import uvloop

    from llm_stream.app import LLMStreamServer, batch_limits, load_configured_models
    from llm_stream.engine.process import CoreSpec, start_engine_process
    from llm_stream.model.execution import ExecutionOptions
    from llm_stream.model.sources import parse_model_spec
    from llm_stream.settings import Settings

    def load(settings: Settings) -> list[Any]:
        if engine_process:
            os.environ["HOST_CEILING_STEP_S"] = str(step_s)
            spec = CoreSpec(
                parse_model_spec("embedded"),
                "cpu",
                "auto",
                settings.cache_dir,
                ExecutionOptions(),
                batch_limits(settings),
                "WARNING",
                loader=simulated_in_child,
            )
            return [start_engine_process(spec)]
        return [SimulatedBackend(b, step_s) for b in load_configured_models(settings)]

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
    """CPU seconds by thread of the server; its engine processes' threads by -pid."""
    import psutil

    server = psutil.Process(pid)
    times = {t.id: t.user_time + t.system_time for t in server.threads()}
    for child in server.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cpu = child.cpu_times()
            times[-child.pid] = cpu.user + cpu.system
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=3.5)
    parser.add_argument(
        "--py-spy", metavar="FILE", help="record the server with py-spy (raw format) into FILE"
    )
    parser.add_argument(
        "--engine-process",
        action="store_true",
        help="the scheduler, runner and text in a child process (--engine-process on)",
    )
    args = parser.parse_args()
    port = free_port()
    threads_file = tempfile.mktemp(suffix=".json")
    context = multiprocessing.get_context("spawn")
    server = context.Process(
        target=serve, args=(port, args.step_ms / 1000, threads_file, args.engine_process)
    )
    server.start()
    try:
        while not os.path.exists(threads_file):
            if not server.is_alive():
                sys.exit("the server exited before it was ready")
            time.sleep(0.2)
        assert server.pid is not None
        names = {v: k for k, v in json.loads(Path(threads_file).read_text()).items()}
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(
                [
                    *("py-spy", "record", "--threads", "--nonblocking", "-r", "250", "-f", "raw"),
                    *("--subprocesses", "-o", args.py_spy, "-p", str(server.pid)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        before = thread_times(server.pid)
        client_before = time.process_time()
        count, seconds, gaps = asyncio.run(measure(port, args.streams, args.tokens))
        client_cpu = time.process_time() - client_before
        after = thread_times(server.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
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
        (
            (
                after[t] - before.get(t, 0.0),
                names.get(t, f"thread {t}" if t > 0 else f"engine process {-t}"),
            )
            for t in after
        ),
        reverse=True,
    )
    for cpu, name in rows:
        if cpu >= 0.01:
            out(f"| {name} | {cpu:.2f} | {cpu / count * 1e6:.1f} | {cpu / seconds:.0%} |\n")
    total = sum(cpu for cpu, _ in rows)
    out(f"| all | {total:.2f} | {total / count * 1e6:.1f} | {total / seconds:.0%} |\n")
    out(
        f"\nThe client process (another interpreter) used {client_cpu:.2f} s of CPU "
        f"({client_cpu / seconds:.0%} of the run): on a machine with few cores it competes "
        "with the server, and the result is a lower bound.\n"
    )


if __name__ == "__main__":
    main()
