"""Throughput and latency of the server against plain transformers ``generate``.

Starts a server on the given model (default: the embedded SmolLM2-135M-Instruct)
on a free port, or uses ``--target``, and prints one table. Compare the ratios
within one run: these machines are shared and noisy.

    .venv/bin/python scripts/bench.py [--tokens 64] [--concurrency 4] [--batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from llm_stream.client import InferenceClient, make_request

PROMPT = "Write a long story about a dragon who learns to paint."


@dataclass
class Row:
    scenario: str
    requests: int
    tokens: int
    seconds: float
    ttft_ms: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(model: str, concurrency: int) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llm_stream.serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            model,
            "--max-concurrent",
            str(concurrency),
            "--log-level",
            "WARNING",
        ],
        env=os.environ.copy(),
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


async def one_stream(client: InferenceClient, tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    first: float | None = None
    count = 0
    async for token in client.stream(PROMPT, max_tokens=tokens):
        if token.is_final:
            count = token.usage.completion_tokens
        elif first is None:
            first = time.perf_counter() - started
    return count, (first or 0.0) * 1000


async def streams(client: InferenceClient, n: int, tokens: int) -> Row:
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, tokens) for _ in range(n)))
    elapsed = time.perf_counter() - started
    return Row(
        f"StreamPredict x{n} concurrent",
        n,
        sum(r[0] for r in results),
        elapsed,
        statistics.median(r[1] for r in results),
    )


async def batch(client: InferenceClient, n: int, tokens: int) -> Row:
    requests = [make_request(PROMPT, max_tokens=tokens) for _ in range(n)]
    started = time.perf_counter()
    response = await client.batch(requests)
    elapsed = time.perf_counter() - started
    total = sum(r.response.usage.completion_tokens for r in response.results)
    return Row(f"BatchPredict of {n}", n, total, elapsed, None)


def plain_generate(tokens: int) -> Row:
    """The baseline: transformers generate, batch 1, no server, same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_stream.model.loader import _converted_gguf
    from llm_stream.model.sources import embedded_gguf_path
    from llm_stream.settings import default_cache_dir

    folder, _ = _converted_gguf(embedded_gguf_path(), default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up
    started = time.perf_counter()
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    elapsed = time.perf_counter() - started
    return Row(
        "plain generate, batch 1 (baseline)",
        1,
        out.shape[1] - ids["input_ids"].shape[1],
        elapsed,
        None,
    )


async def run(args: argparse.Namespace, target: str) -> list[Row]:
    async with InferenceClient(target) as client:
        await client.wait_ready(timeout=300)
        await one_stream(client, 2)
        rows = [await streams(client, 1, args.tokens)]
        rows.append(await streams(client, args.concurrency, args.tokens))
        rows.append(await batch(client, args.concurrency, args.tokens))
        rows.append(await batch(client, args.batch, args.tokens))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--target", help="use a running server instead of starting one")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    if args.target:
        rows = asyncio.run(run(args, args.target))
    else:
        with server(args.model, args.concurrency) as target:
            rows = asyncio.run(run(args, target))
    # The baseline runs after the server has stopped: a model loaded in this process
    # keeps its OpenMP threads spinning and would slow the server on a small machine.
    if not args.no_baseline and args.model == "embedded":
        rows.insert(0, plain_generate(args.tokens))
    base = rows[0].tokens_per_s
    lines = [
        "| scenario | requests | tokens | seconds | tokens/s | x first row | median TTFT ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ttft = f"{row.ttft_ms:.0f}" if row.ttft_ms is not None else "-"
        lines.append(
            f"| {row.scenario} | {row.requests} | {row.tokens} | {row.seconds:.2f} | "
            f"{row.tokens_per_s:.1f} | {row.tokens_per_s / base:.2f} | {ttft} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
