"""The prefix cache through the server: every face gives exactly what it gives with the
cache off, and says how many prompt tokens it reused.

Two servers run side by side on the same models, one with ``--prefix-cache on`` and
one with it off: the tiny Llama (full attention), Mistral with every layer windowed
and Gemma 3 (windowed and full layers), their window 16 tokens, prompts fed in
chunks of 32. The default model's turn of a real chat is in the e2e section.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import pytest

from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.settings import Settings
from tests.conftest import (
    RunningServer,
    collect_stream,
    free_port,
    running_server,
    tiny_settings,
)
from tests.model_families import build_family_model
from tests.test_e2e_default_model import model_cache_dir
from tests.test_metrics import scrape
from tests.tiny_model import CORPUS

BLOCK = 16


def whole_blocks(prompt_tokens: int) -> int:
    """What a prompt held whole by the cache reuses: all but its last token, in blocks."""
    return (prompt_tokens - 1) // BLOCK * BLOCK


MODELS = ["tiny", "mistral-window", "gemma3"]
SYSTEM = " ".join(CORPUS[:3])  # some 60 tokens: several blocks, past the window
QUESTIONS = [CORPUS[4], CORPUS[1] + " " + CORPUS[3], CORPUS[2], CORPUS[0] + " " + CORPUS[4]]


@pytest.fixture(scope="module")
def model_specs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[str, ...]:
    root = tmp_path_factory.mktemp("prefix-families")
    families = {name: build_family_model(name, tiny_model_dir, root / name) for name in MODELS[1:]}
    return (f"tiny={tiny_model_dir}", *(f"{name}={folder}" for name, folder in families.items()))


@pytest.fixture(scope="module")
async def servers(
    model_specs: tuple[str, ...], tiny_model_dir: Path, cache_dir: Path
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """(cache on, cache off), the same models and batching; HTTP and metrics on the first."""

    def settings(prefix_cache: bool, **extra: Any) -> Settings:
        return tiny_settings(
            tiny_model_dir,
            cache_dir,
            models=model_specs,
            max_concurrent=8,
            prefill_chunk=32,
            default_max_tokens=20,
            prefix_cache=prefix_cache,
            **extra,
        )

    on_settings = settings(True, http_port=free_port(), metrics_port=free_port())
    async with (
        running_server(on_settings) as on,
        running_server(settings(False)) as off,
    ):
        yield on, off


def chat_request(model: str, turns: list[tuple[str, str]], **config: Any) -> pb.PredictRequest:
    config.setdefault("max_tokens", 20)
    request = pb.PredictRequest(model_id=model, config=pb.InferenceConfig(**config))
    request.messages.extend(pb.ChatMessage(role=role, content=text) for role, text in turns)
    return request


async def streamed(
    running: RunningServer, request: pb.PredictRequest
) -> tuple[list[int], str, pb.Usage]:
    tokens = await collect_stream(running.stub, request)
    final = tokens[-1]
    assert final.is_final
    return [t.token_id for t in tokens[:-1]], "".join(t.token for t in tokens), final.usage


async def both(
    servers: tuple[RunningServer, RunningServer], request: pb.PredictRequest
) -> tuple[list[int], str, int]:
    """The request on both servers: the same tokens and text; the first's cached count."""
    on, off = servers
    on_ids, on_text, on_usage = await streamed(on, request)
    off_ids, off_text, off_usage = await streamed(off, request)
    assert on_ids == off_ids and on_text == off_text
    assert on_usage.prompt_tokens == off_usage.prompt_tokens
    assert off_usage.cached_prompt_tokens == 0
    assert on_usage.cached_prompt_tokens < on_usage.prompt_tokens
    return on_ids, on_text, on_usage.cached_prompt_tokens


@pytest.mark.parametrize("model", MODELS)
async def test_a_conversation_turn_by_turn_equals_the_cache_off(
    servers: tuple[RunningServer, RunningServer], model: str
) -> None:
    turns: list[tuple[str, str]] = [("system", SYSTEM + f" ({model})")]
    previous_prompt = 0
    for number, question in enumerate(QUESTIONS):
        turns.append(("user", question))
        request = chat_request(model, turns)
        _, text, cached = await both(servers, request)
        if number:
            # Everything up to the last answer, in whole blocks.
            assert cached > previous_prompt - BLOCK, (number, cached, previous_prompt)
        previous_prompt = (await servers[0].stub.Predict(request)).usage.prompt_tokens
        turns.append(("assistant", text))


