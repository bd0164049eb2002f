"""Soak test: overload a local server for a while and account for every call.

Starts ``python -m llm_stream.serve`` on a free loopback port (``--host`` must be a
loopback address: this script never loads a server it did not start) with
``--max-concurrent C --max-queue Q``, Prometheus metrics on a free port and the HTTP
API off, waits for health SERVING, then:

1. warm-up (not counted): C streams at once of the longest prompt with the largest
   ``max_tokens``, and one Predict, so the KV cache has reached its largest shape
   before RSS is first read; its wall time T calibrates the short deadlines;
2. the soak: ``--clients`` loops (default twice the capacity C + Q, so that at any
   moment about half of them find the server full) send requests back to back for
   ``--duration`` seconds, or until ``--max-requests`` calls (rejected ones included)
   have been sent. A loop turned away with RESOURCE_EXHAUSTED sleeps the
   ``grpc-retry-pushback-ms`` the server sent (+-25 % jitter) before its next call,
   and 0.2 s after any other error, so that a failing server is not hammered.
   Every call has a deadline, so the run is bounded: start and warm-up, then
   ``--duration`` + ``--request-timeout`` at most, then the drain;
3. the end: waits for the server's ``llm_stream_requests_in_flight`` to return to 0,
   reads the RSS again, sends SIGTERM and expects exit status 0 (a graceful drain).

The request mix (seeded by ``--seed``): prompts from one word to about 250 tokens
after the chat template (scripts/bench.py's PROMPTS and two short ones); ``max_tokens``
drawn from ``--max-tokens``; half greedy, half sampled (temperature 0.8, seed 1 to
3); 20 % with the stop sequence "."; 10 % Predict, the rest StreamPredict. Of the
calls, 15 % are cancelled by the client after k tokens (k from 1 to max_tokens / 2,
streams only) and 15 % get a short deadline drawn from ``--deadline`` (default
0.25 T to 1.5 T), which expires in the queue or mid-generation.

Every call is classified exactly once:

- completed: a stream got its final message (a finish reason), or Predict returned;
- cancelled: the client cancelled it after k tokens, as planned;
- deadline exceeded: DEADLINE_EXCEEDED on a call with a short deadline (split into
  after its first token and before it);
- rejected: RESOURCE_EXHAUSTED (and whether it carried grpc-retry-pushback-ms);
- other errors (must be 0): any other status, or DEADLINE_EXCEEDED on a call with
  the long ``--request-timeout``; each distinct code and message is printed;
- lost (must be 0): a stream that ended with status OK but without its final message;
- incoherent (must be 0): a completion whose final message disagrees with what came
  before it: token_index not 0..n-1, a token message without token_id, a final message
  with text, final token_index or usage.completion_tokens not n, a finish reason other
  than end-of-sequence, stop sequence or length, more tokens than max_tokens, length
  without exactly max_tokens, the stop text in the text, messages after the final one;
  for Predict: a request_id not echoed, predictions not equal to usage.

Also reported: p50/p95 time to first token of the admitted streams (request sent to
first token message, queueing included), tokens received, completed requests whose
identical twin (same prompt, max_tokens, temperature, seed, stop) got a different
text (informational: the README promises the same output for the same seed, but
greedy rows can flip on float differences between batch shapes), the server's RSS
after warm-up, at its peak (sampled every 5 s) and at the end, the CPU time the server
and this client used (they share the machine), the load average, and the server's own
counters (generations by finish reason, rejected requests by code). RSS is first read
after the warm-up because the batch's KV cache then has its largest shape already;
what the allocator keeps beyond that is noise of a few MiB, while a leak of a few
KiB per call over a few thousand calls exceeds the default bound of 64 MiB.

The loops call through ``llm_stream.client.InferenceClient``. By default it fails
fast (``retry=False``: no retries), so every RESOURCE_EXHAUSTED the server sends
is counted as sent. With ``--client-retries`` its service config retries
RESOURCE_EXHAUSTED (and UNAVAILABLE) up to 5 attempts, honouring the server's
pushback: the rejected row then counts only calls that failed every attempt, and
TTFT includes the retries' waits.

The exit status is 1 when a check fails: other errors, lost or incoherent calls, no
completed call, a rejection without pushback, a server count of RESOURCE_EXHAUSTED
(its metrics) other than the calls rejected here (at least as many with retries),
requests still in flight after the load, RSS at the end more than
``--max-rss-growth-mib`` above the RSS after warm-up, ERROR lines in the server's
log, or a server that does not exit 0 on SIGTERM. The
report (a markdown table and the checks) goes to stdout, progress to stderr.

    .venv/bin/python scripts/soak.py --duration 240               # embedded model, C=8, Q=8
    .venv/bin/python scripts/soak.py --model tiny=/path/to/folder --max-concurrent 2 \\
        --max-queue 2 --duration 10 --json soak.json
    .venv/bin/python scripts/soak.py --client-retries --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil  # type: ignore[import-untyped,unused-ignore]  # installed with accelerate
from prometheus_client.parser import text_string_to_metric_families

from llm_stream.client import InferenceClient
from llm_stream.proto.inference.v1 import inference_pb2 as pb

sys.path.insert(0, str(Path(__file__).parent))
from bench import PROMPTS as BENCH_PROMPTS
from bench import nvml, percentile, wait_ready

log = logging.getLogger("soak")

PROMPTS: tuple[str, ...] = ("Hi!", "Count to five.", *BENCH_PROMPTS)
LONGEST_PROMPT = max(PROMPTS, key=len)
UNARY_SHARE = 0.10
CANCEL_SHARE = 0.15  # of all calls; drawn among streams only
DEADLINE_SHARE = 0.15
SAMPLED_SHARE = 0.5
STOP_SHARE = 0.2
STOP = (".",)
SAMPLED_TEMPERATURE = 0.8
SEEDS = (1, 2, 3)  # few, so that identical requests recur and their texts can be compared
PUSHBACK_KEY = "grpc-retry-pushback-ms"
FALLBACK_PAUSE_S = 0.2  # after an error, or a rejection without pushback
RSS_EVERY_S = 5.0
PROGRESS_EVERY_S = 15.0
IN_FLIGHT_TIMEOUT_S = 30.0  # for the server's in-flight gauge to return to 0 after the load
MIB = 1024 * 1024

COMPLETED = "completed"
CANCELLED = "cancelled"
DEADLINE = "deadline"
REJECTED = "rejected"
ERROR = "error"
LOST = "lost"
INCOHERENT = "incoherent"
OUTCOMES = (COMPLETED, CANCELLED, DEADLINE, REJECTED, ERROR, LOST, INCOHERENT)
NORMAL_ENDS = {
    pb.FINISH_REASON_END_OF_SEQUENCE,
    pb.FINISH_REASON_STOP_SEQUENCE,
    pb.FINISH_REASON_LENGTH,
}


# -- the request mix -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    max_tokens: tuple[int, ...]
    deadline: tuple[float, float]  # range of the short deadlines, seconds
    request_timeout: float  # every other call's deadline


@dataclass(frozen=True)
class Spec:
    """One planned call."""

    request_id: str
    unary: bool
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None
    stop: tuple[str, ...]
    timeout: float
    short_deadline: bool
    cancel_after: int | None  # the client cancels after this many token messages

    def options(self) -> dict[str, Any]:
        """make_request's (and InferenceClient's) keyword arguments."""
        return {
            "request_id": self.request_id,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "stop": self.stop,
        }

    def key(self) -> tuple[Any, ...]:
        """What determines the text: identical keys should give identical texts."""
        return (self.prompt, self.max_tokens, self.temperature, self.seed, self.stop)


def draw(rng: random.Random, mix: Mix, request_id: str) -> Spec:
    unary = rng.random() < UNARY_SHARE
    # Shares among streams, and among the calls not cancelled, that make CANCEL_SHARE and
    # DEADLINE_SHARE of all calls.
    cancel = not unary and rng.random() < CANCEL_SHARE / (1 - UNARY_SHARE)
    short = not cancel and rng.random() < DEADLINE_SHARE / (1 - CANCEL_SHARE)
    max_tokens = rng.choice(mix.max_tokens)
    sampled = rng.random() < SAMPLED_SHARE
    return Spec(
        request_id=request_id,
        unary=unary,
        prompt=rng.choice(PROMPTS),
        max_tokens=max_tokens,
        temperature=SAMPLED_TEMPERATURE if sampled else 0.0,
        seed=rng.choice(SEEDS) if sampled else None,
        stop=STOP if rng.random() < STOP_SHARE else (),
        timeout=rng.uniform(*mix.deadline) if short else mix.request_timeout,
        short_deadline=short,
        cancel_after=rng.randint(1, max(1, max_tokens // 2)) if cancel else None,
    )


# -- calls ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    unary: bool
    ttft_s: float | None = None
    tokens: int = 0
    detail: str = ""  # an error's code and message, or what was incoherent
    pushback_ms: int | None = None
    text: str | None = None  # a completion's text


def finish_problems(
    spec: Spec, reason: int, completion_tokens: int, prompt_tokens: int, text: str
) -> list[str]:
    """What a completed call's end says that its request rules out."""
    problems = []
    if reason not in NORMAL_ENDS:
        problems.append(f"finish_reason {pb.FinishReason.Name(reason)}")  # type: ignore[arg-type]
    if completion_tokens > spec.max_tokens:
        problems.append(f"{completion_tokens} tokens for max_tokens {spec.max_tokens}")
    if reason == pb.FINISH_REASON_LENGTH and completion_tokens != spec.max_tokens:
        problems.append(f"LENGTH after {completion_tokens} of {spec.max_tokens} tokens")
    if prompt_tokens <= 0:
        problems.append(f"usage.prompt_tokens {prompt_tokens}")
    if any(stop in text for stop in spec.stop):
        problems.append("the stop text is in the text")
    return problems


