"""BatchPredict: items join one batch together, results in request order, per-item errors."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from llm_stream.app import load_configured_models
from llm_stream.engine.types import FinishReason, ModelBackend, StepPlan, StepRunner
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.settings import Settings
from tests.conftest import (
    RunningServer,
    collect_stream,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.wrapped_backend import RunnerWrapper, WrappedBackend, slow_models

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def batch_of(*requests: pb.PredictRequest) -> pb.BatchPredictRequest:
    return pb.BatchPredictRequest(requests=list(requests))


def with_id(
    request: pb.PredictRequest, request_id: str = "", model_id: str = ""
) -> pb.PredictRequest:
    request.request_id = request_id
    request.model_id = model_id
    return request


@dataclasses.dataclass
class StepCounts:
    # Per prefill call, the sequences it fed; and the number of decode steps.
    prefills: list[int] = dataclasses.field(default_factory=list)
    decodes: int = 0


class CountingRunner(RunnerWrapper):
    def __init__(self, inner: StepRunner, counts: StepCounts) -> None:
        super().__init__(inner)
        self.counts = counts

    def launch(self, plan: StepPlan) -> None:
        if plan.prefill:
            self.counts.prefills.append(len(plan.prefill))
        if plan.decode:
            self.counts.decodes += 1
        self.inner.launch(plan)


@pytest.fixture(scope="module")
async def counted_server(
    tiny_model_dir: Path, cache_dir: Path
) -> AsyncIterator[tuple[RunningServer, StepCounts]]:
    """The real tiny model, with every prefill and decode step counted."""
    counts = StepCounts()

    def load(settings: Settings) -> list[ModelBackend]:
        return [
            WrappedBackend(backend, lambda runner: CountingRunner(runner, counts))
            for backend in load_configured_models(settings)
        ]

    settings = tiny_settings(tiny_model_dir, cache_dir, max_batch_size=8)
    async with running_server(settings, load_models=load) as running:
        yield running, counts


async def test_batch_items_share_prefill_and_decode_steps(
    counted_server: tuple[RunningServer, StepCounts],
) -> None:
    running, counts = counted_server
    prompts = ["Hello world", "The quick brown fox jumps over the lazy dog.", "日本語", "a"]
    ids = [f"row-{i}" for i in range(len(prompts))]
    tokens = 6
    finished_before = len(running.server.engine.finished)
    counts.prefills.clear()
    counts.decodes = 0
    response = await running.stub.BatchPredict(
        batch_of(
            *(
                with_id(prompt_request(p, max_tokens=tokens), i)
                for p, i in zip(prompts, ids, strict=True)
            )
        )
    )
    assert [r.response.request_id for r in response.results] == ids
    # All four join the batch together: one prefill step, then shared decode steps
    # (at most max_tokens - 1 of them, where one at a time would take four times that).
    assert counts.prefills == [4]
    assert counts.decodes <= tokens - 1
    finished = list(running.server.engine.finished)[finished_before:]
    rows = [f for f in finished if f.request_id in ids]
    assert sorted(f.request_id for f in rows) == ids
    assert all(f.first_token_s is not None and f.completion_tokens > 0 for f in rows)

    counts.prefills.clear()
    await running.stub.Predict(prompt_request("Hello world", max_tokens=2))
    assert counts.prefills == [1]  # Predict goes through the same scheduler


async def test_batch_groups_per_model_and_leaves_bad_items_out(
    counted_server: tuple[RunningServer, StepCounts],
) -> None:
    running, counts = counted_server
    counts.prefills.clear()
    response = await running.stub.BatchPredict(
        batch_of(
            prompt_request("one", max_tokens=3),
            with_id(prompt_request("two", max_tokens=3), model_id="nope"),
            prompt_request("three", max_tokens=3, temperature=-1),
            prompt_request("four", max_tokens=3),
        )
    )
    outcomes = [r.WhichOneof("outcome") for r in response.results]
    assert outcomes == ["response", "error", "error", "response"]
    assert counts.prefills == [2]  # the bad items never reach the model


async def test_batch_rows_equal_predict_for_identical_prompts(tiny_server: RunningServer) -> None:
    request = prompt_request("Hello world", max_tokens=30)
    unary = await tiny_server.stub.Predict(request)
    batch = await tiny_server.stub.BatchPredict(batch_of(*[request] * 4))
    assert [r.response.text for r in batch.results] == [unary.text] * 4
    assert unary.text


async def test_batch_rows_equal_predict_for_equal_length_prompts(
    tiny_server: RunningServer,
) -> None:
    prompts = ["Hello world", "quick fox", "Bonjour le", "jumps over"]
    unary = [await tiny_server.stub.Predict(prompt_request(p, max_tokens=30)) for p in prompts]
    lengths = {u.usage.prompt_tokens for u in unary}
    assert len(lengths) == 1, "the prompts must tokenize to the same length"
    batch = await tiny_server.stub.BatchPredict(
        batch_of(*(prompt_request(p, max_tokens=30) for p in prompts))
    )
    assert [r.response.text for r in batch.results] == [u.text for u in unary]
    assert len({u.text for u in unary}) == len(prompts)  # different prompts, different texts


async def test_left_padding_keeps_short_prompts_right(tiny_server: RunningServer) -> None:
    """Unequal lengths: padded rows start exactly like their unpadded generation.

    Padding changes the float arithmetic a little, so on random weights a long
    generation may drift at a near tie; the first tokens must agree, which a
    missing attention mask or right padding would break at once.
    """
    prompts = ["a", "Hello world", "The quick brown fox jumps over the lazy dog."]
    batch = await tiny_server.stub.BatchPredict(
        batch_of(*(prompt_request(p, max_tokens=20) for p in prompts))
    )
    for prompt, result in zip(prompts, batch.results, strict=True):
        tokens = await collect_stream(tiny_server.stub, prompt_request(prompt, max_tokens=20))
        head = "".join(t.token for t in tokens[:8])
        assert head
        assert result.response.text.startswith(head), prompt
        assert result.response.usage.prompt_tokens == tokens[-1].usage.prompt_tokens


async def test_results_keep_request_order_with_per_item_settings(
    tiny_server: RunningServer,
) -> None:
    base = await tiny_server.stub.Predict(prompt_request("Hello world", max_tokens=40))
    stop = base.text[10:13]
    assert len(stop) == 3 and stop in base.text
    requests = [
        with_id(prompt_request("Hello world", max_tokens=40, stop=[stop]), "stops"),
        with_id(prompt_request("Hello world", max_tokens=1), "one"),
        with_id(prompt_request("Hello world", max_tokens=7), "seven"),
        with_id(prompt_request("Hello world", max_tokens=40), "plain"),
    ]
    batch = await tiny_server.stub.BatchPredict(batch_of(*requests))
    got = [r.response for r in batch.results]
    assert [g.request_id for g in got] == ["stops", "one", "seven", "plain"]

    assert got[0].text == base.text[: base.text.index(stop)]
    assert got[0].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    for response, count in ((got[1], 1), (got[2], 7)):
        assert response.finish_reason == pb.FINISH_REASON_LENGTH
        assert response.usage.completion_tokens == count
        assert base.text.startswith(response.text)
    assert got[3].text == base.text
    assert got[3].usage == base.usage
    for response in got:
        assert response.predictions["prompt_tokens"] == response.usage.prompt_tokens == 3
        assert response.predictions["completion_tokens"] == response.usage.completion_tokens
        assert response.model_version == base.model_version
        assert response.latency_ms > 0


async def test_bad_items_become_their_own_errors(tiny_server: RunningServer) -> None:
    missing_prompt = prompt_request(None, max_tokens=3)
    requests = [
        with_id(prompt_request("Hello world", max_tokens=5), "ok-1"),
        with_id(prompt_request("Hello world", max_tokens=5), "unknown-model", "no-such-model"),
        with_id(prompt_request("Hello world", max_tokens=5, top_p=1.5), "bad-config"),
        with_id(missing_prompt, "no-prompt"),
        with_id(prompt_request("Hello world " * 2100, max_tokens=5), "too-long"),
        with_id(prompt_request("Bonjour", max_tokens=5), "ok-2"),
    ]
    batch = await tiny_server.stub.BatchPredict(batch_of(*requests))
    results = batch.results
    assert len(results) == len(requests)

    ok_1, unknown, bad_config, no_prompt, too_long, ok_2 = results
    for result, prompt, request_id in ((ok_1, "Hello world", "ok-1"), (ok_2, "Bonjour", "ok-2")):
        assert result.WhichOneof("outcome") == "response"
        assert result.response.request_id == request_id
        unary = await tiny_server.stub.Predict(prompt_request(prompt, max_tokens=5))
        assert result.response.text == unary.text

    expectations = [
        (unknown, NOT_FOUND, ("'no-such-model'", "serves: tiny")),
        (bad_config, INVALID_ARGUMENT, ("top_p", "(0, 1]")),
        (no_prompt, INVALID_ARGUMENT, ("features['prompt']", "missing")),
        (too_long, INVALID_ARGUMENT, ("tokens of context", "shorten the prompt")),
    ]
    for result, code, fragments in expectations:
        assert result.WhichOneof("outcome") == "error"
        for fragment in fragments:
            assert fragment in result.error.message
        assert result.error.code == code, result.error.message
        assert "Traceback" not in result.error.message


async def test_request_ids_echoed_or_generated(tiny_server: RunningServer) -> None:
    batch = await tiny_server.stub.BatchPredict(
        batch_of(
            with_id(prompt_request("Hello", max_tokens=2), "mine"),
            prompt_request("Hello", max_tokens=2),
            prompt_request("Hello", max_tokens=2),
            with_id(prompt_request(None), ""),
        )
    )
    ids = [r.response.request_id for r in batch.results[:3]]
    assert ids[0] == "mine"
    assert len(ids[1]) >= 16 and len(ids[2]) >= 16 and ids[1] != ids[2]
    assert batch.results[3].WhichOneof("outcome") == "error"  # still in its place


async def test_too_many_requests_is_invalid_argument(tiny_server: RunningServer) -> None:
    limit = tiny_server.server.settings.max_batch_size
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await tiny_server.stub.BatchPredict(
            batch_of(*[prompt_request("Hello", max_tokens=1)] * (limit + 1))
        )
    details = raised.value.details() or ""
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"{limit + 1} requests" in details and f"at most {limit}" in details
    assert "split" in details

    exactly = await tiny_server.stub.BatchPredict(
        batch_of(*[prompt_request("Hello", max_tokens=1)] * limit)
    )
    assert [r.WhichOneof("outcome") for r in exactly.results] == ["response"] * limit


async def test_empty_batch_is_an_empty_answer(tiny_server: RunningServer) -> None:
    response = await tiny_server.stub.BatchPredict(pb.BatchPredictRequest())
    assert list(response.results) == []


async def test_overload_in_one_model_group_stops_the_other_groups(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    """A multi-model batch refused for one model must not keep generating for another."""
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        models=(f"a={tiny_model_dir}", f"b={tiny_model_dir}"),
        max_concurrent=1,
        max_queue=0,
    )
    async with running_server(settings, load_models=slow_models(0.01)) as running:
        other_b = with_id(prompt_request("Hello world", max_tokens=3500), "other-b", "b")
        long_a = with_id(prompt_request("Hello world", max_tokens=3500), "long-a", "a")
        second_a = with_id(prompt_request("Hello world", max_tokens=3500), "second-a", "a")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await running.stub.BatchPredict(batch_of(other_b, long_a, second_a))
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        record = await running.server.engine.wait_finished("other-b", 30)
        assert record.finish_reason is FinishReason.CANCELLED
        assert record.completion_tokens < 3500
        assert all(
            r.request_id not in {"long-a", "second-a"} for r in running.server.engine.finished
        )
        response = await running.stub.Predict(prompt_request("again", max_tokens=2))
        assert response.usage.completion_tokens > 0
