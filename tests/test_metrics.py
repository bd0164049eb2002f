"""The Prometheus endpoint reports what the server really did."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import collect_stream, free_port, prompt_request, running_server, tiny_settings


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_follow_the_traffic(tiny_model_dir: Path, cache_dir: Path) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, metrics_port=free_port())
    async with running_server(settings) as running:
        port = running.server.metrics_port
        before = await asyncio.to_thread(scrape, port)
        assert before[("llm_stream_ready", ())] == 1
        assert before[("llm_stream_generations_running", ())] == 0
        assert before[("llm_stream_generations_waiting", ())] == 0

        tokens = await collect_stream(running.stub, prompt_request("Hello world", max_tokens=7))
        batch = await running.stub.BatchPredict(
            pb.BatchPredictRequest(requests=[prompt_request("a", max_tokens=3)] * 2)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.Predict(prompt_request(None))

        # Records are published before the final message or batch response is sent.
        after = await asyncio.to_thread(scrape, port)

        def grew(name: str, labels: tuple[tuple[str, str], ...]) -> float:
            return after[(name, labels)] - before.get((name, labels), 0.0)

        model = (("model", "tiny"),)
        finals = [tokens[-1]] + [r.response for r in batch.results]
        generated = sum(f.usage.completion_tokens for f in finals)
        assert grew("llm_stream_generated_tokens_total", model) == generated
        for reason in {f.finish_reason for f in finals}:
            name = pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()
            labels = (("finish_reason", name), ("model", "tiny"))
            expected = sum(f.finish_reason == reason for f in finals)
            assert grew("llm_stream_generations_total", labels) == expected
        assert grew("llm_stream_time_to_first_token_seconds_count", model) == 3
        # Every token after a sequence's first is one inter-token gap.
        assert grew("llm_stream_inter_token_latency_seconds_count", model) == generated - 3
        assert grew("llm_stream_batch_rows_count", model) > 0
        assert grew("llm_stream_generation_duration_seconds_count", model) == 3
        assert after[("llm_stream_rejected_requests_total", (("code", "INVALID_ARGUMENT"),))] == 1

        await running.server.drain(grace_s=0)
        # Draining closes the endpoint with the server.
        with pytest.raises(OSError):
            await asyncio.to_thread(scrape, port)


def test_metrics_are_off_by_default(tiny_model_dir: Path, cache_dir: Path) -> None:
    assert tiny_settings(tiny_model_dir, cache_dir).metrics_port == 0