def stream_problems(
    spec: Spec, tokens: Sequence[pb.PredictToken], final: pb.PredictToken, after_final: int
) -> list[str]:
    n = len(tokens)
    problems = []
    if [m.token_index for m in tokens] != list(range(n)):
        problems.append("token_index is not 0..n-1")
    if any(not m.HasField("token_id") for m in tokens):
        problems.append("a token message without token_id")
    if final.token or final.HasField("token_id"):
        problems.append("the final message carries a token")
    if final.token_index != n:
        problems.append(f"final token_index {final.token_index} after {n} token messages")
    if final.usage.completion_tokens != n:
        problems.append(f"usage.completion_tokens {final.usage.completion_tokens}, {n} sent")
    if after_final:
        problems.append(f"{after_final} messages after the final one")
    text = "".join(m.token for m in tokens)
    usage = final.usage
    return problems + finish_problems(
        spec, final.finish_reason, usage.completion_tokens, usage.prompt_tokens, text
    )


def unary_problems(spec: Spec, response: pb.PredictResponse) -> list[str]:
    usage, predictions = response.usage, response.predictions
    problems = []
    if response.request_id != spec.request_id:
        problems.append(f"request_id {response.request_id!r} for {spec.request_id!r}")
    if (predictions.get("prompt_tokens"), predictions.get("completion_tokens")) != (
        usage.prompt_tokens,
        usage.completion_tokens,
    ):
        problems.append("predictions differ from usage")
    return problems + finish_problems(
        spec, response.finish_reason, usage.completion_tokens, usage.prompt_tokens, response.text
    )