@pytest.mark.parametrize("model", MODELS)
async def test_a_seeded_sample_after_a_cached_prefix_equals_the_cache_off(
    servers: tuple[RunningServer, RunningServer], model: str
) -> None:
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    first = chat_request(model, [("system", SYSTEM), ("user", QUESTIONS[0])], **sampled)
    _, text, _ = await both(servers, first)
    follow_up = chat_request(
        model,
        [("system", SYSTEM), ("user", QUESTIONS[0]), ("assistant", text), ("user", QUESTIONS[1])],
        **sampled,
    )
    _, _, cached = await both(servers, follow_up)
    assert cached > 0


@pytest.mark.parametrize("model", MODELS)
async def test_an_edited_earlier_turn_misses_from_the_edit_on(
    servers: tuple[RunningServer, RunningServer], model: str
) -> None:
    history = [("system", SYSTEM), ("user", QUESTIONS[0]), ("assistant", CORPUS[1])]
    original = chat_request(model, [*history, ("user", QUESTIONS[1])])
    await both(servers, original)
    # The first user message is rewritten: only the system prompt and what precedes the
    # edit can be reused, never the old answer after it.
    edited = chat_request(
        model,
        [
            ("system", SYSTEM),
            ("user", "Rewritten: " + QUESTIONS[0]),
            *history[2:],
            ("user", QUESTIONS[1]),
        ],
    )
    _, _, cached = await both(servers, edited)
    system_only = await servers[1].stub.Predict(chat_request(model, [("system", SYSTEM)]))
    assert 0 < cached <= system_only.usage.prompt_tokens + 4


@pytest.mark.parametrize("model", MODELS)
async def test_the_same_request_many_times_at_once_and_in_turn(
    servers: tuple[RunningServer, RunningServer], model: str
) -> None:
    request = chat_request(model, [("system", SYSTEM), ("user", QUESTIONS[3] + " again")])
    expected, _, _ = await both(servers, request)
    on = servers[0]
    results = await asyncio.gather(*(streamed(on, request) for _ in range(6)))
    for _ in range(3):
        results.append(await streamed(on, request))
    for ids, _, _usage in results:
        assert ids == expected
    # Requests in turn find the previous one's KV: all of the prompt but its last token,
    # in whole blocks.
    assert all(u.cached_prompt_tokens == whole_blocks(u.prompt_tokens) for _, _, u in results[-3:])


