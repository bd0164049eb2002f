"""Multi-turn chat benchmark: the prefix cache on against off, in one run.

A chat frontend sends the whole conversation every turn. Over real gRPC streams
(``StreamPredict`` with ``messages``, greedy), one run measures each scenario on a
server with ``--prefix-cache on``, then on one with it off (the same flags otherwise):

- one conversation of ``--turns`` turns (a system prompt, a question per turn, answers
  of up to ``--answer-tokens``): time to first token and prompt tokens per turn, the
  median of ``--single-runs`` conversations;
- ``--conversations`` such conversations at once: aggregate tokens/s and the median
  time to first token per turn;
- ``--independent`` single-turn streams at once with nothing in common (raw prompts,
  no template): aggregate tokens/s (the median of ``--independent-runs``), where the
  cache cannot help and must cost nothing;

then prints markdown tables and a PASS/FAIL check of the targets (informational: the exit
status is 0 either way) and writes a plot (``--plot``, default ``multiturn.png``). The
servers run one after the other, never beside each other; compare ratios within a run.

    .venv/bin/python scripts/bench_multiturn.py [--plot docs/multiturn.png]
    .venv/bin/python scripts/bench_multiturn.py --quick     # 4 turns, 4 conversations
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import note, server, wait_ready  # scripts/bench.py, beside this file

from llm_stream.client import InferenceClient

SYSTEM = "You are a helpful assistant. Answer every question with a detailed paragraph."
QUESTIONS = [
    "Tell me about the history of Paris.",
    "Describe the river that runs through it.",
    "Describe a famous museum there and what it holds.",
    "Explain why that museum is so well known.",
    "Describe how and when it was built.",
    "Describe what else is worth seeing nearby.",
    "Explain how people usually get around the city.",
    "Describe the food the region is known for.",
    "Describe the weather in spring and what people do then.",
    "Summarise everything we talked about.",
]
TOPICS = [
    "the sea", "mountains", "a small village", "the moon", "a library", "trains", "rain",
    "a lighthouse", "winter", "a garden", "the desert", "a market", "bridges", "a forest",
    "the river", "an old castle", "bicycles", "the night sky", "a bakery", "islands",
    "a harbour", "clocks", "the wind", "a school", "owls", "a city park", "the snow",
    "a theatre", "ships", "a mountain lake", "autumn leaves", "a quiet street",
]  # fmt: skip
STREAM_TIMEOUT_S = 900.0


@dataclass
class Turn:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    text: str = ""


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)


async def one_turn(
    client: InferenceClient, prompt: str | list[dict[str, str]], max_tokens: int, **config: Any
) -> Turn:
    turn = Turn()
    sent = time.perf_counter()
    parts = []
    async for token in client.stream(
        prompt, max_tokens=max_tokens, temperature=0.0, timeout=STREAM_TIMEOUT_S, **config
    ):
        if token.is_final:
            turn.prompt_tokens = token.usage.prompt_tokens
            turn.cached_tokens = token.usage.cached_prompt_tokens
            turn.completion_tokens = token.usage.completion_tokens
        else:
            if not parts:
                turn.ttft_s = time.perf_counter() - sent
            parts.append(token.token)
    turn.text = "".join(parts)
    return turn


async def converse(
    client: InferenceClient, number: int, turns: int, answer: int, *, system: str = SYSTEM
) -> Conversation:
    """One conversation, turn by turn; conversation ``number`` asks its own first question."""
    messages = [{"role": "system", "content": system}]
    conversation = Conversation()
    for index in range(turns):
        question = QUESTIONS[index % len(QUESTIONS)]
        if index == 0 and number:
            question = f"Let us talk about {TOPICS[number % len(TOPICS)]}. {question}"
        messages.append({"role": "user", "content": question})
        turn = await one_turn(client, messages, answer)
        conversation.turns.append(turn)
        messages.append({"role": "assistant", "content": turn.text})
    return conversation


@dataclass
class Concurrent:
    conversations: list[Conversation]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(t.completion_tokens for c in self.conversations for t in c.turns)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def median_ttft_ms(self, turn: int) -> float:
        return statistics.median(c.turns[turn].ttft_s for c in self.conversations) * 1000


async def concurrent(client: InferenceClient, count: int, turns: int, answer: int) -> Concurrent:
    started = time.perf_counter()
    conversations = await asyncio.gather(
        *(converse(client, number + 1, turns, answer) for number in range(count))
    )
    return Concurrent(list(conversations), time.perf_counter() - started)


async def independent(client: InferenceClient, count: int, tokens: int) -> Concurrent:
    """``count`` raw single-turn prompts at once, no two sharing even their first token."""
    prompts = [f"{number} {TOPICS[number % len(TOPICS)]}: a story." for number in range(count)]
    started = time.perf_counter()
    turns = await asyncio.gather(
        *(one_turn(client, prompt, tokens, apply_chat_template=False) for prompt in prompts)
    )
    seconds = time.perf_counter() - started
    return Concurrent([Conversation([turn]) for turn in turns], seconds)


def median_turns(runs: Sequence[Conversation]) -> Conversation:
    """Per turn, the run whose time to first token was the median: one turn's is some
    100 ms on a CPU, and a shared machine moves single ones by a third."""
    return Conversation(
        [
            sorted(turns, key=lambda turn: turn.ttft_s)[len(turns) // 2]
            for turns in zip(*(run.turns for run in runs), strict=True)
        ]
    )


@dataclass
class Measured:
    single: Conversation
    many: Concurrent
    solo: Concurrent


async def measure(target: str, process: Any, args: argparse.Namespace) -> Measured:
    async with InferenceClient(target) as client:
        await wait_ready(client, process)
        await one_turn(client, "warm-up", 4, apply_chat_template=False)
        note(f"one conversation of {args.turns} turns, {args.single_runs} times")
        # Each run with a system prompt of its own, so that none reuses another's turns.
        single = median_turns(
            [
                await converse(
                    client, 0, args.turns, args.answer_tokens, system=f"Chat {run + 1}. {SYSTEM}"
                )
                for run in range(args.single_runs)
            ]
        )
        note(f"{args.conversations} conversations at once")
        many = await concurrent(client, args.conversations, args.turns, args.answer_tokens)
        note(f"{args.independent} independent streams at once, {args.independent_runs} times")
        runs = [
            await independent(client, args.independent, args.independent_tokens)
            for _ in range(args.independent_runs)
        ]
        # The median run: one run's tokens/s varies by some 10% on a shared machine.
        solo = sorted(runs, key=lambda run: run.tokens_per_s)[len(runs) // 2]
        return Measured(single, many, solo)


def run_server(args: argparse.Namespace, cache: str, log_dir: str) -> Measured:
    extra = ["--prefix-cache", cache, *args.server_arg]
    with server(args.model, extra, f"{log_dir}/server-{cache}.log") as (target, process):
        return asyncio.run(measure(target, process, args))


# -- report --------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def turn_table(on: Conversation, off: Conversation) -> list[str]:
    lines = [
        "| turn | prompt tokens | cached | TTFT on (ms) | TTFT off (ms) | on / off |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for number, (a, b) in enumerate(zip(on.turns, off.turns, strict=True), start=1):
        ratio = a.ttft_s / b.ttft_s if b.ttft_s else float("nan")
        lines.append(
            f"| {number} | {a.prompt_tokens} | {a.cached_tokens} | {ms(a.ttft_s)} | "
            f"{ms(b.ttft_s)} | {ratio:.2f} |"
        )
    return lines


def many_table(on: Concurrent, off: Concurrent, turns: int) -> list[str]:
    lines = [
        "| | tokens | seconds | tokens/s | " + " | ".join(f"TTFT t{n + 1}" for n in range(turns)),
        "|---|---:|---:|---:|" + "---:|" * turns,
    ]
    for name, result in (("cache on", on), ("cache off", off)):
        ttfts = " | ".join(f"{result.median_ttft_ms(n):,.0f}" for n in range(turns))
        lines.append(
            f"| {name} | {result.tokens} | {result.seconds:.1f} | {result.tokens_per_s:.1f} | "
            f"{ttfts} |"
        )
    return lines


def check(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {text}"


def checks(on: Measured, off: Measured) -> list[str]:
    first, last = on.single.turns[0].ttft_s, on.single.turns[-1].ttft_s
    last_off = off.single.turns[-1].ttft_s
    many = on.many.tokens_per_s / off.many.tokens_per_s
    solo = on.solo.tokens_per_s / off.solo.tokens_per_s
    turns, count = len(on.single.turns), len(on.many.conversations)
    return [
        check(
            last <= 1.3 * first,
            f"one conversation: TTFT at turn {turns} is {last / first:.2f}x turn 1 "
            "(target <= 1.3x)",
        ),
        check(
            last <= 0.4 * last_off,
            f"one conversation: TTFT at turn {turns} is {last / last_off:.2f}x the cache off "
            "(target <= 0.4x)",
        ),
        check(
            many >= 1.3,
            f"{count} conversations: {many:.2f}x the cache off's tokens/s (target >= 1.3x)",
        ),
        check(
            solo >= 0.9,
            f"{len(on.solo.conversations)} independent streams: {solo:.2f}x the cache off's "
            "tokens/s (no regression beyond noise: >= 0.9x)",
        ),
    ]


def plot(path: str, on: Measured, off: Measured) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    turns = range(1, len(on.single.turns) + 1)
    for name, result, style in (("cache on", on, "-o"), ("cache off", off, "--s")):
        left.plot(turns, [t.ttft_s * 1000 for t in result.single.turns], style, label=name)
        right.plot(
            turns,
            [result.many.median_ttft_ms(n) for n in range(len(turns))],
            style,
            label=f"{name} ({result.many.tokens_per_s:.0f} tokens/s)",
        )
    left.set_title("One conversation: time to first token")
    right.set_title(f"{len(on.many.conversations)} conversations at once: median TTFT")
    for axis in (left, right):
        axis.set_xlabel("turn")
        axis.set_ylabel("ms")
        axis.set_ylim(bottom=0)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    note(f"plot written to {path}")


def report(on: Measured, off: Measured, args: argparse.Namespace) -> list[str]:
    return [
        f"## One conversation, {args.turns} turns (answers up to {args.answer_tokens} tokens; "
        f"per turn the median of {args.single_runs} conversations)",
        "",
        *turn_table(on.single, off.single),
        "",
        f"## {args.conversations} conversations at once, {args.turns} turns each",
        "",
        *many_table(on.many, off.many, args.turns),
        "",
        f"## {args.independent} independent single-turn streams ({args.independent_tokens} "
        f"tokens; the median of {args.independent_runs} runs)",
        "",
        "| | tokens | seconds | tokens/s |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {r.tokens} | {r.seconds:.1f} | {r.tokens_per_s:.1f} |"
            for name, r in (("cache on", on.solo), ("cache off", off.solo))
        ),
        "",
        *checks(on, off),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="the served model (--model)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument(
        "--single-runs", type=int, default=3, help="one conversation, this many times (median)"
    )
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--independent", type=int, default=32)
    parser.add_argument("--independent-tokens", type=int, default=64)
    parser.add_argument(
        "--independent-runs", type=int, default=3, help="the median run is reported"
    )
    parser.add_argument("--quick", action="store_true", help="4 turns, 4 conversations, 8 streams")
    parser.add_argument("--plot", default="multiturn.png", help="'' for no plot")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="one more server flag (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.turns, args.conversations, args.independent = 4, 4, 8
        args.single_runs = args.independent_runs = 1
        args.answer_tokens, args.independent_tokens = 16, 16
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-multiturn-") as logs:
        on = run_server(args, "on", logs)
        off = run_server(args, "off", logs)
    sys.stdout.write("\n".join(report(on, off, args)) + "\n")
    if args.plot:
        plot(args.plot, on, off)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