def pushback_of(error: grpc.aio.AioRpcError) -> int | None:
    for key, value in error.trailing_metadata() or ():
        if key == PUSHBACK_KEY:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def failed(spec: Spec, error: grpc.aio.AioRpcError, ttft_s: float | None, tokens: int) -> Outcome:
    code = error.code()
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Outcome(REJECTED, spec.unary, pushback_ms=pushback_of(error))
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and spec.short_deadline:
        return Outcome(DEADLINE, spec.unary, ttft_s, tokens)
    detail = f"{code.name}: {error.details()}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        detail += f" (the long --request-timeout of {spec.timeout:g} s)"
    return Outcome(ERROR, spec.unary, ttft_s, tokens, detail)


async def run_stream(caller: InferenceClient, spec: Spec) -> Outcome:
    sent = time.perf_counter()
    tokens: list[pb.PredictToken] = []
    final: pb.PredictToken | None = None
    after_final = 0
    ttft: float | None = None
    try:
        stream = caller.stream(spec.prompt, timeout=spec.timeout, **spec.options())
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for message in stream:
                if final is not None:
                    after_final += 1
                elif message.is_final:
                    final = message
                else:
                    ttft = time.perf_counter() - sent if ttft is None else ttft
                    tokens.append(message)
                    if spec.cancel_after is not None and len(tokens) >= spec.cancel_after:
                        return Outcome(CANCELLED, False, ttft, len(tokens))
    except grpc.aio.AioRpcError as error:
        return failed(spec, error, ttft, len(tokens))
    if final is None:
        return Outcome(LOST, False, ttft, len(tokens), f"ended OK after {len(tokens)} tokens")
    problems = stream_problems(spec, tokens, final, after_final)
    kind = INCOHERENT if problems else COMPLETED
    text = "".join(m.token for m in tokens)
    return Outcome(kind, False, ttft, len(tokens), "; ".join(problems), text=text)


async def run_unary(caller: InferenceClient, spec: Spec) -> Outcome:
    try:
        response = await caller.predict(spec.prompt, timeout=spec.timeout, **spec.options())
    except grpc.aio.AioRpcError as error:
        return failed(spec, error, None, 0)
    problems = unary_problems(spec, response)
    kind = INCOHERENT if problems else COMPLETED
    tokens = response.usage.completion_tokens
    return Outcome(kind, True, None, tokens, "; ".join(problems), text=response.text)


async def run_one(caller: InferenceClient, spec: Spec) -> Outcome:
    try:
        return await (run_unary(caller, spec) if spec.unary else run_stream(caller, spec))
    except Exception as exc:  # anything but a status is a client-side surprise: an error
        return Outcome(ERROR, spec.unary, detail=f"{type(exc).__name__}: {exc}")