async def test_predict_and_batch_predict_report_and_reuse_a_shared_system_prompt(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    on, off = servers
    system = [("system", SYSTEM + " shared by every user")]
    warm = chat_request("tiny", [*system, ("user", "first user")])
    await on.stub.Predict(warm)
    batch = pb.BatchPredictRequest(
        requests=[chat_request("tiny", [*system, ("user", q)]) for q in QUESTIONS]
    )
    on_batch, off_batch = await asyncio.gather(
        on.stub.BatchPredict(batch), off.stub.BatchPredict(batch)
    )
    for with_cache, without in zip(on_batch.results, off_batch.results, strict=True):
        assert with_cache.response.text == without.response.text
        assert with_cache.response.usage.cached_prompt_tokens >= 48
        assert without.response.usage.cached_prompt_tokens == 0
    unary = await on.stub.Predict(warm)
    assert unary.usage.cached_prompt_tokens == whole_blocks(unary.usage.prompt_tokens)


async def test_the_http_api_reports_cached_tokens_as_openai_does(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    on, off = servers
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "over HTTP"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(base_url=on.http_url, timeout=30) as http:
        first = (await http.post("/v1/chat/completions", json=body)).json()
        second = (await http.post("/v1/chat/completions", json=body)).json()
        assert second["choices"][0]["message"] == first["choices"][0]["message"]
        usage = second["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == whole_blocks(
            usage["prompt_tokens"]
        )
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/chat/completions", json=stream_body) as response:
            events = [line async for line in response.aiter_lines() if line.startswith("data: {")]
        final = httpx_json(events[-1])
        assert final["usage"]["prompt_tokens_details"]["cached_tokens"] == whole_blocks(
            usage["prompt_tokens"]
        )
        completion = {"model": "tiny", "prompt": SYSTEM + " completed", "max_tokens": 4}
        await http.post("/v1/completions", json=completion)
        again = (await http.post("/v1/completions", json=completion)).json()
        details = again["usage"]["prompt_tokens_details"]
        assert details["cached_tokens"] == whole_blocks(again["usage"]["prompt_tokens"])
    # And the same text as the cache off.
    reference = await off.stub.Predict(
        chat_request("tiny", [("system", SYSTEM), ("user", "over HTTP")], max_tokens=8)
    )
    assert first["choices"][0]["message"]["content"] == reference.text


def httpx_json(event: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(event.removeprefix("data: "))
    return parsed


async def test_metrics_count_reused_and_computed_prompt_tokens(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    on, _ = servers
    port = on.server.metrics_port
    before = await asyncio.to_thread(scrape, port)
    request = chat_request("tiny", [("system", SYSTEM), ("user", "metrics, please")])
    first = await on.stub.Predict(request)
    second = await on.stub.Predict(request)
    after = await asyncio.to_thread(scrape, port)

    def grew(source: str) -> float:
        key = ("llm_stream_prompt_tokens_total", (("model", "tiny"), ("source", source)))
        return after[key] - before.get(key, 0.0)

    cached = first.usage.cached_prompt_tokens + second.usage.cached_prompt_tokens
    assert second.usage.cached_prompt_tokens == whole_blocks(second.usage.prompt_tokens)
    assert grew("cached") == cached
    assert grew("computed") == first.usage.prompt_tokens + second.usage.prompt_tokens - cached


async def test_a_bad_request_between_hits_changes_nothing(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    on, _ = servers
    request = chat_request("tiny", [("system", SYSTEM), ("user", "before and after")])
    before = await on.stub.Predict(request)
    bad = chat_request("tiny", [("system", SYSTEM), ("user", "x")], temperature=-1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await on.stub.Predict(bad)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    after = await on.stub.Predict(request)
    assert after.text == before.text
    assert after.usage.cached_prompt_tokens == whole_blocks(after.usage.prompt_tokens)


# -- the default model -------------------------------------------------------------


@pytest.mark.e2e
async def test_the_default_models_chat_turns_equal_the_cache_off() -> None:
    """A real chat template, a real tokenizer: three turns, each the same as cache off,
    each later one reusing everything before its new user message but a few tokens."""
    base = Settings(host="127.0.0.1", port=0, http_port=0, cache_dir=model_cache_dir())
    on_settings = base
    off_settings = Settings(
        host="127.0.0.1", port=0, http_port=0, cache_dir=model_cache_dir(), prefix_cache=False
    )
    questions = [
        "Name a large city in France.",
        "What river runs through it?",
        "Say that again in one short sentence.",
    ]
    async with running_server(on_settings) as on, running_server(off_settings) as off:
        turns: list[tuple[str, str]] = [("system", "You are a brief, helpful assistant.")]
        previous = 0
        for number, question in enumerate(questions):
            turns.append(("user", question))
            request = pb.PredictRequest(config=pb.InferenceConfig(max_tokens=24))
            request.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in turns)
            (on_ids, on_text, on_usage), (off_ids, off_text, off_usage) = await asyncio.gather(
                streamed(on, request), streamed(off, request)
            )
            assert on_ids == off_ids and on_text == off_text, number
            assert off_usage.cached_prompt_tokens == 0
            if number:
                assert on_usage.cached_prompt_tokens > previous - BLOCK, number
            previous = on_usage.prompt_tokens
            turns.append(("assistant", on_text))


async def test_the_multiturn_benchmark_runs_and_reports(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """scripts/bench_multiturn.py --quick on the tiny model: both servers, every table,
    every check (the numbers are the benchmark's business, not this test's)."""
    plot = tmp_path / "multiturn.png"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "scripts/bench_multiturn.py",
        "--quick",
        "--model",
        f"tiny={tiny_model_dir}",
        "--plot",
        str(plot),
        cwd=Path(__file__).parent.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, err.decode()[-2000:]
    report = out.decode()
    assert "| 4 |" in report  # the fourth turn's row
    assert report.count("PASS") + report.count("FAIL") == 4
    assert "| cache on |" in report and "| cache off |" in report
    assert plot.stat().st_size > 10_000
