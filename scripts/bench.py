"""Continuous batching benchmark: StreamPredict streams against plain transformers ``generate``.

One run measures, with the same weights (the served ``--model``, default the embedded
SmolLM2-135M-Instruct; fp32 on the CPU, bf16 with ``--device cuda``; greedy):

- baselines: plain ``generate`` at batch 1 (and the prefill time of one prompt), and padded
  static ``generate`` (left padding) at batch 8, 32 and 64 on the same prompts the server
  gets, counting the tokens each row really generates (up to its end-of-sequence);
- the server, over real gRPC streams: 1, 8, 32 and 64 streams started at once, 64 streams
  with mixed max_tokens, and a burst of 32 new streams into 32 running ones;

then prints a markdown table and a PASS/FAIL check of the targets (informational: the exit
status is 0 either way), and writes a plot (``--plot``, default ``bench.png``).

With ``--device cuda`` the run also measures, in the baselines' process, the floor a server
of this model can reach on this GPU: one HF decode step captured in a CUDA graph over a
static cache, at each batch size; samples the GPU's utilisation (NVML) during every
scenario; adds a sustained 64-stream scenario (``--sustained-tokens``), optionally
recorded with py-spy (``--py-spy FILE``); and checks the GPU targets against the floor.
``--model`` may be ``random:SHAPE[@TOKENIZER_DIR]``: random weights of a real shape, the
same in the server and the baselines (seeded), so nothing is downloaded.

It starts a server on a free port with the server's default flags but the prefix cache off
(the scenarios repeat their prompts; ``scripts/bench_multiturn.py`` measures the cache),
plus any ``--server-arg`` (``--server-arg=--max-queue=64``), or uses ``--target``. The
baselines run afterwards in a process of their own: a model loaded beside the server keeps
its OpenMP threads spinning and slows the server about 3x on a small machine, so the two
never run at once. Compare ratios within one run: these machines are shared and noisy.

    .venv/bin/python scripts/bench.py [--tokens 64] [--plot docs/bench.png] [--no-baseline]
    .venv/bin/python scripts/bench.py --quick        # 1 and 8 streams, 16 tokens, no burst
    .venv/bin/python scripts/bench.py --target 127.0.0.1:50051
    python scripts/bench.py --device cuda --model 1b=random:llama-3.2-1b --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import grpc

from llm_stream.client import InferenceClient

# Mixed lengths: 86, 39, 243, 47, 143, 39, 166 and 63 tokens after SmolLM2's chat template
# (which alone is 30 tokens). Streams and batch rows take them in this order, cycling, so
# batches of 8, 32 and 64 all hold the same mix. Each asks for a long answer: greedy
# SmolLM2-135M runs every one of them to at least 192 tokens.
PROMPTS: tuple[str, ...] = (
    "You are helping a small bakery write its website. The bakery opened in 1998, bakes "
    "sourdough bread every morning, sells cinnamon rolls on weekends and donates unsold "
    "bread to a shelter. Write a warm, detailed 'About us' page for it.",
    "Tell me a long story about a dragon.",
    "Here are my notes from a meeting about moving our team's services to a new cloud "
    "provider. We run twelve services; four are stateless web frontends, five are "
    "background workers that read from a queue, two are databases (one PostgreSQL, one "
    "Redis) and one is a batch job that runs every night and takes about three hours. "
    "The current provider's contract ends in nine months. The new provider is cheaper "
    "for compute but more expensive for network egress, and most of our egress comes "
    "from the nightly batch job exporting reports to customers. Two engineers can work "
    "on the migration half time; the rest of the team is busy with a product launch in "
    "four months. We have no experience with the new provider's managed database, and "
    "the PostgreSQL database is 2 TB with about 50 GB of writes per day. Security wants "
    "every service behind the new provider's private network before any customer data "
    "moves. Finance wants to know the monthly cost after the move. Write a migration plan "
    "with phases, risks and a rough timeline.",
    "Explain step by step how a bicycle works, from the pedals to the wheels.",
    "I am learning to cook and I have the following in my kitchen: rice, onions, garlic, "
    "two carrots, a can of chickpeas, a can of tomatoes, olive oil, salt, pepper, cumin, "
    "paprika, a lemon and some fresh parsley. I have a stove, one large pan and one pot, "
    "but no oven. I would like a filling dinner for two people that takes less than an "
    "hour and does not waste anything. Suggest a recipe, list the steps in order, and "
    "explain why each step matters so that I learn something while cooking.",
    "Write a poem about the sea at night.",
    "Our city council is debating whether to turn the main street into a pedestrian zone. "
    "Supporters say that cafes and shops will get more customers, the air will be cleaner "
    "and children will be safer. Shop owners worry that customers who drive will go to "
    "the shopping centre outside town instead, and that deliveries will be harder. "
    "Residents of the side streets fear that traffic will move onto their streets. The "
    "bus company says two bus lines would need new routes. A similar change in a "
    "neighbouring town five years ago was first unpopular and is now widely liked, but "
    "that town is smaller and has a train station in the centre. Write a balanced "
    "newspaper article that explains the arguments on each side.",
    "Describe the water cycle in detail for a class of ten-year-olds, with examples "
    "from everyday life they will recognise, such as puddles and clouds.",
)

# The workload of the issue that asked for continuous batching (#6): one short chat prompt,
# 45 tokens after the template, for every stream.
SHORT_PROMPT = "Write a long story about a dragon who learns to paint."

STREAM_TIMEOUT_S = 900.0  # the deadline of every stream
READY_TIMEOUT_S = 600.0  # the first start converts the GGUF model (about 20 s on 2 cores)
# Burst scenario: BURST_RUNNING streams of 3x --tokens run; once each has STEADY_MIN_TOKENS
# tokens, the steady window lasts until each has STEADY_WINDOW_TOKENS more; then BURST_NEW
# streams of --tokens start at once, and the burst window lasts until each has its first token.
BURST_RUNNING = 32
BURST_NEW = 32
STEADY_MIN_TOKENS = 10
STEADY_WINDOW_TOKENS = 16
STEADY_TIMEOUT_S = 120.0  # per wait; an engine that queues instead of batching gets there late
BURST_TIMEOUT_S = 300.0


def note(message: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 to 100) with linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- workloads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """``streams`` streams (or batch rows) at once: PROMPTS and ``limits`` cycled over them.

    ``rounds`` repeats it one after another (the single stream, to steady a tiny sample).
    """

    label: str
    streams: int
    limits: tuple[int, ...]
    rounds: int = 1
    prompt_set: tuple[str, ...] = PROMPTS
    # Also time static generate's first token (its padded prefill) at this batch size.
    static_first_token: bool = False

    @property
    def mixed(self) -> bool:
        return len(set(self.limits)) > 1

    def prompts(self) -> list[str]:
        return [self.prompt_set[i % len(self.prompt_set)] for i in range(self.streams)]

    def max_tokens(self) -> list[int]:
        return [self.limits[i % len(self.limits)] for i in range(self.streams)]


def plan(tokens: int, quick: bool) -> list[Workload]:
    counts = (1, 8) if quick else (1, 8, 32, 64)
    workloads = [
        Workload(
            f"{n} stream{'s' if n > 1 else ''}",
            n,
            (tokens,),
            rounds=3 if n == 1 else 1,
            static_first_token=n == 32,
        )
        for n in counts
    ]
    if not quick:
        mixed = (max(1, tokens // 4), max(1, tokens // 2), tokens, tokens * 2)
        workloads.append(Workload("64 streams, mixed max_tokens", 64, mixed))
        workloads.append(
            Workload(
                "32 streams, one short prompt",
                32,
                (tokens,),
                prompt_set=(SHORT_PROMPT,),
                static_first_token=True,
            )
        )
    return workloads


# -- server side ---------------------------------------------------------------------------


@dataclass
class StreamResult:
    """What the client saw of one StreamPredict call (times from time.perf_counter)."""

    sent: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # one per non-final token message
    completion_tokens: int = 0  # from the final message's usage
    ended: float = 0.0
    done: bool = False
    code: str | None = None  # the gRPC status name when the call failed

    @property
    def tokens(self) -> int:
        return self.completion_tokens or len(self.arrivals)

    @property
    def ttft_ms(self) -> float | None:
        return (self.arrivals[0] - self.sent) * 1000 if self.arrivals else None


def itl_ms(
    results: Sequence[StreamResult],
    *,
    ends_after: float = -math.inf,
    ends_by: float = math.inf,
    starts_before: float = math.inf,
) -> list[float]:
    """Gaps between consecutive token arrivals within each stream, pooled, in ms.

    Only gaps whose later arrival is in (ends_after, ends_by] and whose earlier arrival is
    before starts_before count: the defaults take every gap.
    """
    return [
        (later - earlier) * 1000
        for result in results
        for earlier, later in pairwise(result.arrivals)
        if ends_after < later <= ends_by and earlier < starts_before
    ]


async def one_stream(
    client: InferenceClient, prompt: str, max_tokens: int, result: StreamResult
) -> None:
    result.sent = time.perf_counter()
    try:
        async for token in client.stream(
            prompt, max_tokens=max_tokens, temperature=0.0, timeout=STREAM_TIMEOUT_S
        ):
            if token.is_final:
                result.completion_tokens = token.usage.completion_tokens
            else:
                result.arrivals.append(time.perf_counter())
    except grpc.aio.AioRpcError as exc:
        result.code = exc.code().name
    finally:
        result.ended = time.perf_counter()
        result.done = True


def start_streams(
    client: InferenceClient, prompts: Sequence[str], limits: Sequence[int]
) -> tuple[list[StreamResult], list[asyncio.Task[None]]]:
    results = [StreamResult() for _ in prompts]
    tasks = [
        asyncio.create_task(one_stream(client, prompt, limit, result))
        for prompt, limit, result in zip(prompts, limits, results, strict=True)
    ]
    return results, tasks


@dataclass
class ScenarioResult:
    workload: Workload
    streams: list[StreamResult]
    seconds: float  # summed over rounds: from the start to the end of the last stream
    gpu_util: float | None = None  # mean NVML utilisation while it ran (CUDA)

    @property
    def rejected(self) -> int:
        return sum(s.code == "RESOURCE_EXHAUSTED" for s in self.streams)

    @property
    def errors(self) -> list[str]:
        return [s.code for s in self.streams if s.code and s.code != "RESOURCE_EXHAUSTED"]


def nvml() -> Any:
    """NVIDIA's management library (nvidia-ml-py), initialised; None without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # not installed, or no NVIDIA driver here
        return None
    return pynvml