# -- tally ---------------------------------------------------------------------------------


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    unary_counts: Counter[str] = field(default_factory=Counter)
    deadline_after_first_token: int = 0
    no_pushback: int = 0
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # "KIND: detail" -> calls
    texts: dict[tuple[Any, ...], str] = field(default_factory=dict)
    twins: int = 0  # completions whose key had been seen before
    divergent: int = 0  # ... and whose text differed from the first one's
    divergent_examples: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    def add(self, spec: Spec, outcome: Outcome) -> None:
        self.counts[outcome.kind] += 1
        self.unary_counts[outcome.kind] += outcome.unary
        self.tokens += outcome.tokens
        if outcome.ttft_s is not None:
            self.ttfts.append(outcome.ttft_s)
        if outcome.kind == DEADLINE and outcome.tokens:
            self.deadline_after_first_token += 1
        if outcome.kind == REJECTED and outcome.pushback_ms is None:
            self.no_pushback += 1
        if outcome.kind in (ERROR, LOST, INCOHERENT):
            detail = f"{outcome.kind}: {outcome.detail}"
            if not self.errors[detail]:  # each distinct one once
                log.warning("%s %s", spec.request_id, detail)
            self.errors[detail] += 1
        if outcome.kind == COMPLETED and outcome.text is not None:
            self.compare(spec, outcome.text)

    def compare(self, spec: Spec, text: str) -> None:
        first = self.texts.get(spec.key())
        if first is None:
            self.texts[spec.key()] = text
            return
        self.twins += 1
        if first != text:
            self.divergent += 1
            if len(self.divergent_examples) < 3:
                self.divergent_examples.append(
                    f"{spec.request_id} (temperature {spec.temperature:g}, seed {spec.seed}, "
                    f"max_tokens {spec.max_tokens}): {text[:60]!r} vs {first[:60]!r}"
                )


# -- the load ------------------------------------------------------------------------------


@dataclass
class Budget:
    """Shared by the loops: the end time, the calls left, and a stop switch."""

    end: float
    left: int | None
    stopped: bool = False

    def take(self) -> bool:
        if self.stopped or time.monotonic() >= self.end or self.left == 0:
            return False
        if self.left is not None:
            self.left -= 1
        return True


async def client_loop(
    index: int, caller: InferenceClient, *, mix: Mix, seed: int, budget: Budget, tally: Tally
) -> None:
    rng = random.Random(f"{seed}-{index}")
    number = 0
    while budget.take():
        spec = draw(rng, mix, f"soak-{index}-{number}")
        number += 1
        outcome = await run_one(caller, spec)
        tally.add(spec, outcome)
        if outcome.kind in (REJECTED, ERROR):  # never a hot loop against a failing server
            pause = FALLBACK_PAUSE_S
            if outcome.pushback_ms is not None:
                pause = outcome.pushback_ms / 1000
            await asyncio.sleep(pause * rng.uniform(0.75, 1.25))


