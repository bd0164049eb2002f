"""End to end on the real embedded default model, SmolLM2-135M-Instruct.

Converted once into the cache (LLM_STREAM_CACHE_DIR or ~/.cache/llm-stream),
so reruns start in seconds. Generations stay short: about 15 tokens/s on 2 cores.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_stream.client import continuation, make_request
from llm_stream.engine.types import FinishReason
from llm_stream.model.loader import file_digest
from llm_stream.model.sources import embedded_gguf_path
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.settings import Settings, default_cache_dir
from tests.conftest import (
    RunningServer,
    collect_stream,
    free_port,
    prompt_request,
    running_server,
)

pytestmark = pytest.mark.e2e


def model_cache_dir() -> Path:
    return Path(os.environ.get("LLM_STREAM_CACHE_DIR") or default_cache_dir())


@pytest.fixture(scope="module")
async def default_server() -> AsyncIterator[RunningServer]:
    settings = Settings(host="127.0.0.1", port=0, http_port=0, cache_dir=model_cache_dir())
    async with running_server(settings) as running:
        yield running


async def test_answers_coherently(default_server: RunningServer) -> None:
    response = await default_server.stub.Predict(
        prompt_request("What is the capital of France? Answer in one sentence.", max_tokens=24)
    )
    assert "Paris" in response.text
    assert response.finish_reason in (pb.FINISH_REASON_END_OF_SEQUENCE, pb.FINISH_REASON_LENGTH)


async def test_a_cut_answer_carries_on_where_it_stopped(default_server: RunningServer) -> None:
    """What a resumed stream sends (continue_final_message): on real text, greedy, the
    first tokens plus the continuation are the whole answer at (almost) every cut."""
    question = [{"role": "user", "content": "Name three colours of the rainbow."}]
    whole = await collect_stream(default_server.stub, make_request(question, max_tokens=20))
    answer = "".join(t.token for t in whole)
    cuts = range(1, len(whole) - 1, 3)
    matched = 0
    for cut in cuts:
        text = "".join(t.token for t in whole[:cut])
        prompt, options = continuation(question, text, cut, {"max_tokens": 20})
        rest = await collect_stream(default_server.stub, make_request(prompt, **options))
        matched += text + "".join(t.token for t in rest) == answer
    assert matched >= len(cuts) - 1, (matched, len(cuts))


async def test_model_version_is_the_weights_digest(default_server: RunningServer) -> None:
    response = await default_server.stub.Predict(prompt_request("Hi", max_tokens=2))
    assert response.model_version == file_digest([embedded_gguf_path()])


@pytest.mark.parametrize(
    ("prompt", "multibyte"),
    [
        ("Write one short sentence about the sea.", False),
        # Raw continuations: the small model reliably continues these in kind.
        ("🎉🎉🎉 Party time! 🎊", True),
        ("日本の首都は東京です。大阪は", True),
        ("中文：你好，世界！今天天气", True),
    ],
)
async def test_stream_equals_predict(
    default_server: RunningServer, prompt: str, multibyte: bool
) -> None:
    request = prompt_request(prompt, max_tokens=24)
    request.config.apply_chat_template = not multibyte
    unary, tokens = await asyncio.gather(
        default_server.stub.Predict(request), collect_stream(default_server.stub, request)
    )
    streamed = "".join(t.token for t in tokens if not t.is_final)
    assert streamed == unary.text
    assert tokens[-1].usage.completion_tokens == unary.usage.completion_tokens
    if multibyte:
        assert any(len(ch.encode()) > 2 for ch in unary.text), unary.text
    assert "\ufffd" not in unary.text


BUSY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colours of the rainbow, separated by commas.",
    "Explain in two sentences why the sky is blue, as if to a child of ten years old.",
]


async def test_output_in_a_busy_batch_equals_output_alone(default_server: RunningServer) -> None:
    """Left padding, masks and positions never change a row: greedy text and seeded
    samples are the same alone and among other rows that join and leave mid-way."""
    greedy = [prompt_request(p, max_tokens=32) for p in BUSY_PROMPTS]
    seeded = prompt_request("Tell me a joke.", max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    alone = [(await default_server.stub.Predict(r)).text for r in [*greedy, seeded]]

    async def late(request: pb.PredictRequest, delay: float) -> str:
        await asyncio.sleep(delay)  # joins while the others decode
        return (await default_server.stub.Predict(request)).text

    noise = [
        prompt_request("Count from one to twenty.", max_tokens=8),  # leaves early
        prompt_request("Describe a forest.", max_tokens=40, temperature=1.0, top_k=20),
    ]
    noisy = [default_server.stub.Predict(r) for r in noise]
    together = await asyncio.gather(*(late(r, 0.3 * i) for i, r in enumerate([*greedy, seeded])))
    await asyncio.gather(*noisy)
    assert together == alone


async def test_cancel_stops_the_real_model(default_server: RunningServer) -> None:
    request = prompt_request("Tell me a very long story about a dragon.", max_tokens=400)
    request.request_id = "e2e-cancel"
    call = default_server.stub.StreamPredict(request)
    await call.read()
    await call.read()
    call.cancel()
    record = await default_server.server.engine.wait_finished("e2e-cancel", timeout=30)
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.completion_tokens < 40


async def test_batch_on_the_real_model(default_server: RunningServer) -> None:
    prompts = ["What is 2 + 2?", "Name a colour.", "What is the capital of France?"]
    response = await default_server.stub.BatchPredict(
        pb.BatchPredictRequest(requests=[prompt_request(p, max_tokens=16) for p in prompts])
    )
    assert len(response.results) == 3
    assert all(r.HasField("response") and r.response.text for r in response.results)
    assert "Paris" in response.results[2].response.text


def test_readme_flow_serve_then_client(tmp_path: Path) -> None:
    """`python -m llm_stream.serve` with no model flags, then the client CLI streams."""
    port = free_port()
    env = {**os.environ, "LLM_STREAM_CACHE_DIR": str(model_cache_dir())}
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "llm_stream.serve"),
            *("--port", str(port), "--host", "127.0.0.1", "--http-port", "0"),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = subprocess.run(
            [
                sys.executable,
                "-m",
                "llm_stream.client",
                "--target",
                f"127.0.0.1:{port}",
                "--max-tokens",
                "12",
                "What is the capital of France?",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        assert "Paris" in client.stdout
        assert "finish=FINISH_REASON" in client.stderr
    finally:
        server.terminate()
        _, log = server.communicate(timeout=60)
    assert server.returncode == 0
    assert "ready: serving on" in log and "smollm2-135m-instruct" in log and "device=cpu" in log