class GpuMonitor:
    """The GPU's utilisation (NVML: share of time a kernel ran), sampled every 20 ms."""

    def __init__(self) -> None:
        self._nvml: Any = nvml()
        self._handle: Any = None if self._nvml is None else self._nvml.nvmlDeviceGetHandleByIndex(0)

    @contextlib.asynccontextmanager
    async def sampling(self) -> Any:
        samples: list[float] = []
        task = asyncio.create_task(self._sample(samples)) if self._handle else None
        result: dict[str, float | None] = {"mean": None}
        try:
            yield result
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            # The first and last samples straddle the start and the end: left out.
            inner = samples[1:-1] or samples
            result["mean"] = statistics.fmean(inner) if inner else None

    async def _sample(self, samples: list[float]) -> None:
        while True:
            rates = await asyncio.to_thread(self._nvml.nvmlDeviceGetUtilizationRates, self._handle)
            samples.append(float(rates.gpu))
            await asyncio.sleep(0.02)


async def run_scenario(
    client: InferenceClient, workload: Workload, gpu: GpuMonitor
) -> ScenarioResult:
    note(f"server: {workload.label} (max_tokens {'/'.join(map(str, workload.limits))})")
    streams: list[StreamResult] = []
    seconds = 0.0
    async with gpu.sampling() as util:
        for _ in range(workload.rounds):
            started = time.perf_counter()
            results, tasks = start_streams(client, workload.prompts(), workload.max_tokens())
            await asyncio.gather(*tasks)
            seconds += max(r.ended for r in results) - started
            streams.extend(results)
    return ScenarioResult(workload, streams, seconds, util["mean"])