class GpuMemory:
    """GPU memory of the server process and its children (NVML), where there is a GPU."""

    def __init__(self) -> None:
        self._nvml: Any = nvml()
        count = 0 if self._nvml is None else self._nvml.nvmlDeviceGetCount()
        self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def used(self, pid: int) -> int | None:
        if self._nvml is None:
            return None
        with contextlib.suppress(psutil.Error):
            pids = {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
            total = 0
            for handle in self._handles:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in pids and proc.usedGpuMemory:
                        total += int(proc.usedGpuMemory)
            return total
        return None


def rss_bytes(pid: int) -> int:
    """Resident memory of the server process and any children."""
    process = psutil.Process(pid)
    return int(
        process.memory_info().rss
        + sum(child.memory_info().rss for child in process.children(recursive=True))
    )


@dataclass
class Memory:
    """Samples of the server's memory during the soak, with their times (s from its start)."""

    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    gpu: list[int] = field(default_factory=list)


async def watch(
    process: subprocess.Popen[bytes],
    budget: Budget,
    tally: Tally,
    rss: list[int],
    *,
    started: float,
    memory: Memory,
) -> None:
    """Memory samples and progress lines while the load runs; stops the loops if the
    server dies."""
    last_progress = time.monotonic()
    gpu = GpuMemory()
    while True:
        await asyncio.sleep(RSS_EVERY_S)
        try:
            if process.poll() is not None:  # reaps it: psutil reads a zombie's RSS as 0
                raise psutil.NoSuchProcess(process.pid)
            rss.append(rss_bytes(process.pid))
            memory.times.append(time.monotonic() - started)
            memory.rss.append(rss[-1])
            used = await asyncio.to_thread(gpu.used, process.pid)
            if used is not None:
                memory.gpu.append(used)
        except psutil.NoSuchProcess:
            budget.stopped = True  # the server died: the exit-status check reports it
            return
        if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
            last_progress = time.monotonic()
            counts = ", ".join(f"{kind} {tally.counts[kind]}" for kind in OUTCOMES)
            log.info(
                "%.0f s: %d calls: %s; RSS %.0f MiB",
                time.monotonic() - started,
                tally.sent,
                counts,
                rss[-1] / MIB,
            )


# -- the server ----------------------------------------------------------------------------


def loopback_host(text: str) -> str:
    """argparse type: a loopback address only, so that the load stays on this machine."""
    host = "127.0.0.1" if text == "localhost" else text.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(f"{text!r} is not a loopback address; soak stays local")
    return host


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    target: str
    metrics_url: str
    log_path: Path


@contextlib.contextmanager
def server(args: argparse.Namespace, log_path: Path) -> Iterator[Server]:
    """The server on free loopback ports, its log in ``log_path``; killed if still running."""
    port, metrics_port = free_port(args.host), free_port(args.host)
    extra = [part for arg in args.server_arg for part in shlex.split(arg)]
    command = [
        sys.executable,
        "-m",
        "llm_stream.serve",
        *("--host", args.host, "--port", str(port), "--metrics-port", str(metrics_port)),
        *("--model", args.model, "--log-level", "WARNING"),
        # gRPC only: the HTTP API's default port (8000) may be busy, and requests other
        # processes send there would count in the server's rejection counters.
        *("--http-port", "0"),
        *("--max-concurrent", str(args.max_concurrent), "--max-queue", str(args.max_queue)),
        *extra,
    ]
    log.info("starting %s (log: %s)", shlex.join(command[1:]), log_path)
    host = f"[{args.host}]" if ":" in args.host else args.host
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            yield Server(
                process, f"{host}:{port}", f"http://{host}:{metrics_port}/metrics", log_path
            )
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def stop_server(process: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, float]:
    """SIGTERM, then the exit status (None if it had to be killed) and the seconds it took."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout), time.monotonic() - started
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None, time.monotonic() - started


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the server's /metrics, by name and labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def by_label(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str
) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for (sample, labels), value in samples.items():
        if sample == name:
            totals[dict(labels).get(label, "")] += int(value)
    return dict(sorted(totals.items()))


async def wait_idle(url: str, timeout: float) -> float:
    """The server's in-flight gauge, polled until it is 0 or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, url)
        in_flight = samples.get(("llm_stream_requests_in_flight", frozenset()), -1.0)
        if in_flight == 0 or time.monotonic() > deadline:
            return in_flight
        await asyncio.sleep(0.5)


# -- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """CPU seconds used so far by the server and by this client, and the load average."""

    server_cpu_s: float
    client_cpu_s: float
    load_average: float

    @classmethod
    def now(cls, pid: int) -> Usage:
        server = psutil.Process(pid).cpu_times()
        client = psutil.Process().cpu_times()
        return cls(
            server.user + server.system,
            client.user + client.system,
            os.getloadavg()[0],
        )


@dataclass
class Result:
    tally: Tally
    seconds: float  # from the first call to the end of the last one
    clients: int
    deadline: tuple[float, float]
    rss: list[int]  # the first after warm-up, the last after the load
    usage: tuple[Usage, Usage]  # at the start and at the end of the load
    memory: Memory = field(default_factory=Memory)
    in_flight_after: float = 0.0
    server_generations: dict[str, int] = field(default_factory=dict)
    server_rejected: dict[str, int] = field(default_factory=dict)
    exit_status: int | None = None
    stop_s: float = 0.0
    log_errors: list[str] = field(default_factory=list)
    log_warnings: int = 0


def greedy_spec(request_id: str, unary: bool, max_tokens: int, timeout: float) -> Spec:
    """A plain greedy call of the longest prompt: the warm-up's."""
    return Spec(request_id, unary, LONGEST_PROMPT, max_tokens, 0.0, None, (), timeout, False, None)


async def warm_up(caller: InferenceClient, args: argparse.Namespace) -> float:
    """C streams of the longest prompt and the largest max_tokens at once, then one Predict.

    The batch then has had its most rows at their longest, so the KV cache has reached the
    largest shape the soak can give it before RSS is first read. Returns the streams' time.
    """
    started = time.perf_counter()
    streams = [
        run_one(caller, greedy_spec(f"warm-{i}", False, max(args.max_tokens), args.request_timeout))
        for i in range(args.max_concurrent)
    ]
    outcomes = await asyncio.gather(*streams)
    seconds = time.perf_counter() - started
    outcomes.append(await run_one(caller, greedy_spec("warm-unary", True, 8, args.request_timeout)))
    bad = [f"{o.kind} {o.detail}" for o in outcomes if o.kind != COMPLETED]
    if bad:
        raise SystemExit(f"warm-up failed: {bad}")
    log.info("warm-up: %d streams in %.1f s", args.max_concurrent, seconds)
    return seconds


async def soak(args: argparse.Namespace, caller: InferenceClient, srv: Server, mix: Mix) -> Result:
    """The load itself, from the first RSS reading to the end of the last call."""
    rss = [rss_bytes(srv.process.pid)]
    usage = Usage.now(srv.process.pid)
    tally = Tally()
    started = time.monotonic()
    budget = Budget(started + args.duration, args.max_requests)
    memory = Memory()
    watcher = asyncio.create_task(
        watch(srv.process, budget, tally, rss, started=started, memory=memory)
    )
    log.info("soak: %d clients for %g s", args.clients, args.duration)
    await asyncio.gather(
        *(
            client_loop(i, caller, mix=mix, seed=args.seed, budget=budget, tally=tally)
            for i in range(args.clients)
        )
    )
    watcher.cancel()
    seconds = time.monotonic() - started
    with contextlib.suppress(psutil.NoSuchProcess):
        return Result(
            tally,
            seconds,
            args.clients,
            mix.deadline,
            rss,
            (usage, Usage.now(srv.process.pid)),
            memory,
        )
    return Result(tally, seconds, args.clients, mix.deadline, rss, (usage, usage), memory)


async def load(args: argparse.Namespace, srv: Server) -> Result:
    """Ready, warm-up, soak, then the server's state once the load is over."""
    async with InferenceClient(srv.target) as ready_client:
        log.info("waiting for %s to report SERVING", srv.target)
        await wait_ready(ready_client, srv.process)
    # Without --client-retries every refusal reaches the loops as the server sent it.
    caller = InferenceClient(srv.target, retry=args.client_retries)
    try:
        warm_s = await warm_up(caller, args)
        deadline = args.deadline or (0.25 * warm_s, 1.5 * warm_s)
        result = await soak(
            args, caller, srv, Mix(tuple(args.max_tokens), deadline, args.request_timeout)
        )
    finally:
        await caller.close()
    if srv.process.poll() is not None:  # the checks on the exit status and errors report it
        log.error("the server exited with status %s during the soak", srv.process.returncode)
        result.in_flight_after = -1
        return result
    result.in_flight_after = await wait_idle(srv.metrics_url, IN_FLIGHT_TIMEOUT_S)
    result.rss.append(rss_bytes(srv.process.pid))
    samples = await asyncio.to_thread(scrape, srv.metrics_url)
    result.server_generations = by_label(samples, "llm_stream_generations_total", "finish_reason")
    result.server_rejected = by_label(samples, "llm_stream_rejected_requests_total", "code")
    return result


def scan_log(path: Path) -> tuple[list[str], int]:
    """The server log's ERROR/CRITICAL lines and tracebacks, and its count of WARNING lines."""
    lines = path.read_text(errors="replace").splitlines()
    errors = [
        line for line in lines if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
    ]
    return errors, sum(" WARNING " in line for line in lines)


# -- report --------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def table(args: argparse.Namespace, result: Result) -> list[str]:
    tally, counts = result.tally, result.tally.counts
    unary = sum(tally.unary_counts.values())
    ttft = percentile(tally.ttfts, 50), percentile(tally.ttfts, 95)
    rss_start, rss_end = result.rss[0] / MIB, result.rss[-1] / MIB
    growth = rss_end - rss_start
    deadline = counts[DEADLINE]
    rejected = counts[REJECTED]
    stop = "killed" if result.exit_status is None else str(result.exit_status)
    rows = [
        ("calls (StreamPredict / Predict)", f"{tally.sent:,} ({tally.sent - unary:,} / {unary:,})"),
        ("completed", f"{counts[COMPLETED]:,}"),
        ("cancelled by the client", f"{counts[CANCELLED]:,}"),
        (
            "deadline exceeded (streams after their first token / the rest)",
            f"{deadline:,} ({tally.deadline_after_first_token:,} / "
            f"{deadline - tally.deadline_after_first_token:,})",
        ),
        (
            "rejected, RESOURCE_EXHAUSTED (with pushback)",
            f"{rejected:,} ({rejected - tally.no_pushback:,})",
        ),
        ("**other errors** (must be 0)", f"{counts[ERROR]:,}"),
        ("**lost streams** (must be 0)", f"{counts[LOST]:,}"),
        ("**incoherent completions** (must be 0)", f"{counts[INCOHERENT]:,}"),
        ("TTFT of admitted streams, p50 / p95", f"{ms(ttft[0])} / {ms(ttft[1])}"),
        (
            "tokens received (per second)",
            f"{tally.tokens:,} ({tally.tokens / result.seconds:,.1f})",
        ),
        (
            "identical requests with a different text",
            f"{tally.divergent:,} of {tally.twins:,}",
        ),
        (
            "server GPU memory (NVML) first / peak / last sample",
            "-"
            if not result.memory.gpu
            else f"{result.memory.gpu[0] / MIB:,.0f} / {max(result.memory.gpu) / MIB:,.0f} / "
            f"{result.memory.gpu[-1] / MIB:,.0f} MiB",
        ),
        (
            "server RSS after warm-up / peak / end",
            f"{rss_start:,.0f} / {max(result.rss) / MIB:,.0f} / {rss_end:,.0f} MiB "
            f"({growth:+,.0f} MiB)",
        ),
        ("server CPU / this client's CPU", cpu(result)),
        ("server in flight after the load", f"{result.in_flight_after:g}"),
        ("server exit status after SIGTERM", f"{stop} (in {result.stop_s:.1f} s)"),
    ]
    return ["| measure | value |", "|---|---:|", *(f"| {name} | {value} |" for name, value in rows)]


def cpu(result: Result) -> str:
    start, end = result.usage
    server = end.server_cpu_s - start.server_cpu_s
    client = end.client_cpu_s - start.client_cpu_s
    return (
        f"{server:,.0f} s / {client:,.0f} s ({server / result.seconds:.2f} / "
        f"{client / result.seconds:.2f} cores)"
    )


def rejections_check(args: argparse.Namespace, result: Result) -> tuple[bool, str]:
    """The server's count of RESOURCE_EXHAUSTED against the calls rejected here.

    Without client retries each is one call; with them, one call may have been rejected
    up to maxAttempts times before it failed or got in.
    """
    server = result.server_rejected.get("RESOURCE_EXHAUSTED", 0)
    client = result.tally.counts[REJECTED]
    if args.client_retries:
        return server >= client, f"server rejections {server} >= calls rejected {client}"
    return server == client, f"server rejections {server} == calls rejected {client}"


def settled(result: Result, settle_s: float) -> tuple[int, int] | None:
    """(RSS at the first sample ``settle_s`` into the soak, RSS at the end)."""
    memory = result.memory
    after = [rss for at, rss in zip(memory.times, memory.rss, strict=True) if at >= settle_s]
    if not after:
        return None
    return after[0], result.rss[-1]


def memory_checks(args: argparse.Namespace, result: Result) -> list[tuple[bool, str]]:
    out = []
    pair = settled(result, args.rss_settle)
    if pair is not None:
        growth = (pair[1] - pair[0]) / pair[0] * 100
        out.append(
            (
                growth <= args.max_rss_growth_pct,
                f"RSS growth after the first {args.rss_settle:g} s {growth:+.1f}% <= "
                f"{args.max_rss_growth_pct:g}% ({pair[0] / MIB:,.0f} -> {pair[1] / MIB:,.0f} MiB)",
            )
        )
    gpu = result.memory.gpu
    if gpu:
        growth_mib = (gpu[-1] - gpu[0]) / MIB
        out.append(
            (
                growth_mib <= args.max_gpu_growth_mib,
                f"GPU memory growth {growth_mib:+.0f} MiB <= {args.max_gpu_growth_mib:g} MiB "
                f"({gpu[0] / MIB:,.0f} -> {gpu[-1] / MIB:,.0f} MiB, peak {max(gpu) / MIB:,.0f})",
            )
        )
    return out


def checks(args: argparse.Namespace, result: Result) -> list[tuple[bool, str]]:
    counts, tally = result.tally.counts, result.tally
    growth_mib = (result.rss[-1] - result.rss[0]) / MIB
    return [
        (counts[ERROR] == 0, f"other errors: {counts[ERROR]}"),
        (counts[LOST] == 0, f"lost streams: {counts[LOST]}"),
        (counts[INCOHERENT] == 0, f"incoherent completions: {counts[INCOHERENT]}"),
        (counts[COMPLETED] > 0, f"completed: {counts[COMPLETED]}"),
        (tally.no_pushback == 0, f"rejections without {PUSHBACK_KEY}: {tally.no_pushback}"),
        rejections_check(args, result),
        (result.in_flight_after == 0, f"in flight after the load: {result.in_flight_after:g}"),
        (
            growth_mib <= args.max_rss_growth_mib,
            f"RSS growth {growth_mib:+.0f} MiB <= {args.max_rss_growth_mib:g} MiB",
        ),
        *memory_checks(args, result),
        (not result.log_errors, f"ERROR lines in the server log: {len(result.log_errors)}"),
        (result.exit_status == 0, f"exit status after SIGTERM: {result.exit_status}"),
    ]


def report(args: argparse.Namespace, result: Result, srv: Server) -> bool:
    verdicts = checks(args, result)
    capacity = args.max_concurrent + args.max_queue
    retries = "InferenceClient with retries" if args.client_retries else "no client retries"
    low, high = result.deadline
    start, end = result.usage
    lines = [
        f"Soak: model {args.model}, --max-concurrent {args.max_concurrent} --max-queue "
        f"{args.max_queue} (capacity {capacity}), {result.clients} clients for "
        f"{args.duration:g} s ({result.seconds:.0f} s to the last call's end), {retries}, "
        f"seed {args.seed}, max_tokens {'/'.join(map(str, args.max_tokens))}, short deadlines "
        f"{low:.1f} to {high:.1f} s; {os.cpu_count()} CPUs, load average "
        f"{start.load_average:.2f} at the start, {end.load_average:.2f} at the end.",
        "",
        *table(args, result),
        "",
        "Server counters: generations "
        + (", ".join(f"{k} {v}" for k, v in result.server_generations.items()) or "none")
        + "; rejected "
        + (", ".join(f"{k} {v}" for k, v in result.server_rejected.items()) or "none")
        + f" (warm-ups included; {result.log_warnings} WARNING lines in {srv.log_path}).",
    ]
    if result.tally.errors:
        lines += ["", "Errors, lost and incoherent calls:"]
        lines += [f"- {detail} (x{n})" for detail, n in result.tally.errors.most_common()]
    if result.tally.divergent_examples:
        lines += ["", "Identical requests, different texts (informational):"]
        lines += [f"- {example}" for example in result.tally.divergent_examples]
    if result.log_errors:
        lines += ["", "Server log errors:", *(f"    {line}" for line in result.log_errors[:20])]
    lines += ["", "Checks:", *(f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in verdicts)]
    sys.stdout.write("\n".join(lines) + "\n")
    passed = all(ok for ok, _ in verdicts)
    if args.json:
        Path(args.json).write_text(
            json.dumps(summary(args, result, verdicts, passed), indent=2, default=str)
        )
    return passed


def summary(
    args: argparse.Namespace, result: Result, verdicts: list[tuple[bool, str]], passed: bool
) -> dict[str, Any]:
    tally = result.tally
    return {
        "passed": passed,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "clients": result.clients,
        "seconds": result.seconds,
        "counts": {kind: tally.counts[kind] for kind in OUTCOMES},
        "unary_counts": {kind: tally.unary_counts[kind] for kind in OUTCOMES},
        "sent": tally.sent,
        "deadline_after_first_token": tally.deadline_after_first_token,
        "rejected_without_pushback": tally.no_pushback,
        "errors": dict(tally.errors),
        "ttft_ms": {
            "p50": (percentile(tally.ttfts, 50) or 0) * 1000,
            "p95": (percentile(tally.ttfts, 95) or 0) * 1000,
        },
        "tokens": tally.tokens,
        "twins": tally.twins,
        "divergent": tally.divergent,
        "rss_mib": [round(r / MIB, 1) for r in result.rss],
        "samples": {
            "seconds": [round(t, 1) for t in result.memory.times],
            "rss_mib": [round(r / MIB, 1) for r in result.memory.rss],
            "gpu_mib": [round(g / MIB, 1) for g in result.memory.gpu],
        },
        "cpu_s": {
            "server": result.usage[1].server_cpu_s - result.usage[0].server_cpu_s,
            "client": result.usage[1].client_cpu_s - result.usage[0].client_cpu_s,
        },
        "load_average": [usage.load_average for usage in result.usage],
        "in_flight_after": result.in_flight_after,
        "server_generations": result.server_generations,
        "server_rejected": result.server_rejected,
        "exit_status": result.exit_status,
        "log_errors": result.log_errors,
        "checks": [{"ok": ok, "check": text} for ok, text in verdicts],
    }


# -- main ----------------------------------------------------------------------------------


def positive_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 8,16,32, got {text!r}")
    return values


def seconds_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    try:
        bounds = float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in seconds, got {text!r}") from None
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return bounds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", default="embedded", help="the served model, as the server's --model")
    add(
        "--host",
        type=loopback_host,
        default="127.0.0.1",
        help="loopback address the server listens on (127.0.0.1, ::1; others are refused)",
    )
    add("--max-concurrent", type=int, default=8, help="the server's batch rows, C (default 8)")
    add("--max-queue", type=int, default=8, help="the server's queue, Q (default 8)")
    add("--clients", type=int, help="concurrent client loops (default 2 x (C + Q))")
    add("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    add("--max-requests", type=int, help="calls to send at most (default: no count bound)")
    add(
        "--max-tokens",
        type=positive_ints,
        default=[8, 16, 32, 64, 128],
        help="max_tokens values drawn from (default 8,16,32,64,128)",
    )
    add(
        "--deadline",
        type=seconds_range,
        metavar="LOW,HIGH",
        help="seconds range of the short deadlines (default 0.25 T to 1.5 T, T the warm-up's)",
    )
    add(
        "--request-timeout",
        type=float,
        default=300.0,
        help="deadline of every call without a short one (default 300 s)",
    )
    add(
        "--client-retries",
        action="store_true",
        help="use InferenceClient, whose service config retries RESOURCE_EXHAUSTED honouring "
        "the server's pushback (default: fail fast, no retries)",
    )
    add("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    add(
        "--max-rss-growth-mib",
        type=float,
        default=64.0,
        help="fail if the server's RSS at the end exceeds its RSS after warm-up by more "
        "(default 64)",
    )
    add(
        "--rss-settle",
        type=float,
        default=60.0,
        help="seconds into the soak after which RSS must be flat (default 60)",
    )
    add(
        "--max-rss-growth-pct",
        type=float,
        default=5.0,
        help="fail if RSS grows by more than this share from --rss-settle to the end (default 5)",
    )
    add(
        "--max-gpu-growth-mib",
        type=float,
        default=64.0,
        help="fail if the server's GPU memory (NVML, where present) grows by more during the "
        "soak (default 64)",
    )
    add(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra server flag(s), split like a shell: --server-arg=--retry-pushback=0.2",
    )
    add("--server-log", type=Path, help="the server's log file (default: a temporary file)")
    add("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.max_concurrent < 1 or args.max_queue < 0 or args.duration <= 0:
        parser.error("need --max-concurrent >= 1, --max-queue >= 0 and --duration > 0")
    args.clients = args.clients or 2 * (args.max_concurrent + args.max_queue)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[soak] %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    log_path = args.server_log or Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    with server(args, log_path) as srv:
        result = asyncio.run(load(args, srv))
        log.info("stopping the server with SIGTERM")
        result.exit_status, result.stop_s = stop_server(srv.process, timeout=90)
    result.log_errors, result.log_warnings = scan_log(log_path)
    return 0 if report(args, result, srv) else 1


if __name__ == "__main__":
    sys.exit(main())
