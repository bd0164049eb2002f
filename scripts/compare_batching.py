"""llm-stream's batch loop against transformers' own continuous batching, in one process.

Both run the same requests on the same weights (the embedded SmolLM2-135M-Instruct,
fp32, greedy) without a server in between: llm-stream's scheduler and step runner
(the engine the server uses), and ``model.generate_batch`` (transformers'
``ContinuousBatchingManager`` with paged attention). Prints one table: tokens/s,
and how many requests produced exactly the text of a batch-1 ``generate``.

    .venv/bin/python scripts/compare_batching.py [--requests 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llm_stream.runtime import tune_openmp

tune_openmp()  # as the server does, before torch loads

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

from llm_stream.engine.scheduler import BatchLimits, Scheduler, StepOutput  # noqa: E402
from llm_stream.engine.sequence import Sequence as Seq  # noqa: E402
from llm_stream.engine.types import GenerationRequest, SamplingParams  # noqa: E402
from llm_stream.model.backend import pad_token_id  # noqa: E402
from llm_stream.model.loader import load_backend  # noqa: E402
from llm_stream.model.sources import parse_model_spec  # noqa: E402
from llm_stream.settings import default_cache_dir  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench import PROMPTS, SHORT_PROMPT  # noqa: E402


def llm_stream_loop(
    backend: Any, requests: Sequence[GenerationRequest]
) -> tuple[float, list[list[int]]]:
    """The server's engine core: every request submitted at once, stepped until all end."""
    runner = backend.new_runner()
    delivered: list[StepOutput] = []
    scheduler = Scheduler(runner, BatchLimits(max_rows=len(requests)), delivered.extend)
    sequences = [Seq(backend.prepare(request)) for request in requests]
    started = time.perf_counter()
    scheduler.submit(*sequences)
    while not all(s.finished for s in sequences):
        scheduler.step()
    seconds = time.perf_counter() - started
    tokens: dict[int, list[int]] = {s.key: [] for s in sequences}
    for output in delivered:
        tokens[output.key] += output.token_ids
    return seconds, [tokens[s.key] for s in sequences]


def transformers_cb(
    model: Any, prompts: Sequence[list[int]], config: GenerationConfig
) -> tuple[float, list[list[int]]]:
    """transformers' ContinuousBatchingManager, sized explicitly (its CPU defaults reserve
    0.6 x free RAM for KV blocks and zero-fill it)."""
    cb_config = ContinuousBatchingConfig(num_blocks=256, max_batch_tokens=2048)
    started = time.perf_counter()
    outputs = model.generate_batch(
        inputs=list(prompts),
        generation_config=config,
        continuous_batching_config=cb_config,
        warmup=False,
    )
    seconds = time.perf_counter() - started
    ordered = sorted(outputs.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))
    return seconds, [list(o.generated_tokens) for o in ordered]


def plain_generate(model: Any, prompt: list[int], config: GenerationConfig) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [int(t) for t in out[0, len(prompt) :]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--check", type=int, default=4, help="requests compared with batch 1")
    args = parser.parse_args()

    backend = load_backend(parse_model_spec("embedded"), "cpu", "float32", default_cache_dir())
    model, tokenizer = backend._model, backend._tokenizer
    eos = sorted(backend._eos_ids)
    config = GenerationConfig(
        max_new_tokens=args.tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad_token_id(tokenizer, backend._eos_ids),
    )
    rows = []
    for name, prompt_set in (("mixed prompts", PROMPTS), ("one short prompt", (SHORT_PROMPT,))):
        texts = [prompt_set[i % len(prompt_set)] for i in range(args.requests)]
        requests = [
            GenerationRequest(f"r{i}", "", text, SamplingParams(max_tokens=args.tokens))
            for i, text in enumerate(texts)
        ]
        prompts = [list(backend.prepare(r).prompt_ids) for r in requests]
        reference = [plain_generate(model, p, config) for p in prompts[: args.check]]
        runs: list[tuple[str, Callable[[], tuple[float, list[list[int]]]]]] = [
            (
                "llm-stream scheduler + slot KV cache",
                functools.partial(llm_stream_loop, backend, requests),
            ),
            (
                "transformers ContinuousBatchingManager (paged)",
                functools.partial(transformers_cb, model, prompts, config),
            ),
        ]
        for label, run in runs:
            run()  # warm-up (first allocations, one-time kernels)
            seconds, outputs = run()
            tokens = sum(len(o) for o in outputs)
            same = sum(o == r for o, r in zip(outputs, reference, strict=False))
            rows.append((name, label, tokens, seconds, same))
        model.destroy_cached_continuous_batching_manager()
        model.set_attn_implementation("sdpa")
    del tokenizer
    lines = [
        f"{args.requests} requests, {args.tokens} greedy tokens each, SmolLM2-135M fp32, "
        f"{torch.get_num_threads()} threads",
        "",
        "| workload | engine | tokens | seconds | tokens/s | same text as batch-1 generate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for workload, label, tokens, seconds, same in rows:
        lines.append(
            f"| {workload} | {label} | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} "
            f"| {same}/{args.check} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