async def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` every 10 ms; False if it is still false after ``timeout`` s."""
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@dataclass
class BurstResult:
    running: list[StreamResult]
    new: list[StreamResult]
    steady: tuple[float, float]  # the steady window (perf_counter start, end)
    burst: tuple[float, float]  # from the burst start to the last new stream's first token
    steady_reached: bool
    burst_complete: bool
    running_tokens: int
    new_tokens: int

    def steady_itl(self) -> list[float]:
        return itl_ms(self.running, ends_after=self.steady[0], ends_by=self.steady[1])

    def burst_itl(self) -> list[float]:
        # Every gap the burst window overlaps, the one that ends after it included.
        return itl_ms(self.running, ends_after=self.burst[0], starts_before=self.burst[1])

    def new_ttft(self) -> list[float]:
        return [t for s in self.new if (t := s.ttft_ms) is not None]

    def codes(self) -> list[str]:
        return [s.code for s in self.running + self.new if s.code]


async def run_burst(client: InferenceClient, tokens: int) -> BurstResult:
    running_tokens = 3 * tokens
    note(f"server: burst, {BURST_RUNNING} running streams (max_tokens {running_tokens})")
    running_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(BURST_RUNNING)]
    running, tasks = start_streams(client, running_prompts, [running_tokens] * BURST_RUNNING)
    steady_reached = await wait_until(
        lambda: all(s.done or len(s.arrivals) >= STEADY_MIN_TOKENS for s in running),
        STEADY_TIMEOUT_S,
    )
    steady_start = time.perf_counter()
    counts = [len(s.arrivals) for s in running]
    await wait_until(
        lambda: all(
            s.done or len(s.arrivals) >= n + STEADY_WINDOW_TOKENS
            for s, n in zip(running, counts, strict=True)
        ),
        STEADY_TIMEOUT_S,
    )
    burst_start = time.perf_counter()
    note(f"server: burst, {BURST_NEW} new streams (max_tokens {tokens})")
    new_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(BURST_NEW)]
    new, new_tasks = start_streams(client, new_prompts, [tokens] * BURST_NEW)
    burst_complete = await wait_until(
        lambda: all(s.done or s.arrivals for s in new), BURST_TIMEOUT_S
    )
    burst_end = max((s.arrivals[0] if s.arrivals else s.ended) for s in new)
    if not burst_complete:
        burst_end = time.perf_counter()
    # The gap each running stream is in at the burst's end counts: wait for its next token.
    await wait_until(
        lambda: all(s.done or (s.arrivals and s.arrivals[-1] > burst_end) for s in running),
        STEADY_TIMEOUT_S,
    )
    for task in tasks + new_tasks:
        task.cancel()
    await asyncio.gather(*tasks, *new_tasks, return_exceptions=True)
    return BurstResult(
        running,
        new,
        (steady_start, burst_start),
        (burst_start, burst_end),
        steady_reached,
        burst_complete,
        running_tokens,
        tokens,
    )


@dataclass
class ServerResults:
    target: str
    scenarios: list[ScenarioResult]
    burst: BurstResult | None


async def wait_ready(client: InferenceClient, process: subprocess.Popen[bytes] | None) -> None:
    """Wait for SERVING; fail at once if the server process exits first."""
    ready = asyncio.create_task(client.wait_ready(timeout=READY_TIMEOUT_S))
    while not ready.done():
        if process is not None and process.poll() is not None:
            ready.cancel()
            raise SystemExit(f"the server exited with status {process.returncode} before ready")
        await asyncio.wait({ready}, timeout=0.5)
    await ready


async def measure_server(
    target: str,
    process: subprocess.Popen[bytes] | None,
    workloads: Sequence[Workload],
    tokens: int,
    burst: bool,
    *,
    sustained: Workload | None = None,
    py_spy: str | None = None,
) -> ServerResults:
    gpu = GpuMonitor()
    async with InferenceClient(target) as client:
        note(f"waiting for {target} to report SERVING")
        await wait_ready(client, process)
        note("warm-up: 3 short streams")
        _, warm = start_streams(client, PROMPTS[:2], [4, 4])
        await asyncio.gather(*warm)
        await one_stream(client, PROMPTS[0], 8, StreamResult())
        scenarios = [await run_scenario(client, w, gpu) for w in workloads]
        burst_result = await run_burst(client, tokens) if burst else None
        if sustained is not None:
            with profiled(py_spy, process):
                scenarios.append(await run_scenario(client, sustained, gpu))
        return ServerResults(target, scenarios, burst_result)


@contextlib.contextmanager
def profiled(path: str | None, process: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """py-spy records the server (and its engine processes) meanwhile, into ``path``."""
    if not path or process is None:
        yield
        return
    if shutil.which("py-spy") is None:
        note("--py-spy: py-spy is not on PATH (pip install py-spy); not profiling")
        yield
        return
    command = ["py-spy", "record", "--threads", "--nonblocking", "--subprocesses", "-r", "200"]
    command += ["-f", "raw", "-o", path, "-p", str(process.pid)]
    note("py-spy: " + shlex.join(command))
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(
    model: str, extra: Sequence[str], log_path: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A server on a free port with its default flags, plus ``extra``; its log in a file."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llm_stream.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model,
        # INFO for the ready line (how the model runs); a file, not a pipe nobody reads.
        "--log-level",
        "INFO",
        # gRPC only: a busy default HTTP port (8000) must not stop the benchmark.
        "--http-port",
        "0",
        *extra,
    ]
    note("starting " + shlex.join(command[1:]) + f" (log: {log_path})")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=os.environ.copy(), stdout=log, stderr=log)
    try:
        yield f"127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- baselines (in a process of their own) -------------------------------------------------


@dataclass(frozen=True)
class Timed:
    tokens: int
    seconds: float
    # Static generate's time to its first token at this batch size (its padded prefill).
    first_token_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class Baselines:
    prefill_ms: float  # median time of generate(max_new_tokens=1) on PROMPTS[0]
    runs: dict[str, Timed]  # by workload label
    # CUDA: ms of one decode step of the model in a CUDA graph over a static cache, by rows.
    graph_step_ms: dict[int, float] = field(default_factory=dict)
    device: str = "cpu"

    def floor_tokens_per_s(self, rows: int) -> float | None:
        step = self.graph_step_ms.get(rows)
        return rows / step * 1000 if step else None


def generated(row: Sequence[int], limit: int, eos_ids: frozenset[int]) -> int:
    """Tokens a row really generated: up to its first end-of-sequence (counted), or limit."""
    for index, token in enumerate(row[:limit]):
        if token in eos_ids:
            return index + 1
    return len(row[:limit])


def graph_step_ms(model: Any, rows: int, prompt: int = 128, steps: int = 64) -> float:
    """One decode step of ``rows`` rows replayed from a CUDA graph over a StaticCache.

    The floor a server running this model's own forward can reach on this GPU: fixed
    shapes, inputs updated in place, nothing else in the step.
    """
    import torch
    from transformers import StaticCache

    device = next(model.parameters()).device
    with torch.inference_mode():
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 16)
        ids = torch.randint(100, 1000, (rows, prompt), device=device)
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = torch.randint(100, 1000, (rows, 1), device=device)
        position = torch.full((rows, 1), prompt, device=device)

        def step() -> Any:
            return model(input_ids=token, position_ids=position, cache=cache, use_cache=True)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            graph.replay()
            token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
            position.add_(1)
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps * 1000


def run_baselines(workloads: Sequence[Workload], model_text: str, device_name: str) -> Baselines:
    """Plain and padded static ``generate`` for each workload, in this process; on CUDA also
    the graph-step floor at each batch size."""
    import torch
    from transformers import GenerationConfig

    from llm_stream.model.backend import eos_token_ids, pad_token_id
    from llm_stream.model.loader import load_weights
    from llm_stream.model.sources import parse_model_spec
    from llm_stream.settings import default_cache_dir

    model, tokenizer, _, device = load_weights(
        parse_model_spec(model_text), device_name, "auto", default_cache_dir()
    )
    cuda = device.type == "cuda"
    if cuda:  # the server's own choice: cuDNN attention re-plans every new shape
        torch.backends.cuda.enable_cudnn_sdp(False)
    tokenizer.padding_side = "left"
    # The end-of-sequence and pad tokens the server uses (llm_stream.model.backend).
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos_ids)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def generate(prompts: Sequence[str], limits: Sequence[int]) -> Timed:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        batch = batch.to(device)
        config = GenerationConfig(
            max_new_tokens=max(limits),
            do_sample=False,
            eos_token_id=sorted(eos_ids),
            pad_token_id=pad_id,
        )
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, generation_config=config)
        sync()
        seconds = time.perf_counter() - started
        rows = out[:, batch["input_ids"].shape[1] :].tolist()
        tokens = sum(
            generated(row, limit, frozenset(eos_ids))
            for row, limit in zip(rows, limits, strict=True)
        )
        return Timed(tokens, seconds)

    generate(PROMPTS[:2], [2, 2])  # warm-up
    prefill = statistics.median(generate(PROMPTS[:1], [1]).seconds for _ in range(5))
    runs: dict[str, Timed] = {}
    for workload in workloads:
        what = "plain" if workload.streams == 1 else "static"
        note(f"baseline: {what} generate, batch {workload.streams}, {workload.label}")
        timed = [
            generate(workload.prompts(), workload.max_tokens()) for _ in range(workload.rounds)
        ]
        first_token = None
        if workload.static_first_token:
            first_token = generate(workload.prompts(), [1] * workload.streams).seconds
        runs[workload.label] = Timed(
            sum(t.tokens for t in timed), sum(t.seconds for t in timed), first_token
        )
    floors: dict[int, float] = {}
    if cuda:
        for rows in sorted({w.streams for w in workloads}):
            note(f"floor: one decode step of {rows} rows in a CUDA graph")
            floors[rows] = graph_step_ms(model, rows)
    return Baselines(prefill * 1000, runs, floors, device.type)


def baselines_in_subprocess(
    workloads: Sequence[Workload], model_text: str, device: str
) -> Baselines:
    """run_baselines in a fresh process that exits (with its OpenMP threads) when done."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(run_baselines, list(workloads), model_text, device).result()


# -- report --------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    streams: int
    tokens: int
    seconds: float
    static_tokens_per_s: float | None = None
    ttft: tuple[float | None, float | None] = (None, None)  # p50, p95 in ms
    itl: tuple[float | None, float | None] = (None, None)
    rejected: int | None = None
    errors: int | None = None
    mixed: bool = False  # max_tokens differ between streams
    floor_tokens_per_s: float | None = None  # CUDA: streams / the graph step of that many rows
    gpu_util: float | None = None  # CUDA: mean NVML utilisation, %

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def ratio(self) -> float | None:
        if not self.static_tokens_per_s:
            return None
        return self.tokens_per_s / self.static_tokens_per_s

    @property
    def floor_ratio(self) -> float | None:
        if not self.floor_tokens_per_s:
            return None
        return self.tokens_per_s / self.floor_tokens_per_s


def baseline_rows(workloads: Sequence[Workload], baselines: Baselines) -> list[Row]:
    rows = []
    for workload in workloads:
        timed = baselines.runs[workload.label]
        if workload.streams == 1:
            name = "plain generate, batch 1"
            ttft: tuple[float | None, float | None] = (baselines.prefill_ms, None)
        else:
            name = f"static generate, batch {workload.streams}"
            name += ", mixed max_tokens" if workload.mixed else ""
            name += ", one short prompt" if workload.prompt_set == (SHORT_PROMPT,) else ""
            first = None if timed.first_token_s is None else timed.first_token_s * 1000
            ttft = (first, first)
        rows.append(
            Row(
                name,
                workload.streams,
                timed.tokens,
                timed.seconds,
                ttft=ttft,
                mixed=workload.mixed,
            )
        )
    return rows


def server_row(result: ScenarioResult, baselines: Baselines | None) -> Row:
    streams = result.streams
    ttfts = [t for s in streams if (t := s.ttft_ms) is not None]
    itls = itl_ms(streams)
    static = baselines.runs.get(result.workload.label) if baselines else None
    floor = baselines.floor_tokens_per_s(result.workload.streams) if baselines else None
    return Row(
        f"server, {result.workload.label}",
        result.workload.streams,
        sum(s.tokens for s in streams),
        result.seconds,
        static.tokens_per_s if static else None,
        (percentile(ttfts, 50), percentile(ttfts, 95)),
        (percentile(itls, 50), percentile(itls, 95)),
        result.rejected,
        len(result.errors),
        result.workload.mixed,
        floor,
        result.gpu_util,
    )


def cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: Sequence[Row], gpu: bool = False) -> list[str]:
    extra_head = " x floor | GPU util % |" if gpu else ""
    extra_rule = "---:|---:|" if gpu else ""
    lines = [
        "| scenario | streams (batch) | tokens | seconds | tokens/s | x static | TTFT p50 ms "
        "| TTFT p95 ms | ITL p50 ms | ITL p95 ms | rejected | errors |" + extra_head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + extra_rule,
    ]
    for row in rows:
        extra = f" {cell(row.floor_ratio, 2)} | {cell(row.gpu_util)} |" if gpu else ""
        lines.append(
            f"| {row.scenario} | {row.streams} | {row.tokens} | {row.seconds:.2f} "
            f"| {row.tokens_per_s:.1f} | {cell(row.ratio, 2)} | {cell(row.ttft[0])} "
            f"| {cell(row.ttft[1])} | {cell(row.itl[0], 1)} | {cell(row.itl[1], 1)} "
            f"| {cell(row.rejected)} | {cell(row.errors)} |" + extra
        )
    return lines


def floor_lines(baselines: Baselines) -> list[str]:
    lines = [
        "The floor: one decode step of the model in a CUDA graph (static cache, 128 cached "
        "positions, greedy), as a server of this model could at best repeat it:",
        "",
        "| rows | graph step ms | tokens/s |",
        "|---:|---:|---:|",
    ]
    for rows, step in sorted(baselines.graph_step_ms.items()):
        lines.append(f"| {rows} | {step:.2f} | {rows / step * 1000:,.0f} |")
    return lines


def burst_lines(burst: BurstResult) -> list[str]:
    steady, spike = burst.steady_itl(), burst.burst_itl()
    new_ttft = burst.new_ttft()
    lines = [
        f"Burst: {BURST_NEW} new streams (max_tokens {burst.new_tokens}) into "
        f"{BURST_RUNNING} running ones (max_tokens {burst.running_tokens}).",
        "",
        "| window | seconds | running ITL p50 ms | running ITL p95 ms | gaps |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, window, gaps in (("steady", burst.steady, steady), ("burst", burst.burst, spike)):
        lines.append(
            f"| {name} | {window[1] - window[0]:.2f} | {cell(percentile(gaps, 50), 1)} "
            f"| {cell(percentile(gaps, 95), 1)} | {len(gaps)} |"
        )
    steady_p95, burst_p95 = percentile(steady, 95), percentile(spike, 95)
    ratio = burst_p95 / steady_p95 if burst_p95 is not None and steady_p95 else None
    codes = burst.codes()
    lines += [
        "",
        f"- burst/steady ITL p95: {cell(ratio, 2)}x",
        f"- new streams' TTFT p50 {cell(percentile(new_ttft, 50))} ms, "
        f"p95 {cell(percentile(new_ttft, 95))} ms",
        f"- rejected {codes.count('RESOURCE_EXHAUSTED')}, "
        f"other errors {len(codes) - codes.count('RESOURCE_EXHAUSTED')}",
    ]
    if not burst.steady_reached:
        lines.append(f"- steady state not reached within {STEADY_TIMEOUT_S:g} s")
    if not burst.burst_complete:
        lines.append(f"- not every new stream had a token within {BURST_TIMEOUT_S:g} s")
    return lines


def burst_check(burst: BurstResult | None) -> str:
    """The running streams' ITL p95 during a burst at most 3x steady."""
    if burst is None:
        return check(None, "burst ITL p95 <= 3x steady (no burst scenario)")
    steady = percentile(burst.steady_itl(), 95)
    spike = percentile(burst.burst_itl(), 95)
    if not steady or spike is None:
        return check(None, "burst ITL p95 <= 3x steady (no gaps measured)")
    return check(
        spike <= 3 * steady,
        f"burst: running streams' ITL p95 {spike:.1f} ms <= 3x steady p95 {steady:.1f} ms "
        f"({spike / steady:.2f}x)",
    )


def check(ok: bool | None, text: str) -> str:
    verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    return f"- {verdict}: {text}"


def targets(results: ServerResults, rows: dict[str, Row], baselines: Baselines | None) -> list[str]:
    lines = ["Targets (informational):", ""]
    one, plain = rows.get("server, 1 stream"), rows.get("plain generate, batch 1")
    if one and plain:
        ratio = one.tokens_per_s / plain.tokens_per_s
        lines.append(
            check(
                ratio >= 0.95,
                f"1 stream {one.tokens_per_s:.1f} tokens/s >= 0.95x plain generate batch 1 "
                f"{plain.tokens_per_s:.1f} tokens/s ({ratio:.2f}x)",
            )
        )
    else:
        lines.append(check(None, "1 stream >= 0.95x plain generate batch 1 (not measured)"))
    if one and one.ttft[0] is not None and baselines:
        limit = baselines.prefill_ms + 15
        lines.append(
            check(
                one.ttft[0] <= limit,
                f"1-stream TTFT p50 {one.ttft[0]:.0f} ms <= plain prefill "
                f"{baselines.prefill_ms:.0f} ms + 15 ms",
            )
        )
    else:
        lines.append(check(None, "1-stream TTFT <= plain prefill + 15 ms (not measured)"))
    for label in ("32 streams, one short prompt", "32 streams"):
        row32 = rows.get(f"server, {label}")
        if row32 and row32.ratio is not None and row32.ttft[1] is not None:
            ratio, p95 = row32.ratio, row32.ttft[1]
            lines.append(
                check(
                    ratio >= 0.8 and p95 <= 2000,
                    f"{label}: {row32.tokens_per_s:.1f} tokens/s >= 0.8x static batch 32 "
                    f"({ratio:.2f}x) and TTFT p95 {p95:.0f} ms <= 2000 ms",
                )
            )
        else:
            lines.append(check(None, f"{label} >= 0.8x static batch 32, TTFT p95 <= 2 s"))
    sixty_four = [r for r in results.scenarios if r.workload.streams == 64]
    if sixty_four:
        rejected = sum(r.rejected for r in sixty_four)
        lines.append(
            check(
                rejected == 0,
                f"64 streams: {rejected} rejected "
                f"(in {', '.join(r.workload.label for r in sixty_four)})",
            )
        )
    else:
        lines.append(check(None, "64 streams: none rejected (not measured)"))
    lines.append(burst_check(results.burst))
    return lines


def gpu_targets(results: ServerResults, rows: dict[str, Row], baselines: Baselines) -> list[str]:
    """The GPU issue's targets, against the floor measured in the same run."""
    lines = ["GPU targets (informational):", ""]
    step = baselines.graph_step_ms
    for label, rows_at, least in (("64 streams", 64, 0.6), ("32 streams", 32, 0.6)):
        row = rows.get(f"server, {label}")
        if row is None or row.floor_ratio is None:
            lines.append(check(None, f"{label} >= {least}x the graph-step floor (not measured)"))
            continue
        lines.append(
            check(
                row.floor_ratio >= least,
                f"{label}: {row.tokens_per_s:,.0f} tokens/s >= {least}x the floor "
                f"{row.floor_tokens_per_s:,.0f} at {rows_at} rows ({row.floor_ratio:.2f}x)",
            )
        )
    row64, one = rows.get("server, 64 streams"), rows.get("server, 1 stream")
    latency = [  # (row, measured ms, limit ms, what)
        (row64, row64 and row64.itl[1], 2 * step.get(64, 0), "64 streams: ITL p95", "2x the step"),
        (one, one and one.itl[0], 1.5 * step.get(1, 0), "1 stream: ITL p50", "1.5x the step"),
        (
            one,
            one and one.ttft[0],
            baselines.prefill_ms + step.get(1, 0),
            "1 stream: TTFT p50",
            f"prefill {baselines.prefill_ms:.1f} ms + one step",
        ),
    ]
    for row, value, limit, what, bound in latency:
        if row is not None and value is not None and limit:
            lines.append(
                check(value <= limit, f"{what} {value:.2f} ms <= {bound} ({limit:.2f} ms)")
            )
    lines.append(burst_check(results.burst))
    sustained = [r for r in results.scenarios if r.workload.label.endswith("sustained")]
    if sustained and sustained[0].gpu_util is not None:
        util = sustained[0].gpu_util
        lines.append(
            check(
                util >= 60, f"GPU utilisation during sustained 64-stream decode {util:.0f}% >= 60%"
            )
        )
    else:
        lines.append(check(None, "GPU utilisation >= 60% (no NVML or no sustained scenario)"))
    return lines


def plot(
    path: str, generate: Sequence[Row], served: Sequence[Row], burst: BurstResult | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, NullLocator

    def uniform(rows: Sequence[Row]) -> list[Row]:
        """The main curve: the mixed prompts, one max_tokens."""
        return [r for r in rows if not r.mixed and "short prompt" not in r.scenario]

    def short(rows: Sequence[Row]) -> list[Row]:
        return [r for r in rows if "short prompt" in r.scenario]

    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax: Any = axes[0][0]
    for rows, style, color, label in (
        (served, "o-", "C0", "server"),
        (generate, "s--", "C1", "generate"),
    ):
        ax.plot(
            [r.streams for r in uniform(rows)],
            [r.tokens_per_s for r in uniform(rows)],
            style,
            color=color,
            label=label,
        )
        for r in rows:
            if r.mixed:
                ax.plot(
                    [r.streams],
                    [r.tokens_per_s],
                    style[0],
                    color=color,
                    mfc="none",
                    label=f"{label}, mixed max_tokens",
                )
        for r in short(rows):
            ax.plot([r.streams], [r.tokens_per_s], "^", color=color, label=f"{label}, short prompt")
    ax.set(title="aggregate throughput", ylabel="tokens/s", ylim=(0, None))
    for ax, key, title in (
        (axes[0][1], "ttft", "time to first token (server, client-side)"),
        (axes[1][0], "itl", "inter-token latency (server, client-side)"),
    ):
        for index, label in ((0, "p50"), (1, "p95")):
            points = [(r.streams, getattr(r, key)[index]) for r in uniform(served)]
            points = [(x, y) for x, y in points if y is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], "o-", label=label)
        if key == "ttft":
            for r in short(served):
                if r.ttft[1] is not None:
                    ax.plot([r.streams], [r.ttft[1]], "^", color="C1", label="p95, short prompt")
            for r in uniform(generate):
                if r.ttft[0] is not None:
                    name = "plain prefill" if r.streams == 1 else "static generate's first token"
                    ax.plot([r.streams], [r.ttft[0]], "s", color="C2", label=name)
        ax.set(title=title, ylabel="ms", yscale="log")
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ticks = sorted({r.streams for r in [*generate, *served]})
    for ax in (axes[0][0], axes[0][1], axes[1][0]):
        ax.set(xlabel="concurrent streams (batch size for generate)", xscale="log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[1][1]
    if burst:
        windows = {"steady": burst.steady_itl(), "burst": burst.burst_itl()}
        for offset, q in ((-0.2, 50), (0.2, 95)):
            values = [percentile(v, q) or 0.0 for v in windows.values()]
            ax.bar([i + offset for i in range(2)], values, width=0.4, label=f"p{q}")
        ax.set_xticks([0, 1], list(windows))
        ax.set(
            title=f"ITL of {BURST_RUNNING} running streams when {BURST_NEW} new ones start",
            ylabel="ms",
        )
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no burst scenario", ha="center", va="center")
        ax.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def server_notes(log_path: str | None) -> list[str]:
    """The server log's ready line (how the model runs) and its warnings and errors."""
    if not log_path or not os.path.exists(log_path):
        return []
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    ready = [line.split(" ready: ", 1)[1] for line in lines if " ready: " in line]
    worse = [line for line in lines if " WARNING " in line or " ERROR " in line]
    worse += [line for line in lines if " CRITICAL " in line or line.startswith("Traceback")]
    notes = [f"Server: {ready[0]}" if ready else f"Server: no ready line in {log_path}"]
    notes += [f"Server log: {line}" for line in worse[:10]]
    return notes


def report(
    args: argparse.Namespace,
    workloads: Sequence[Workload],
    results: ServerResults,
    baselines: Baselines | None,
    load_at_start: float,
) -> None:
    generate = baseline_rows(workloads, baselines) if baselines else []
    served = [server_row(r, baselines) for r in results.scenarios]
    rows = generate + served
    gpu = args.device.startswith("cuda")
    served_model = "its default model" if args.target else f"model {args.model}"
    precision = "bf16" if gpu else "fp32"
    lines = [
        f"Server {results.target}, {served_model} on {args.device} ({precision}); greedy, "
        f"max_tokens {args.tokens}; baselines: the same model and device. {os.cpu_count()} "
        f"CPUs, load average {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} now.",
        *server_notes(args.server_log),
        "",
        *table(rows, gpu),
        "",
        "x static: server tokens/s over generate's at the same batch size (1 stream: plain "
        "generate); tokens/s = completion tokens / wall time to the last stream's end. "
        "TTFT: request sent to first token, client-side (plain generate: "
        "generate(max_new_tokens=1) on the 1-stream prompt). ITL: gaps between consecutive "
        "tokens of a stream, pooled. The 1-stream rows are 3 runs one after another, summed. "
        "Static generate counts each row's tokens up to its "
        "end-of-sequence or its own max_tokens, but runs the batch to the largest max_tokens."
        + (
            " x floor: server tokens/s over the graph-step floor at that many rows. GPU util: "
            "NVML's share of time a kernel ran, sampled every 20 ms during the scenario."
            if gpu
            else ""
        ),
    ]
    if baselines and baselines.graph_step_ms:
        lines += ["", *floor_lines(baselines)]
    errors = [code for r in results.scenarios for code in r.errors]
    if errors:
        counts = {code: errors.count(code) for code in sorted(set(errors))}
        lines.append("Errors: " + ", ".join(f"{c} x{n}" for c, n in counts.items()))
    if results.burst:
        lines += ["", *burst_lines(results.burst)]
    by_name = {r.scenario: r for r in rows}
    if gpu and baselines:
        lines += ["", *gpu_targets(results, by_name, baselines)]
    else:
        lines += ["", *targets(results, by_name, baselines)]
    plot(args.plot, generate, served, results.burst)
    lines += ["", f"Plot: {args.plot}"]
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="embedded",
        help="the served model, as --model takes it (default embedded); the baselines load "
        "the same (random:SHAPE for random weights of a real shape)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda: the server's and the baselines'"
    )
    parser.add_argument(
        "--target",
        help="use a running server (host:port) instead of starting one; the baselines "
        "assume it serves --model",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag(s) for the started server, split like a shell: "
        "--server-arg=--max-queue=64 (repeatable)",
    )
    parser.add_argument("--tokens", type=int, help="max_tokens per stream (default 64, quick 16)")
    parser.add_argument(
        "--sustained-tokens",
        type=int,
        help="tokens per stream of a last, sustained 64-stream scenario (default: 8x --tokens "
        "on CUDA, none on the CPU); the GPU utilisation target is read there",
    )
    parser.add_argument(
        "--py-spy", metavar="FILE", help="record the server with py-spy during the sustained run"
    )
    parser.add_argument("--plot", default="bench.png", help="PNG to write (default bench.png)")
    parser.add_argument(
        "--server-log", help="the started server's log file (default: a temporary file)"
    )
    parser.add_argument("--quick", action="store_true", help="1 and 8 streams only, no burst")
    parser.add_argument("--no-baseline", action="store_true", help="skip plain/static generate")
    args = parser.parse_args()
    args.tokens = args.tokens or (16 if args.quick else 64)
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    gpu = args.device.startswith("cuda")
    sustained_tokens = args.sustained_tokens
    if sustained_tokens is None:
        sustained_tokens = 8 * args.tokens if gpu and not args.quick else 0
    sustained = None
    if sustained_tokens > 0:
        sustained = Workload("64 streams, sustained", 64, (sustained_tokens,))
    load_at_start = os.getloadavg()[0]
    workloads = plan(args.tokens, args.quick)

    def measure(target: str, process: subprocess.Popen[bytes] | None) -> ServerResults:
        return asyncio.run(
            measure_server(
                target,
                process,
                workloads,
                args.tokens,
                not args.quick,
                sustained=sustained,
                py_spy=args.py_spy,
            )
        )

    if args.target:
        if args.server_arg:
            note("--server-arg is ignored with --target")
        results = measure(args.target, None)
    else:
        # The prefix cache off (a --server-arg may turn it on): the scenarios repeat the
        # same prompts and the baselines compute every prompt; bench_multiturn.py
        # measures the cache.
        extra = ["--device", args.device, "--prefix-cache", "off"]
        extra += [part for arg in args.server_arg for part in shlex.split(arg)]
        args.server_log = args.server_log or tempfile.mktemp(prefix="bench-server-", suffix=".log")
        with server(args.model, extra, args.server_log) as (target, process):
            results = measure(target, process)
    baselines = None
    if not args.no_baseline:
        # Only now: the server has stopped (or, with --target, sits idle).
        baselines = baselines_in_subprocess(workloads, args.model, args.device)
    report(args, workloads, results, baselines, load_at_start)


if __name__ == "__main__":
    main()
